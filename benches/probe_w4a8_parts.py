"""Probe (H200): what the W4A8 route's time at 8-16 rows is made of, on the 1.1B model's weight
shapes (where decoding at batch 8 runs it) and two large ones.

Per shape and row count, µs per call in a CUDA graph over enough weight copies to overflow the
L2 cache: cuBLAS bf16; the routed op (pre-pass + Gluon TMA matmul); the pre-pass alone; the
matmul alone (the pre-pass's launch skipped: it reads the activations the last call left); the
matmul with its K split 1, 2, 4 and 8 ways (the launcher picks one to fill the GPU); and the
floor: an empty Triton kernel, one program, as one graph node.

    OUT=DIR python3 benches/probe_w4a8_parts.py [--baseline OLD_mma_int8_gluon.py]

``--baseline``: another version of ``kernels/mma_int8_gluon.py`` (e.g. ``git show
main~1:python/qtensors/torch/kernels/mma_int8_gluon.py``), its routed op timed beside this one's
(alternating copies of the graph) and its outputs checked bit-equal to this one's first.
"""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

say = S.REPORT.say
SHAPES = [(2048, 2048), (2560, 2048), (11264, 2048), (2048, 5632), (32000, 2048), (8192, 8192),
          (14336, 4096)]  # fmt: skip
ROWS = (8, 16)


@triton.jit
def _empty(x_ptr):
    pass


def run(x, w, cfg=None):
    name, _bits, g = w.enc
    return L.mma_int8_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg, True)


def skipping(keep_prepass: bool, keep_rest: bool):
    """``L.launch`` with the pre-pass (``quantize_kernel``) or everything else left out."""
    orig = L.launch

    def launch(kernel, *args, **kwargs):
        if (keep_prepass, keep_rest)[0 if kernel is L.quantize_kernel else 1]:
            return orig(kernel, *args, **kwargs)
        return None

    return mock.patch.object(L, "launch", launch)


def load_baseline(path: str):
    """The module at ``path`` (a version of ``mma_int8_gluon.py``: it imports nothing of ours)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mma_int8_gluon_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    t0 = time.perf_counter()
    baseline = None
    if "--baseline" in sys.argv:
        baseline = load_baseline(sys.argv[sys.argv.index("--baseline") + 1])
    say(f"# probe_w4a8_parts on {torch.cuda.get_device_name()}; int4-affine-g64, bf16 x, us per "
        "call in a CUDA graph")  # fmt: skip
    dummy = torch.zeros(1, device="cuda")
    floor = S.graph_us([lambda: _empty[(1,)](dummy)] * 64)
    say(f"empty Triton kernel, one graph node: {floor:.2f} us")
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {'routed':>7} {'pre':>6} {'matmul':>7} | "
        f"{'split1':>7} {'split2':>7} {'split4':>7} {'split8':>7} | routed split")  # fmt: skip
    C = L.MmaConfig
    base = L.MMA_INT8_GLUON_DEFAULT
    rows = []
    for N, K in SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in ROWS:
            x = case.x(M)
            cub = case.cublas_us(x, 8)
            routed = case.time(run, M)
            if baseline is not None:
                with mock.patch.object(L, "mma_int8_gluon", baseline):
                    old = run(x, case.ws[0])
                    t_old = case.time(run, M)
                same = torch.equal(old, run(x, case.ws[0]))
                routed = min(routed, case.time(run, M))  # alternate: the faster of two turns
                say(f"{N:>5}x{K:<5} {M:>3} | baseline {t_old:7.1f}  this {routed:7.1f}  "
                    f"x{t_old / routed:5.2f}  outputs bit-equal: {same}")  # fmt: skip
            for w in case.ws:  # every copy's plan and workspaces made before the captures
                run(x, w)
            with skipping(True, False):
                pre = case.time(run, M)
            with skipping(False, True):
                mm = case.time(run, M)
            splits = []
            for s in (1, 2, 4, 8):
                cfg = C(base.block_m, base.block_n, base.groups, s, base.num_warps, 1)
                try:
                    splits.append(case.time(lambda x_, w, c=cfg: run(x_, w, c), M))
                except Exception as exc:  # more slices than steps, ...
                    say(f"  split {s}: {type(exc).__name__}: {str(exc)[:100]}")
                    splits.append(float("nan"))
            plan = L._mma_int8_plan(M, N, K, "affine", 64, False, 0, None, True, True,
                                    L.GLUON_KSPEC, L.GLUON_TMA_STAGES)  # fmt: skip
            rows.append(dict(N=N, K=K, M=M, cublas=cub, routed=routed, pre=pre, matmul=mm,
                             splits=splits, routed_split=plan[3]))  # fmt: skip
            cells = " ".join(f"{v:7.1f}" for v in splits)
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {routed:7.1f} {pre:6.1f} {mm:7.1f} | {cells}"
                f" | {plan[3]}")  # fmt: skip
        del case
    say(f"done in {time.perf_counter() - t0:.0f} s")
    S.REPORT.write("probe_w4a8_parts", dict(floor_us=floor, rows=rows))


if __name__ == "__main__":
    main()
