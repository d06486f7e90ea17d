"""`qtensors convert` on a synthetic multi-GB model: time, throughput, peak memory, cores used,
against a plain safetensors read of the same input in the same run.

    python benches/bench_convert.py                        # ~3 GB fp16 model under /tmp
    python benches/bench_convert.py --size-gb 6 --dtype bfloat16 --preset nf4

The model is a Hugging Face style folder (LLaMA-like layer shapes, two shards and an index,
config.json), generated once under --dir (never in the repository). Every measured run is a fresh
subprocess; its peak RSS is that child's ru_maxrss (os.wait4), which counts file pages mapped into
the process as well as its own allocations. Runs:

* imports only: python + numpy + safetensors + qtensors (+ torch for bfloat16 models, which
  numpy cannot hold), the floor of every other figure;
* plain read: safetensors.safe_open (numpy) and get_tensor of every tensor, one handle per shard,
  the way a loader reads a model: the speed limit of reading, and what the input costs in memory;
* convert: `python -m qtensors convert SRC DST` (default read-ahead of one tensor), and again with
  `--read-ahead 0` (read inline, no overlap) to show what the reader thread buys.

Page cache: the input is read once before the runs ("warm"). With --cold the input's pages are
also dropped (posix_fadvise DONTNEED) before each run, so each run reads from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

PLAIN_READ = r"""
import sys, os, glob
from safetensors import safe_open
n = 0
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors"))):
    with safe_open(path, framework=sys.argv[2]) as f:
        for k in f.keys():
            x = f.get_tensor(k)
            if sys.argv[2] == "pt":
                x = x.clone()  # torch tensors are lazy views of the map: make them read
            n += x.nbytes
            del x
print(n)
"""

IMPORTS_ONLY = "import numpy, safetensors, qtensors, qtensors.convert"


def layer_shapes(hidden: int, inter: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
    ]


def make_model(folder: str, size_gb: float, dtype: str, seed: int = 0) -> dict:
    """A LLaMA-shaped model (hidden 4096, intermediate 11008, vocab 32000) with as many layers as
    fit in `size_gb`, in two shards with an index. Values: a random normal pool, scaled per
    tensor (the encoders' speed does not depend on the values' variety)."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab = 4096, 11008, 32000
    item = 4 if dtype == "float32" else 2
    per_layer = sum(int(np.prod(s)) for _, s in layer_shapes(hidden, inter)) * item
    fixed = (2 * vocab * hidden + hidden) * item
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        tensors += [(f"model.layers.{i}.{n}", s) for n, s in layer_shapes(hidden, inter)]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=gen)
    os.makedirs(folder, exist_ok=True)
    total = sum(int(np.prod(s)) for _, s in tensors) * item
    half, acc, shard, shards = total / 2, 0, {}, []
    weight_map = {}

    def flush():
        name = f"model-{len(shards) + 1:05d}-of-00002.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        shards.append(name)
        shard.clear()

    for j, (name, shape) in enumerate(tensors):
        n = int(np.prod(shape))
        if len(shape) == 1:
            t = torch.ones(n)
        else:
            reps = -(-n // pool.numel())
            start = (j * 7919) % pool.numel()
            t = pool.roll(start).repeat(reps)[:n] * (0.02 + 0.001 * (j % 13))
        shard[name] = t.reshape(shape).to(tdtype)
        acc += n * item
        if acc >= half and not shards:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump({"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers}, fh)
    return {"tensors": len(tensors), "bytes": total}


def describe_model(folder: str) -> dict:
    from safetensors import safe_open

    n = total = largest = 0
    dtypes = set()
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="np") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    item = {"F32": 4, "F16": 2, "BF16": 2}[sl.get_dtype()]
                    b = int(np.prod(sl.get_shape())) * item
                    n, total, largest = n + 1, total + b, max(largest, b)
                    dtypes.add(sl.get_dtype())
    return {"tensors": n, "bytes": total, "largest": largest, "dtypes": sorted(dtypes)}


def drop_cache(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                while fh.read(64 << 20):
                    pass


# A child's ru_maxrss starts from its parent's RSS at fork (Linux carries the high-water mark
# across exec), so commands are started from this small, fresh interpreter, never from the
# benchmark process itself (which holds numpy, and torch after generating a model).
RUNNER = r"""
import json, os, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t0 = time.perf_counter()
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_pid, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
err = p.stderr.read().decode()
print(json.dumps({"wall": wall, "rss": ru.ru_maxrss * 1024, "cpu": ru.ru_utime + ru.ru_stime,
                  "rc": os.waitstatus_to_exitcode(status), "err": err}))
"""


def run(cmd: list[str]) -> dict:
    """Run `cmd`: wall seconds, peak RSS (bytes) and CPU seconds (user + system) of the child."""
    out = subprocess.run(
        [sys.executable, "-S", "-c", RUNNER, json.dumps(cmd)],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(out.stdout)
    if r["rc"] != 0:
        sys.exit(f"failed ({r['rc']}): {shlex.join(cmd)}\n{r['err']}")
    return r


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=3.0, help="model size (default 3)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--preset", default="flexgen")
    ap.add_argument("--dir", default="/tmp/qtensors-bench", help="where the model is generated")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each kind; the best is shown")
    ap.add_argument("--cold", action="store_true", help="drop the input's page cache each run")
    ap.add_argument("--keep", action="store_true", help="keep the converted output")
    args = ap.parse_args()

    print("$ python benches/bench_convert.py " + shlex.join(sys.argv[1:]))
    src = os.path.join(args.dir, f"model-{args.dtype}-{args.size_gb:g}gb")
    dst = os.path.join(args.dir, "out-qtensors")
    if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        make_model(src, args.size_gb, args.dtype)
        print(f"# generated {src} in {time.perf_counter() - t0:.1f} s")
    m = describe_model(src)

    import qtensors

    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, kernels {qtensors.kernels()[1]}, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"# model: {m['tensors']} tensors in 2 shards, {gb(m['bytes'])} of {'/'.join(m['dtypes'])}"
        f", largest tensor {m['largest'] / 1e6:.0f} MB; preset {args.preset}; "
        f"page cache {'dropped before each run' if args.cold else 'warm'}"
    )
    warm(src)

    py = sys.executable
    fw = "pt" if args.dtype == "bfloat16" else "np"
    kinds = [
        ("imports only", [py, "-c", IMPORTS_ONLY + (", torch" if fw == "pt" else "")]),
        (f"plain read (safetensors, {fw})", [py, "-c", PLAIN_READ, src, fw]),
        (
            "convert (read-ahead 1)",
            [py, "-m", "qtensors", "convert", src, dst, "--preset", args.preset, "--force", "-q"],
        ),
        (
            "convert (read-ahead 0)",
            [
                py,
                "-m",
                "qtensors",
                "convert",
                src,
                dst,
                "--preset",
                args.preset,
                "--force",
                "-q",
                "--read-ahead",
                "0",
            ],
        ),
    ]
    results = {}
    for _ in range(args.repeat):
        for label, cmd in kinds:
            if args.cold:
                drop_cache(src)
            r = run(cmd)
            best = results.get(label)
            if best is None or r["wall"] < best["wall"]:
                results[label] = r
    out_bytes = sum(
        os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".qtensors")
    )
    verify = run([py, "-m", "qtensors", "verify", dst, "-q"])

    base = results["imports only"]
    print()
    print(f"{'run':34} {'wall s':>7} {'GB/s':>6} {'peak RSS':>9} {'RSS-imports':>11} {'cores':>5}")
    for label, r in results.items():
        rate = "" if label == "imports only" else f"{m['bytes'] / r['wall'] / 1e9:6.2f}"
        extra = "" if label == "imports only" else gb(r["rss"] - base["rss"])
        print(
            f"{label:34} {r['wall']:7.2f} {rate:>6} {gb(r['rss']):>9} {extra:>11} "
            f"{r['cpu'] / r['wall']:5.2f}"
        )
    read = results[f"plain read (safetensors, {fw})"]
    conv = results["convert (read-ahead 1)"]
    serial = results["convert (read-ahead 0)"]
    print()
    print(
        f"model size               {gb(m['bytes'])} of tensors; output {gb(out_bytes)} "
        f"({m['bytes'] / out_bytes:.2f}x smaller); verify took {verify['wall']:.2f} s"
    )
    print(
        f"convert vs plain read    {conv['wall'] / read['wall']:.2f}x the time "
        f"({m['bytes'] / conv['wall'] / 1e9:.2f} vs {m['bytes'] / read['wall'] / 1e9:.2f} GB/s)"
    )
    print(f"read-ahead 1 vs 0        {serial['wall'] / conv['wall']:.2f}x faster")
    print(
        f"convert peak RSS         {gb(conv['rss'])} = {conv['rss'] / m['bytes']:.2f}x the model,"
        f" {(conv['rss'] - base['rss']) / m['largest']:.2f}x the largest tensor above the imports"
    )
    print(f"plain read peak RSS      {gb(read['rss'])} = {read['rss'] / m['bytes']:.2f}x the model")
    if not args.keep:
        shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
