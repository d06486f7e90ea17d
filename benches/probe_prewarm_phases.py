"""Where the load's replica (``qtensors/torch/prewarm.py``) spends its time, alone.

    python3 benches/probe_prewarm_phases.py [--quick] [--device cuda]

Makes the 1.1B Llama-shaped int4-g64 folder of ``bench_gpu_load.py``, then in fresh processes
(imports and CUDA's initialisation paid first, as there) runs the replica's steps on the main
thread with nothing else running, each synchronised and timed: build (from the headers),
materialize, join siblings, the prompt's forward, the one-row calls, and the same forward again
(every first use paid). One more process runs them under cProfile and prints the functions with
the most time of their own: a torch op's first call on the device shows there with its set-up.
Tells the replica's own cost from what running beside the loader adds (the load bench's
``prewarm`` column).
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


def child(folder: str, device: str, profile: bool) -> None:
    import torch
    import transformers

    import qtensors.torch  # noqa: F401
    from qtensors.torch import prewarm as P
    from qtensors.torch.siblings import fuse_siblings
    from qtensors.torch.transformers import architecture_class
    from qtensors.torch.warmup import warmup

    dev, sync = device_ready(device)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = architecture_class(cfg)
    prof = cProfile.Profile() if profile else None
    times: dict[str, float] = {}
    state: dict = {}

    def step(name, fn):
        t = time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn()
        sync()
        if prof is not None:
            prof.disable()
        times[name] = time.perf_counter() - t
        return out

    model = step("build", lambda: P.build_replica(cls, cfg, folder, torch.float16))
    step("materialize", lambda: P._materialize(model, dev, torch.float16))
    step("fuse", lambda: fuse_siblings(model))
    ids = torch.zeros(1, P.PROMPT_TOKENS, dtype=torch.long, device=dev)

    def forward():
        with torch.inference_mode():
            state["out"] = model(input_ids=ids)

    step("forward", forward)
    step("one_row", lambda: warmup(model, rows=(1,), remember=False))
    step("forward_again", forward)
    print("RESULT " + " ".join(f"{k}={v * 1e3:.1f}ms" for k, v in times.items()), flush=True)
    if prof is not None:
        print_profile(prof, 30)


def main() -> None:
    ap = probe_parser(repeat=3)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.profile)
        return
    probe_in_fresh_processes(__file__, args.device, args.quick, args.repeat, [])


if __name__ == "__main__":
    main()
