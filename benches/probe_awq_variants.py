"""AWQ's variants compared cheaply: SmolLM2-135M-Instruct cut to its first ``--blocks`` decoder
blocks, each variant quantizing them on the calibration of ``bench_methods.py`` (32 x 256
tokens of the tutorial, seed 0), scored by the relative error of the last hidden state against
the float cut model on 8 held-back windows (seed 1234). A probe for choosing what to run in
full (perplexity: ``bench_methods.py``), not a result on its own.

    flock /tmp/qt-cpu.lock python3 benches/probe_awq_variants.py --blocks 2 \\
        --config int4-g128-sym --variants "rtn:;awq:;awq:duo_scaling=False;gptq:" --out FILE

A variant is ``method:settings`` (keyword arguments of the method, e.g. ``awq:n_grid=10``).
"""

from __future__ import annotations

import argparse
import ast
import time

import torch
from _data import doc_texts, smollm2_folder
from bench_methods import CONFIGS, results_log

import qtensors.torch as qtt
from qtensors.methods import calibration_windows


def settings_of(text: str) -> dict:
    """``a=1, b=False`` -> {"a": 1, "b": False} (literals only)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--config", default="int4-g128-sym", choices=sorted(CONFIGS))
    ap.add_argument("--variants", default="rtn:;awq:;gptq:")
    ap.add_argument("--out")
    args = ap.parse_args()
    log = results_log(args.out)
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    calib = doc_texts("tutorial")
    held = calibration_windows(calib, tok, 8, 256, seed=1234)

    def cut_model() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.model.layers = model.model.layers[: args.blocks]
        return model

    @torch.no_grad()
    def hidden(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat(
            [
                model.model(input_ids=held[i : i + 4], use_cache=False).last_hidden_state
                for i in range(0, held.shape[0], 4)
            ]
        )

    ref = hidden(cut_model())
    log(f"SmolLM2 first {args.blocks} blocks, {args.config}; calibration 32 x 256 (seed 0)")
    log(f"{'variant':40} {'rel err':>8} {'time s':>7}")
    for variant in args.variants.split(";"):
        method, _, kw = variant.partition(":")
        model = cut_model()
        t0 = time.perf_counter()
        qtt.quantize_model(
            model,
            CONFIGS[args.config],
            method=method,
            calibration=calib,
            tokenizer=tok,
            samples=32,
            seq_len=256,
            skip=("lm_head",),
            progress=False,
            **settings_of(kw),
        )
        secs = time.perf_counter() - t0
        err = float((hidden(model) - ref).norm() / ref.norm())
        log(f"{variant:40} {err:8.4f} {secs:7.1f}")


if __name__ == "__main__":
    main()
