"""Peak memory of ``qtensors convert --method`` on SmolLM2-135M-Instruct (fp32 safetensors
folder), which builds the model without weights and reads one block at a time from the
shards, against the obvious alternative: loading the whole model with transformers first (what
``convert --method`` did before). Each run is a fresh child process; its peak RSS is the
child's own ``ru_maxrss`` (``os.wait4``).

    python3 benches/bench_methods_convert.py --out benches/results/methods_convert.txt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _data import doc_texts, smollm2_folder

HERE = os.path.dirname(os.path.abspath(__file__))

LOAD_WHOLE = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
"""


def child(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    src = smollm2_folder()
    size = sum(
        os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")
    )
    lines = [
        "$ python3 benches/" + " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        f"SmolLM2-135M-Instruct fp32 safetensors: {size / 2**20:.0f} MiB; int4-g128 (affine); "
        f"calibration {args.samples} x {args.seq_len} tokens of the Python tutorial",
        "",
        f"{'run':44} {'seconds':>8} {'peak RSS MiB':>13} {'x model':>8}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "tutorial.txt")
        with open(calib, "w", encoding="utf-8") as fh:
            fh.write("\n\n".join(doc_texts("tutorial")))
        py = [sys.executable, "-c", "import sys; sys.argv[0] = 'qtensors'; "]
        runs = [
            (
                "python -c 'import torch, transformers' (floor)",
                [sys.executable, "-c", "import torch, transformers"],
            ),
        ]
        for method in ("rtn", "gptq"):
            cmd = [
                *py[:2],
                "import sys; from qtensors.cli import main; sys.exit(main(sys.argv[1:]))",
                "convert", src, os.path.join(tmp, f"out-{method}"), "--preset", "int4-g128",
                "--method", method, "--calibration", calib, "--samples", str(args.samples),
                "--seq-len", str(args.seq_len), "-q",
            ]  # fmt: skip
            runs.append((f"convert --method {method} (block by block)", cmd))
        runs.append(
            ("transformers from_pretrained, whole model", [sys.executable, "-c", LOAD_WHOLE, src])
        )
        for label, argv in runs:
            secs, peak = child(argv)
            lines.append(f"{label:44} {secs:8.1f} {peak:13.0f} {peak * 2**20 / size:8.2f}")
            print(lines[-1], flush=True)
    lines += [
        "",
        "peak RSS includes the Python, torch and transformers runtime (the floor row). The",
        "whole-model row is only the load that the old convert --method started with.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
