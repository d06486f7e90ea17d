"""Where a decode step's GPU time goes: the 1.1B Llama-shaped model (random weights; ``--model
8b``: Llama-3-8B's shape), bf16 and int4-g64 kept quantized, greedy generation of one sequence
(``--batch``: that many) under torch.profiler (eager: the kernels are
the ones a CUDA graph replays; their device time does not depend on the host).

    OUT=DIR python3 benches/profile_gpu_decode.py [--modes eager,compiled] [--batch 1] [--model 8b]
        [--no-bf16]

``compiled``: transformers' static cache + ``torch.compile(mode="reduce-overhead", fullgraph)``
as ``bench_gpu_generate.py`` runs it; the kernels the CUDA graphs replay are listed as the
profiler records them, with the step's wall time and torch.compile's counters (CUDA-graph skips,
graph breaks), to find what a compiled step spends beyond its kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import LLAMA_1B, LLAMA_8B, Report, generate_kwargs  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402

NEW = 16
REPORT = Report()
say = REPORT.say


def build(config: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def profile_decode(model, label: str, results: dict, mode: str = "eager", batch: int = 1) -> None:
    ids = torch.randint(1, model.config.vocab_size, (batch, 16), device="cuda")
    kw = generate_kwargs(NEW, mode == "compiled")
    label = f"{label} {mode} batch {batch}"
    with torch.inference_mode():
        for _ in range(2 if mode == "compiled" else 1):
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / NEW
        long_kw = dict(kw, max_new_tokens=4 * NEW, min_new_tokens=4 * NEW)
        model.generate(ids, **long_kw)  # the longer cache shape's compile / capture first
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **long_kw)
        torch.cuda.synchronize()
        step_ms = ((time.perf_counter() - t0) * 1e3 - wall_ms * NEW) / (3 * NEW)
        say(f"## {label}: wall time per generated token {wall_ms:.2f} ms (prefill included); "
            f"per decode step {step_ms:.2f} ms (from {NEW} and {4 * NEW} new tokens)")  # fmt: skip
        if mode == "compiled":
            from torch._dynamo.utils import counters

            for group in ("inductor", "graph_break", "stats"):
                items = {k: v for k, v in counters[group].items() if v}
                say(f"  torch.compile counters[{group!r}]: {dict(list(items.items())[:12])}")
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model.generate(ids, **kw)
            torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name][0] += (
                ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            )
            per_name[ev.name][1] += 1
    cpu = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith(("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel")):
            cpu[ev.key] += ev.count
    say(f"  host launches per token: { {k: round(v / NEW, 1) for k, v in cpu.items()} }")
    say("  host time by event (self CPU, per generated token):")
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:14]
    for ev in top:
        say(f"    {ev.self_cpu_time_total / NEW:8.1f} us  {ev.count / NEW:6.1f}x  {ev.key[:80]}")
    total = sum(v[0] for v in per_name.values())
    say(f"## {label}: GPU time per generated token {total / NEW:.0f} us, kernels per token "
        f"{sum(v[1] for v in per_name.values()) / NEW:.0f}")  # fmt: skip
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:18]
    for name, (us, n) in rows:
        say(f"  {us / NEW:8.1f} us/token  {n / NEW:6.1f} calls/token  {name[:90]}")
    results[label] = {k: v for k, v in per_name.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="eager", help="comma-separated: eager, compiled")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--model", default="1b", choices=["1b", "8b"], help="the Llama shape")
    ap.add_argument("--no-bf16", action="store_true", help="profile the int4 model only")
    args = ap.parse_args()
    modes = args.modes.split(",")
    results: dict = {}
    model = build(LLAMA_8B if args.model == "8b" else LLAMA_1B)
    for mode in modes if not args.no_bf16 else ():
        profile_decode(model, "bf16", results, mode, args.batch)
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    torch.cuda.empty_cache()
    for mode in modes:
        profile_decode(model, "int4-g64", results, mode, args.batch)
    REPORT.write("profile_gpu_decode", results)


if __name__ == "__main__":
    main()
