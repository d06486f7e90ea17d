"""Probe (H200): dequantize kernel variants and launch configurations against a device copy.

    OUT=DIR python3 benches/probe_dequant.py [--sizes 4096,8192] [--cases nf4,int3,...]
        [--baseline MODULE]     # a copy of another dequant.py, e.g. main's, timed beside
        [--sweep]               # launch configurations of the default kernel per case
    python3 benches/probe_dequant.py --smoke [--sweep]   # CPU, TRITON_INTERPRET=1: a dry run

Measured the way ``bench_gpu.py --sections kernels`` does (the issue's "share of copy
bandwidth"): (codes + scales + mins + output bytes) / time, against ``dst.copy_(src)`` of the
output's bytes (read + write); each time the fastest of 3 interleaved rounds of
``triton.testing.do_bench`` medians (L2 flushed before each call). Every variant is first
checked bit for bit against the default kernel's output and plain torch (``dequantize_torch``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

if "--smoke" in sys.argv:  # the script's own check on the CPU: tiny sizes, the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402
import triton  # noqa: E402
from _common import Report, cli_value  # noqa: E402
from bench_gpu import CASES, random_parts  # noqa: E402

from qtensors.torch import ops  # noqa: E402
from qtensors.torch._layout import normalize_axis  # noqa: E402
from qtensors.torch.kernels import dequant as tk  # noqa: E402

REPORT = Report()
say = REPORT.say
RESULTS: list[dict] = []  # one row per (case, size, variant), written as JSON beside the text
SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
SHORT = {
    "int4": "int4-g64 ax-1",
    "int4ax0": "int4-g64 ax0 (flexgen)",
    "int8": "int8 sym g128 ax-1",
    "nf4": "nf4 g64 ax-1",
    "int4g128": "int4-g128 ax-1",
    "bf16": "int4-g64 ax-1 -> bf16",
    "int3": "int3-g64 ax-1",
    "int2": "int2-g64 ax0",
    "mxfp4": "mxfp4 ax-1",
    "nvfp4": "nvfp4 ax-1",
}


def bench_ms(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def variants(case: tuple, shape: tuple[int, ...]) -> dict[str, tk.Config | None]:
    """The launch configurations to time for a case: the default, and those that change a code
    path the case takes (with ``--sweep``: persistent grids, pipelined or not, and other tiles)."""
    encoding, bits, _, axis, _, _ = case
    lastaxis = normalize_axis(axis, 2) == 1
    R, C = shape
    base = tk.default_config(R, C, bits, lastaxis, encoding)
    out: dict[str, tk.Config | None] = {"default": None}
    if "--sweep" in sys.argv:
        for pers in (1, 2, 4):
            out[f"persistent {pers}"] = dataclasses.replace(base, persistent=pers)
        for pers, stages in ((4, 3), (8, 3), (8, 4)):  # pipelined: the next tile's loads early
            out[f"persistent {pers} {stages} st"] = dataclasses.replace(
                base, persistent=pers, num_stages=stages
            )
        for tile, warps in ((2048, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8)):
            bc = min(base.block_c, tile)
            out[f"{max(1, tile // bc)}x{bc} {warps}w"] = dataclasses.replace(
                base, block_r=max(1, tile // bc), block_c=bc, num_warps=warps
            )
    return out


def measure(name: str, size: int, baseline) -> None:
    """Check, then time every variant of one case at ``size``^2 (and ``baseline``'s kernel)."""
    case = CASES[SHORT[name]]
    encoding, bits, g, axis, sdt, odt = case
    shape = (size, size)
    codes, scales, mins = random_parts(shape, encoding, bits, g, axis, sdt, DEV)
    a = normalize_axis(axis, 2)
    args = (codes, scales, mins, list(shape), encoding, bits, g, a, odt)
    ref = ops.dequantize_torch(*args)
    src = torch.empty(shape, dtype=odt, device=DEV).normal_()
    dst = torch.empty_like(src)
    fns = {}
    for vname, cfg in variants(case, shape).items():
        out = torch.full(shape, float("nan"), dtype=odt, device=DEV)
        run = functools.partial(tk.dequantize_triton, *args, config=cfg, out=out)
        run()
        if not SMOKE:
            torch.cuda.synchronize()
        bad = int((out.view(torch.int16) != ref.view(torch.int16)).sum())
        if bad:
            say(f"{name:10} {size:>6} {vname:>20} WRONG: {bad} elements differ")
        else:
            fns[vname] = run
    if baseline is not None:
        fns["baseline (main)"] = functools.partial(
            baseline.dequantize_triton, *args, out=torch.empty_like(src)
        )
        fns["baseline (main)"]()
    times: dict[str, list[float]] = {k: [] for k in fns}
    copies, fills = [], []
    for _ in range(3):
        for k, fn in fns.items():
            times[k].append(bench_ms(fn))
        copies.append(bench_ms(functools.partial(dst.copy_, src)))
        fills.append(bench_ms(functools.partial(dst.fill_, 1.0)))
    nb = codes.numel() + scales.numel() * scales.element_size()
    nb += 0 if mins is None else mins.numel() * mins.element_size()
    out_bytes = src.numel() * src.element_size()
    nb += out_bytes
    cbw = 2 * out_bytes / min(copies) / 1e6
    d = min(times["default"]) if "default" in times else float("nan")
    # the output written alone (no reads): how close a decode is to the cost of its writes
    fill = min(fills)
    say(f"{name:10} {size:>6} {'(fill_ of the output)':>20} {fill * 1e3:7.1f} "
        f"{out_bytes / fill / 1e6:6.0f} {'':>7} default / fill {d / fill:.2f}")  # fmt: skip
    for k, ts in times.items():
        ms = min(ts)
        bw = nb / ms / 1e6
        RESULTS.append({"case": name, "size": size, "variant": k, "us": ms * 1e3,
                        "GBps": bw, "vs_copy": bw / cbw, "fill_us": fill * 1e3})  # fmt: skip
        say(f"{name:10} {size:>6} {k:>20} {ms * 1e3:7.1f} {bw:6.0f} {bw / cbw:7.1%} "
            f"{d / ms:9.2f}x")  # fmt: skip


def main() -> None:
    sizes = [int(s) for s in cli_value("--sizes", "64" if SMOKE else "4096,8192").split(",")]
    names = cli_value("--cases", ",".join(SHORT)).split(",")
    baseline = None
    if "--baseline" in sys.argv:
        baseline = importlib.import_module(f"qtensors.torch.kernels.{cli_value('--baseline', '')}")
    gpu = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    say(f"# dequant probe, {gpu}, triton {triton.__version__}; "
        f"us = fastest of 3 rounds of do_bench medians")  # fmt: skip
    say(f"{'case':10} {'size':>6} {'variant':>20} {'us':>7} {'GB/s':>6} {'vs copy':>7} "
        f"{'vs default':>10}")  # fmt: skip
    for name in names:
        for size in sizes:
            measure(name, size, baseline)
            if not SMOKE:
                torch.cuda.empty_cache()
    REPORT.write("probe_dequant", {"rows": RESULTS})


if __name__ == "__main__":
    main()
