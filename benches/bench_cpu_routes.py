"""The routes of the CPU linear for bf16 (and fp16) activations, each forced, in the same run:
the core's int8 kernel, the core's float kernels (packed GEMV / outgroups GEMV / bf16 tiles) and
decoding the weight to the activations' dtype then torch's ``F.linear``; against ``F.linear`` on
the dense weight in that dtype. The last column is what ``linear_cpu`` picks
(``qtensors.torch.linear._route``, by shapes alone).

    RAYON_NUM_THREADS=1 python3 benches/bench_cpu_routes.py --threads 1
    RAYON_NUM_THREADS=2 python3 benches/bench_cpu_routes.py --threads 2

Milliseconds, best of --repeat; "-" where a route does not take the weight (int8: affine and
symmetric codes grouped along the inputs).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.nn.functional as F
from _common import best_ms
from torch import nn

import qtensors as qt
from qtensors.torch import QuantizedLinear
from qtensors.torch import linear as L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()}, torch {torch.__version__} threads {args.threads}, "
        f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}, "
        f"AVX-512 BF16 tiles {qt._core.linear_bf16_available()}"
    )
    print(
        f"{'shape':>11} {'rows':>4} {'encoding':>11} {'dtype':>8} {'F.linear':>8} {'int8':>8} "
        f"{'core':>8} {'decode':>8}  picked"
    )
    encodings = [("affine4 g64", qt.Affine(4, 64, axis=-1)), ("nf4 g64", qt.NF4(64, axis=-1))]
    real_route = L._cpu_route
    torch.manual_seed(0)
    with torch.no_grad():
        for n_out, n_in in [(4096, 4096), (5632, 2048), (384, 384), (1536, 384), (384, 1536)]:
            lin = nn.Linear(n_in, n_out, bias=False)
            for label, enc in encodings:
                q = QuantizedLinear.from_linear(lin, enc)
                # fp16: fewer rows (torch's fp16 GEMM is slow on CPUs without AVX-512 FP16)
                cases = [(torch.bfloat16, r) for r in [9, 16, 32, 64, 128, 480]]
                cases += [(torch.float16, r) for r in [32, 480] if r * n_out * n_in < 1 << 30]
                for dt, rows in cases:
                    wd = lin.weight.to(dt)
                    x = torch.randn(rows, n_in).to(dt)
                    t = {"F.linear": best_ms(lambda x=x, wd=wd: F.linear(x, wd), args.repeat)}
                    for route in ("int8", "core", "decode"):
                        forced = "exact" if route == "core" else route
                        L._cpu_route = lambda *a, r=forced: r
                        try:
                            ok = route != "int8" or q.weight.encoding["name"] == "affine"
                            ok = ok and (route != "int8" or L._INT8_CPU)
                            t[route] = best_ms(lambda x=x, q=q: q(x), args.repeat) if ok else None
                        finally:
                            L._cpu_route = real_route
                    int8 = L._INT8_CPU and q.weight.encoding["name"] == "affine"
                    picked = real_route(int8, n_out, n_in, dt, rows)
                    cells = " ".join("       -" if v is None else f"{v:8.3f}" for v in t.values())
                    name = str(dt)[6:]
                    print(f"{n_out:>5}x{n_in:<5} {rows:>4} {label:>11} {name:>8} {cells}  {picked}")


if __name__ == "__main__":
    main()
