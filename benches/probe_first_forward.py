"""What the first forward after ``qtt.from_pretrained`` still pays, once the load's replica ran.

    python3 benches/probe_first_forward.py [--quick] [--device cuda]

Makes the 1.1B Llama-shaped int4-g64 folder of ``bench_gpu_load.py``; then, in fresh processes
(imports and CUDA's initialisation first; the first two fill Triton's and Python's caches): the
model is loaded, its first and second forwards (16-token prompt) timed; then a second model is
loaded in the same process and timed the same way, which pays only what is per module (every
kernel and op of the process is set up by then). The last process profiles the first model's
first forward (cProfile; nothing else runs then: the replica's threads are joined by the load).
"""

from __future__ import annotations

import cProfile
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_gpu_load import (  # noqa: E402
    device_ready,
    print_profile,
    probe_in_fresh_processes,
    probe_parser,
)


def child(folder: str, device: str, profile: bool, warm_main: bool) -> None:
    import torch

    import qtensors.torch as qtt

    dev, sync = device_ready(device)
    ids = torch.arange(1, 17, device=dev).unsqueeze(0)
    out = []
    prof = None
    for n in (1, 2):
        t = time.perf_counter()
        model = qtt.from_pretrained(folder, device=dev, dtype=torch.float16)
        sync()
        load = time.perf_counter() - t
        if warm_main and n == 1:  # the common ops' first calls on this thread too
            from qtensors.torch import prewarm as P

            t = time.perf_counter()
            P._run_ops(P.common_ops(model.config, dev, torch.float16), dev)
            out.append(f"common ops on the main thread {(time.perf_counter() - t) * 1e3:.1f} ms")
        times = []
        with torch.inference_mode():
            for i in range(2):
                if profile and n == 1 and i == 0:
                    prof = cProfile.Profile()
                    prof.enable()
                t = time.perf_counter()
                model(ids)
                sync()
                times.append(time.perf_counter() - t)
                if prof is not None and n == 1 and i == 0:
                    prof.disable()
        out.append(f"model{n}: load {load * 1e3:.0f} ms, fwd1 {times[0] * 1e3:.1f} ms, "
                   f"fwd2 {times[1] * 1e3:.1f} ms")  # fmt: skip
        del model
    print("RESULT " + "; ".join(out), flush=True)
    if prof is not None:
        print_profile(prof, 25)


def main() -> None:
    ap = probe_parser(repeat=2)
    ap.add_argument("--warm-main", action="store_true", help="common_ops on the main thread first")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.profile, args.warm_main)
        return
    extra = ["--warm-main"] if args.warm_main else []
    probe_in_fresh_processes(__file__, args.device, args.quick, args.repeat, extra, tail=7000)


if __name__ == "__main__":
    main()
