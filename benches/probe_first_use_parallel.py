"""Whether the first calls of distinct torch ops on the GPU overlap when made from several threads.

    python3 benches/probe_first_use_parallel.py [--repeat 3]

The first call of each torch op on the device pays a set-up (its kernels' module loaded, a
library initialised): 10-110 ms each for the ops of a Llama forward on the H200
(``probe_prewarm_phases.py``). Each fresh process here (CUDA initialised first) makes the first
calls of the same list of ops (those of a Llama layer in fp16 with fp32 norms and rotary, and a
quantized embedding's row gathers), either one after another on the main thread or spread over
N threads, and reports the wall time. If the set-ups serialise inside the driver, the threads
gain nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def ops(torch):
    dev = "cuda"
    f32 = torch.zeros(1, 16, 2048, device=dev)
    f16 = torch.zeros(1, 16, 2048, device=dev, dtype=torch.float16)
    u8 = torch.zeros(64, 128, device=dev, dtype=torch.uint8)
    rows = torch.zeros(4, device=dev, dtype=torch.long)
    q = torch.zeros(1, 32, 16, 64, device=dev, dtype=torch.float16)
    kv = torch.zeros(1, 4, 16, 64, device=dev, dtype=torch.float16)
    inv = torch.zeros(1, 32, 1, device=dev)
    pos = torch.zeros(1, 1, 16, device=dev)
    F = torch.nn.functional
    return [
        lambda: f32.pow(2),
        lambda: torch.rsqrt(f32),
        lambda: f32.mean(-1, keepdim=True),
        lambda: f16.float(),
        lambda: u8.index_select(0, rows),
        lambda: f16[0].index_select(0, rows),
        lambda: inv @ pos,  # the rotary frequencies: cuBLAS's first call
        lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True),
        lambda: F.silu(f16),
        lambda: torch.cat((f16, f16), -1),
        lambda: -f16,
        lambda: f32.cos(),
        lambda: f32.sin(),
        lambda: f16 * f16,
        lambda: f16 + f16,
    ]


def child(threads: int) -> None:
    import torch

    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    work = ops(torch)
    t0 = time.perf_counter()
    if threads <= 1:
        for fn in work:
            fn()
    else:

        def run(part):
            for fn in part:
                fn()
            torch.cuda.synchronize()

        ts = [threading.Thread(target=run, args=(work[i::threads],)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    torch.cuda.synchronize()
    print(f"RESULT {time.perf_counter() - t0:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=int)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    print("first calls of 15 ops in a fresh process (CUDA initialised before the timer)")
    for threads in (1, 2, 4, 8, 15):
        got = []
        for _ in range(args.repeat):
            p = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", str(threads)],
                capture_output=True,
                text=True,
            )
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(p.stderr[-3000:])
            got.append(float(line[0][7:]))
        print(f"{threads:2d} thread(s): " + ", ".join(f"{g * 1e3:.0f} ms" for g in got))


if __name__ == "__main__":
    main()
