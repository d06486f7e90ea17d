"""Probe (GPU): the activations a compiled decode step hands the decode + cuBLAS path, and what
their strides cost. Llama-3-8B's widths in 2 layers, int4-g64 kept quantized, greedy
``generate`` of ``--batch`` sequences with transformers' static cache + ``torch.compile``
(``reduce-overhead``, as ``bench_gpu_generate.py``): every 3-D x that ``linear.linear_rows``
receives is listed with its strides, ``is_contiguous()`` and whether matmul folds its rows
itself (``linear.rows_fold``). Then, for each such layout, ``F.linear`` on a bf16 weight of
that width timed inside a CUDA graph, as given and as one 2-D product over the rows.

    OUT=DIR python3 benches/probe_compiled_strides.py [--batch 256]
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

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402

REPORT = Report()
say = REPORT.say


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds a call of ``fn`` takes replayed from a CUDA graph of ``reps`` calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 256
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**dict(LLAMA_8B, num_hidden_layers=2)))
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    seen: dict[tuple, int] = {}
    real_rows = lin.linear_rows

    def noting(x, w, bias):
        if x.dim() > 2:
            key = (tuple(x.shape), x.stride(), x.is_contiguous(), lin.rows_fold(x), w.shape[0])
            seen[key] = seen.get(key, 0) + 1
        return real_rows(x, w, bias)

    lin.linear_rows = noting
    ids = torch.randint(1, model.config.vocab_size, (batch, 16), device="cuda")
    with torch.inference_mode():
        for _ in range(2):
            model.generate(ids, **generate_kwargs(8, True))
    lin.linear_rows = real_rows
    say(f"# Llama-8B widths, 2 layers, int4-g64, batch {batch}, static cache + torch.compile, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}")  # fmt: skip
    say("x given to linear_rows: shape, strides, is_contiguous, rows_fold, out features: calls")
    for key, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        say(f"  {key}: {n}")
    say("F.linear on a bf16 weight inside a CUDA graph, us: as given / rows folded (ratio)")
    with torch.inference_mode():
        for shape, stride, _c, folds, n_out in sorted(seen):
            if folds:
                continue
            k = shape[-1]
            span = sum(s * (d - 1) for s, d in zip(stride, shape, strict=True)) + 1
            x = torch.randn(span, device="cuda", dtype=torch.bfloat16).as_strided(shape, stride)
            w = torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16)
            given = graph_us(lambda x=x, w=w: F.linear(x, w))
            rows = graph_us(lambda x=x, w=w, k=k: F.linear(x.reshape(-1, k), w))
            say(f"  {shape} strides {stride} x {n_out}x{k}: {given:9.1f} / {rows:7.1f} "
                f"({given / rows:.1f}x)")  # fmt: skip
    REPORT.write("probe_compiled_strides", {"seen": [list(map(str, k)) for k in seen]})


if __name__ == "__main__":
    main()
