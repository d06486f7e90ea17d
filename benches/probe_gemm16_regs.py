"""Probe (H200): ``kernels/gemm16_regs_gluon.py`` (the weight decoded in registers into the
``wgmma``'s left operand, the activations its right one) for a prompt's worth of rows, against
cuBLAS on the bf16 weight, decode + cuBLAS (the route past 64 rows) and ``gemm16_gluon.py``
(the weight decoded into shared memory, opt-in), per shape, row count and configuration.

    OUT=DIR python3 benches/probe_gemm16_regs.py [--rows 128,256] [--shapes 8192x8192,...]
        [--encodings int4-affine-g64,...] [--configs f128s4,f64s3x,...] [--repeat 4]
        [--dtype bf16|fp16]

Checks first, for each configuration: against decode + ``F.linear`` in fp32 (relative error <
2e-2, reported), and bit for bit against the same configuration with no product in flight
(``pending`` 0: the same sums in the same order), ``--repeat`` times each: a product reading
registers the next step's decode had overwritten would differ. Times: us per call inside a CUDA
graph over enough weight copies to overflow L2 (``bench_gpu_gemv_sweep.Case``).

``--ncu``: only three calls of each configuration, no checks or timing, for a profiler:
``ncu -k regex:gemm16_regs ... python3 benches/probe_gemm16_regs.py --ncu --rows 256 ...``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import Report, cli_value  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.linear import linear_dequantize  # noqa: E402

REPORT = Report()
say = REPORT.say
R = L.Gemm16RegsConfig


def parse(spec: str) -> L.Gemm16RegsConfig:
    """``f128s4``: 128 features a program, 4 stages, the scales loaded a step ahead, the weight
    decoded in 16-bit pairs; suffixes: ``t`` the scales by TMA in the ring (``t16``: 16 groups
    a copy), ``x`` decoded through fp32 (as the dequantize kernel)."""
    m = re.fullmatch(r"f(\d+)s(\d+)(t(16)?)?(x)?(k(\d+))?", spec)
    if not m:
        raise SystemExit(f"bad configuration {spec!r}: f<features>s<stages>[t|t16][x][k<n>]")
    return R(block_f=int(m[1]), stages=int(m[2]), scales_tma=bool(m[3]),
             scale_box=16 if m[4] else 8, packed=not m[5],
             split_k=int(m[7]) if m[6] else 1)  # fmt: skip


def slices(x, case, cfg) -> str:
    """After a split-K call: each K slice's partial sums in the workspace against x times the
    weight over that slice (fp32), as relative errors."""
    M, K, N = x.shape[0], case.K, case.N
    split, k_steps = L.gemm16_regs_split(M, N, K, cfg, x.device)
    # the launcher's buffer is its row bucket's; slice k at k * M * N
    ws = L._workspace(x.device, (split, L.gemm16_rows(M), N)).view(-1)[: split * M * N]
    ws = ws.view(split, M, N)
    errs = []
    for k in range(split):
        lo, hi = k * k_steps * 64, min(K, (k + 1) * k_steps * 64)
        want = F.linear(x[:, lo:hi].float(), case.ref_w[:, lo:hi])
        errs.append(f"{S.rel_err(ws[k], want):.1e}")
    return f"slices {split} x {k_steps} steps, partials' rel err {' '.join(errs)}"


def regs(cfg):
    def run(x, w: S.Weight):
        name, _, g = w.enc
        return L.gemm16_regs_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)

    return run


def gemm16(x, w: S.Weight):
    name, _, g = w.enc
    cfg = L.gemm16_config(x.shape[0], w.N, w.K)
    return L.gemm16_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)


def decode_cublas(x, w: S.Weight):
    return linear_dequantize(x, *w.args[:3], None, *w.args[3:])


def main() -> None:
    rows = [int(r) for r in cli_value("--rows", "128,200,256").split(",")]
    shapes = [(8192, 8192), (14336, 4096), (4096, 14336), (4096, 4096), (11264, 2048)]
    if "--shapes" in sys.argv:
        shapes = [tuple(int(d) for d in s.split("x")) for s in cli_value("--shapes", "").split(",")]
    encs = cli_value("--encodings", "int4-affine-g64").split(",")
    specs = cli_value("--configs", "f128s4,f128s3,f64s3,f64s4").split(",")
    repeat = int(cli_value("--repeat", "4"))
    if cli_value("--dtype", "bf16") == "fp16":  # the activations' (and cuBLAS's weight's) dtype
        S.DT = torch.float16
    say(f"# gemm16_regs probe, {torch.cuda.get_device_name()}, torch {torch.__version__},"
        f" {S.DT}; us per call in a CUDA graph; x: cuBLAS's time / ours")  # fmt: skip
    t0 = time.perf_counter()
    for ename in encs:
        for N, K in shapes:
            case = S.Case(ename, N, K)
            for M in rows:
                x = case.x(M)
                if "--ncu" in sys.argv:
                    for spec in specs:
                        for _ in range(3):
                            regs(parse(spec))(x, case.ws[0])
                    torch.cuda.synchronize()
                    continue
                ref = F.linear(x.float(), case.ref_w)
                fns = {"decode+cuBLAS": decode_cublas, "gemm16": gemm16}
                for spec in specs:
                    cfg = parse(spec)
                    fn = regs(cfg)
                    try:
                        got = fn(x, case.ws[0])
                        err = S.rel_err(got, ref)
                        check = regs(dataclasses.replace(cfg, pending=0))
                        same = all(
                            torch.equal(check(x, case.ws[0]), got)
                            and torch.equal(fn(x, case.ws[0]), got)
                            for _ in range(repeat)
                        )
                    except Exception as exc:  # a configuration the shape cannot take
                        say(f"  {ename} {N}x{K} M{M} {spec}: {type(exc).__name__}: {exc}"[:300])
                        continue
                    verdict = "ok" if err < S.TOL and same else "WRONG"
                    say(f"  {ename} {N}x{K} M{M} {spec}: rel err {err:.2e}, same bits as"
                        f" pending 0 x{repeat}: {same} -> {verdict}")  # fmt: skip
                    if verdict != "ok" and cfg.split_k != 1:
                        fn(x, case.ws[0])
                        say(f"    {slices(x, case, cfg)}")
                    if verdict == "ok":
                        fns[spec] = fn
                ok = {}
                for name, fn in fns.items():
                    if name in specs:
                        ok[name] = fn
                        continue
                    try:
                        if S.rel_err(fn(x, case.ws[0]), ref) < S.TOL:
                            ok[name] = fn
                    except Exception as exc:
                        say(f"  {name}: {type(exc).__name__}: {exc}"[:200])
                cub = case.cublas_us(x)
                times = {name: case.time(fn, M) for name, fn in ok.items()}
                cells = " | ".join(f"{k} {v:.1f} ({cub / v:.2f}x)" for k, v in times.items())
                say(f"{ename:16} {N:>5}x{K:<5} M{M:<4} cuBLAS {cub:7.1f} | {cells}")
                torch.cuda.empty_cache()
            del case
    say(f"# {time.perf_counter() - t0:.0f} s")
    REPORT.write("probe_gemm16_regs", {})


if __name__ == "__main__":
    main()
