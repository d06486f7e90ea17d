"""Host time of the CUDA linear's Python before the kernel launcher, measured on any machine:
``linear_cuda`` on CPU tensors (its routing, plans, output allocation and argument building are
device-agnostic) with the launcher replaced by the specialization-key computation alone
(``fastlaunch._spec`` per argument, what every call pays before the compiled launcher runs).

    python3 benches/probe_host_overhead.py

Prints microseconds per call for batch 1 and 8 (bf16, a 2048 x 2048 int4-g64 weight) and the
share of that spent building the key. The launcher's own cost (~10 us on the H200 machine,
``probe_gemv_variants.py --overhead``) comes on top on a GPU.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
)

import torch

import qtensors as qt
from qtensors import quantized as Q
from qtensors.torch import linear as lin
from qtensors.torch.kernels import fastlaunch
from qtensors.torch.kernels import launch as L


def per_call_us(fn, n: int = 5000) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def best_pair(a, b, rounds: int = 7) -> tuple[float, float]:
    """The fastest round of each, the two alternating (a shared machine drifts)."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(per_call_us(a))
        tb.append(per_call_us(b))
    return min(ta), min(tb)


def main() -> None:
    w = torch.randn(2048, 2048)
    c, s, m = Q.quantize(w, qt.Affine(bits=4, group_size=64, axis=-1), framework="pt").parts()
    args = ([2048, 2048], "affine", 4, 64, 1)

    def key_only(kernel, grid, a, meta, meta_key, device):
        return tuple(map(fastlaunch._spec, a))

    def nothing(kernel, grid, a, meta, meta_key, device):
        return None

    for M in (1, 8):
        x = torch.randn(M, 2048, dtype=torch.bfloat16)
        call = lambda x=x: lin.linear_cuda(x, c, s, m, None, *args)  # noqa: E731

        def with_key_call(call=call):
            L.launch = key_only
            return call()

        def without_call(call=call):
            L.launch = nothing
            return call()

        with_key, without = best_pair(with_key_call, without_call)
        path = L.route(M, 2048, 2048, "affine", 4, 64, 1, True, True)
        print(
            f"batch {M} ({path}): {with_key:.1f} us per call before the launcher, of which "
            f"the specialization key {with_key - without:.1f} us "
            f"({(with_key - without) / with_key:.0%})"
        )


if __name__ == "__main__":
    main()
