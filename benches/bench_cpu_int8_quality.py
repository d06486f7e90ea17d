"""What int8 activations cost in quality: SmolLM2-135M with int4-g64 RTN linears kept quantized,
perplexity on the Python library reference, in the same run, against the fp32 model:

* exact: the CPU kernels with fp32 activations;
* CPU int8: the CPU matmul's int8 activations (``linear.CPU_INT8_ACTIVATIONS``, on by default;
  rounded per 32 inside the Rust kernel);
* GPU int8 numerics: every quantized linear's input rounded as the GPU's 1-4-row kernel rounds
  it (``kernels/words_int8.py``, ``launch.INT8_ACTIVATIONS``: ``q * d`` per 16 activations,
  ``d = max|x| / 127``), then the exact kernels. On the GPU only decode steps (1-4 rows) take
  that kernel; here every row does, so this bounds its effect from above;
* GPU int8 MMA numerics: the same rounding per 64 activations (one weight group), as the
  tensor-core kernel for 5-64 rows rounds them (``kernels/mma_int8.py``);
* per row: one factor for a row's whole input (``unit`` -1), as W4A8 GEMMs that scale each
  int product once per token do: the cheapest int8 rounding for a prompt's rows to apply;
* FP8 per row: each row scaled by ``max|x| / 448`` and rounded to E4M3 (``fp8`` hooks), as FP8
  tensor-core GEMMs take activations.

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


def int8_rounding(unit: int):
    """A forward pre-hook: the input rounded per ``unit`` activations as the GPU's int8 kernels
    do (16: ``words_int8.py``; the group size, 64 here: ``mma_int8.py``), the dtype kept, a
    ragged tail of fewer than ``unit`` left exact."""
    return lambda module, inputs: _rounded(inputs, unit)


def fp8_rounding(module, inputs):
    """A forward pre-hook: each row of the input scaled into E4M3's range by one factor and
    rounded to E4M3 (to nearest even), the dtype kept."""
    (x,) = inputs
    u = x.float()
    d = u.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 448.0
    return (((u / d).to(torch.float8_e4m3fn).float() * d).to(x.dtype),)


def _rounded(inputs, unit: int):
    (x,) = inputs
    K = x.shape[-1]
    unit = K if unit < 0 else unit
    n = K // unit * unit
    u = x[..., :n].float().reshape(*x.shape[:-1], n // unit, unit)
    amax = u.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    d = amax * (1.0 / 127.0)
    r = (torch.round(u * (127.0 / amax)) * d).reshape(*x.shape[:-1], n)
    return (torch.cat([r.to(x.dtype), x[..., n:]], -1),)


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
    linears = [m for m in model.modules() if isinstance(m, qtt.QuantizedLinear)]
    try:
        kinds = {
            "exact (fp32 activations)": 0,
            "CPU int8 (per 32)": 0,
            "GPU int8 numerics (per 16)": 16,
            "GPU int8 MMA numerics (per 64)": 64,
            "int8 per row (one factor a row)": -1,
            "FP8 E4M3 per row": "fp8",
        }
        for kind, unit in kinds.items():
            lin.CPU_INT8_ACTIVATIONS = kind.startswith("CPU")
            hooks = []
            hook = fp8_rounding if unit == "fp8" else int8_rounding(unit) if unit else None
            if hook is not None:
                hooks = [m.register_forward_pre_hook(hook) for m in linears]
            t = time.perf_counter()
            p = perplexity(model, windows)
            for h in hooks:
                h.remove()
            print(
                f"int4-g64 RTN, {kind:<31} perplexity {p:.4f}  {p / base:.4f}x fp32  "
                f"({time.perf_counter() - t:.1f} s)"
            )
    finally:
        lin.CPU_INT8_ACTIVATIONS = saved


if __name__ == "__main__":
    main()
