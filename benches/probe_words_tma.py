"""Probe (H200): the batch-1 int8 GEMV (``words_int8.py``) with its codes brought by the TMA
engine into a ring of shared memory (Triton's pipeliner over a tensor descriptor), against the
routed kernel and cuBLAS bf16, CUDA-graph timed over the issue's shapes.

The question: the routed kernel runs at ~70% of the HBM bound with its instructions cut
by 15-23% for no gain (``gpu_words_int8_lane_units_h200.txt``), so what holds it may be the bytes a
thread can keep in flight in registers (each program loads a step, waits, multiplies). Here
the next ``STAGES - 1`` steps' codes are copied while a step is multiplied, in shared memory,
with no register or load instruction per thread for them.

    OUT=DIR python3 benches/probe_words_tma.py [--stages 2,3,4] [--features 4,8]
        [--encodings int4-affine-g64,int4-sym-g64]
    python3 benches/probe_words_tma.py --smoke    # CPU, TRITON_INTERPRET=1: the check only
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from _common import Report, cli_value  # noqa: E402
from bench_gpu_gemv_sweep import SHAPES, SMOKE, TOL, Case, copy_gbps, graph_us  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.kernels.words_int8 import _row  # noqa: E402

REPORT = Report()
say = REPORT.say


@triton.jit
def words_int8_tma_kernel(
    x_ptr,
    codes_desc,
    scales_ptr,
    mins_ptr,
    out_ptr,
    N,
    K,
    G,
    ENC: tl.constexpr,
    GS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """One row of x, 4-bit affine / symmetric codes: ``words_int8.py``'s arithmetic (``_row``)
    on codes read through ``codes_desc`` (int64 units ``[N, K / 16]``, blocks ``[BLOCK_N,
    BLOCK_K / 16]``), pipelined ``STAGES`` deep."""
    PU: tl.constexpr = 16
    KU: tl.constexpr = BLOCK_K // PU
    pid = tl.program_id(0)
    row0 = pid * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((KU, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        u = tl.trans(codes_desc.load([row0, k0 // PU]))  # [KU, BLOCK_N]; zeros out of bounds
        unit = k0 // PU + tl.arange(0, KU)
        kmask = unit < K // PU
        wmask = rmask[None, :] & kmask[:, None]
        sidx = rows[None, :] * G + (unit * PU // GS)[:, None]
        s = tl.load(scales_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        else:
            m = s
        xcol = unit[:, None] * PU + tl.arange(0, 8)[None, :]
        wa = u.to(tl.int32)
        wb = (u >> 32).to(tl.int32)
        acc = _row(wa, wb, x_ptr, 0, 1, 0, xcol, kmask[:, None], s, m, acc, ENC, 4, EMULATE)
    y = tl.sum(acc, axis=0)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


def tma_linear(x, w, block_n: int, stages: int, block_k: int = 2048):
    """``x @ W^T`` (one row) by the probe kernel; the descriptor made once per weight copy."""
    name, _, g = w.enc
    key = (block_n, block_k)
    descs = w.__dict__.setdefault("tma_descs", {})
    if key not in descs:
        units = w.codes.view(torch.int64).view(w.N, w.K // 16)
        descs[key] = TensorDescriptor(units, list(units.shape), list(units.stride()),
                                      [block_n, block_k // 16])  # fmt: skip
    out = torch.empty(1, w.N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(w.N, block_n),)
    opts = {} if SMOKE else {"num_warps": 4}
    words_int8_tma_kernel[grid](
        x, descs[key], w.scales, w.mins if w.mins is not None else w.scales, out, w.N, w.K,
        -(-w.K // g), ENC={"affine": 0, "symmetric": 1}[name], GS=g, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, EMULATE=SMOKE, **opts,
    )  # fmt: skip
    return out


def routed(x, w):
    n, b, g = w.enc
    return L.tiled_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, n, b, g)


def main() -> None:
    stages = [int(s) for s in cli_value("--stages", "2,3,4").split(",")]
    features = [int(s) for s in cli_value("--features", "4,8").split(",")]
    encodings = cli_value("--encodings", "int4-affine-g64,int4-sym-g64").split(",")
    gbps = copy_gbps()
    device = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    say(f"# batch-1 int8 GEMV, codes by TMA, on {device}, triton {triton.__version__}; copy "
        f"{gbps:.0f} GB/s; us per call in a CUDA graph (x: over cuBLAS bf16, hbm: share of the "
        f"bound, then the time over the routed kernel's)")  # fmt: skip
    for ename in encodings:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            x = case.x(1)
            cub = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
            bound = case.bound_us(1, gbps)
            cells = []
            err = case.check(routed, 1)
            base = case.time(routed, 1) if err <= TOL else None
            cells.append(f"routed {base:6.1f} {cub / base:5.2f}x {bound / base:4.0%}"
                         if base else f"routed WRONG {err:.1e}")  # fmt: skip
            for bn in features:
                for st in stages:
                    fn = lambda x, w, bn=bn, st=st: tma_linear(x, w, bn, st)  # noqa: E731
                    try:
                        err = case.check(fn, 1)
                        if not err <= TOL:
                            cells.append(f"n{bn}s{st} WRONG {err:.1e}")
                            continue
                        t = case.time(fn, 1)
                        rel = f" {t / base:5.3f}" if base else ""
                        cells.append(f"n{bn}s{st} {t:6.1f} {cub / t:5.2f}x {bound / t:4.0%}{rel}")
                    except Exception as exc:  # a configuration the compiler refuses
                        cells.append(f"n{bn}s{st} {type(exc).__name__}: {str(exc)[:80]}")
            say(f"{ename:<16} {N:>5}x{K:<5} cuBLAS {cub:6.1f} | " + " | ".join(cells))
            del case
            torch.cuda.empty_cache()
    REPORT.write("probe_words_tma", {})


if __name__ == "__main__":
    main()
