"""Probe (H200): where a prefill forward's time goes, bf16 against int4-g64, the 1.1B model
of ``bench_gpu_prefill.py`` at one prompt length.

    OUT=DIR python3 benches/probe_prefill_host.py [--prompt 512]

Models: bf16; int4 (decode + cuBLAS past 64 rows, the decode launches kept); the same through
the full path each call (``linear.REPLAYS = False``). Per model: the forward's wall time (CUDA
events, best of 3), its GPU kernel time (the
union of kernel intervals in a ``torch.profiler`` trace) and the host time of one forward
under cProfile (the top functions by own time), so a host-bound forward shows where its host
time goes.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import bench_gpu_generate as G  # noqa: E402
import torch  # noqa: E402
from _common import Report  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402

REPORT = Report()
say = REPORT.say


def busy_ms(prof) -> float:
    """The union of the trace's GPU kernel intervals, in ms."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    total, end = 0.0, -1.0
    for s, e in spans:
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3


def main() -> None:
    P = int(sys.argv[sys.argv.index("--prompt") + 1]) if "--prompt" in sys.argv else 512
    bf16 = G.build_model()
    q = G.build_model()
    qtt.quantize_model(q, qt.Affine(bits=4, group_size=64, axis=-1))
    ids = torch.randint(1, bf16.config.vocab_size, (1, P), device=G.DEV)
    say(f"# prefill host probe, 1.1B, P={P}, {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        for label, m in (("bf16", bf16), ("int4", q), ("int4 full path", q)):
            lin.REPLAYS = label != "int4 full path"
            for _ in range(3):
                m(ids)
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                m(ids)
                b.record()
                b.synchronize()
                best = min(best, a.elapsed_time(b))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                m(ids)
                torch.cuda.synchronize()
            pr = cProfile.Profile()
            pr.enable()
            m(ids)
            torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            say(f"## {label}: wall {best:.2f} ms, GPU busy {busy_ms(prof):.2f} ms")
            top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            say(top)
            say(s.getvalue()[:6000])
    REPORT.write("probe_prefill_host", {})


if __name__ == "__main__":
    main()
