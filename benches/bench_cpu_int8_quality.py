"""What the CPU matmul's int8 activations (``qtensors.torch.linear.CPU_INT8_ACTIVATIONS``, on by
default) cost in quality: SmolLM2-135M with int4-g64 RTN linears kept quantized, perplexity on
the Python library reference with the exact fp32-activation kernel and with the int8 one, in
the same run, against the fp32 model.

    python3 benches/bench_cpu_int8_quality.py [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_methods import eval_windows, perplexity, smollm2_folder  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    windows = eval_windows(tok, args.eval_tokens, 256)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = perplexity(model, windows)
    print(f"SmolLM2-135M fp32: perplexity {base:.4f} on {windows.numel()} tokens")
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    saved = lin.CPU_INT8_ACTIVATIONS
    try:
        for flag in (False, True):
            lin.CPU_INT8_ACTIVATIONS = flag
            t = time.perf_counter()
            p = perplexity(model, windows)
            kind = "int8 activations" if flag else "exact (fp32 activations)"
            print(
                f"int4-g64 RTN, {kind:<25} perplexity {p:.4f}  {p / base:.4f}x fp32  "
                f"({time.perf_counter() - t:.1f} s)"
            )
    finally:
        lin.CPU_INT8_ACTIVATIONS = saved


if __name__ == "__main__":
    main()
