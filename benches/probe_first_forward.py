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

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(folder: str, device: str, profile: bool, warm_main: bool) -> None:
    import torch

    import qtensors.torch as qtt

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.empty(1, device=dev)
        sync()
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
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", metavar="FOLDER")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--warm-main", action="store_true", help="common_ops on the main thread first")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device, args.profile, args.warm_main)
        return
    from bench_gpu_load import SIZES, make_folders

    work = tempfile.mkdtemp(prefix="qtensors-probe-fwd-")
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(work, "triton"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    try:
        _, dst, _ = make_folders(work, SIZES["quick" if args.quick else "full"])
        cmd = [sys.executable, os.path.abspath(__file__), "--child", dst, "--device", args.device]
        cmd += ["--warm-main"] if args.warm_main else []
        for i in range(args.repeat + 2):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(p.stderr[-4000:])
            print(("untimed " if i < 2 else "") + line[0][7:], flush=True)
        p = subprocess.run([*cmd, "--profile"], capture_output=True, text=True, env=env)
        print(p.stdout[-7000:] if p.returncode == 0 else p.stderr[-4000:])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
