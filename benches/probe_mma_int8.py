"""Probe (H200): the int8 tensor-core kernel ``kernels/mma_int8.py`` ("W4A8": activations rounded
to int8 per row and group) against cuBLAS bf16 and ``mma.py`` (the kernel routed for 5-64 rows
now), CUDA-graph timed over enough weight copies to overflow the L2 cache.

1. correctness, before any timing: the kernel against an independent float64 ``W x~`` (x rounded
   per (row, group) in torch, times the decoded weight) and against the exact product within
   the rounding's bound ``sum_k |W_nk| d(k) / 2``, every encoding, rows 5 / 16 / 17 / 64;
2. int4 affine g64, bf16 x, the issue's shapes, rows 5 / 8 / 16 / 32 / 64: cuBLAS ``F.linear``,
   ``mma.py`` at its routed config, the int8 kernel at its shipped config ("int8":
   ``MMA_INT8_TABLE``'s entry, else ``MMA_INT8_DEFAULT``) and a config sweep
   (features and groups a program, K-slices, stages; ``--budget`` seconds), the pre-pass alone;
   speedups over cuBLAS and over ``mma.py``;
3. symmetric g64 and affine g128 (and fp16 x) at each shape's best config;
4. what to set: ``INT8_MMA_ROWS`` (the rows where the int8 kernel beat ``mma.py`` on every
   shape) and ``MMA_INT8_TABLE`` lines (where the sweep's best beat the shipped config by 3%).

    OUT=DIR python3 benches/probe_mma_int8.py [--budget S]   # ~4 minutes on an H200
    python3 benches/probe_mma_int8.py --smoke                # CPU, Triton interpreter, tiny
"""

from __future__ import annotations

import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402  (sets TRITON_INTERPRET for --smoke first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.kernels.mma_int8 import quantize_kernel  # noqa: E402

BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 150.0
ROWS = [5, 8, 16, 32, 64] if not S.SMOKE else [5, 17]
CHECK_ROWS = [5, 16, 17, 64] if not S.SMOKE else [5, 17]
SHAPES = S.SHAPES
ENCODINGS = ["int4-affine-g64", "int4-sym-g64", "int4-affine-g128"]
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"check": [], "sweep": [], "encodings": []}


def configs(M: int) -> list[L.MmaConfig]:
    C = L.MmaConfig
    if S.SMOKE:
        return [C(0, 64, 1, 0, 4, 1), C(0, 128, 2, 2, 4, 1)]
    out = []
    for bn, groups, split, stages in [(128, 2, 0, 3), (128, 4, 0, 3), (128, 1, 0, 3),
                                      (64, 4, 0, 3), (64, 2, 0, 3), (64, 4, 0, 2),
                                      (128, 2, 4, 3), (128, 4, 4, 3), (128, 2, 2, 3)]:  # fmt: skip
        out.append(C(0, bn, groups, split, 4, stages))
    return out


def int8(x, w, cfg=None):
    name, _bits, g = w.enc
    return L.mma_int8_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)


def mma(x, w):
    name, _bits, g = w.enc
    cfg = L.mma_config(x.shape[0], w.N, w.K, g)
    return L.mma_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)


def rounded(x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x~ (float64) and d per activation: each (row, group) rounded to ``q * d``,
    ``d = max(max|x|, 1e-30) / 127``, q ties to even (torch ops, not the kernel's code)."""
    M, K = x.shape
    xf = x.float().reshape(M, K // g, g)
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    d = amax * torch.tensor(1.0 / 127.0, device=x.device)
    xt = torch.round(xf * (torch.tensor(127.0, device=x.device) / amax)) * d
    return xt.reshape(M, K).double(), d.expand(M, K // g, g).reshape(M, K).double()


def bound_excess(x: torch.Tensor, w: torch.Tensor, got: torch.Tensor, g: int, bias=None) -> float:
    """The largest excess of ``got`` over the activations' rounding bound (x rounded per row and
    group of ``g``) of the exact product with the float64 weight ``w``, relative to the largest
    |exact| (<= 0: within), half a bf16 ulp of each value allowed for the output's rounding."""
    shift = 0.0 if bias is None else bias.double()
    _xt, d = rounded(x, g)
    exact = x.double() @ w.T + shift
    bound = (d / 2) @ w.abs().T
    over = (got.double() - exact).abs() - bound * (1 + 1e-3) - exact.abs() * 2.0**-8
    return (over.max() / exact.abs().max()).item()


def check(case: S.Case, M: int, cfg=None, dtype=S.DT) -> tuple[float, float]:
    """(error against float64 ``W x~`` relative to its largest value, the largest excess over
    the rounding bound against the exact product, relative to the largest |exact|)."""
    x = case.x(M).to(dtype)
    got = int8(x, case.ws[0], cfg).double()
    w = case.ref_w.double()
    xt, d = rounded(x, case.ws[0].enc[2])
    ref = xt @ w.T
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    exact = x.double() @ w.T
    bound = (d / 2) @ w.abs().T
    # bf16 output: half an ulp of each value
    excess = (got - exact).abs() - bound * (1 + 1e-3) - exact.abs() * 2.0**-8
    return err, (excess.max() / exact.abs().max()).item()


def section_check() -> bool:
    say("## correctness: int8 kernel vs float64 W x~ (rel err) and the rounding bound (excess)")
    ok = True
    for ename in ENCODINGS:
        for N, K in SHAPES[:2] if not S.SMOKE else SHAPES:
            case = S.Case(ename, N, K)
            for M in CHECK_ROWS:
                err, excess = check(case, M)
                good = err <= 1e-2 and excess <= 0
                ok &= good
                RESULTS["check"].append(dict(enc=ename, N=N, K=K, M=M, err=err, excess=excess))
                say(
                    f"{ename:<17} {N:>5}x{K:<5} M={M:<3} rel err {err:.2e} excess {excess:+.1e}"
                    f" {'ok' if good else 'FAIL'}"
                )
            del case
    return ok


def label(c: L.MmaConfig) -> str:
    split = f"/k{c.split_k}" if c.split_k else ""
    return f"n{c.block_n}/g{c.groups}/{c.num_warps}w/{c.num_stages}s{split}"


def timed(case: S.Case, M: int, cfg) -> tuple[float, str]:
    try:
        err, excess = check(case, M, cfg)
        if not (err <= 1e-2 and excess <= 0):
            return math.inf, f"WRONG (rel err {err:.1e}, excess {excess:.1e})"
        return case.time(lambda x, w: int8(x, w, cfg), M), ""
    except Exception as exc:  # a config the compiler refuses (shared memory, registers)
        return math.inf, f"{type(exc).__name__}: {str(exc)[:80]}"


def prepass_us(case: S.Case, M: int) -> float:
    """The pre-pass alone (``quantize_kernel`` into the call's workspaces)."""
    x = case.x(M)
    w = case.ws[0]
    g = w.enc[2]
    MP, (grid, meta, _key), *_ = L._mma_int8_plan(
        M, w.N, w.K, w.enc[0], g, False, L._device_index(x.device), None, True
    )
    G = w.K // g
    xq = torch.empty((MP, w.K), dtype=torch.int8, device=x.device)
    xs = torch.empty((2, G, MP), dtype=torch.float32, device=x.device)
    args = (x, xq, xs, M, MP, w.K, G, x.stride(0))
    return S.graph_us([lambda: quantize_kernel[grid](*args, **meta)] * 8)


def sweep(gbps: float) -> dict:
    say()
    say("## int4-affine-g64, bf16 x: us per call (CUDA graph); x: speedup of the int8 kernel")
    say(
        f"{'shape':>11} {'M':>3} | {'cublas':>7} {'mma.py':>7} {'pre':>5} | {'int8':>7} "
        f"{'best':>7} {'x cub':>5} {'x mma':>5} {'hbm':>4} | best config (then the next)"
    )
    best: dict = {}
    for N, K in SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in ROWS:
            x = case.x(M)
            cub = case.cublas_us(x, 8)
            old = case.time(mma, M)
            pre = prepass_us(case, M)
            dflt, why = timed(case, M, None)
            bucket = next((b for b in L.BATCH_BUCKETS if M <= b), L.BATCH_BUCKETS[-1])
            shipped = L.MMA_INT8_TABLE.get((bucket, N, K)) or L.MMA_INT8_DEFAULT
            cells = [(dflt, shipped, why)]
            if time.perf_counter() - T0 < BUDGET_S:
                for cfg in configs(M):
                    if cfg != shipped:
                        us, why = timed(case, M, cfg)
                        cells.append((us, cfg, why))
            base = next((u for u, c, _ in cells if c == L.MMA_INT8_DEFAULT), dflt)
            cells.sort(key=lambda c: c[0])
            us, cfg, _ = cells[0]
            nxt = ", ".join(f"{label(c)} {u:.1f}" for u, c, _ in cells[1:3] if u < math.inf)
            bound = case.bound_us(M, gbps)
            say(
                f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {pre:5.1f} | {dflt:7.1f} "
                f"{us:7.1f} {cub / us:5.2f} {old / us:5.2f} {bound / us:4.0%} | "
                f"{label(cfg)} ({nxt})"
            )
            for _us, c, w in cells:
                if w:
                    say(f"      refused/wrong: {label(c)}: {w}")
            best[(M, N, K)] = (cfg, us)
            row = dict(N=N, K=K, M=M, cublas=cub, mma=old, prepass=pre, int8_shipped=dflt)
            row["int8_default_config"] = base
            RESULTS["sweep"].append(dict(row, int8_best=us, config=label(cfg), bound=bound))
        del case
        if not S.SMOKE:
            torch.cuda.empty_cache()
    return best


def encodings(best: dict) -> None:
    say()
    say("## the other encodings at the sweep's best config (bf16 x; fp16 x for affine g64)")
    say(f"{'encoding':<22} {'shape':>11} {'M':>3} | {'cublas':>7} {'mma.py':>7} {'int8':>7} "
        f"{'x cub':>5} {'x mma':>5}")  # fmt: skip
    for ename in ("int4-sym-g64", "int4-affine-g128", "int4-affine-g64/fp16"):
        for N, K in SHAPES[:4] if not S.SMOKE else SHAPES:
            if time.perf_counter() - T0 > BUDGET_S * 1.5:
                say("(budget spent)")
                return
            case = S.Case(ename.split("/")[0], N, K)
            fp16 = ename.endswith("/fp16")
            for M in (8, 16, 32) if not S.SMOKE else (17,):
                cfg = best.get((M, N, K), (L.MMA_INT8_DEFAULT, 0))[0]
                x = case.x(M)
                dense = case.dense[:8]
                if fp16:
                    x = x.half()
                    dense = [d.half() for d in dense]
                cub = S.graph_us([lambda d=d, x=x: F.linear(x, d) for d in dense])
                dt = torch.float16 if fp16 else S.DT
                old = case.time(lambda x_, w, dt=dt: mma(x_.to(dt), w), M)
                err, excess = check(case, M, cfg, dt)
                ok = err <= 1e-2 and excess <= 0
                run = lambda x_, w, c=cfg, dt=dt: int8(x_.to(dt), w, c)  # noqa: E731
                us = case.time(run, M) if ok else math.inf
                say(
                    f"{ename:<22} {N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {us:7.1f} "
                    f"{cub / us:5.2f} {old / us:5.2f}" + ("" if ok else f"  WRONG {err:.1e}")
                )
                RESULTS["encodings"].append(
                    dict(enc=ename, N=N, K=K, M=M, cublas=cub, mma=old, int8=us, err=err)
                )
            del case


def advice(best: dict) -> None:
    say()
    say("## what to set")
    wins = {}
    for (M, N, K), (_cfg, us) in best.items():
        row = next(r for r in RESULTS["sweep"] if (r["M"], r["N"], r["K"]) == (M, N, K))
        wins.setdefault(M, []).append(row["mma"] / us)
    good = [M for M in sorted(wins) if min(wins[M]) > 1.0]
    for M in sorted(wins):
        say(f"rows {M:>3}: int8 / mma.py speedup min {min(wins[M]):.2f} max {max(wins[M]):.2f}")
    say(f"routing: INT8_MMA_ROWS = {(min(good), max(good)) if good else None}  (rows won on every"
        " shape: check they are contiguous)")  # fmt: skip
    for (M, N, K), (cfg, us) in sorted(best.items()):
        row = next(r for r in RESULTS["sweep"] if (r["M"], r["N"], r["K"]) == (M, N, K))
        # MMA_INT8_TABLE's keys are batch buckets: lines at the rows of one, > 3% faster than
        # MMA_INT8_DEFAULT
        base = row["int8_default_config"]
        if M in L.BATCH_BUCKETS and cfg != L.MMA_INT8_DEFAULT and us < base / 1.03:
            say(f"table: ({M}, {N}, {K}): {cfg}  # {us:.1f} against {base:.1f}")


def main() -> int:
    dev = "CPU (interpreter)" if S.SMOKE else torch.cuda.get_device_name()
    gbps = S.copy_gbps()
    say(f"# probe_mma_int8 on {dev}; copy {gbps:.0f} GB/s; budget {BUDGET_S:.0f} s")
    if not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_mma_int8", RESULTS)
        return 1
    best = sweep(gbps)
    encodings(best)
    advice(best)
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_mma_int8", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
