"""Probe (H200): which matmul of an int4 8B model's batched greedy ``generate`` (batch 256, eager,
16 new tokens) takes the slowest cuBLAS kernels: ``torch.profiler`` with input shapes, the
matmul ops (``aten::mm`` / ``addmm`` / ``bmm``) grouped by their inputs' shapes, with their CUDA
time, and the inputs' strides of the LM head's calls.

    OUT=DIR python3 benches/probe_slow_matmul.py [--batch 256]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import LLAMA_8B, Report, generate_kwargs  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402

REPORT = Report()
say = REPORT.say


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 256
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B)).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    seen = []
    head = model.lm_head
    real = head.forward

    def noted(x):
        seen.append((tuple(x.shape), x.stride(), x.is_contiguous()))
        return real(x)

    head.forward = noted
    ids = torch.randint(1, model.config.vocab_size, (batch, 16), device="cuda")
    kw = generate_kwargs(16, False)
    with torch.inference_mode():
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        seen.clear()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                     record_shapes=True) as prof:  # fmt: skip
            model.generate(ids, **kw)
            torch.cuda.synchronize()
    say(
        f"# int4-g64 8B, batch {batch}, eager generate of 16 tokens, {torch.cuda.get_device_name()}"
    )
    say(f"LM head inputs (shape, strides, contiguous): {sorted(set(seen))}")
    ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ops]
    rows.sort(key=lambda e: -e.device_time_total)
    for e in rows[:16]:
        say(f"  {e.device_time_total / 1e3:9.2f} ms  {e.count:5d}x  {e.key:12}  {e.input_shapes}")
    kernels = [e for e in prof.key_averages() if "384x8" in e.key]
    for e in kernels:
        say(f"kernel {e.key[:70]}: {e.count} calls, {e.device_time_total / 1e3:.2f} ms")
    # the LM head's product alone, on each input layout seen, against its bf16 weight
    hidden = model.config.hidden_size
    w = torch.randn(model.config.vocab_size, hidden, device="cuda", dtype=torch.bfloat16)
    for shape, strides, _ in sorted(set(seen)):
        base = torch.randn(shape[0], max(1, strides[0] // hidden), hidden, device="cuda",
                           dtype=torch.bfloat16)  # fmt: skip
        x = base[:, -shape[1] :, :] if len(shape) == 3 else base[:, 0]
        for label, xx in (("as given", x), ("contiguous", x.contiguous())):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            F.linear(xx, w)
            a.record()
            for _ in range(5):
                F.linear(xx, w)
            b.record()
            torch.cuda.synchronize()
            say(f"F.linear({tuple(xx.shape)}, strides {xx.stride()}) {label}: "
                f"{a.elapsed_time(b) / 5:.3f} ms")  # fmt: skip
    REPORT.write("probe_slow_matmul", {})


if __name__ == "__main__":
    main()
