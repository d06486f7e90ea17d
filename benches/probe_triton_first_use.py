"""What the first Triton kernel of a process costs when every kernel is already in Triton's
on-disk cache: ``qtensors.torch.warmup`` of one 2048 x 2048 int4-g64 fp16 linear at batch 1,
under cProfile, then the same for a second shape (same kernel function) for comparison.

    TRITON_CACHE_DIR=/tmp/tc python3 benches/probe_triton_first_use.py   # once to fill the cache
    TRITON_CACHE_DIR=/tmp/tc python3 benches/probe_triton_first_use.py   # the measured run

Needs a CUDA GPU.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
)

import torch

import qtensors as qt
from qtensors.torch import QuantizedLinear
from qtensors.torch.warmup import warmup


def layer(n_in: int) -> torch.nn.Module:
    dense = torch.nn.Linear(n_in, 2048, bias=False, device="cuda", dtype=torch.float16)
    return torch.nn.Sequential(
        QuantizedLinear.from_linear(dense, qt.Affine(bits=4, group_size=64, axis=-1))
    )


def main() -> None:
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    first = layer(2048)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    warmup(first, rows=(1,))
    prof.disable()
    print(f"first warm-up, batch 1: {time.perf_counter() - t:.3f} s")
    t = time.perf_counter()
    warmup(layer(4096), rows=(1,))
    print(f"another shape, same kernel: {time.perf_counter() - t:.3f} s")
    for key, n in (("cumulative", 28), ("tottime", 12)):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
        print(s.getvalue())


if __name__ == "__main__":
    main()
