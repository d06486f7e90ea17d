"""Probe (H200): the Gluon W4A8 TMA kernel (5-32 rows) with each step's int8 activations
(``XTMA`` 1), and their per-group factors too (2), copied by the TMA engine into the ring slot
that holds the step's codes, against loading both into registers two steps ahead (0: the
kernel before). Nsight Compute had the kernel's two warps a scheduler waiting on global loads
for half their stall samples (``gpu_gluon_tma_ncu_h200.txt``); with 2 the only loads left in
its loop are the scales'. Since this probe the blocked FP4 codes (MXFP4, NVFP4) take mode 0
whatever the switch (measured slower): their rows compare at commit 62425a3.

1. correctness, before any timing: every mode's output bit for bit equal to mode 0's (the same
   values in the same arithmetic), every encoding the kernel takes, rows 5 / 8 / 16 / 17 / 32,
   with and without a bias, a partial tile of features;
2. int4 affine g64, bf16 x, the issue's shapes, rows 5 / 8 / 16 / 32: cuBLAS ``F.linear`` and
   each mode, CUDA-graph timed over enough weight copies to overflow the L2; ratios, share of
   the HBM bound;
3. the other encodings at 16 rows on the three large shapes.

    OUT=DIR python3 benches/probe_gluon_act_tma.py [--modes 0,1,2] [--quick] [--first-try MODE]
        [--configs 64x2,64x4,32x2 [--rows 16,32] [--shapes 4096x4096,11264x2048]]

``--quick``: rows 5 and 16 in (2), no (3). ``--configs``: instead of (1)-(3), int4 affine g64
in mode 1 with each ``features x warps`` program on the large shapes and 4096^2 (each within the
activations' rounding bound of the exact product first): with the activations in shared memory
a program's warps no longer each load them, which made 4 warps a program slower before.
``--shapes``: the weights ``NxK`` to time instead of those four.

``--first-try MODE``: one call in that mode against mode 0, exit status 0 if equal (a first try in
a process of its own: a faulting kernel leaves the process's CUDA context unusable).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_mma_int8 as P  # noqa: E402
import torch  # noqa: E402
from _common import cli_value, switched  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

QUICK = "--quick" in sys.argv
MODES = [int(m) for m in cli_value("--modes", "0,1,2").split(",")]
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"modes": MODES, "check": [], "table": [], "encodings": []}


def run(x, w, mode: int, bias=None, cfg=None):
    """``mma_int8_linear`` through the routed Gluon kernel with ``GLUON_ACT_TMA = mode`` (and
    ``cfg``: a configuration other than the default)."""
    name, _bits, g = w.enc
    with switched(L, GLUON_ACT_TMA=mode):
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, bias, w.N, w.K, name, g, cfg, True)


def first_try(mode: int) -> int:
    case = S.Case("int4-affine-g64", 4096, 4096)
    x = case.x(16)
    same = torch.equal(run(x, case.ws[0], mode), run(x, case.ws[0], 0))
    torch.cuda.synchronize()
    print(f"first try: mode {mode} equal to mode 0: {same}")
    return 0 if same else 1


def section_check() -> bool:
    say("## correctness: each mode bit for bit equal to mode 0")
    ok = True
    for ename in S.ENCODINGS:
        for N, K in ((4096, 4096), (4000, 2048)):
            case = S.Case(ename, N, K)
            for M in (5, 8, 16, 17, 32):
                for bias in (False, True):
                    x = case.x(M)
                    b = torch.randn(N, device=x.device, dtype=S.DT) if bias else None
                    ref = run(x, case.ws[0], 0, b)
                    same = {m: torch.equal(run(x, case.ws[0], m, b), ref) for m in MODES}
                    good = all(same.values())
                    ok &= good
                    sames = {str(m): v for m, v in same.items()}
                    RESULTS["check"].append(dict(enc=ename, N=N, K=K, M=M, bias=bias, same=sames))
                    if not good or (M == 16 and not bias):
                        say(f"{ename:<17} {N:>5}x{K:<5} M={M:<3} bias={bias!s:<5} equal "
                            f"{same} {'ok' if good else 'FAIL'}")  # fmt: skip
            del case
            torch.cuda.empty_cache()
    say(f"check: {'all equal' if ok else 'FAILED'}")
    return ok


def timed(case, M: int):
    """(cuBLAS us, {mode: us}) at ``M`` rows, or None where a mode's output differs."""
    x = case.x(M)
    ref = run(x, case.ws[0], 0)
    if not all(torch.equal(run(x, case.ws[0], m), ref) for m in MODES):
        return None
    cub = case.cublas_us(x, 8)
    return cub, {m: case.time(lambda x_, w, m=m: run(x_, w, m), M) for m in MODES}


def section_table(gbps: float) -> None:
    say()
    say("## int4-affine-g64, bf16 x, the routed Gluon kernel: us per call (CUDA graph)")
    cols = " ".join(f"{'mode ' + str(m):>7}" for m in MODES)
    ratios = " ".join(f"{'x m' + str(m):>5}" for m in MODES if m)
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {cols} | {'x cub':>5} {ratios} {'hbm':>4}")
    rows = (5, 16) if QUICK else (5, 8, 16, 32)
    for N, K in S.SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in rows:
            got = timed(case, M)
            if got is None:
                say(f"{N:>5}x{K:<5} {M:>3} | WRONG: a mode differs from mode 0; not timed")
                continue
            cub, us = got
            best = min(us.values())
            bound = case.bound_us(M, gbps)
            times = " ".join(f"{us[m]:7.1f}" for m in MODES)
            gains = " ".join(f"{us[0] / us[m]:5.2f}" for m in MODES if m)
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {times} | {cub / best:5.2f} {gains} "
                f"{bound / best:4.0%}")  # fmt: skip
            RESULTS["table"].append(dict(N=N, K=K, M=M, cublas=cub, bound=bound,
                                         us={str(m): v for m, v in us.items()}))  # fmt: skip
        del case
        torch.cuda.empty_cache()


def section_encodings() -> None:
    say()
    say("## the other encodings at 16 rows, the large shapes: us per call (CUDA graph)")
    for ename in S.ENCODINGS:
        if ename == "int4-affine-g64":
            continue
        for N, K in S.SHAPES[:3]:
            case = S.Case(ename, N, K)
            got = timed(case, 16)
            if got is None:
                say(f"{ename:<17} {N:>5}x{K:<5} | WRONG: a mode differs from mode 0; not timed")
                continue
            cub, us = got
            times = " ".join(f"mode {m} {us[m]:6.1f}" for m in MODES)
            best = min(us.values())
            say(f"{ename:<17} {N:>5}x{K:<5} | cublas {cub:6.1f} {times} | x cub "
                f"{cub / best:5.2f} mode 0 / best {us[0] / best:5.2f}")  # fmt: skip
            RESULTS["encodings"].append(dict(enc=ename, N=N, K=K, cublas=cub,
                                             us={str(m): v for m, v in us.items()}))  # fmt: skip
            del case
            torch.cuda.empty_cache()


def section_configs() -> None:
    say("## int4-affine-g64, mode 1, features x warps a program: us per call (CUDA graph)")
    specs = cli_value("--configs", "64x2").split(",")
    rows = [int(r) for r in cli_value("--rows", "16,32").split(",")]
    given = cli_value("--shapes", "")
    shapes = [tuple(int(v) for v in s.split("x")) for s in given.split(",") if s]
    for N, K in shapes or (*S.SHAPES[:3], (4096, 4096)):
        case = S.Case("int4-affine-g64", N, K)
        for M in rows:
            x = case.x(M)
            cells = [f"cublas {case.cublas_us(x, 8):6.1f}"]
            for spec in specs:
                f, w = (int(v) for v in spec.split("x"))
                cfg = L.MmaConfig(block_m=0, block_n=f, groups=2, split_k=0, num_warps=w)
                got = run(x, case.ws[0], 1, None, cfg)
                exc = P.bound_excess(x, case.ref_w.double(), got, 64)
                if exc > 0:
                    cells.append(f"{spec} OUT OF BOUND ({exc:+.1e})")
                    continue
                us = case.time(lambda x_, w_, cfg=cfg: run(x_, w_, 1, None, cfg), M)
                cells.append(f"{spec} {us:6.1f}")
                RESULTS["table"].append(dict(N=N, K=K, M=M, config=spec, us=us))
            say(f"{N:>5}x{K:<5} {M:>3} | " + " | ".join(cells))
        del case
        torch.cuda.empty_cache()


def main() -> int:
    if "--configs" in sys.argv:
        say(f"# probe_gluon_act_tma --configs on {torch.cuda.get_device_name()}")
        section_configs()
        S.REPORT.write("probe_gluon_act_tma_configs", RESULTS)
        return 0
    if "--first-try" in sys.argv:
        return first_try(int(cli_value("--first-try", "2")))
    gbps = S.copy_gbps()
    say(f"# probe_gluon_act_tma on {torch.cuda.get_device_name()}; torch {torch.__version__};"
        f" copy {gbps:.0f} GB/s; modes {MODES}")  # fmt: skip
    if not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_gluon_act_tma", RESULTS)
        return 1
    S.REPORT.write("probe_gluon_act_tma", RESULTS)  # (each section kept as it ends)
    section_table(gbps)
    S.REPORT.write("probe_gluon_act_tma", RESULTS)
    if not QUICK:
        section_encodings()
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_gluon_act_tma", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
