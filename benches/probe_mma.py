"""Probe (H200): the tensor-core kernel ``kernels/mma.py`` (swap-AB, codes turned into 16-bit
floats by bits) against cuBLAS bf16 and the op as routed now, batches 1-64, CUDA-graph timed over
enough weight copies to overflow the L2 cache; a sweep of launch configs, then every 4-bit
encoding and fp16 activations at each shape's best config. Prints ``MMA_TABLE`` lines and the
batches where the kernel beats the current route.

    OUT=DIR python3 benches/probe_mma.py [--budget S]
    OUT=DIR python3 benches/probe_mma.py --routed-only   # cuBLAS against the op as routed
    OUT=DIR python3 benches/probe_mma.py --encoding nvfp4  # no sweep: one encoding, default config
    python3 benches/probe_mma.py --smoke          # CPU, Triton interpreter, tiny shapes
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

BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 240.0
BATCHES = [1, 2, 4, 8, 16, 32, 64] if not S.SMOKE else [1, 3, 17]
SHAPES = S.SHAPES
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"sweep": [], "encodings": []}


ROUTED_ONLY = "--routed-only" in sys.argv  # no config sweep: cuBLAS against the op as routed
ONLY = sys.argv[sys.argv.index("--encoding") + 1] if "--encoding" in sys.argv else None


def configs(M: int) -> list[L.MmaConfig]:
    C = L.MmaConfig
    if ROUTED_ONLY:
        return []
    if S.SMOKE:
        return [C(0, 16, 1, 0, 4, 1), C(0, 32, 2, 0, 4, 1)]
    bm = max(16, 1 << (M - 1).bit_length())
    out = []
    for bn, groups, warps, stages in [
        (64, 1, 4, 3),
        (64, 2, 4, 3),
        (64, 4, 4, 2),
        (128, 1, 4, 3),
        (128, 2, 4, 3),
        (128, 1, 4, 4),
        (128, 1, 8, 3),
        (256, 1, 8, 3),
    ]:
        out.append(C(bm, bn, groups, 0, warps, stages))
    return out


def mma(x, w, cfg):
    name, _bits, g = w.enc
    return L.mma_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg)


def timed(case, M, cfg) -> tuple[float, str]:
    try:
        err = case.check(lambda x, w: mma(x, w, cfg), M)
        if not err <= S.TOL:
            return math.inf, f"WRONG (rel err {err:.2e})"
        return case.time(lambda x, w: mma(x, w, cfg), M), ""
    except Exception as exc:  # a config the compiler refuses (shared memory, registers)
        return math.inf, f"{type(exc).__name__}: {str(exc)[:80]}"


def label(c: L.MmaConfig) -> str:
    return f"m{c.block_m}/n{c.block_n}/g{c.groups}/{c.num_warps}w/{c.num_stages}s"


def sweep(gbps: float) -> dict:
    say("## int4-affine-g64, bf16 x: us per call (CUDA graph); x = speedup over cuBLAS bf16")
    say(
        f"{'shape':>11} {'M':>3} | {'cublas':>7} {'routed':>7} | {'mma best':>8} {'x':>5} "
        f"{'hbm':>4} | config (then the next best)"
    )
    best: dict = {}
    case_name = "int4-affine-g64"
    for N, K in SHAPES:
        case = S.Case(case_name, N, K)
        for M in BATCHES:
            if time.perf_counter() - T0 > BUDGET_S:
                say(f"(budget of {BUDGET_S:.0f} s spent: the sweep stops at {N}x{K} M={M})")
                return best
            x = case.x(M)
            cub = case.cublas_us(x, 8)
            rt = case.time(S.routed, M)
            cells = []
            for cfg in configs(M):
                us, why = timed(case, M, cfg)
                cells.append((us, cfg, why))
            cells.sort(key=lambda c: c[0])
            us, cfg, _ = cells[0] if cells else (rt, L.mma_config(M, N, K, 64), "")
            bound = case.bound_us(M, gbps)
            nxt = ", ".join(f"{label(c)} {u:.1f}" for u, c, _ in cells[1:3] if u < math.inf)
            bad = [f"{label(c)}: {w}" for u, c, w in cells if w]
            say(
                f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {rt:7.1f} | {us:8.1f} {cub / us:5.2f} "
                f"{bound / us:4.0%} | {label(cfg)} ({nxt})"
            )
            for b in bad[:2]:
                say(f"      refused/wrong: {b}")
            best[(M, N, K)] = cfg
            RESULTS["sweep"].append(
                dict(N=N, K=K, M=M, cublas=cub, routed=rt, mma=us, config=label(cfg), bound=bound)
            )
        del case
        torch.cuda.empty_cache() if not S.SMOKE else None
    return best


def encodings(best: dict) -> None:
    say()
    say("## every 4-bit encoding at the sweep's best config (bf16 x; fp16 x for affine g64)")
    cols = f"{'cublas':>7} {'routed':>7} {'mma':>7} {'x':>5}"
    say(f"{'encoding':<17} {'shape':>11} {'M':>3} | {cols}")
    names = ("int4-sym-g64", "int4-affine-g128", "mxfp4", "nvfp4", "int4-affine-g64/fp16")
    if ROUTED_ONLY:
        names = ("int4-sym-g64", "mxfp4", "int4-affine-g64/fp16")
    if ONLY:
        names = (ONLY,)
    for ename in names:
        for N, K in SHAPES[:4]:
            if time.perf_counter() - T0 > BUDGET_S * 1.4:
                say("(budget spent)")
                return
            fp16 = ename.endswith("/fp16")
            case = S.Case(ename.split("/")[0], N, K)
            for M in (3, 17) if S.SMOKE else (2, 8, 16):
                cfg = best.get((M, N, K), L.MMA_DEFAULT)
                x = case.x(M)
                if fp16:
                    x = x.half()
                    dense = [d.half() for d in case.dense[:8]]
                    fn = lambda x_, w, cfg=cfg: mma(x_.half(), w, cfg)  # noqa: E731
                else:
                    dense = case.dense[:8]
                    fn = lambda x_, w, cfg=cfg: mma(x_, w, cfg)  # noqa: E731
                cub = S.graph_us([lambda d=d, x=x: F.linear(x, d) for d in dense])
                rt = case.time(S.routed, M)
                err = case.check(fn, M)
                us = case.time(fn, M) if err <= S.TOL else math.inf
                say(
                    f"{ename:<17} {N:>5}x{K:<5} {M:>3} | {cub:7.1f} {rt:7.1f} {us:7.1f} "
                    f"{cub / us:5.2f}" + ("" if err <= S.TOL else f"  WRONG {err:.1e}")
                )
                RESULTS["encodings"].append(
                    dict(enc=ename, N=N, K=K, M=M, cublas=cub, routed=rt, mma=us, err=err)
                )
            del case


def ncu_one() -> None:
    """Two calls on 8192 x 8192, batch 16 (for ncu's counters)."""
    case = S.Case("int4-affine-g64", 8192, 8192)
    x = case.x(16)
    for _ in range(2):
        mma(x, case.ws[0], L.MmaConfig(16, 128, 1, 0, 4, 3))
    torch.cuda.synchronize()


def main() -> int:
    if "--ncu" in sys.argv:
        ncu_one()
        return 0
    dev = "CPU (interpreter)" if S.SMOKE else torch.cuda.get_device_name()
    gbps = S.copy_gbps()
    say(f"# probe_mma on {dev}; copy {gbps:.0f} GB/s; budget {BUDGET_S:.0f} s")
    best = {} if ONLY else sweep(gbps)
    encodings(best)
    say()
    say("## table lines (MMA_TABLE)")
    for (M, N, K), cfg in sorted(best.items()):
        say(f"table: ({M}, {N}, {K}): {cfg}")
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_mma", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
