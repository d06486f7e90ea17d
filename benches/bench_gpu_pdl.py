"""Programmatic dependent launch (``kernels/gdc.py``, ``launch.PDL``) on the H200: the int8
kernels with and without it, against cuBLAS bf16, timed in CUDA graphs.

1. correctness first: for each encoding the int8 kernels take (int4 affine / symmetric g64, NF4,
   MXFP4, NVFP4) at 1, 3 and 16 rows (16: the W4A8 pre-pass and its Gluon matmul), the routed op
   with PDL on equals it with PDL off bit for bit, eagerly and replayed from a CUDA graph, and
   both are within the sweep's tolerance of ``F.linear`` in fp32 of the decoded weight;
2. back to back: each layer over enough weight copies to overflow L2, one CUDA graph (as
   ``bench_gpu_gemv_sweep.py``): cuBLAS, the routed op without PDL, with it (at 1 row also with
   ``PDL_AHEAD`` 0 and 4 steps prefetched before the wait);
3. after a torch op, as in a model: each call preceded by an elementwise op on x (a norm's
   scaling), whose kernel does not let ours start early; the pair's time, less the op's own.

    OUT=DIR python3 benches/bench_gpu_pdl.py [--rows 1,16] [--encodings a,b]
    python3 benches/bench_gpu_pdl.py --smoke     # CPU, Triton interpreter: the script's own check
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402  (sets TRITON_INTERPRET under --smoke)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

say = S.REPORT.say
T0 = time.perf_counter()


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


ROWS = [int(r) for r in _arg("--rows", "1,16").split(",")]
ENCODINGS = _arg("--encodings", "int4-affine-g64,int4-sym-g64").split(",")
CHECK_ENCODINGS = ["int4-affine-g64", "int4-sym-g64", "nf4-g64", "mxfp4", "nvfp4"]
CHECK_ROWS = [1, 3, 16]


class pdl:
    """``with pdl(on, ahead):`` the routed op's PDL switch and prefetch depth."""

    def __init__(self, on: bool, ahead: int = L.PDL_AHEAD) -> None:
        self.on, self.ahead = on, ahead

    def __enter__(self) -> None:
        self.saved = (L.PDL, L.PDL_AHEAD)
        L.PDL, L.PDL_AHEAD = self.on, self.ahead

    def __exit__(self, *exc) -> None:
        L.PDL, L.PDL_AHEAD = self.saved


def graph_outputs(fn, x, w) -> torch.Tensor:
    """``fn(x, w)`` captured in a CUDA graph and replayed (eager on the CPU)."""
    if S.SMOKE:
        return fn(x, w)
    fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def check() -> bool:
    say("## correctness: PDL on == off (bits), eager and in a graph; both vs fp32 F.linear")
    ok = True
    N, K = (40, 128) if S.SMOKE else (4096, 8192)  # 2^25 weights: 16 rows take W4A8
    for ename in CHECK_ENCODINGS:
        case = S.Case(ename, N, K)
        for M in CHECK_ROWS:
            x = case.x(M)
            with pdl(False):
                off = S.routed(x, case.ws[0])
                off_g = graph_outputs(S.routed, x, case.ws[0])
            with pdl(True):
                on = S.routed(x, case.ws[0])
                on_g = graph_outputs(S.routed, x, case.ws[0])
            same = torch.equal(on, off) and torch.equal(on_g, off_g) and torch.equal(on, on_g)
            err = S.rel_err(on, F.linear(x.float(), case.ref_w))
            good = same and err <= S.TOL
            ok &= good
            path = L.route(M, N, K, *S.ENCODINGS[ename], 1, True, True, L.INT8_ACTIVATIONS)
            say(f"{ename:<16} {N}x{K} M={M:<3} {path:<10} identical {same}, rel err {err:.2e}"
                f" {'ok' if good else 'FAIL'}")  # fmt: skip
        del case
    return ok


def scaled(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The op before the linear: a norm's elementwise scaling (one torch kernel)."""
    return x * s


def row(case: S.Case, M: int, gbps: float) -> None:
    """One (shape, rows): cuBLAS and the routed op without and with PDL, back to back and after
    the op."""
    N, K = case.N, case.K
    x = case.x(M)
    s = torch.full((K,), 1.0, dtype=S.DT, device=S.DEV)
    bound = case.bound_us(M, gbps)
    cub = S.graph_us([lambda d=d: F.linear(x, d) for d in case.dense])
    op = S.graph_us([lambda: scaled(x, s)] * len(case.dense))
    cub2 = S.graph_us([lambda d=d: F.linear(scaled(x, s), d) for d in case.dense]) - op
    path = L.route(M, N, K, *S.ENCODINGS[case.ename], 1, True, True, L.INT8_ACTIVATIONS)
    say(f"{case.ename:<16} {N:>5}x{K:<5} M={M:<3} {path:<8} cuBLAS {cub:6.1f}"
        f" | after the op: cuBLAS {cub2:6.1f} (op {op:4.1f})")  # fmt: skip
    runs = [("no PDL", False, L.PDL_AHEAD), ("PDL", True, L.PDL_AHEAD)]
    if M == 1:
        runs += [("PDL ahead 0", True, 0), ("PDL ahead 4", True, 4)]
    base = None
    for label, on, ahead in runs:
        with pdl(on, ahead):
            t = S.graph_us([lambda w=w: S.routed(x, w) for w in case.ws])
            t2 = S.graph_us([lambda w=w: S.routed(scaled(x, s), w) for w in case.ws]) - op
        base = base or t
        say(f"{'':<16} {label:<12} {t:6.1f} {cub / t:5.2f}x {bound / t:4.0%}"
            f" ({t / base:.3f} of no PDL) | after the op: {t2:6.1f} {cub2 / t2:5.2f}x")  # fmt: skip


def timings(gbps: float) -> None:
    say("## us per call in a CUDA graph; x: over cuBLAS bf16; hbm: share of the bound")
    for ename in ENCODINGS:
        for N, K in S.SHAPES:
            case = S.Case(ename, N, K)
            for M in ROWS:
                row(case, M, gbps)
            del case
            if not S.SMOKE:
                torch.cuda.empty_cache()


def main() -> int:
    device = "cpu (smoke)" if S.SMOKE else torch.cuda.get_device_name()
    import triton

    here = L.pdl(-1 if S.SMOKE else torch.cuda.current_device()) is not None
    say(f"# PDL, {device}, torch {torch.__version__}, triton {triton.__version__};"
        f" PDL applies here: {here}")  # fmt: skip
    if S.SMOKE:
        S.SHAPES[:] = [(40, 128)]
    ok = check()
    if not ok:
        say("correctness FAILED: no timings")
        S.REPORT.write("bench_gpu_pdl", {})
        return 1
    timings(S.copy_gbps())
    say(f"# {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("bench_gpu_pdl", {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
