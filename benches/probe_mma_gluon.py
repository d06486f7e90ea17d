"""Probe (H200): the Gluon W4A8 kernel ``kernels/mma_int8_gluon.py`` against the ``tl.dot`` one it
replaces (``mma_int8.py``, at its shipped config) and cuBLAS bf16, CUDA-graph timed over enough
weight copies to overflow the L2 cache.

1. correctness, before any timing: the Gluon kernel against an independent float64 ``W x~`` (x
   rounded per (row, group) in torch) and the rounding's bound against the exact product
   (``probe_mma_int8.check``), every encoding, rows 5 / 16 / 17 / 33 / 64, with a bias and with a
   forced K-split; and against the ``tl.dot`` kernel;
2. int4 affine g64, bf16 x, the issue's shapes, rows 5 / 8 / 16 / 32 / 64: cuBLAS ``F.linear``,
   the ``tl.dot`` kernel, the Gluon kernel at ``MMA_INT8_GLUON_DEFAULT`` and a config sweep
   (features a program, groups a step, K-slices, warps); speedups and the share of the HBM bound;
3. symmetric g64 and affine g128 at the default config.

    OUT=DIR python3 benches/probe_mma_gluon.py [--budget S] [--quick]
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
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 200.0
QUICK = "--quick" in sys.argv  # the sweep alone: the three large shapes at 16 rows
ROWS = [16] if QUICK else [5, 16, 32]
CHECK_ROWS = [5, 16, 17, 33, 64]
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"check": [], "sweep": [], "encodings": []}
BEST: dict = {}  # (N, K, M): the sweep's best config
C = L.MmaConfig


def run(x, w, cfg=None, gluon=True, bias=None):
    """``mma_int8_linear``; a config's ``num_stages`` 1 turns ``GLUON_KSPEC`` off for the call."""
    name, _bits, g = w.enc
    kspec = L.GLUON_KSPEC
    L.GLUON_KSPEC = not (cfg is not None and cfg.num_stages == 1)
    try:
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, bias, w.N, w.K, name, g, cfg, gluon)
    finally:
        L.GLUON_KSPEC = kspec


def configs() -> list:
    """(features, groups a step, K-slices, warps; num_stages 2: compiled per K, 1: not)."""
    out = []
    for bn, groups, split, warps, kspec in [
        (64, 2, 0, 2, 0), (64, 2, 0, 4, 1), (64, 4, 0, 2, 1), (64, 4, 0, 4, 1), (64, 1, 0, 2, 1),
        (64, 2, 8, 2, 1), (16, 4, 0, 1, 1), (32, 4, 0, 1, 1), (32, 2, 0, 2, 1), (64, 2, 16, 2, 1),
    ]:  # fmt: skip
        out.append(C(0, bn, groups, split, warps, 1 + kspec))
    return out


def label(c) -> str:
    split = f"/k{c.split_k}" if c.split_k else ""
    return f"n{c.block_n}/g{c.groups}/{c.num_warps}w{'/ks' if c.num_stages != 1 else ''}{split}"


def check(case, M, cfg=None, bias=False) -> tuple[float, float, float]:
    """(rel err against float64 W x~, excess over the rounding bound, rel difference to the
    tl.dot kernel)."""
    x = case.x(M).to(S.DT)
    w0 = case.ws[0]
    b = torch.randn(w0.N, device=x.device, dtype=S.DT) if bias else None
    got = run(x, w0, cfg, True, b).double()
    old = run(x, w0, None, False, b).double()
    shift = 0.0 if b is None else b.double()
    w = case.ref_w.double()
    xt, d = P.rounded(x, w0.enc[2])
    ref = xt @ w.T + shift
    scale = ref.abs().max().clamp_min(1e-12)
    err = ((got - ref).abs().max() / scale).item()
    exact = x.double() @ w.T + shift
    bound = (d / 2) @ w.abs().T
    # bf16 output: half an ulp of each value
    excess = (got - exact).abs() - bound * (1 + 1e-3) - exact.abs() * 2.0**-8
    return err, (excess.max() / exact.abs().max()).item(), ((got - old).abs().max() / scale).item()


def section_check() -> bool:
    say("## correctness: Gluon kernel vs float64 W x~ (err), the rounding bound (excess), tl.dot")
    ok = True
    cases = [(e, N, K) for e in ("int4-affine-g64", "int4-sym-g64", "int4-affine-g128")
             for N, K in S.SHAPES[:2]] + [("int4-affine-g64", 4000, 2048)]  # fmt: skip
    for ename, N, K in cases:
        case = S.Case(ename, N, K)
        for M in CHECK_ROWS:
            for cfg, bias in (
                (None, False),
                (None, True),
                (C(0, 64, 2, 4, 4, 2), False),
                (C(0, 64, 2, 0, 2, 1), False),
            ):
                err, excess, vs_old = check(case, M, cfg, bias)
                good = err <= 1e-2 and excess <= 0 and vs_old <= 2e-2
                ok &= good
                tag = ("bias" if bias else "") + (f" k{cfg.split_k}" if cfg else "")
                RESULTS["check"].append(dict(enc=ename, N=N, K=K, M=M, tag=tag, err=err,
                                             excess=excess, vs_tl=vs_old))  # fmt: skip
                say(f"{ename:<17} {N:>5}x{K:<5} M={M:<3} {tag:<6} err {err:.2e} excess "
                    f"{excess:+.1e} vs tl.dot {vs_old:.1e} {'ok' if good else 'FAIL'}")  # fmt: skip
        del case
    return ok


def timed(case, M, cfg) -> tuple[float, str]:
    try:
        err, excess, _ = check(case, M, cfg)
        if not (err <= 1e-2 and excess <= 0):
            return math.inf, f"WRONG ({err:.1e}, {excess:.1e})"
        return case.time(lambda x, w: run(x, w, cfg), M), ""
    except Exception as exc:  # a config the compiler refuses
        return math.inf, f"{type(exc).__name__}: {str(exc)[:100]}"


def sweep(gbps: float) -> None:
    say()
    say("## int4-affine-g64, bf16 x: us per call (CUDA graph, pre-pass included)")
    head = f"{'shape':>11} {'M':>3} | {'cublas':>7} {'tl.dot':>7} {'pre':>5} | {'gluon':>7} "
    say(head + f"{'best':>7} {'x cub':>5} {'x tl':>5} {'hbm':>4} {'-pre':>4} | best (next)")
    for N, K in S.SHAPES[:3] if QUICK else S.SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in ROWS:
            x = case.x(M)
            cub = S.graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense[:8]])
            old = case.time(lambda x_, w: run(x_, w, None, False), M)
            pre = P.prepass_us(case, M)  # the pre-pass alone (its other order: the same work)
            dflt, why = timed(case, M, None)
            cells = [(dflt, L.MMA_INT8_GLUON_DEFAULT, why)]
            if time.perf_counter() - T0 < BUDGET_S:
                for cfg in configs():
                    if cfg != L.MMA_INT8_GLUON_DEFAULT:
                        us, why = timed(case, M, cfg)
                        cells.append((us, cfg, why))
            cells.sort(key=lambda c: c[0])
            us, cfg, _ = cells[0]
            nxt = ", ".join(f"{label(c)} {u:.1f}" for u, c, _ in cells[1:3] if u < math.inf)
            bound = case.bound_us(M, gbps)
            # "-pre": the share of the bound without the pre-pass's time
            ratios = f"{cub / dflt:5.2f} {old / dflt:5.2f} {bound / dflt:4.0%} "
            ratios += f"{bound / max(dflt - pre, 1e-9):4.0%}"
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {pre:5.1f} | {dflt:7.1f} {us:7.1f} "
                f"{ratios} | {label(cfg)} ({nxt})")  # fmt: skip
            for _u, c, w in cells:
                if w:
                    say(f"      refused/wrong: {label(c)}: {w}")
            row = dict(N=N, K=K, M=M, cublas=cub, tl_dot=old, prepass=pre, gluon=dflt)
            RESULTS["sweep"].append(dict(row, best=us, config=label(cfg), bound=bound))
            BEST[(N, K, M)] = cfg
        del case
        torch.cuda.empty_cache()


def encodings() -> None:
    say()
    say("## symmetric g64 / affine g128 at the sweep's best config for affine g64 at 16 rows")
    for ename in ("int4-sym-g64", "int4-affine-g128"):
        for N, K in S.SHAPES:
            case = S.Case(ename, N, K)
            for M in (8, 16):
                cfg = BEST.get((N, K, 16))
                x = case.x(M)
                cub = S.graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense[:8]])
                old = case.time(lambda x_, w: run(x_, w, None, False), M)
                us, why = timed(case, M, cfg)
                tag = label(cfg) if cfg else ""
                say(f"{ename:<17} {N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {us:7.1f} "
                    f"{cub / us:5.2f} {old / us:5.2f} {tag} {why}")  # fmt: skip
                RESULTS["encodings"].append(dict(enc=ename, N=N, K=K, M=M, cublas=cub,
                                                 tl_dot=old, gluon=us))  # fmt: skip
            del case
        torch.cuda.empty_cache()


def main() -> int:
    gbps = S.copy_gbps()
    say(f"# probe_mma_gluon on {torch.cuda.get_device_name()}; copy {gbps:.0f} GB/s")
    if not QUICK and not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_mma_gluon", RESULTS)
        return 1
    sweep(gbps)
    if not QUICK:
        encodings()
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_mma_gluon", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
