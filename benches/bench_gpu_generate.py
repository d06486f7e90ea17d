"""Decode speed of a 1.1B Llama-shaped model (hidden 2048, 22 layers, intermediate 5632, GQA
32/4, vocab 32000, random weights, built on the GPU), bf16 against ``qtt.quantize_model`` int4-g64
(affine, groups along in) kept quantized: greedy ``generate`` at batch 1 and 8, eager (dynamic
cache) and with ``cache_implementation="static"`` + ``torch.compile(mode="reduce-overhead")``
(transformers' own compile of the decoding step, fullgraph), tokens/s and peak GPU memory.
Self-contained, no network:

    python3 benches/bench_gpu_generate.py          # table to stdout; with OUT=DIR also files

Each measured ``generate`` follows two warm-up calls (compilation, CUDA-graph recording) of the
same shape; the compiled runs are skipped once the script has run longer than
``QT_BENCH_BUDGET_S`` seconds (default 330). ``QT_BENCH_DRY=1``: a tiny model on the CPU, eager
only (checks the script).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from _common import LLAMA_1B, LLAMA_1B_DRY, Report

DRY = os.environ.get("QT_BENCH_DRY") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402

DEV = "cpu" if DRY else "cuda"
BUDGET_S = float(os.environ.get("QT_BENCH_BUDGET_S", "330"))
PROMPT, NEW = (16, 64) if not DRY else (4, 3)
BATCHES = (1, 8) if not DRY else (1, 2)
MODES = ("eager", "static+compile") if not DRY else ("eager",)
T0 = time.time()
RESULTS: dict[str, Any] = {"runs": []}
REPORT = Report()
say = REPORT.say


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(LLAMA_1B_DRY if DRY else LLAMA_1B))
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if not DRY else torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: always NEW tokens
    model.generation_config.pad_token_id = 0
    return model


def generate_kwargs(mode: str) -> dict:
    kw: dict[str, Any] = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    if mode == "static+compile":
        from transformers import CompileConfig

        kw["cache_implementation"] = "static"
        kw["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
    else:
        kw["disable_compile"] = True
    return kw


def measure(model, label: str, batch: int, mode: str) -> None:
    if mode != "eager" and time.time() - T0 > BUDGET_S:
        say(f"{label:<10} {batch:>5} {mode:<15} skipped (past {BUDGET_S:.0f} s)")
        return
    ids = torch.randint(1, model.config.vocab_size, (batch, PROMPT), device=DEV)
    kw = generate_kwargs(mode)
    err = ""
    try:
        with torch.inference_mode():
            t_warm = time.perf_counter()
            for _ in range(2):
                model.generate(ids, **kw)
            sync()
            t_warm = time.perf_counter() - t_warm
            if not DRY:
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            sync()
            t = time.perf_counter() - t
    except Exception as exc:  # report and go on (a graph break under fullgraph, ...)
        err = f"{type(exc).__name__}: {str(exc)[:300]}"
        say(f"{label:<10} {batch:>5} {mode:<15} FAILED {err}")
        RESULTS["runs"].append(dict(model=label, batch=batch, mode=mode, error=err))
        return
    assert out.shape == (batch, PROMPT + NEW), out.shape
    peak = torch.cuda.max_memory_allocated() / 2**30 if not DRY else 0.0
    tps = batch * NEW / t
    row = dict(
        model=label,
        batch=batch,
        mode=mode,
        seconds=t,
        tokens_per_s=tps,
        ms_per_step=t / NEW * 1e3,
        peak_gib=peak,
        warmup_s=t_warm,
    )
    RESULTS["runs"].append(row)
    say(
        f"{label:<10} {batch:>5} {mode:<15} {tps:9.1f} {row['ms_per_step']:9.2f} {peak:8.2f} "
        f"{t_warm:8.1f}"
    )


def main() -> None:
    name = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    import transformers

    RESULTS["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    say(
        f"# 1.1B Llama-shaped decode, {name}, {RESULTS['versions']}, prompt {PROMPT}, "
        f"{NEW} new tokens, greedy"
    )
    say(
        f"{'model':<10} {'batch':>5} {'mode':<15} {'tokens/s':>9} {'ms/step':>9} {'peak GiB':>8} "
        f"{'warmup s':>8}"
    )
    model = build_model()
    runs = [(b, m) for m in MODES for b in BATCHES]
    for b, m in runs:
        measure(model, "bf16", b, m)
        torch._dynamo.reset()
    t = time.perf_counter()
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    sync()
    RESULTS["quantize_model_s"] = time.perf_counter() - t
    if not DRY:
        torch.cuda.empty_cache()
    for b, m in runs:
        measure(model, "int4-g64", b, m)
        torch._dynamo.reset()
    say(f"(quantize_model: {RESULTS['quantize_model_s']:.1f} s on the CPU)")
    by = {(r["model"], r["batch"], r["mode"]): r for r in RESULTS["runs"] if "error" not in r}
    say("speedup int4-g64 / bf16 in tokens/s:")
    for b, m in runs:
        q, f = by.get(("int4-g64", b, m)), by.get(("bf16", b, m))
        if q and f:
            say(f"  batch {b} {m:<15} {q['tokens_per_s'] / f['tokens_per_s']:.2f}x")
    say(f"total {time.time() - T0:.0f} s")
    REPORT.write("bench_gpu_generate", RESULTS)


if __name__ == "__main__":
    main()
