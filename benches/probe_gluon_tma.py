"""Probe (H200): the Gluon W4A8 kernel with its codes brought in by the TMA engine
(``mma_int8_gluon_tma_kernel``: a ring of steps in shared memory) against the register-load
kernel it would replace (``mma_int8_gluon_kernel``) and cuBLAS bf16, CUDA-graph timed over enough
weight copies to overflow the L2 cache.

1. correctness, before any timing: the TMA kernel's output equal (bit for bit: the same
   arithmetic in the same order) to the register kernel's, and within the rounding bound of the
   exact product (``probe_mma_gluon.check``'s test), every int4 encoding the kernel takes, rows
   5 / 16 / 17 / 32, a bias, a forced K-split, a row count that leaves a partial tile;
2. int4 affine g64, bf16 x, the issue's shapes, rows 5 / 16 / 32: cuBLAS ``F.linear``, the
   register kernel (shipped config), the TMA kernel at each ring depth and tile; ratios and
   the share of the HBM bound;
3. symmetric g64 / affine g128 at 16 rows, the best TMA config of (2) against the register one.

``--splits``: the routed kernel with its K split 2-16 ways at 16 rows (no check: the
split-K epilogue is checked in (1)).

    OUT=DIR python3 benches/probe_gluon_tma.py [--stages 2,3,4,6] [--quick] [--splits]
"""

from __future__ import annotations

import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_mma_int8 as P  # noqa: E402
import torch  # noqa: E402
from _common import switched  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

ARG = sys.argv[sys.argv.index("--stages") + 1] if "--stages" in sys.argv else "2,3,4,6"
STAGES = [int(s) for s in ARG.split(",")]
QUICK = "--quick" in sys.argv
ROWS = [16] if QUICK else [5, 16, 32]
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"check": [], "sweep": [], "encodings": []}
C = L.MmaConfig
# (features a program, warps): the shipped 64 / 2 and larger tiles (activations read once per
# more codes)
TILES = [(64, 2), (128, 4), (128, 2), (64, 4)]


def run(x, w, stages: int, cfg=None, bias=None):
    name, _bits, g = w.enc
    with switched(L, GLUON_TMA_STAGES=stages):
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, bias, w.N, w.K, name, g, cfg, True)


def excess(x, w0, ref_w, got, bias) -> float:
    """The largest excess of ``got`` over the rounding bound of the exact product (<= 0: ok)."""
    return P.bound_excess(x, ref_w.double(), got, w0.enc[2], bias)


def section_check() -> bool:
    say("## correctness: TMA kernel == register kernel (bit for bit), within the rounding bound")
    ok = True
    cases = [(e, N, K) for e in ("int4-affine-g64", "int4-sym-g64", "int4-affine-g128")
             for N, K in ((4096, 4096), (4000, 2048))]  # fmt: skip
    for ename, N, K in cases:
        case = S.Case(ename, N, K)
        w0 = case.ws[0]
        for M in (5, 8, 16, 17, 32):
            for cfg, bias, stages in (
                (None, False, 3),
                (None, True, 2),
                (C(0, 64, 2, 4, 2, 1), False, 4),
                (C(0, 128, 2, 0, 4, 1), False, 6),
            ):
                x = case.x(M).to(S.DT)
                b = torch.randn(N, device=x.device, dtype=S.DT) if bias else None
                got = run(x, w0, stages, cfg, b)
                ref = run(x, w0, 0, cfg, b)
                same = torch.equal(got, ref)
                exc = excess(x, w0, case.ref_w, got, b)
                good = same and exc <= 0
                ok &= good
                tag = f"s{stages}" + (" bias" if bias else "")
                if cfg:
                    tag += f" {cfg.block_n}/{cfg.num_warps}w/k{cfg.split_k}"
                RESULTS["check"].append(dict(enc=ename, N=N, K=K, M=M, tag=tag, same=same,
                                             excess=exc))  # fmt: skip
                say(f"{ename:<17} {N:>5}x{K:<5} M={M:<3} {tag:<18} equal {same} excess "
                    f"{exc:+.1e} {'ok' if good else 'FAIL'}")  # fmt: skip
        del case
    return ok


def timed(case, M, stages, cfg) -> tuple[float, str]:
    try:
        x = case.x(M).to(S.DT)
        got = run(x, case.ws[0], stages, cfg)
        ref = run(x, case.ws[0], 0, cfg)
        if not torch.equal(got, ref):
            return math.inf, "WRONG (differs from the register kernel)"
        return case.time(lambda x_, w: run(x_, w, stages, cfg), M), ""
    except Exception as exc:  # a config the compiler refuses
        return math.inf, f"{type(exc).__name__}: {str(exc)[:160]}"


def sweep(gbps: float) -> dict:
    say()
    say("## int4-affine-g64, bf16 x: us per call (CUDA graph, pre-pass included)")
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {'reg':>7} | {'tma best':>8} {'x cub':>5} "
        f"{'x reg':>5} {'hbm':>4} | config (others)")  # fmt: skip
    best: dict = {}
    for N, K in S.SHAPES[:3] if QUICK else S.SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in ROWS:
            x = case.x(M)
            cub = case.cublas_us(x, 8)
            reg = case.time(lambda x_, w: run(x_, w, 0), M)
            cells = []
            for bn, warps in TILES:
                cfg = C(0, bn, 2, 0, warps, 2)
                for st in STAGES:
                    us, why = timed(case, M, st, cfg)
                    cells.append((us, f"n{bn}/{warps}w/s{st}", why, cfg, st))
            cells.sort(key=lambda c: c[0])
            us, lab, _, cfg, st = cells[0]
            best[(N, K, M)] = (cfg, st)
            bound = case.bound_us(M, gbps)
            others = ", ".join(f"{c[1]} {c[0]:.1f}" for c in cells[1:6] if c[0] < math.inf)
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {reg:7.1f} | {us:8.1f} {cub / us:5.2f} "
                f"{reg / us:5.2f} {bound / us:4.0%} | {lab} ({others})")  # fmt: skip
            for c in cells:
                if c[2]:
                    say(f"      refused/wrong: {c[1]}: {c[2]}")
            RESULTS["sweep"].append(dict(N=N, K=K, M=M, cublas=cub, reg=reg, tma=us, config=lab,
                                         bound=bound, all={c[1]: c[0] for c in cells}))  # fmt: skip
        del case
        torch.cuda.empty_cache()
    return best


def encodings(best: dict) -> None:
    say()
    say("## symmetric g64 / affine g128, 16 rows: the best TMA config of affine g64")
    for ename in ("int4-sym-g64", "int4-affine-g128"):
        for N, K in S.SHAPES:
            if (N, K, 16) not in best:
                continue
            cfg, st = best[(N, K, 16)]
            case = S.Case(ename, N, K)
            x = case.x(16)
            cub = case.cublas_us(x, 8)
            reg = case.time(lambda x_, w: run(x_, w, 0), 16)
            us, why = timed(case, 16, st, cfg)
            say(f"{ename:<17} {N:>5}x{K:<5} | cublas {cub:7.1f} reg {reg:7.1f} tma {us:7.1f} "
                f"x cub {cub / us:5.2f} x reg {reg / us:5.2f} {why}")  # fmt: skip
            RESULTS["encodings"].append(dict(enc=ename, N=N, K=K, cublas=cub, reg=reg, tma=us))
            del case
        torch.cuda.empty_cache()


def splits(gbps: float) -> None:
    """The routed TMA kernel at 16 rows with its K split 2-16 ways (``MmaConfig.split_k``;
    0: the launcher's own choice): more, shorter programs hide more latency."""
    say()
    say("## int4-affine-g64, bf16 x: us per call by K-slices (0: as routed)")
    st = L.GLUON_TMA_STAGES
    for N, K in S.SHAPES[:3]:
        case = S.Case("int4-affine-g64", N, K)
        for M in (16,):
            x = case.x(M)
            cub = case.cublas_us(x, 8)
            cells = []
            for split in (0, 2, 4, 8, 16):
                us, why = timed(case, M, st, C(0, 64, 2, split, 2, 2))
                cells.append(f"k{split} {us:.1f}{' ' + why if why else ''}")
                RESULTS["sweep"].append(dict(N=N, K=K, M=M, split=split, us=us, cublas=cub))
            say(f"{N:>5}x{K:<5} {M:>3} | cublas {cub:6.1f} | " + ", ".join(cells))
        del case
        torch.cuda.empty_cache()


def main() -> int:
    gbps = S.copy_gbps()
    say(f"# probe_gluon_tma on {torch.cuda.get_device_name()}; copy {gbps:.0f} GB/s")
    if "--splits" not in sys.argv and not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_gluon_tma", RESULTS)
        return 1
    if "--splits" in sys.argv:
        splits(gbps)
    else:
        best = sweep(gbps)
        if not QUICK:
            encodings(best)
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_gluon_tma", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
