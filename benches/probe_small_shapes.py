"""Probe (H200): batch-1 kernels on the 1.1B model's own linear shapes (small grids), the
per-group words kernel in several configs (block_k, split) against cuBLAS, CUDA-graph timed.
(Its results file also has a column for the per-word kernel that words.py replaced, timed by
this script's first version with a copy of that kernel: see git history.)

    OUT=DIR python3 benches/probe_small_shapes.py
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_gpu_gemv_sweep import Case, graph_us, routed, timed  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

LINES: list[str] = []
SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def configs() -> dict[str, L.TiledConfig]:
    c = L.TiledConfig
    out = {}
    for bn, bk, warps in [(8, 1024, 4), (8, 512, 4), (8, 256, 2), (4, 512, 4), (16, 512, 4)]:
        for split in (0, 4):
            out[f"{bn}/{bk}/{warps}w/s{split}"] = c("words", 0, bn, bk, split, warps, 2)
    return out


def main() -> None:
    for N, K in SHAPES:
        case = Case("int4-affine-g64", N, K)
        x = case.x(1)
        cub = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
        rt = case.time(routed, 1)
        res = []
        for label, cfg in configs().items():
            us, err = timed(case, 1, cfg)
            res.append((us, label, err))
        res.sort()
        say(f"{N}x{K}: cublas {cub:.1f}  routed {rt:.1f}")
        for us, label, err in res[:8]:
            say(f"    {label:<18} {us:6.1f}  x{cub / us:.2f} {err}")
        best = res[0]
        say(f"  best {best[1]} {best[0]:.1f} us")
        del case
        torch.cuda.empty_cache()


if __name__ == "__main__":
    try:
        main()
    finally:
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "small.txt"), "w") as fh:
                fh.write("\n".join(LINES) + "\n")
