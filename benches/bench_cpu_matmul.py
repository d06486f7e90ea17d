"""CPU matmul with 4-bit weights (``torch.ops.qtensors.linear``, the Rust core) against torch's
``F.linear`` on dense fp32 and bf16 weights of the same shape, in the same run.

    RAYON_NUM_THREADS=1 python3 benches/bench_cpu_matmul.py --threads 1
    RAYON_NUM_THREADS=2 python3 benches/bench_cpu_matmul.py --threads 2

``--threads`` sets torch's threads, which the core's parallel work runs on (torch's OpenMP team,
``qtensors.torch.cpu_pool``); rayon's pool follows RAYON_NUM_THREADS (set it to match). "rayon
ms" is the default path again with the core on rayon's pool, the alternative the OpenMP team
replaced, in the same run.
Prints milliseconds (best of --repeat) and the speedups the issue asks for: batch 1 >= 3x fp32
and >= 1.5x bf16; batch 32 no slower than fp32. Each qtensors figure is in the activations' dtype
(fp32 activations against fp32 F.linear, bf16 against bf16). "qtensors" is the default path (the
integer kernel with int8 activations where it applies: 4-bit affine/symmetric, not NF4 or FlexGen's
groups along the outputs); "exact" the same call with fp32 activations
(``qtensors.torch.linear.CPU_INT8_ACTIVATIONS = False``).
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
from qtensors.torch import QuantizedLinear, cpu_pool
from qtensors.torch import linear as linear_mod


def on_rayon_ms(fn, repeat: int) -> float:
    """`best_ms(fn)` with the core's parallel work on rayon's pool, then back to the default."""
    default = cpu_pool.current()
    cpu_pool.use("rayon")
    try:
        return best_ms(fn, repeat)
    finally:
        cpu_pool.use(default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()}, kernels {qt.kernels()}, torch {torch.__version__} "
        f"threads {args.threads}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}, "
        f"core's pool {cpu_pool.current()} ({cpu_pool.threads()} threads)"
    )
    encodings = [
        ("affine4 g64", qt.Affine(4, 64, axis=-1)),
        ("nf4 g64", qt.NF4(64, axis=-1)),
        ("flexgen (axis 0)", qt.FLEXGEN),
    ]
    head = f"{'shape':>11} {'batch':>5} {'encoding':>17} {'dtype':>8} {'F.linear ms':>11} "
    print(
        head + f"{'qtensors ms':>11} {'speedup':>8} {'exact ms':>9} {'speedup':>8} "
        f"{'rayon ms':>9} {'speedup':>8}"
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for n_out, n_in in [(4096, 4096), (5632, 2048)]:
            lin = nn.Linear(n_in, n_out, bias=False)
            for batch in [1, 32]:
                for label, enc in encodings:
                    q = QuantizedLinear.from_linear(lin, enc)
                    for dt in [torch.float32, torch.bfloat16]:
                        w = lin.weight.to(dt)
                        x = torch.randn(batch, n_in).to(dt)
                        t_ref = best_ms(lambda w=w, x=x: F.linear(x, w), args.repeat)
                        t_q = best_ms(lambda q=q, x=x: q(x), args.repeat)
                        t_r = on_rayon_ms(lambda q=q, x=x: q(x), args.repeat)
                        linear_mod.CPU_INT8_ACTIVATIONS = False
                        t_e = best_ms(lambda q=q, x=x: q(x), args.repeat)
                        linear_mod.CPU_INT8_ACTIVATIONS = True
                        print(
                            f"{n_out:>5}x{n_in:<5} {batch:>5} {label:>17} {str(dt)[6:]:>8} "
                            f"{t_ref:11.3f} {t_q:11.3f} {t_ref / t_q:7.2f}x "
                            f"{t_e:9.3f} {t_ref / t_e:7.2f}x {t_r:9.3f} {t_ref / t_r:7.2f}x"
                        )


if __name__ == "__main__":
    main()
