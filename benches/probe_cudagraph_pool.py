"""Probe (H200): the int4 1.1B model's compiled decode (static cache, ``torch.compile(mode=
"reduce-overhead")``: CUDA-graph trees) at each batch, in a fresh process, with the trees' own
allocation history on, so that a "tensor(s) in the cudagraph pool not tracked as outputs"
failure names where each such tensor was allocated.

    python3 benches/probe_cudagraph_pool.py [--batches 1,8] [--eager-first]

``--eager-first``: an eager ``generate`` at each batch before the compiled ones (the order
``bench_gpu_generate.py`` runs them in).
"""

from __future__ import annotations

import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import generate_kwargs  # noqa: E402
from bench_gpu_generate import build_model  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402


def main() -> int:
    batches = [int(b) for b in (sys.argv[sys.argv.index("--batches") + 1]
                                if "--batches" in sys.argv else "1,8").split(",")]  # fmt: skip
    torch._inductor.config.triton.cudagraph_trees_history_recording = True
    model = build_model()
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    failed = 0
    with torch.inference_mode():
        if "--eager-first" in sys.argv:
            for b in batches:
                ids = torch.randint(1, model.config.vocab_size, (b, 16), device="cuda")
                model.generate(ids, **generate_kwargs(8, False))
                print(f"eager batch {b}: ok", flush=True)
        for b in batches:
            ids = torch.randint(1, model.config.vocab_size, (b, 16), device="cuda")
            try:
                for _ in range(3):
                    model.generate(ids, **generate_kwargs(8, True))
                print(f"compiled batch {b}: ok", flush=True)
            except Exception:
                failed += 1
                print(f"compiled batch {b}: FAILED", flush=True)
                traceback.print_exc(limit=3)
            torch._dynamo.reset()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
