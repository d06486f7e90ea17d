"""Loading a 4-bit file of an fp16 model to dense fp16 tensors on the CPU, against reading the
fp16 original and against bitsandbytes dequantizing the same tensors.

    python3 benches/bench_cpu_load.py [--tensors 8 --dim 4096 --repeats 5] [--cold]
                                      [--out benches/results/cpu_load.txt]

The model: ``--tensors`` fp16 matrices of ``--dim`` x ``--dim`` (N(0,1) times log-normal row
scales around 0.02, seeded). Contenders, each timed to dense fp16 torch tensors in memory with
the page cache warm (page faults of fresh memory and of the mapping included):

* ``safetensors``: ``safetensors.torch.load_file`` of the fp16 file, then one byte of every
  4 KiB page of every tensor read (so that a lazily mapped reader pays its faults); and the
  same with each tensor cloned;
* ``fresh fp16 tensors, written once``: ``torch.empty`` + ``fill_`` of each output tensor, no
  input at all: the floor of any decoder that returns new tensors (page faults of fresh memory
  and writing every byte once);
* ``qtensors``: ``qtensors.load_file(file, framework="pt")`` of the int4-g64 (affine, groups
  along rows) and NF4 g64 files of the same tensors: the Rust core decodes straight to fp16;
* ``bitsandbytes``: ``bitsandbytes.functional.dequantize_4bit`` (NF4, block 64, fp16 out) of
  every tensor, quantized beforehand in memory (no file read: bitsandbytes has no file format).

One warm-up, then ``--repeats`` rounds in which the contenders alternate; best of each (the
machine is shared). ``--cold``: each file is dropped from the page cache before each timed read
(``posix_fadvise(DONTNEED)``, outside the timing), so the reads come from the disk. qtensors'
outputs are checked against the numpy reference decoder first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

import qtensors as qt  # noqa: E402

PAGE = 4096


def model(n: int, dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        rows = 0.02 * torch.exp(0.3 * torch.randn(dim, 1, generator=g))
        out[f"layers.{i}.weight"] = (torch.randn(dim, dim, generator=g) * rows).half()
    return out


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """One byte of every page of every tensor (a sum, so the reads cannot be skipped)."""
    s = 0
    for t in tensors.values():
        s += int(t.view(-1).view(torch.uint8)[::PAGE].sum())
    return s


def evict(path: str) -> None:
    """Drop ``path``'s pages from the page cache (clean pages of a file nobody maps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--cold", action="store_true", help="read every file from the disk")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import reference
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file as st_save

    tensors = model(a.tensors, a.dim)
    nbytes = sum(t.numel() * 2 for t in tensors.values())
    fns = {}
    files: dict[str, str] = {}  # contender -> the file it reads (evicted first with --cold)
    notes = []
    with tempfile.TemporaryDirectory() as d:
        fp16 = os.path.join(d, "model.safetensors")
        st_save(tensors, fp16)
        fns["safetensors fp16 file + touch"] = lambda: touch(st_load(fp16))
        # the same into fresh memory: what any decoder's output pays (faults, writing it)
        fns["safetensors fp16 file + clone"] = lambda: touch(
            {k: v.clone() for k, v in st_load(fp16).items()}
        )
        files["safetensors fp16 file + touch"] = files["safetensors fp16 file + clone"] = fp16
        # the floor of any decoder to fresh tensors: allocating and writing the output once
        shapes = {k: v.shape for k, v in tensors.items()}
        fns["fresh fp16 tensors, written once"] = lambda: touch(
            {k: torch.empty(sh, dtype=torch.float16).fill_(1) for k, sh in shapes.items()}
        )
        for preset in ("int4-g64", "nf4"):
            path = os.path.join(d, f"{preset}.qtensors")
            qt.save_file(tensors, path, quant=preset)
            # correctness first: the decode equals the numpy reference of the spec
            got = qt.load_file(path, framework="pt")
            with qt.safe_open(path, framework="np") as f:
                name = next(iter(f.keys()))
                q = f.get_quantized(name)
            parts = {"codes": q.codes, "scales": q.scales}
            if q.mins is not None:
                parts["mins"] = q.mins
            want = reference.dequantize(parts, dict(q.encoding), q.shape, "float16")
            assert got[name].dtype == torch.float16
            assert (got[name].numpy() == want).all(), f"{preset}: decode differs from reference"
            fns[f"qtensors load_file {preset}"] = lambda p=path: touch(
                qt.load_file(p, framework="pt")
            )
            files[f"qtensors load_file {preset}"] = path
        try:
            import bitsandbytes.functional as bnbf

            qs = {
                k: bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4") for k, t in tensors.items()
            }
            fns["bitsandbytes dequantize_4bit nf4"] = lambda: touch(
                {k: bnbf.dequantize_4bit(c, s) for k, (c, s) in qs.items()}
            )
        except Exception as exc:  # not installed, or no CPU backend
            notes.append(f"bitsandbytes: not measured ({type(exc).__name__}: {exc})")
        for fn in fns.values():
            fn()
        best = {k: float("inf") for k in fns}
        for _ in range(a.repeats):
            for k, fn in fns.items():
                if a.cold and k in files:
                    evict(files[k])
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    base = best["safetensors fp16 file + touch"]
    lines = [
        f"# $ python3 benches/bench_cpu_load.py --tensors {a.tensors} --dim {a.dim} "
        f"--repeats {a.repeats}{' --cold' if a.cold else ''}    ({time.strftime('%Y-%m-%d')}, "
        "load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + ")",
        f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 torch "
        f"thread, RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'unset')}; "
        f"{a.tensors} x {a.dim}x{a.dim} fp16 = {nbytes / 1e6:.0f} MB of output; best of "
        f"{a.repeats} alternating rounds, "
        + ("files dropped from the page cache before each read" if a.cold else "page cache warm"),
        f"{'contender':<36} {'ms':>9} {'GB/s out':>9} {'vs safetensors':>15}",
    ]
    for k, s in best.items():
        lines.append(f"{k:<36} {s * 1e3:9.1f} {nbytes / s / 1e9:9.2f} {s / base:14.2f}x")
    lines += notes
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
            json.dump({"bytes": nbytes, "seconds": best}, fh, indent=1)


if __name__ == "__main__":
    main()
