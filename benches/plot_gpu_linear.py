"""Where the fused quantized linear stands against the issue's targets, as a figure: the
speedup over cuBLAS ``F.linear`` on the bf16 weight (both in a CUDA graph), int4-g64 affine with
bf16 activations, per shape and batch, from a committed ``bench_gpu_linear.py --sections main``
output, with each batch's target drawn over its bars.

    python3 benches/plot_gpu_linear.py [RESULTS.txt] [--out PNG]     # needs matplotlib

Defaults: ``benches/results/gpu_linear_stop42_h200.txt`` -> ``benches/results/gpu_linear.png``.
Reads only the table's text (no GPU): the figure shows what that run measured.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: the issue's targets (x cuBLAS): batch 1 by shape, batch 16, batch 256
BATCH1_TARGET = {"8192x8192": 3.0, "14336x4096": 3.0, "4096x14336": 3.0}
OTHER_TARGETS = {1: 2.5, 16: 2.0, 256: 1.0}
#: one row of the "graph" table: shape, batch, activations, fused us, cuBLAS us, old us, ratio
NUM = r"\s+([\d.]+)"
ROW = re.compile(r"^\s*(\d+x\d+)\s+(\d+)\s+(bf16|fp16)\s+\|" + NUM * 4)


def read_table(path: Path, act: str = "bf16") -> dict[tuple[str, int], float]:
    """{(shape, batch): x cuBLAS} of the run's CUDA-graph table, ``act`` activations."""
    got = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m and m[3] == act:
            got[(m[1], int(m[2]))] = float(m[7])
    if not got:
        raise SystemExit(f"{path}: no '## int4-g64' table of bench_gpu_linear.py --sections main")
    return got


def target(shape: str, batch: int) -> float:
    return BATCH1_TARGET.get(shape, OTHER_TARGETS[1]) if batch == 1 else OTHER_TARGETS[batch]


def plot(table: dict[tuple[str, int], float], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(s for s, _b in table))
    batches = sorted({b for _s, b in table})
    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    width = 0.8 / len(batches)
    colors = {1: "#1f77b4", 16: "#ff7f0e", 256: "#2ca02c"}
    for j, b in enumerate(batches):
        xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(shapes))]
        ys = [table.get((s, b), 0.0) for s in shapes]
        ax.bar(xs, ys, width * 0.92, label=f"batch {b}", color=colors.get(b))
        for x, y, s in zip(xs, ys, shapes, strict=True):
            t = target(s, b)
            ax.hlines(t, x - width / 2, x + width / 2, colors="black", linewidth=1.6)
            ax.text(x, max(y, t) + 0.04, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 3.6)
    ax.set_xticks(range(len(shapes)), [s.replace("x", " × ") for s in shapes])
    ax.set_ylabel("× cuBLAS bf16 F.linear (CUDA graph)")
    ax.set_title(title, fontsize=10)
    ax.plot([], [], color="black", linewidth=1.6, label="the issue's target")
    ax.legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(RESULTS / "gpu_linear_stop42_h200.txt"))
    ap.add_argument("--out", default=str(RESULTS / "gpu_linear.png"))
    a = ap.parse_args()
    path = Path(a.results)
    table = read_table(path)
    for (shape, batch), x in table.items():
        print(f"{shape:>11} batch {batch:>3}: {x:.2f}x cuBLAS (target {target(shape, batch)})")
    title = f"int4-g64 affine, bf16, H200: fused linear against cuBLAS ({path.name})"
    plot(table, title, Path(a.out))


if __name__ == "__main__":
    main()
