"""Probe (H200): the Gluon W4A8 kernel's staged K loop (``launch.GLUON_STAGES``: each step's
codes, activations and scales copied into a ring of shared memory by cp.async) against its
register double-buffered loop (``GLUON_STAGES = 0``) and cuBLAS bf16, CUDA-graph timed over
enough weight copies to overflow L2, the pre-pass included.

1. correctness first, for every ring depth: ``probe_mma_gluon.check`` (float64 ``W x~``, the
   rounding bound, the ``tl.dot`` kernel) for affine / symmetric g64 and affine g128, a large
   and an odd shape, rows 5 / 16 / 17 / 32, with a bias and with a forced K-split;
2. int4 g64 (affine, symmetric), the issue's shapes, rows 5 / 16 / 32 (``--rows``): us per
   call, speedup over cuBLAS, share of the HBM bound, time over the register loop's.

    OUT=DIR python3 benches/probe_gluon_staged.py [--stages 0,3,4] [--rows 5,16,32]
"""

from __future__ import annotations

import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_mma_gluon as PG  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

say = S.REPORT.say
T0 = time.perf_counter()


def _arg(name: str, default: str) -> list[int]:
    v = sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
    return [int(t) for t in v.split(",")]


STAGES = _arg("--stages", "0,3,4")
ROWS = _arg("--rows", "5,16,32")
C = L.MmaConfig


def staged(stages: int):
    """``with staged(n):`` the Gluon kernel's loop at ring depth ``n`` (0: registers)."""

    class _Ctx:
        def __enter__(self):
            self.saved = L.GLUON_STAGES
            L.GLUON_STAGES = stages

        def __exit__(self, *exc):
            L.GLUON_STAGES = self.saved

    return _Ctx()


def section_check() -> bool:
    say("## correctness: err vs float64 W x~, excess over the rounding bound, vs the tl.dot kernel")
    ok = True
    cases = [(e, N, K) for e in ("int4-affine-g64", "int4-sym-g64", "int4-affine-g128")
             for N, K in ((8192, 8192), (4000, 2048))]  # fmt: skip
    for ename, N, K in cases:
        case = S.Case(ename, N, K)
        for stages in STAGES:
            worst = [0.0, -math.inf, 0.0]
            for M in (5, 16, 17, 32):
                for cfg, bias in ((None, False), (None, True), (C(0, 64, 2, 4, 2, 2), False)):
                    with staged(stages):
                        err, excess, vs_tl = PG.check(case, M, cfg, bias)
                    good = err <= 1e-2 and excess <= 0 and vs_tl <= 2e-2
                    ok &= good
                    worst = [max(worst[0], err), max(worst[1], excess), max(worst[2], vs_tl)]
                    if not good:
                        say(f"{ename} {N}x{K} stages {stages} M={M} bias {bias} cfg {cfg}: "
                            f"err {err:.2e} excess {excess:+.1e} vs tl {vs_tl:.1e} FAIL")  # fmt: skip
            say(f"{ename:<17} {N:>5}x{K:<5} stages {stages}: worst err {worst[0]:.2e}, excess "
                f"{worst[1]:+.1e}, vs tl.dot {worst[2]:.1e}")  # fmt: skip
        del case
    return ok


def section_time(gbps: float) -> None:
    say("## us per call in a CUDA graph (pre-pass included); x cuBLAS bf16; hbm; over stages 0")
    for ename in ("int4-affine-g64", "int4-sym-g64"):
        for N, K in S.SHAPES:
            case = S.Case(ename, N, K)
            for M in ROWS:
                x = case.x(M)
                cub = S.graph_us([lambda d=d: F.linear(x, d) for d in case.dense])
                bound = case.bound_us(M, gbps)
                cells, base = [], None
                for stages in STAGES:
                    try:
                        with staged(stages):
                            t = case.time(lambda x, w: PG.run(x, w, None, True), M)
                    except Exception as exc:  # a configuration the compiler refuses
                        cells.append(f"s{stages} {type(exc).__name__}: {str(exc)[:40]}")
                        continue
                    base = base or t
                    cells.append(f"s{stages} {t:6.1f} {cub / t:5.2f}x {bound / t:4.0%} "
                                 f"{t / base:5.3f}")  # fmt: skip
                say(f"{ename:<16} {N:>5}x{K:<5} M={M:<3} cuBLAS {cub:6.1f} | " + " | ".join(cells))
            del case
            torch.cuda.empty_cache()


def main() -> int:
    gbps = S.copy_gbps()
    say(f"# probe_gluon_staged on {torch.cuda.get_device_name()}; copy {gbps:.0f} GB/s; "
        f"stages {STAGES}")  # fmt: skip
    if not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_gluon_staged", {})
        return 1
    section_time(gbps)
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_gluon_staged", {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
