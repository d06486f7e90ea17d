"""CPU matmul with 4-bit weights (``torch.ops.qtensors.linear``, the Rust core) against torch's
``F.linear`` on dense fp32 and bf16 weights of the same shape, in the same run.

    RAYON_NUM_THREADS=1 python3 benches/bench_cpu_matmul.py --threads 1
    RAYON_NUM_THREADS=2 python3 benches/bench_cpu_matmul.py --threads 2
    RAYON_NUM_THREADS=2 python3 benches/bench_cpu_matmul.py --threads 2 --breakdown

``--threads`` sets torch's threads, which the core's parallel work runs on (torch's OpenMP team,
``qtensors.torch.cpu_pool``); rayon's pool follows RAYON_NUM_THREADS (set it to match). "rayon"
is the default path again with the core on rayon's pool, the alternative the OpenMP team
replaced, in the same run.

The contenders of a row are timed in turn, ``--rounds`` times (each time the best of
``--repeat`` calls): on a machine shared with other work, bf16 ``F.linear`` on 2 threads ranged
0.18-0.53 ms from run to run on 4096x4096, so one timing per contender compared noise. Printed
per contender: the fastest round and the median round (ms), and the speedups of both against
``F.linear``'s. The issue asks for batch 1 >= 3x fp32 and >= 1.5x bf16; batch 32 no slower than
fp32. Each qtensors figure is in the activations' dtype (fp32 activations against fp32 F.linear,
bf16 against bf16). "qtensors" is the default path (the integer kernel with int8 activations
where it applies: 4-bit affine/symmetric, NF4, MXFP4 and NVFP4 through int8 tables of their
levels, not FlexGen's groups along the outputs);
"exact" the same call with fp32 activations (``qtensors.torch.linear.CPU_INT8_ACTIVATIONS =
False``).

``--layers N``: N copies of each weight (dense and quantized), called in turn, so that with
enough of them every call reads its weight from memory, as a model's layers do; 1 (the default):
the same weight each call, from cache as far as it fits (a 4096x4096 bf16 weight is 32 MiB, this
VM's L3 32 MiB, so bf16 F.linear there depends on what else the cache holds).

FP4's "exact" decodes and calls ``F.linear``.

``--breakdown``: where a batch-1 bf16 call's time goes, affine 4-bit g64, the layers alternated
the same way: the bare ``_core.linear`` call with its arguments made once (the Rust matmul and
the binding), ``linear_cpu`` (argument checks, routing, the output tensor), ``linear`` (the eager
shortcut past the dispatcher) and the module's call.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from _common import best_ms
from torch import nn

import qtensors as qt
from qtensors import _core
from qtensors.torch import QuantizedLinear, cpu_pool
from qtensors.torch import linear as linear_mod

SHAPES = [(4096, 4096), (5632, 2048)]


def rounds(contenders: dict, repeat: int, n: int) -> dict[str, list[float]]:
    """Each contender's best of ``repeat`` calls (ms), ``n`` times, the contenders in turn. A
    contender is a call, or (setup, call, teardown) to switch a setting (pool, activations) once
    per round rather than per call."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(n):
        for name, c in contenders.items():
            setup, call, teardown = c if isinstance(c, tuple) else (None, c, None)
            if setup:
                setup()
            try:
                times[name].append(best_ms(call, repeat))
            finally:
                if teardown:
                    teardown()
    return times


def in_turn(fn, items):
    """A call of ``fn(item)`` for the next of ``items`` each time, cycling."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return call


def pool_switch(kind: str):
    """(setup, teardown): the core's pool on ``kind``, then back to the default."""
    default = cpu_pool.current()
    return (lambda: cpu_pool.use(kind), lambda: cpu_pool.use(default))


def exact_switch():
    """(setup, teardown): fp32 activations in the core (no int8 kernel), then back."""

    def on():
        linear_mod.CPU_INT8_ACTIVATIONS = False

    def off():
        linear_mod.CPU_INT8_ACTIVATIONS = True

    return on, off


def summary(t: list[float]) -> tuple[float, float]:
    return min(t), statistics.median(t)


def matmul_table(args) -> None:
    encodings = [
        ("affine4 g64", qt.Affine(4, 64, axis=-1)),
        ("affine4 bf16 scales", qt.Affine(4, 64, axis=-1, scale_dtype="bfloat16")),
        ("nf4 g64", qt.NF4(64, axis=-1)),
        ("mxfp4", qt.MXFP4(axis=-1)),
        ("nvfp4", qt.NVFP4(axis=-1)),
        ("flexgen (axis 0)", qt.FLEXGEN),
    ]
    if args.encodings:
        picks = args.encodings.split(",")
        encodings = [(k, e) for k, e in encodings if any(p in k for p in picks)]
    cols = ["qtensors", "exact", "rayon"]
    head = f"{'shape':>11} {'batch':>5} {'encoding':>19} {'dtype':>8} {'F.linear best/med':>18} "
    print(head + " ".join(f"{c + ' best/med':>16} {'speedup':>11}" for c in cols))
    torch.manual_seed(0)
    with torch.no_grad():
        for n_out, n_in in SHAPES:
            lin = nn.Linear(n_in, n_out, bias=False)
            for batch in args.batches:
                for label, enc in encodings:
                    q1 = QuantizedLinear.from_linear(lin, enc)
                    qs = [q1] + [copy.deepcopy(q1) for _ in range(args.layers - 1)]
                    for dt in [torch.float32, torch.bfloat16]:
                        ws = [lin.weight.to(dt).clone() for _ in range(args.layers)]
                        x = torch.randn(batch, n_in).to(dt)
                        dense = in_turn(lambda w, x=x: F.linear(x, w), ws)
                        quant = in_turn(lambda q, x=x: q(x), qs)
                        on, off = exact_switch()
                        r_on, r_off = pool_switch("rayon")
                        t = rounds(
                            {
                                "F.linear": dense,
                                "qtensors": quant,
                                "exact": (on, quant, off),
                                "rayon": (r_on, quant, r_off),
                            },
                            args.repeat,
                            args.rounds,
                        )
                        ref = summary(t["F.linear"])
                        line = (
                            f"{n_out:>5}x{n_in:<5} {batch:>5} {label:>19} {str(dt)[6:]:>8} "
                            f"{ref[0]:8.3f}/{ref[1]:<9.3f}"
                        )
                        for c in cols:
                            b, m = summary(t[c])
                            line += f" {b:7.3f}/{m:<8.3f} {ref[0] / b:5.2f}/{ref[1] / m:<5.2f}"
                        print(line, flush=True)


def breakdown(args) -> None:
    """Where a batch-1 bf16 call's time goes (see the module docstring)."""
    print(
        f"{'shape':>11} {'layer':>14} {'best ms':>9} {'median ms':>9}  "
        "(contenders in turn, best of --repeat, over --rounds)"
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for n_out, n_in in SHAPES:
            lin = nn.Linear(n_in, n_out, bias=False)
            q1 = QuantizedLinear.from_linear(lin, qt.Affine(4, 64, axis=-1))
            qs = [q1] + [copy.deepcopy(q1) for _ in range(args.layers - 1)]
            wbs = [lin.weight.to(torch.bfloat16).clone() for _ in range(args.layers)]
            x = torch.randn(1, n_in).to(torch.bfloat16)
            xb = x.view(torch.int16).numpy().view(np.uint8)
            out = np.empty((1, n_out), np.uint16).view(np.uint8)
            ops, plans = [], []
            for q in qs:
                w = q.weight
                ops.append((x, w.codes, w.scales, w.mins, None, *w.op_args))
                q(x)
                plans.append(w.codes._qt_cpu_plan)

            def bare(plan, xb=xb, out=out):
                _core.linear(plan.parts, plan.shape, plan.enc, xb, "bfloat16", out, None, False)

            t = rounds(
                {
                    "F.linear bf16": in_turn(lambda w, x=x: F.linear(x, w), wbs),
                    "_core.linear": in_turn(bare, plans),
                    "linear_cpu": in_turn(lambda op: linear_mod.linear_cpu(*op), ops),
                    "linear": in_turn(lambda op: linear_mod.linear(*op), ops),
                    "module": in_turn(lambda q, x=x: q(x), qs),
                },
                args.repeat,
                args.rounds,
            )
            for name, v in t.items():
                b, m = summary(v)
                print(f"{n_out:>5}x{n_in:<5} {name:>14} {b:9.4f} {m:9.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=1, help="copies of each weight, in turn")
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 32])
    ap.add_argument("--breakdown", action="store_true", help="only the batch-1 breakdown")
    ap.add_argument(
        "--encodings", default="", help="comma-separated labels (substrings) to run, e.g. nvfp4"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()}, kernels {qt.kernels()}, torch {torch.__version__} "
        f"threads {args.threads}, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS')}, "
        f"core's pool {cpu_pool.current()} ({cpu_pool.threads()} threads), "
        f"{args.rounds} rounds of best-of-{args.repeat}, {args.layers} layer(s) in turn; "
        f"load average {os.getloadavg()}"
    )
    if args.breakdown:
        breakdown(args)
    else:
        matmul_table(args)


if __name__ == "__main__":
    main()
