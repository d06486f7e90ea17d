"""AWQ's variants compared cheaply: SmolLM2-135M-Instruct cut to its first ``--blocks`` decoder
blocks, each variant quantizing them on the calibration of ``bench_methods.py`` (32 x 256
tokens of the tutorial, seed 0), scored by the relative error of the last hidden state against
the float cut model on 8 held-back windows (seed 1234), and by the per-layer output error on 4
of those windows (as ``bench_methods.py`` measures it: mean over linears, then per kind of
linear: the first variant's own, the others' relative to it). A probe for choosing what to run in
full (perplexity: ``bench_methods.py``), not a result on its own.

    flock /tmp/qt-cpu.lock python3 benches/probe_awq_variants.py --blocks 2 \\
        --config int4-g128-sym --variants "rtn:;awq:;awq:duo_scaling=False;gptq:" --out FILE

A variant is ``method:settings`` (keyword arguments of the method, e.g. ``awq:n_grid=10``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _data import doc_texts, smollm2_folder
from bench_methods import CONFIGS, results_log, settings_of

import qtensors.torch as qtt
from qtensors.methods import calibration_windows


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
    head = f"{'rel err':>8} {'layer':>6} {'vs 1st':>6}  {'per kind vs 1st':30}"
    log(f"{'variant':40} {head} {'time s':>7}")
    first: dict[str, float] | None = None
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
            holdout=held[:4],
            progress=False,
            **settings_of(kw),
        )
        secs = time.perf_counter() - t0
        err = float((hidden(model) - ref).norm() / ref.norm())
        layer = model.qtensors_quantization["layer_error"]
        first = first or layer
        kinds = {}
        for name, e in layer.items():  # the first variant's own errors, the others' ratios
            ratio = e if layer is first else e / first[name]
            kinds.setdefault(name.rsplit(".", 1)[-1].split("_")[0], []).append(ratio)
        per_kind = " ".join(f"{k[:2]}{statistics.mean(v):.2f}" for k, v in kinds.items())
        mean = statistics.mean(layer.values())
        vs = mean / statistics.mean(first.values())
        log(f"{variant:40} {err:8.4f} {mean:6.4f} {vs:6.2f}  {per_kind:30} {secs:7.1f}")


if __name__ == "__main__":
    main()
