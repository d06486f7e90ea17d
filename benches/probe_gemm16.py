"""Probe (H200): ``kernels/gemm16_gluon.py`` (each weight tile decoded into 16 bits in shared
memory, asynchronous ``wgmma``) for many rows, against cuBLAS bf16 and the route it replaces
(decode + cuBLAS past 64 rows), per shape, row count and configuration.

    OUT=DIR python3 benches/probe_gemm16.py [--rows 128,256,...] [--shapes 8192x8192,...]
        [--encodings int4-affine-g64,...] [--configs table|all] [--dtype bf16|fp16]

Before any timing every configuration is checked against decode + ``F.linear`` (bf16 output:
relative error < 2e-2, and reported) and dropped if wrong. Times are us per call inside a CUDA
graph over enough weight copies to overflow L2 (``bench_gpu_gemv_sweep.Case``), the median of 10
replays. Prints, per (encoding, shape, rows): cuBLAS, decode + cuBLAS, the op as routed without
gemm16 ("old route": the default) and with it ("routed": ``launch.use_gemm16()``), every
configuration, the best and its ratio to cuBLAS; then ``table`` lines for
``launch.GEMM16_TABLE``. ``--configs table``: the table's configurations only (the default: the
candidates below).
"""

from __future__ import annotations

import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

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
C = L.Gemm16Config
#: the candidates (block_m, block_n, wgmma warps; the rest by name), as the H200 sweeps of this
#: kernel narrowed them (``benches/results/gpu_gemm16_ws_h200.txt``)
ALL = [
    C(),
    C(split_k=2),
    C(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1),
    C(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1, split_k=2),
    C(128, 128, 4, decode_regs=104),
    C(128, 128, 4, decode_regs=104, split_k=2),
]
SHAPES_1B = [(2048, 2048), (256, 2048), (32000, 2048)]


def label(c: L.Gemm16Config) -> str:
    dec = f"{c.decode_groups}x{c.decode_warps}" if c.decode_groups > 1 else c.decode_warps
    split = f" k/{c.split_k}" if c.split_k > 1 else ""
    fma = " fma" if c.fuse else ""
    return (f"{c.block_m}x{c.block_n} {c.num_warps}+{dec}w r{c.stages}/{c.w_ring}"
            f" {c.decode_regs}reg{fma}{split}")  # fmt: skip


def gemm16(cfg):
    def run(x, w: S.Weight):
        name, _, g = w.enc
        return L.gemm16_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)

    return run


def decode_cublas(x, w: S.Weight):
    return linear_dequantize(x, *w.args[:3], None, *w.args[3:])


def routed_without_gemm16(x, w: S.Weight):
    L.use_gemm16(False)
    try:
        return S.routed(x, w)
    finally:
        L.use_gemm16()


def main() -> None:
    rows = [int(r) for r in cli_value("--rows", "16,32,64,128,256,512,1024,2048,4096").split(",")]
    shapes = S.SHAPES + SHAPES_1B
    if "--shapes" in sys.argv:
        shapes = [tuple(int(d) for d in s.split("x")) for s in cli_value("--shapes", "").split(",")]
    encs = cli_value("--encodings", "int4-affine-g64").split(",")
    L.use_gemm16()  # "routed": with gemm16 on (opt-in)
    configs = ALL
    if cli_value("--configs", "all") == "table":
        configs = list(dict.fromkeys(L.GEMM16_TABLE.values()))
    if cli_value("--dtype", "bf16") == "fp16":
        S.DT = torch.float16
    if SMOKE:  # the script's own check: tiny shapes, decode + cuBLAS only (no Gluon on CPU)
        rows, shapes, configs = [70], [(40, 128)], []
    gpu = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    say(f"# gemm16 probe, {gpu}, torch {torch.__version__}, {S.DT}; us per call in a CUDA graph")
    say("# x: speedup over cuBLAS (its time / ours); old route: the op without gemm16")
    best_rows: dict[tuple, tuple[str, float, float]] = {}
    t0 = time.perf_counter()
    for ename in encs:
        for N, K in shapes:
            case = S.Case(ename, N, K)
            for M in rows:
                x = case.x(M)
                ref = F.linear(x.float(), case.ref_w)
                fns = {"decode+cuBLAS": decode_cublas, "old route": routed_without_gemm16}
                fns["routed"] = S.routed
                fns.update({label(c): gemm16(c) for c in configs})
                cfg_of = {label(c): c for c in configs}
                ok = {}
                for name, fn in fns.items():
                    try:
                        err = S.rel_err(fn(x, case.ws[0]), ref)
                    except Exception as exc:  # a config the shape cannot take
                        say(f"  {ename} {N}x{K} M{M} {name}: {type(exc).__name__}: {exc}"[:200])
                        continue
                    if err < S.TOL:
                        ok[name] = fn
                        if name in cfg_of and M == rows[0]:
                            say(f"  {ename} {N}x{K} M{M} {name}: rel err {err:.2e}")
                    else:
                        say(f"  {ename} {N}x{K} M{M} {name}: WRONG, rel err {err:.3g}")
                cub = case.cublas_us(x)
                times = {name: case.time(fn, M) for name, fn in ok.items()}
                mine = {k: v for k, v in times.items() if k in cfg_of}
                best = min(mine, key=mine.get) if mine else None
                head = f"{ename:16} {N:>5}x{K:<5} M{M:<5} cuBLAS {cub:8.1f}"
                parts = [f"{k} {v:.1f}" for k, v in times.items() if k not in cfg_of]
                say(f"{head} | " + " | ".join(parts))
                ranked = sorted(((k, v) for k, v in times.items() if k in cfg_of),
                                key=lambda kv: kv[1])  # fmt: skip
                say("    " + "  ".join(f"[{k}] {v:.1f}" for k, v in ranked))
                if best is not None:
                    old = times.get("old route", float("nan"))
                    say(f"    best {best}: {mine[best]:.1f} us = {cub / mine[best]:.2f}x cuBLAS,"
                        f" {old / mine[best]:.2f}x the old route ({old:.1f});"
                        f" routed now {times.get('routed', float('nan')):.1f}")  # fmt: skip
                    best_rows[(ename, N, K, M)] = (best, mine[best], old)
                if not SMOKE:
                    torch.cuda.empty_cache()
            del case
    say(f"# {time.perf_counter() - t0:.0f} s")
    say("## table: the best configuration per (bucket, N, K) of the first encoding")
    for (ename, N, K, M), (best, us, old) in best_rows.items():
        if ename == encs[0]:
            say(f"table {M} {N} {K} {best} {us:.1f} old {old:.1f}")
    REPORT.write("probe_gemm16", {})


if __name__ == "__main__":
    main()
