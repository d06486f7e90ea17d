"""Does GPTQ's block-scale search pay off on the FP4 grids? SmolLM2-135M-Instruct, GPTQ at MXFP4
and NVFP4 with the scale search off (each block's round-to-nearest scale, as the formats define
it) and with neighbouring scales of the format's lattice tried under diag(H) (E8M0: powers of
two; E4M3: neighbouring bytes), the steps given per variant. Reports the
mean per-layer output error on held-back windows and the perplexity relative to fp32, with the
same data and settings as bench_methods.py.

    flock /tmp/qt-cpu.lock python3 benches/bench_fp4_scale_search.py \\
        --out benches/results/fp4_scale_search.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _data import doc_texts, smollm2_folder
from bench_methods import (
    CONFIGS,
    cached_fp32_perplexity,
    eval_windows,
    perplexity,
    results_log,
)

import qtensors.torch as qtt
from qtensors.methods import GPTQ, calibration_windows
from qtensors.methods import grid as grid_module

#: (label, steps tried around RTN's scale; None: the search off), per format
VARIANTS = {
    "mxfp4": [("off", None), ("+-1", (-1, 1))],
    "nvfp4": [("off", None), ("-3..+2", (-3, -2, -1, 1, 2))],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="mxfp4,nvfp4")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--holdout", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out")
    args = ap.parse_args()
    log = results_log(args.out)
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
    log(f"{'config':8} {'method':6} {'steps':8} {'x fp32':>7} {'layer err':>9} {'time s':>7}")
    default_steps = dict(grid_module.FP4_SEARCH_STEPS)
    for cname in args.configs.split(","):
        for label, steps in VARIANTS[cname]:
            if steps is not None:  # the variant's neighbours, for this run only
                grid_module.FP4_SEARCH_STEPS[cname] = steps
            model = fresh()
            t0 = time.perf_counter()
            qtt.quantize_model(
                model,
                CONFIGS[cname],
                method=GPTQ(search_scales=steps is not None),
                calibration=calib,
                tokenizer=tok,
                samples=args.samples,
                seq_len=args.seq_len,
                skip=("lm_head",),
                holdout=holdout,
                progress=False,
            )
            secs = time.perf_counter() - t0
            grid_module.FP4_SEARCH_STEPS.update(default_steps)
            err = statistics.mean(model.qtensors_quantization["layer_error"].values())
            ratio = perplexity(model, evalw) / base
            log(f"{cname:8} {'gptq':6} {label:8} {ratio:7.3f} {err:9.4f} {secs:7.1f}")
            del model
    log("")
    log("steps: the neighbouring block scales tried besides RTN's (E8M0 exponents for mxfp4,")
    log("E4M3 bytes for nvfp4), under diag(H); off: RTN's scale for every block. layer err: mean")
    log("over linears of ||XW - XW'|| / ||XW|| on held-back windows.")


if __name__ == "__main__":
    main()
