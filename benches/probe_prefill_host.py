"""Probe (H200): where a prefill forward's time goes, bf16 against int4-g64, the model of
``bench_gpu_prefill.py`` (1.1B; ``QT_BENCH_MODEL=8b``: 8B) at one prompt length.

    OUT=DIR python3 benches/probe_prefill_host.py [--prompt 512]

Models: bf16; int4 (decode + cuBLAS past 64 rows, the decode launches kept); int4 with gemm16
on (``launch.use_gemm16()``: 65-256 rows on its table's weights, the launches kept); int4
through the full path each call (``linear.REPLAYS = False``). Per model: the forward's wall
time (CUDA events, best of 3), its GPU kernel time (``_common.gpu_busy``: the union of kernel
intervals in a ``torch.profiler`` trace) with its top kernels, and the host time of one forward
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
from _common import Report, cuda_ms, gpu_busy  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

REPORT = Report()
say = REPORT.say


def main() -> None:
    P = int(sys.argv[sys.argv.index("--prompt") + 1]) if "--prompt" in sys.argv else 512
    bf16 = G.build_model()
    q = G.build_model()
    qtt.quantize_model(q, qt.Affine(bits=4, group_size=64, axis=-1))
    ids = torch.randint(1, bf16.config.vocab_size, (1, P), device=G.DEV)
    say(f"# prefill host probe, {G.MODEL_NAME}, P={P}, {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        models = (("bf16", bf16), ("int4", q), ("int4 gemm16", q), ("int4 full path", q))
        for label, m in models:
            lin.REPLAYS = label != "int4 full path"
            L.use_gemm16(label == "int4 gemm16")
            for _ in range(3):
                m(ids)
            torch.cuda.synchronize()
            best = min(cuda_ms(lambda m=m: m(ids)) for _ in range(3))
            _, busy, _, by_name = gpu_busy(lambda m=m: m(ids))
            pr = cProfile.Profile()
            pr.enable()
            m(ids)
            torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            say(f"## {label}: wall {best:.2f} ms, GPU busy {busy * 1e3:.2f} ms")
            for name, sec in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]:
                say(f"  {sec * 1e3:8.3f} ms  {name[:90]}")
            say(s.getvalue()[:6000])
    REPORT.write("probe_prefill_host", {})


if __name__ == "__main__":
    main()
