"""Cold-cache streaming of a lossless (zstd) file against the same tensors uncompressed: does
compression pay at the disk's read rate? Self-contained; one script for the CPU and the GPU.

    python benches/bench_stream_compressed.py                      # CPU (qtensors.stream to "cpu")
    python benches/bench_stream_compressed.py --device cuda        # the GPU variant (H200)
    python benches/bench_stream_compressed.py --gb 0.25 --work /tmp/x

1. model: the ~1 GB synthetic bf16 model of `_common.synthetic_bf16` saved as safetensors, then
   `qtensors.convert --lossless` (every tensor raw, zstd on byte planes) and `--quant raw`
   (the same tensors uncompressed);
2. check: both files streamed to the device decode bit-identical to the safetensors tensors;
3. disk: the sequential read rate of the uncompressed file from a cold page cache (plain
   `read` of 16 MiB blocks, no decoding);
4. stream: `qtensors.stream(path, device=...)` of each file from a cold page cache (best of
   `--repeat`, the contenders in turn), then warm (file read into the page cache first); output
   GB/s (decoded bytes per second) and the lossless / uncompressed ratio. On the CPU also the
   uncompressed file read one tensor at a time through the page cache (`uncompressed-1`: the
   CPU path before it read `HOST_READERS` tensors at once in mode "auto").
5. loaders (CPU): `qtensors.torch.load_model` of each file into a model built on the meta device,
   and one forward pass of that model under `qtensors.torch.offload` (each layer's weights read
   from the file as it runs), cold, in their default engine mode (as the stream: "auto",
   `HOST_READERS` tensors in flight) against one tensor at a time in mode "pread" (`-1`: how
   both read before they shared the stream's engine).

Page cache: dropped with `echo 3 > /proc/sys/vm/drop_caches` where allowed, else with
`posix_fadvise(DONTNEED)` on the files (the output says which). Writes JSON and text to $OUT
if set.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

import torch
from _common import Report, drop_caches, synthetic_bf16
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import qtensors as qt

S = importlib.import_module("qtensors.stream")  # the module (`qt.stream` is the function)

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
ap.add_argument("--gb", type=float, default=1.0, help="size of the synthetic bf16 model")
ap.add_argument("--repeat", type=int, default=2)
ap.add_argument("--work", default=None, help="folder for the files (default: a temporary one)")
args = ap.parse_args()
REP = Report()
RESULT: dict = {"device": args.device, "gb": args.gb}


def sync() -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def stream_all(path: str, readers: int | None = None, mode: str | None = None) -> int:
    """Stream every tensor of `path` to the device (on the CPU with `readers` tensors read at
    once, default HOST_READERS; `mode`: the read mode, default stream's); decoded bytes."""
    default = S.HOST_READERS
    S.HOST_READERS = readers or default
    try:
        n = 0
        for _, t in qt.stream(path, device=args.device, mode=mode):
            n += t.numel() * t.element_size()
    finally:
        S.HOST_READERS = default
    sync()
    return n


class _Layer(torch.nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        lin = torch.nn.Linear
        for name in ("q", "k", "v", "o"):
            setattr(self, name, lin(hidden, hidden, bias=False, dtype=torch.bfloat16))
        self.gate = lin(hidden, inter, bias=False, dtype=torch.bfloat16)
        self.up = lin(hidden, inter, bias=False, dtype=torch.bfloat16)
        self.down = lin(inter, hidden, bias=False, dtype=torch.bfloat16)
        self.norm = torch.nn.LayerNorm(hidden, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.o(self.q(x) + self.k(x) + self.v(x)))
        return x + self.down(self.gate(x) * self.up(x))


class _Model(torch.nn.Module):
    """The synthetic model's tensors as modules (`layers.{i}.{q,...,down,norm}.weight`)."""

    def __init__(self, layers: int, hidden: int = 2048, inter: int = 5632) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(hidden, inter) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def timed_loader(path: str, layers: int, kind: str, one: bool) -> float:
    """Seconds of `load_model` (kind "load") or of one offloaded forward (kind "offload") of
    `path` to the CPU; `one`: one tensor at a time in mode "pread" (else the defaults)."""
    qtt = importlib.import_module("qtensors.torch")
    default = S.HOST_READERS
    S.HOST_READERS = 1 if one else default
    kw = {"mode": "pread"} if one else {}
    try:
        with qtt.init_empty_weights():
            model = _Model(layers)
        t0 = time.perf_counter()
        if kind == "load":
            qtt.load_model(model, path, device="cpu", **kw)
        else:
            model = qtt.offload(model, path, device="cpu", prefetch=1 if one else 2, **kw)
            model(torch.ones(1, 2048, dtype=torch.bfloat16))
            model.qtensors_offload.remove()
        return time.perf_counter() - t0
    finally:
        S.HOST_READERS = default


def timed_stream(path: str, **kw) -> tuple[float, int]:
    """Seconds to stream every tensor of `path`, and the decoded bytes."""
    t0 = time.perf_counter()
    n = stream_all(path, **kw)
    return time.perf_counter() - t0, n


def cache(path: str) -> None:
    """Read `path` into the page cache."""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def disk_read(path: str) -> float:
    """Seconds to read `path` sequentially from a cold cache, 16 MiB at a time."""
    drop_caches([path])
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass
    return time.perf_counter() - t0


def main(work: str) -> None:
    REP.say(f"bench_stream_compressed: device {args.device}, {args.gb:g} GB synthetic bf16")
    if args.device.startswith("cuda"):
        REP.say(f"gpu: {torch.cuda.get_device_name()}")
    src = os.path.join(work, "synthetic.safetensors")
    lossless = os.path.join(work, "lossless.qtensors")
    plain = os.path.join(work, "plain.qtensors")
    tensors = synthetic_bf16(args.gb)
    st_save(tensors, src)
    del tensors
    qt.convert(src, lossless, lossless=True, force=True)
    qt.convert(src, plain, quant="raw", force=True)
    sizes = {p: os.path.getsize(p) for p in (src, lossless, plain)}
    RESULT.update(
        safetensors_bytes=sizes[src], lossless_bytes=sizes[lossless], plain_bytes=sizes[plain]
    )
    REP.say(
        f"files: safetensors {sizes[src] / 1e9:.3f} GB, lossless {sizes[lossless] / 1e9:.3f} GB "
        f"({sizes[src] / sizes[lossless]:.3f}x), uncompressed qtensors {sizes[plain] / 1e9:.3f} GB"
    )

    # Correctness first: both files stream to the same bits as the safetensors tensors.
    want = st_load(src)
    for path in (lossless, plain):
        for name, t in qt.stream(path, device=args.device):
            w = want[name]
            assert t.dtype == w.dtype and torch.equal(
                t.cpu().view(torch.int16), w.view(torch.int16)
            ), (
                path,
                name,
            )
    del want
    REP.say("check: both files stream bit-identical to the safetensors tensors")

    t_disk = min(disk_read(plain) for _ in range(args.repeat))
    how = drop_caches([plain])
    RESULT["disk_read_gbps"] = sizes[plain] / t_disk / 1e9
    RESULT["cache_drop"] = how
    REP.say(f"disk: {RESULT['disk_read_gbps']:.2f} GB/s sequential read, cold ({how})")

    # The contenders in turn, each cold `--repeat` times; on the CPU also the uncompressed file
    # read as the CPU path did before: one tensor at a time, through the page cache ("pread").
    contenders = [("uncompressed", plain, {}), ("lossless", lossless, {})]
    if not args.device.startswith("cuda"):
        contenders.append(("uncompressed-1", plain, {"readers": 1, "mode": "pread"}))
    cold: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for _ in range(args.repeat):
        for label, path, kw in contenders:
            drop_caches([path])
            cold[label].append(timed_stream(path, **kw)[0])
    out = {}
    for label, path, kw in contenders:
        cache(path)  # (a stream in mode "auto" reads around the page cache: it fills none)
        warm, n = min(timed_stream(path, **kw) for _ in range(args.repeat))
        out[label] = {
            "decoded_bytes": n,
            "cold_s": min(cold[label]),
            "cold_gbps": n / min(cold[label]) / 1e9,
            "warm_gbps": n / warm / 1e9,
        }
        REP.say(
            f"stream {label:14s} cold {out[label]['cold_gbps']:.2f} GB/s "
            f"({min(cold[label]):.2f} s)  warm {out[label]['warm_gbps']:.2f} GB/s  "
            "(decoded bytes/s)"
        )
    if "uncompressed-1" in out:
        gain = out["uncompressed"]["cold_gbps"] / out["uncompressed-1"]["cold_gbps"]
        RESULT["cold_gain_of_host_readers"] = gain
        REP.say(
            f"cold stream, uncompressed: {S.HOST_READERS} tensors at once, mode "
            f"{S.HOST_MODE!r} / one at a time, mode 'pread' (uncompressed-1): {gain:.2f}x"
        )
    RESULT["stream"] = out
    if not args.device.startswith("cuda"):
        loaders(lossless, plain, out["uncompressed"]["decoded_bytes"])
    ratio = out["lossless"]["cold_gbps"] / out["uncompressed"]["cold_gbps"]
    RESULT["cold_speed_ratio"] = ratio
    REP.say(
        f"cold stream, lossless / uncompressed: {ratio:.2f}x "
        f"({'compression pays' if ratio >= 1 else 'compression does not pay'} at this disk's "
        f"{RESULT['disk_read_gbps']:.2f} GB/s; threads: {os.cpu_count()} cores visible)"
    )
    REP.write("stream_compressed", RESULT)


def loaders(lossless: str, plain: str, n: int) -> None:
    """load_model and an offloaded forward on the CPU, cold: default engine mode against one
    tensor at a time in mode "pread", on each file (the four contenders in turn)."""
    layers = len(qt.safe_open(plain).keys()) // 8
    res: dict = {}
    for kind in ("load", "offload"):
        cold: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.repeat):
            for label, path in (("lossless", lossless), ("uncompressed", plain)):
                for one in (False, True):
                    drop_caches([path])
                    cold.setdefault((label, one), []).append(timed_loader(path, layers, kind, one))
        for (label, one), ts in cold.items():
            res[f"{kind} {label}{'-1' if one else ''}"] = {
                "cold_s": min(ts),
                "cold_gbps": n / min(ts) / 1e9,
            }
        for label in ("lossless", "uncompressed"):
            new, old = res[f"{kind} {label}"], res[f"{kind} {label}-1"]
            REP.say(
                f"{'load_model' if kind == 'load' else 'offload pass'} {label:12s} cold "
                f"{new['cold_gbps']:.2f} GB/s ({new['cold_s']:.2f} s; the stream's engine) vs "
                f"{old['cold_gbps']:.2f} GB/s one tensor at a time, 'pread': "
                f"{new['cold_gbps'] / old['cold_gbps']:.2f}x"
            )
    RESULT["loaders"] = res


if args.work:
    os.makedirs(args.work, exist_ok=True)
    main(args.work)
else:
    with tempfile.TemporaryDirectory(prefix="qt-bench-zstream-") as tmp:
        main(tmp)
