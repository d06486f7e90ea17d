"""``qtt.QuantizedKVCache`` on the GPU: correctness of the Triton kernel, decode speed against
bf16 ``DynamicCache`` (and transformers' ``QuantizedCache``, quanto backend, where
optimum-quanto is installed), and the longest context that fits in a fixed memory budget.
Self-contained, no network, about 3-5 minutes on an H200:

    python3 benches/bench_gpu_kv_cache.py          # tables to stdout; with OUT=DIR also files

1. Correctness: states appended in chunks and token by token to a CUDA cache (the Triton kernel)
   and to a CPU cache (the Rust core, itself checked against the numpy reference by
   tests/test_kv_cache.py): the keys and values returned and the stored codes, scales and mins
   must be identical, for 2, 4 and 8 bits, fp16 and bf16, head_dim 64 and 128.
2. Decode speed: a 1.1B Llama-shaped model (hidden 2048, 22 layers, GQA 32/4, head_dim 64,
   random bf16 weights), prompt of 4k, 16k and 32k tokens prefilled in chunks of 4096, then 32
   greedy single-token forwards timed (after 3 warm-up steps), batch 1 and 8; tokens/s (batch x
   steps / s) and the cache's bytes.
3. Memory budget: model weights + ``QT_KV_BUDGET_GIB`` (default 1) GiB as the process' memory
   cap (``torch.cuda.set_per_process_memory_fraction``); prompts prefilled 1024 tokens at a time
   until the allocator refuses: the tokens reached, for each cache.

``QT_BENCH_DRY=1`` runs a tiny model on the CPU (checks the script).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

from _common import LLAMA_1B, LLAMA_1B_DRY, Report

DRY = os.environ.get("QT_BENCH_DRY") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import kv_cache as kc  # noqa: E402

warnings.filterwarnings("ignore")
DEV = "cpu" if DRY else "cuda"
CONTEXTS = (4096, 16384, 32768) if not DRY else (64, 128)
BATCHES = (1, 8) if not DRY else (1, 2)
STEPS, WARM = (32, 3) if not DRY else (3, 1)
PREFILL_CHUNK = 4096 if not DRY else 32
BUDGET_GIB = float(os.environ.get("QT_KV_BUDGET_GIB", "1"))
RESULTS: dict[str, Any] = {"correctness": [], "decode": [], "budget": []}
REPORT = Report()
say = REPORT.say
T0 = time.time()


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------------


def correctness() -> bool:
    say("## 1. Triton kernel (CUDA) against the Rust core (CPU), byte for byte")
    ok_all = True
    cases = [
        (4, 64, 64, torch.bfloat16, 128),
        (4, 32, 128, torch.float16, 16),
        (2, 64, 64, torch.bfloat16, 0),
        (8, 64, 128, torch.bfloat16, 64),
        (2, 16, 128, torch.float16, 32),
    ]
    for bits, g, D, dtype, res in cases:
        torch.manual_seed(bits + D)
        gpu = qtt.QuantizedKVCache(bits, g, res)
        cpu = qtt.QuantizedKVCache(bits, g, res)
        same = True
        B, H = 2, 4
        with torch.no_grad():
            for n in [300, 1, 1, 77, 1, 200] + [1] * 20:
                k = (torch.randn(B, H, n, D) * 2).to(dtype)
                v = torch.randn(B, H, n, D).to(dtype)
                kg, vg = gpu.update(k.to(DEV), v.to(DEV), 0)
                kc_, vc = cpu.update(k, v, 0)
                same &= torch.equal(kg.cpu(), kc_) and torch.equal(vg.cpu(), vc)
            lg, lc = gpu.layers[0], cpu.layers[0]
            tq = lc.quantized_tokens
            for sg, sc in ((lg.k, lc.k), (lg.v, lc.v)):
                for pg, pc in zip(sg.quantized(tq), sc.quantized(tq), strict=True):
                    same &= torch.equal(pg.cpu(), pc)
        name = f"{bits}-bit g{g} head_dim {D} {str(dtype)[6:]} window {res}"
        say(f"- {name}: {'identical' if same else 'DIFFERENT'} (backend {kc.backend(kg.device)})")
        RESULTS["correctness"].append({"case": name, "identical": bool(same)})
        ok_all &= bool(same)
    return ok_all


# ------------------------------------------------------------------------------------------------
# 2. decode speed
# ------------------------------------------------------------------------------------------------


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    # contexts up to 32k tokens: positions beyond the model's 2048
    cfg = LlamaConfig(**{**(LLAMA_1B_DRY if DRY else LLAMA_1B), "max_position_embeddings": 1 << 20})
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if not DRY else torch.float32)
    return model.eval()


def cache_kinds(config) -> dict:
    from transformers import DynamicCache

    kinds = {
        "bf16 DynamicCache": lambda: DynamicCache(config=config),
        "qtensors 4-bit g64": lambda: qtt.QuantizedKVCache(4, 64, 128),
        "qtensors 8-bit g64": lambda: qtt.QuantizedKVCache(8, 64, 128),
        "qtensors 2-bit g64": lambda: qtt.QuantizedKVCache(2, 64, 128),
    }
    try:
        from transformers import QuantizedCache

        QuantizedCache(backend="quanto", config=config, nbits=4)
        kinds["transformers QuantizedCache quanto 4-bit"] = lambda: QuantizedCache(
            backend="quanto", config=config, nbits=4
        )
    except Exception as e:
        say(f"(transformers QuantizedCache, quanto backend, unavailable: {type(e).__name__})")
    return kinds


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in cache.layers:  # DynamicCache: its tensors; quanto: not reported
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def prefill(model, cache, B: int, T: int, chunk: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(T)
    vocab = model.config.vocab_size
    nxt = None
    for a in range(0, T, chunk):
        ids = torch.randint(0, vocab, (B, min(chunk, T - a)), device=DEV, generator=g)
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    assert nxt is not None
    return nxt


def decode_speed(model) -> None:
    say()
    say("## 2. Decode speed, 1.1B Llama-shaped model, bf16 weights (random)")
    say()
    say("| batch | context | cache | tokens/s | vs bf16 | cache bytes | peak GPU memory |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    kinds = cache_kinds(model.config)
    for B in BATCHES:
        for T in CONTEXTS:
            base = None
            for name, make in kinds.items():
                if not DRY:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                cache = make()
                try:
                    with torch.no_grad():
                        tok = prefill(model, cache, B, T, PREFILL_CHUNK)
                        for i in range(WARM + STEPS):
                            if i == WARM:
                                sync()
                                t0 = time.perf_counter()
                            logits = model(tok, past_key_values=cache, logits_to_keep=1).logits
                            tok = logits[:, -1].argmax(-1, keepdim=True)
                        sync()
                        dt = time.perf_counter() - t0
                except torch.cuda.OutOfMemoryError:
                    say(f"| {B} | {T} | {name} | out of memory | | | |")
                    continue
                tps = B * STEPS / dt
                base = base or tps
                nb = cache_bytes(cache)
                peak = torch.cuda.max_memory_allocated() if not DRY else 0
                say(
                    f"| {B} | {T} | {name} | {tps:.1f} | {tps / base:.2f}x | "
                    f"{nb / 2**20:.0f} MiB | {peak / 2**30:.2f} GiB |"
                )
                RESULTS["decode"].append(
                    {
                        "batch": B,
                        "context": T,
                        "cache": name,
                        "tokens_per_s": tps,
                        "bytes": nb,
                        "peak": peak,
                    }
                )
                del cache


# ------------------------------------------------------------------------------------------------
# 3. longest context in a memory budget
# ------------------------------------------------------------------------------------------------


def budget(model) -> None:
    say()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cap = weights + BUDGET_GIB * 2**30
    say(
        f"## 3. Longest context, batch 1, in weights ({weights / 2**30:.2f} GiB) + "
        f"{BUDGET_GIB:g} GiB"
    )
    say()
    say("| cache | tokens reached | vs bf16 |")
    say("| --- | --- | --- |")
    if not DRY:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
    chunk = 1024 if not DRY else 16
    limit = 1 << 20 if not DRY else 256
    base = None
    for name, make in cache_kinds(model.config).items():
        if time.time() - T0 > 270 and not DRY:
            say(f"| {name} | skipped (time) | |")
            continue
        cache = make()
        reached = 0
        g = torch.Generator(device=DEV).manual_seed(0)
        try:
            with torch.no_grad():
                while reached < limit:
                    ids = torch.randint(
                        0, model.config.vocab_size, (1, chunk), device=DEV, generator=g
                    )
                    model(ids, past_key_values=cache, logits_to_keep=1)
                    reached += chunk
        except torch.cuda.OutOfMemoryError:
            pass
        del cache
        if not DRY:
            torch.cuda.empty_cache()
        base = base or reached
        note = " (the script's limit)" if reached >= limit else ""
        say(f"| {name} | {reached}{note} | {reached / base:.2f}x |")
        RESULTS["budget"].append({"cache": name, "tokens": reached, "cap_bytes": cap})
    if not DRY:
        torch.cuda.set_per_process_memory_fraction(1.0)


def main() -> None:
    say("$ python3 benches/bench_gpu_kv_cache.py")
    import transformers

    dev = torch.cuda.get_device_name() if not DRY else "CPU (dry run)"
    say(f"{dev}; torch {torch.__version__}, transformers {transformers.__version__}")
    say()
    ok = correctness()
    model = build_model()
    decode_speed(model)
    budget(model)
    say()
    say(f"correctness: {'all identical' if ok else 'MISMATCH'}; {time.time() - T0:.0f} s")
    REPORT.write("gpu_kv_cache", RESULTS)


if __name__ == "__main__":
    main()
