"""Probe (H200): where an eager decode step's host time goes, bf16 against int4-g64 kept
quantized (siblings joined, the default), the 1.1B Llama-shaped model of
``bench_gpu_generate.py``: greedy ``generate`` of ``--new`` tokens at batch 1 under cProfile,
after two warm-up calls, each model alternately ``--rounds`` times (the fastest kept).

    OUT=DIR python3 benches/probe_eager_host.py [--new 32] [--rounds 3] [--top 25]

Prints each model's wall time per token, then per model the functions (file:line:name) with the
most own and the most cumulative time per token: the Python that decode steps run
(transformers' layers, our modules, the launch path).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import Report, generate_kwargs  # noqa: E402
from bench_gpu_generate import build_model  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402

REPORT = Report()
say = REPORT.say


def profiled(model, ids, new: int) -> tuple[float, pstats.Stats]:
    kw = generate_kwargs(new, False)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    prof.disable()
    return time.perf_counter() - t, pstats.Stats(prof)


def by_name(stats: pstats.Stats) -> dict[str, tuple[float, float, int]]:
    """{"file:line:function": (own s, cumulative s, calls)}."""
    return {
        f"{os.path.basename(file)}:{line}:{fn}": (tt, ct, nc)
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    bf16 = build_model()
    int4 = copy.deepcopy(bf16)
    qtt.quantize_model(int4, qt.Affine(bits=4, group_size=64, axis=-1))
    torch.cuda.empty_cache()
    models = {"bf16": bf16, "int4-g64": int4}
    ids = torch.randint(1, bf16.config.vocab_size, (1, 16), device="cuda")
    best: dict[str, tuple[float, pstats.Stats]] = {}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(2):
                m.generate(ids, **generate_kwargs(a.new, False))
        for _ in range(a.rounds):
            for label, m in models.items():
                wall, stats = profiled(m, ids, a.new)
                if label not in best or wall < best[label][0]:
                    best[label] = (wall, stats)
    say(f"# eager decode host time, {torch.cuda.get_device_name()}, batch 1, {a.new} new tokens,"
        " cProfile on (it slows Python: compare the models, not absolute times)")  # fmt: skip
    for label, (wall, _) in best.items():
        say(f"{label:<9} {wall / a.new * 1e3:7.2f} ms a token (profiled)")
    names = {label: by_name(stats) for label, (_, stats) in best.items()}
    for label in models:
        for what, col in (("own", 0), ("cumulative", 1)):
            say(f"## {label}: top {a.top} by {what} time, us a token (calls a token)")
            rows = sorted(names[label].items(), key=lambda kv: -kv[1][col])[: a.top]
            for k, (tt, ct, nc) in rows:
                say(f"  own {tt / a.new * 1e6:8.0f}  cum {ct / a.new * 1e6:8.0f}  calls"
                    f" {nc / a.new:6.0f}  {k}")  # fmt: skip
    REPORT.write("probe_eager_host", {})


if __name__ == "__main__":
    main()
