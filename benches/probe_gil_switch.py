"""How long a thread of small torch ops takes beside a thread running Python, by switch interval.

    python3 benches/probe_gil_switch.py

The load's replica (``qtensors/torch/prewarm.py``) runs ~150 short torch ops in a thread while
the loader runs Python. Each op releases the GIL; taking it back from a thread in Python code
waits for that thread to drop it, which CPython forces after the switch interval (5 ms by
default). This probe runs 200 small CPU ops in a thread beside a busy Python loop at several
intervals, and alone, so the cost per op is seen without a GPU.

Outcome (stop 28): the replica lowered the interval to 0.2 ms for a while; on the H200 it did not
shorten the replica's thread (0.44 s against 0.41 s at 5 ms, ``gpu_load_replica_kernels_h200.txt``):
alone on the main thread the replica takes as long (``probe_prewarm_phases.py``), its time is
the first calls' own set-up, so the change was taken out.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

OPS = 200


def ops(out: list[float]) -> None:
    t0 = time.perf_counter()
    x = torch.zeros(16, 64)
    for _ in range(OPS):
        x = x + 1
    out.append(time.perf_counter() - t0)


def busy(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def main() -> None:
    torch.set_num_threads(1)
    saved = sys.getswitchinterval()
    alone: list[float] = []
    ops(alone)
    print(f"{OPS} small ops alone: {alone[0] * 1e3:.2f} ms")
    try:
        for interval in (0.005, 0.001, 0.0002):
            sys.setswitchinterval(interval)
            out: list[float] = []
            t = threading.Thread(target=ops, args=(out,))
            t.start()
            busy(1.5)
            t.join()
            print(
                f"switch interval {interval * 1e3:.1f} ms: {OPS} ops beside a Python loop took "
                f"{out[0] * 1e3:.1f} ms ({out[0] / alone[0]:.0f}x alone)"
            )
    finally:
        sys.setswitchinterval(saved)


if __name__ == "__main__":
    main()
