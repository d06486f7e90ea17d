"""Host time of torch.compile's guard checks before each compiled call ("TorchDynamo Cache
Lookup" in the profiler) for a 22-layer Llama-shaped model (tiny widths, so the checks are what
the call is made of), on the CPU: dense ``nn.Linear`` layers, int4 ``QuantizedLinear`` layers,
and the same with the forward that read the weight's ``torch.Size``, encoding dict and ``bits``
property (before ``QuantizedWeight.op_args``), in one run.

    python3 benches/probe_compile_guards.py

Prints microseconds per call, the best of 6 rounds of 10 calls.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
)

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import QuantizedLinear
from qtensors.torch.linear import linear
from qtensors.torch.ops import OUT_DTYPES


def forward_reading_metadata(self, x: torch.Tensor) -> torch.Tensor:
    """``QuantizedLinear.forward`` as it was: the op's static arguments read from the weight's
    Size, encoding dict and ``bits`` property on every call."""
    w = self.weight
    if x.dtype not in OUT_DTYPES:
        x = x.to(w.dtype)
    e = w.encoding
    return linear(
        x, w.codes, w.scales, w.mins, self.bias, list(w.shape), e["name"], w.bits,
        int(e["group_size"]), int(e["axis"]),
    )  # fmt: skip


class OldQuantizedLinear(QuantizedLinear):
    forward = forward_reading_metadata


def model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=22, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    )  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    if kind != "dense":
        qtt.quantize_model(m, qt.Affine(bits=4, group_size=32, axis=-1))
        if kind == "int4, metadata read per call":
            for mod in m.modules():
                if type(mod) is QuantizedLinear:
                    mod.__class__ = OldQuantizedLinear
    return m


def guard_us(m: torch.nn.Module) -> float:
    f = torch.compile(m.forward, fullgraph=True)
    ids = torch.randint(0, 256, (1, 1))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            f(input_ids=ids, use_cache=False)
        for _ in range(6):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    f(input_ids=ids, use_cache=False)
            ev = {e.key: e for e in prof.key_averages()}
            best = min(best, ev["TorchDynamo Cache Lookup"].self_cpu_time_total / 10)
    torch._dynamo.reset()
    return best


def main() -> None:
    print(f"# torch {torch.__version__}, CPU; guard checks per compiled call (us, best of 6 x 10)")
    for kind in ("dense", "int4, metadata read per call", "int4 (op_args)"):
        print(f"{kind:32} {guard_us(model(kind)):8.0f}", flush=True)


if __name__ == "__main__":
    main()
