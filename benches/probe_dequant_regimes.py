"""Probe (H200): the dequantize kernel's share of copy bandwidth under two ways of timing, and
what writing the output alone can reach.

    OUT=DIR python3 benches/probe_dequant_regimes.py [--sizes 4096,8192] [--cases int4,nf4,...]
    python3 benches/probe_dequant_regimes.py --smoke    # CPU, TRITON_INTERPRET=1: a dry run

* ``flushed``: as ``bench_gpu.py --sections kernels`` and ``probe_dequant.py`` time it,
  ``triton.testing.do_bench`` medians with the L2 cleared before each call. Clearing it writes
  256 MB of zeros, so each timed call starts with the L2 full of dirty lines that it must write
  back while it runs: the same bytes for the decode and for the copy it is compared with, a
  larger share of the smaller transfer.
* ``graph``: the calls back to back in one CUDA graph, each on its own inputs and output, so
  many that their outputs are at least ``SPAN`` bytes (5x the L2): every byte written goes to
  HBM, as a model's layers run one after another (``bench_gpu_linear.py`` times the fused
  linear so).

Both: (codes + scales + mins + output bytes) / time against ``dst.copy_(src)`` of the output's
bytes (read + write), and the writes alone: ``fill_`` of the output, a Triton kernel of 16-byte
stores, and a Triton kernel whose stores go through the TMA engine (a host tensor descriptor),
to see whether any write path is faster than the decode's. Every decode is first checked bit
for bit against ``dequantize_torch``.
"""

from __future__ import annotations

import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the script's own check on the CPU: tiny sizes, the interpreter
    os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from _common import Report, cli_value, graph_us  # noqa: E402
from bench_gpu import CASES, random_parts  # noqa: E402
from probe_dequant import SHORT  # noqa: E402

from qtensors.torch import ops  # noqa: E402
from qtensors.torch._layout import normalize_axis  # noqa: E402
from qtensors.torch.kernels import dequant as tk  # noqa: E402

REPORT = Report()
say = REPORT.say
DEV = "cpu" if SMOKE else "cuda"
#: bytes of output a graph's calls write at least (the H200's L2 is 50 MB)
SPAN = (1 << 16) if SMOKE else (256 << 20)
RESULTS: list[dict] = []

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None


@triton.jit
def _store16(out_ptr, n, BLOCK: tl.constexpr):
    """Ones into ``out``, 8 fp16 (16 bytes) a thread per store."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.full([BLOCK], 1.0, tl.float16), mask=offs < n)


@triton.jit
def _store_tma(desc, BR: tl.constexpr, BC: tl.constexpr):
    """Ones into a ``[BR, BC]`` tile of the descriptor's tensor, by the TMA engine."""
    r = tl.program_id(0) * BR
    c = tl.program_id(1) * BC
    desc.store([r, c], tl.full([BR, BC], 1.0, tl.float16))


def writers(out: torch.Tensor) -> dict:
    """Write-only calls into ``out`` (2-D fp16): name -> call."""
    n = out.numel()
    block = 4096
    w = {
        "fill_": functools.partial(out.fill_, 1.0),
        "16-byte stores": lambda: _store16[(triton.cdiv(n, block),)](out, n, BLOCK=block),
    }
    if TensorDescriptor is not None and not SMOKE:
        br, bc = 64, 128
        desc = TensorDescriptor.from_tensor(out, [br, bc])
        grid = (triton.cdiv(out.shape[0], br), triton.cdiv(out.shape[1], bc))
        w["TMA stores"] = lambda: _store_tma[grid](desc, BR=br, BC=bc)
    return w


def timed(calls: list, one) -> dict[str, float]:
    """us a call: ``graph`` (``calls`` back to back in a CUDA graph) and ``flushed`` (``one``
    by ``do_bench``, the L2 cleared first; the fastest of 3 medians)."""
    if SMOKE:
        us = graph_us(calls, 1, dry=True)
        return {"graph": us, "flushed": us}
    flushed = min(triton.testing.do_bench(one, return_mode="median") for _ in range(3)) * 1e3
    return {"graph": graph_us(calls, 20), "flushed": flushed}


def measure(name: str, size: int) -> None:
    encoding, bits, g, axis, sdt, odt = CASES[SHORT[name]]
    shape = (size, size)
    out_bytes = size * size * torch.finfo(odt).bits // 8
    copies = max(2, -(-SPAN // out_bytes))
    a = normalize_axis(axis, 2)
    gen = torch.Generator(device=DEV).manual_seed(size)
    sets = [random_parts(shape, encoding, bits, g, axis, sdt, DEV, gen) for _ in range(copies)]
    outs = [torch.empty(shape, dtype=odt, device=DEV) for _ in range(copies)]
    calls = []
    for (codes, scales, mins), out in zip(sets, outs, strict=True):
        args = (codes, scales, mins, list(shape), encoding, bits, g, a, odt)
        calls.append(functools.partial(tk.dequantize_triton, *args, out=out))
    calls[0]()
    codes, scales, mins = sets[0]
    ref = ops.dequantize_torch(codes, scales, mins, list(shape), encoding, bits, g, a, odt)
    bad = int((outs[0].view(torch.int16) != ref.view(torch.int16)).sum())
    if bad:
        say(f"{name:8} {size:>6} WRONG: {bad} elements differ; not timed")
        return
    nb = out_bytes + codes.numel() + scales.numel() * scales.element_size()
    nb += 0 if mins is None else mins.numel() * mins.element_size()
    srcs = [torch.empty(shape, dtype=odt, device=DEV).normal_() for _ in range(copies)]
    copy_calls = [functools.partial(d.copy_, s) for d, s in zip(outs, srcs, strict=True)]
    t_dq = timed(calls, calls[0])
    t_cp = timed(copy_calls, copy_calls[0])
    row = {"case": name, "size": size, "copies": copies}
    for mode in ("flushed", "graph"):
        dq = nb / t_dq[mode] / 1e3
        cp = 2 * out_bytes / t_cp[mode] / 1e3
        row[mode] = {"us": t_dq[mode], "GBps": dq, "copy_us": t_cp[mode], "vs_copy": dq / cp}
        say(f"{name:8} {size:>6} {mode:>8}  decode {t_dq[mode]:7.1f} us {dq:6.0f} GB/s  "
            f"copy {t_cp[mode]:7.1f} us {cp:6.0f} GB/s  decode / copy {dq / cp:6.1%}")  # fmt: skip
    if odt == torch.float16 and name == "int4":  # the write paths, on this case's outputs
        per = [writers(o) for o in outs]
        for wname in per[0]:
            try:
                t = timed([p[wname] for p in per], per[0][wname])
            except Exception as exc:  # a write path this Triton lacks: said, not timed
                say(f"{name:8} {size:>6} writes alone, {wname:>14}: failed: {exc!r}"[:300])
                continue
            row[wname] = t
            say(f"{name:8} {size:>6} writes alone, {wname:>14}: graph {t['graph']:7.1f} us "
                f"({out_bytes / t['graph'] / 1e3:5.0f} GB/s), flushed {t['flushed']:7.1f} us "
                f"({out_bytes / t['flushed'] / 1e3:5.0f} GB/s); decode / this: graph "
                f"{t_dq['graph'] / t['graph']:.2f}, "
                f"flushed {t_dq['flushed'] / t['flushed']:.2f}")  # fmt: skip
    RESULTS.append(row)
    del sets, outs, srcs, calls, copy_calls
    if not SMOKE:
        torch.cuda.empty_cache()


def main() -> None:
    sizes = [int(s) for s in cli_value("--sizes", "64" if SMOKE else "4096,8192").split(",")]
    names = cli_value("--cases", ",".join(SHORT)).split(",")
    gpu = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    say(f"# dequant regimes, {gpu}, torch {torch.__version__}, triton {triton.__version__}; "
        f"graph: back to back over >= {SPAN >> 20} MiB of outputs, median of 20 replays; "
        f"flushed: fastest of 3 do_bench medians")  # fmt: skip
    for name in names:
        for size in sizes:
            measure(name, size)
    REPORT.write("probe_dequant_regimes", {"rows": RESULTS})


if __name__ == "__main__":
    main()
