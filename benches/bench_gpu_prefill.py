"""Prefill on the GPU: the forward over a prompt (what time to first token is made of past the
load), the Llama-shaped model of ``bench_gpu_generate.py`` (1.1B, or 8B; random weights) in
bf16 against the same model quantized int4-g64 (``quantize_model``, siblings joined), whose
linears run past 64 rows either the gemm16 route (the default, ``launch.GEMM16_ROWS``: 65-256
rows, ``gemm16_regs_gluon.py`` on ``launch.GEMM16_REGS_TABLE``'s weights, ``gemm16_gluon.py`` on
``GEMM16_TABLE``'s others) or decode + cuBLAS: "int4" with gemm16 on and the
decode launches kept (``fastlaunch.Refill``); in the same run "int4 no gemm16"
(``launch.use_gemm16(False)``: decode + cuBLAS only) and "int4 full path"
(``linear.REPLAYS = False``).

    OUT=DIR python3 benches/bench_gpu_prefill.py [--prompts 128,512,2048] [--batch 1]
    QT_BENCH_MODEL=8b ...          # Llama-3-8B's shape
    QT_BENCH_DRY=1 python3 benches/bench_gpu_prefill.py    # CPU, tiny model: the script's check

Each forward is ``model(ids, use_cache=True)`` under ``inference_mode`` (a fresh cache per
call, as ``generate``'s first step), timed with CUDA events; two warm-up calls, then 5 rounds
(``QT_BENCH_ROUNDS``) alternating between the models, the fastest and the median of each kept
(this host's spells of slowness move single rounds by 10-50%). Before timing, the int4 paths'
last-position logits are compared: kept launches against the full path (the same kernels:
equal), with gemm16 against without (relative max difference). Also prints the peak GPU
memory of one forward past the weights.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import bench_gpu_generate as G  # noqa: E402
import torch  # noqa: E402
from _common import Report, cli_value, count_calls, cuda_ms  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

DRY = G.DRY
REPORT = Report()
say = REPORT.say
ROUNDS = int(os.environ.get("QT_BENCH_ROUNDS", "5"))


def setting(kept: bool, gemm16: bool) -> None:
    """The int4 model's paths ("int4" with the gemm16 route, "int4 no gemm16" without)."""
    lin.REPLAYS = kept
    if (L.GEMM16_ROWS is not None) != gemm16:
        L.use_gemm16(gemm16)


def forward_ms(model, ids, kept: bool, gemm16: bool = True) -> float:
    setting(kept, gemm16)
    if DRY:
        t = time.perf_counter()
        model(ids, use_cache=True)
        return (time.perf_counter() - t) * 1e3
    return cuda_ms(lambda: model(ids, use_cache=True))


def main() -> None:
    prompts = [
        int(p) for p in cli_value("--prompts", "16,64" if DRY else "128,512,2048").split(",")
    ]
    batch = int(cli_value("--batch", "1"))
    dev = G.DEV
    bf16 = G.build_model()
    q = G.build_model()
    qtt.quantize_model(q, qt.Affine(bits=4, group_size=64, axis=-1))
    models = {"bf16": (bf16, True, True), "int4 no gemm16": (q, True, False),
              "int4": (q, True, True), "int4 full path": (q, False, True)}  # fmt: skip
    gpu = "cpu (dry)" if DRY else torch.cuda.get_device_name()
    say(f"# prefill, {G.MODEL_NAME} Llama-shaped, batch {batch}, {gpu}, torch {torch.__version__}")
    say(f"# ms per forward (best of {ROUNDS} alternating rounds), prompt tokens/s; "
        "x: bf16 time / this")  # fmt: skip
    vocab = bf16.config.vocab_size
    for P in prompts:
        ids = torch.randint(1, vocab, (batch, P), device=dev)
        setting(True, True)  # the checks' first forwards are "int4"'s (gemm16 on, kept)
        with torch.inference_mode():
            for _ in range(3):  # compile, note the launches, then kept
                a = q(ids).logits[:, -1].float()
            setting(False, True)
            b = q(ids).logits[:, -1].float()
            setting(True, False)
            c = q(ids).logits[:, -1].float()
            setting(True, True)
            diff = ((a - c).abs().max() / c.abs().max()).item()
            with (
                count_calls(L, "gemm16_linear") as calls,
                count_calls(L, "gemm16_regs_linear") as regs_calls,
                count_calls(L.Gemm16Kept, "__call__") as kept_calls,
            ):
                q(ids)
            n = len(calls) + len(regs_calls) + len(kept_calls)
            say(f"P={P}: gemm16 calls in one int4 forward: {n} ({len(kept_calls)} kept launches,"
                f" {len(regs_calls)} register-operand kernel's full path)")  # fmt: skip
            say(f"P={P}: int4 last logits, kept decode launches against the full path: equal"
                f" {bool(torch.equal(a, b))}; with gemm16 against without: relative max"
                f" difference {diff:.2e}")  # fmt: skip
            peak = {}
            for label, (m, kept, g16) in models.items():
                for _ in range(2):
                    forward_ms(m, ids, kept, g16)
                if not DRY:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    forward_ms(m, ids, kept, g16)
                    peak[label] = (torch.cuda.max_memory_allocated() - base) / 2**20
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(ROUNDS):
                for label, (m, kept, g16) in models.items():
                    times[label].append(forward_ms(m, ids, kept, g16))
        ref = min(times["bf16"])
        ref_med = statistics.median(times["bf16"])
        for label, ts in times.items():
            ms, med = min(ts), statistics.median(ts)
            extra = f", peak +{peak[label]:.0f} MiB" if label in peak else ""
            say(f"  {label:20} P={P:<5} {ms:8.2f} ms  {batch * P / ms * 1e3:9.0f} tok/s"
                f"  x{ref / ms:5.2f}  median {med:6.2f} ms x{ref_med / med:5.2f}"
                f"  (spread {max(ts) / ms - 1:.0%}){extra}")  # fmt: skip
    setting(True, True)
    REPORT.write("bench_gpu_prefill", {})


if __name__ == "__main__":
    main()
