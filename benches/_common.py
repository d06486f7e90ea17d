"""Helpers shared by the benchmark scripts (run as `python3 benches/NAME.py`, so this module is
importable as `_common`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any

#: The Llama-shaped 1.1B model the GPU benchmarks load or build (random weights): TinyLlama's
#: shape, so figures compare across scripts. `LLAMA_1B_DRY`: the same architecture, tiny, for
#: the CPU dry runs that check the scripts.
LLAMA_1B: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
#: Llama-3-8B's shape (hidden 4096, MLP 14336, 32 layers, GQA 32/8, vocab 128256): its MLP and
#: head weights are large enough for the tensor-core W4A8 route at 5-32 rows
LLAMA_8B: dict[str, Any] = dict(
    LLAMA_1B,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_key_value_heads=8,
    vocab_size=128256,
)
LLAMA_1B_DRY: dict[str, Any] = dict(
    LLAMA_1B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=128
)
LLAMA_1B_DRY.update(num_attention_heads=4, num_key_value_heads=2)


def synthetic_bf16(gb: float) -> dict[str, Any]:
    """A ~`gb` GB bf16 model of LLaMA-like layers (hidden 2048, MLP 5632) drawn from a realistic
    distribution: N(0, 1) weights times log-normal per-row scales around 0.02, norms near 1.
    Seeded: every run and script sees the same tensors."""
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {}
    hidden, inter = 2048, 5632
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 2
    shapes = [("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden))]
    shapes += [("o", (hidden, hidden)), ("gate", (inter, hidden)), ("up", (inter, hidden))]
    shapes += [("down", (hidden, inter))]
    for i in range(max(1, round(gb * 1e9 / per_layer))):
        for name, shape in shapes:
            rows = 0.02 * torch.exp(0.3 * torch.randn(shape[0], 1, generator=g))
            w = torch.randn(*shape, generator=g) * rows
            tensors[f"layers.{i}.{name}.weight"] = w.to(torch.bfloat16)
        norm = 1 + 0.1 * torch.randn(hidden, generator=g)
        tensors[f"layers.{i}.norm.weight"] = norm.to(torch.bfloat16)
    return tensors


def drop_caches(paths: list[str]) -> str:
    """Drop the page cache (all of it where permitted, else these files'); returns which way."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def cli_value(flag: str, default: str) -> str:
    """The word after ``flag`` on the command line, else ``default`` (the probes' one-flag
    options, without an argparse parser each)."""
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


class Report:
    """What a benchmark prints, kept so that it can be written with the numbers under $OUT."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, stem: str, results: dict[str, Any]) -> None:
        """`stem.json` (the numbers) and `stem.txt` (what was printed) under $OUT, if it is set."""
        out = os.environ.get("OUT")
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{stem}.json"), "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        with open(os.path.join(out, f"{stem}.txt"), "w") as fh:
            fh.write("\n".join(self.lines) + "\n")


def best_ms(fn, repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn`` (after one warm-up call), in milliseconds."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def gpu_busy(fn) -> tuple[float, float, int, dict[str, float]]:
    """(wall s, GPU busy s, kernels, seconds by kernel name) of ``fn()``: the union of the
    kernels' intervals in a ``torch.profiler`` trace (CUDA-graph replays included: CUPTI traces
    their kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) * 1e-6
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # union of intervals (us)
        if b > end:
            busy += b - max(a, end)
            end = b
    return wall, busy * 1e-6, len(spans), by_name


def cuda_ms(fn) -> float:
    """GPU time of one call of ``fn`` (ms): CUDA events recorded around it on the current
    stream (when the host is the bottleneck, its launch time)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_us(calls: list, reps: int, dry: bool = False) -> float:
    """Median time per call (us) of ``calls`` run back to back inside one CUDA graph, after one
    eager pass (compiles, allocations, split-K counters: outside the capture) and one on a side
    stream; ``dry``: one eager pass timed on the host (the CPU dry runs)."""
    import statistics

    import torch

    if dry:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e6 / len(calls)
    for c in calls:
        c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del graph
    return statistics.median(times)


@contextlib.contextmanager
def count_calls(module, name: str):
    """``with count_calls(launch, "gemm16_linear") as calls:`` the calls of ``module.name``
    made inside, counted (the function still runs)."""
    real = getattr(module, name)
    calls: list[int] = []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def switched(module, **values):
    """``with switched(launch, GLUON_ACT_TMA=1):`` those attributes of ``module`` set inside,
    put back after (the probes' way to run one kernel variant)."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def generate_kwargs(new: int, compiled: bool) -> dict[str, Any]:
    """``generate`` arguments for ``new`` greedy tokens: eager (dynamic cache, transformers'
    auto-compile off), or ``compiled``: the static cache with transformers' own
    ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of the decoding step."""
    kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if compiled:
        from transformers import CompileConfig

        kw["cache_implementation"] = "static"
        kw["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
        kw["disable_compile"] = True
    return kw
