"""Probe (GPU): how many quantized-linear calls a compiled forward of the 1.1B Llama-shaped model
of ``bench_gpu_generate.py`` makes, its sibling linears joined (inductor's merging pass,
``qtensors/torch/inductor_pass.py``) and apart: ``qtensors::linear`` dispatches counted by
torch's profiler over one forward of ``torch.compile(model, fullgraph=True)`` (inductor), the
logits compared with the eager model's.

    OUT=DIR python3 benches/probe_compile_merge.py
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu_generate as B
import torch
from _common import Report

import qtensors as qt
import qtensors.torch as qtt

REPORT = Report()


def calls(model, ids) -> tuple[int, float]:
    """(``qtensors::linear`` calls in one compiled forward, max |compiled - eager| / max |eager|
    of the logits)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        want = model(ids, use_cache=False).logits.float()
        compiled(ids, use_cache=False)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(ids, use_cache=False).logits.float()
    n = sum(e.count for e in prof.key_averages() if e.key == "qtensors::linear")
    return n, ((got - want).abs().max() / want.abs().max()).item()


def main() -> None:
    model = B.build_model()
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    apart = copy.deepcopy(model)
    qtt.unfuse_siblings(apart)
    layers = model.config.num_hidden_layers
    ids = torch.randint(1, model.config.vocab_size, (1, 16), device=B.DEV)
    for label, m in (("joined", model), ("apart", apart)):
        n, err = calls(m, ids)
        per = (n - 1) / layers
        REPORT.say(f"{label:<7} qtensors::linear calls a compiled forward: {n} ({layers} layers:"
                   f" {per:.1f} a layer + the head); logits vs eager {err:.1e}")  # fmt: skip
    REPORT.write("probe_compile_merge", {"lines": REPORT.lines})


if __name__ == "__main__":
    main()
