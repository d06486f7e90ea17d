"""Quantize / dequantize speed of the Rust core on ONE core, against a plain memory copy of the
same bytes and against the numpy reference implementation of the spec (tests/reference.py).

    RAYON_NUM_THREADS=1 python benches/bench_codecs.py            # or: --size 2048 --repeat 5

Prints GB/s (of fp32 bytes: output for dequantize, input for quantize) and the ratios the
foundation issue asks for: dequantize >= 0.8x memcpy, quantize >= 0.4x memcpy, both >= 20x numpy.
Dequantizing to fp16 and bf16 is measured against a memcpy of the same (half-size) output (the
two run alternately, best of each; the faster of a copy between 64-byte aligned buffers and one
between numpy's arrays), into a 64-byte aligned buffer (as qtensors and torch allocate them; a
second line decodes into a buffer 16 bytes off, as a numpy array may be), and
peers that are installed (gguf-py's Q4_0, bitsandbytes' NF4) dequantize comparable data to fp16
in the same run.

Quantizing from fp16 and bf16 is compared with quantizing from fp32 (same values), and with
`--baseline-core PATH` (another build's `_core.abi3.so`, e.g. main's) quantizing and
dequantizing to fp16/bf16 are compared with that build on the same input, run alternately.
`--quantize-only` skips the rest:

    RAYON_NUM_THREADS=1 python benches/bench_codecs.py --quantize-only \
        --baseline-core /tmp/main/python/qtensors/_core.abi3.so
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before the Rust thread pool starts

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference

import qtensors as qt
from qtensors import _core


def best_pair(a, b, repeat: int) -> tuple[float, float]:
    """Best times of `a` and `b` run alternately (`best_alternating`)."""
    ta, tb = best_alternating([a, b], repeat)
    return ta, tb


def best_alternating(fns, repeat: int) -> list[float]:
    """Best times of `fns` run alternately, with pauses that spread the repeats over a second
    or more: on a machine shared with other jobs, a load spike then hits every side of a ratio
    rather than one, and lasts fewer repeats."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    order = list(zip(fns, times, strict=True))
    for i in range(repeat):
        time.sleep(0.03)
        # Which one runs first after the pause alternates too, so that a cost of running first
        # (or last) falls on every side.
        for fn, ts in order[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def best_of(fn, repeat: int) -> float:
    fn()  # warm up (page faults, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="matrix is SIZE x SIZE fp32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ref-size", type=int, default=512, help="side of the numpy-reference run")
    ap.add_argument("--only", default="", help="run only the cases whose label contains this")
    ap.add_argument("--quantize-only", action="store_true", help="only the quantize rows")
    ap.add_argument(
        "--baseline-core",
        default="",
        help="another build's _core.abi3.so to compare quantize and fp16/bf16 dequantize with",
    )
    args = ap.parse_args()
    base_core = load_core(args.baseline_core) if args.baseline_core else None

    rng = np.random.default_rng(0)
    n = args.size
    x = rng.standard_normal((n, n), dtype=np.float32)
    nbytes = x.nbytes
    print(
        f"# {platform.processor() or platform.machine()}, kernels {qt.kernels()}, "
        f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}"
    )
    print(f"# tensor {n}x{n} fp32 = {nbytes / 2**20:.0f} MiB, best of {args.repeat}")

    if base_core is not None:
        print(f"# baseline: {args.baseline_core}")
    dst = np.empty_like(x)
    t_copy = best_of(lambda: np.copyto(dst, x), args.repeat)
    copy_gbs = nbytes / t_copy / 1e9
    print(f"memcpy (np.copyto)                 {copy_gbs:7.2f} GB/s")
    t_copy_new = best_of(lambda: x.copy(), args.repeat)
    copy_new_gbs = nbytes / t_copy_new / 1e9
    print(f"copy to a new array (x.copy())     {copy_new_gbs:7.2f} GB/s")

    xr = rng.standard_normal((args.ref_size, args.ref_size), dtype=np.float32)
    rows = []
    cases = [
        ("affine 4-bit g64 axis=-1", qt.Affine(4, 64, axis=-1)),
        ("affine 4-bit g64 axis=0 (flexgen)", qt.FLEXGEN),
        ("symmetric 8-bit g128 axis=-1", qt.Symmetric(8, 128, axis=-1)),
        ("affine 8-bit g64 axis=-1", qt.Affine(8, 64, axis=-1)),
        ("symmetric 4-bit g64 axis=-1", qt.Symmetric(4, 64, axis=-1)),
        ("symmetric 4-bit full levels g32 axis=-1 (Q4_0)", qt.Symmetric(4, 32, levels="full")),
        ("affine 3-bit g64 axis=-1", qt.Affine(3, 64, axis=-1)),
        ("affine 2-bit g64 axis=-1", qt.Affine(2, 64, axis=-1)),
        ("nf4 g64 axis=-1", qt.NF4(64, axis=-1)),
        ("mxfp4 axis=-1", qt.MXFP4()),
        ("nvfp4 axis=-1", qt.NVFP4()),
    ]
    for label, enc in cases:
        if args.only not in label:
            continue
        enc_json = json.dumps(enc.to_dict(2))
        flat = x.reshape(-1).view(np.uint8)
        t_q = best_of(
            lambda enc_json=enc_json, flat=flat: _core.encode(flat, "float32", [n, n], enc_json),
            args.repeat,
        )
        q_gbs = nbytes / t_q / 1e9
        if args.quantize_only:
            vs = ""
            if base_core is not None:
                t_q, t_old = pair_with(base_core, flat, "float32", n, enc_json, args.repeat)
                q_gbs = nbytes / t_q / 1e9
                vs = f"  {t_old / t_q:5.2f}x baseline ({nbytes / t_old / 1e9:.2f} GB/s)"
            print(f"\n{label}")
            print(
                f"  quantize                     {q_gbs:7.2f} GB/s  {q_gbs / copy_gbs:5.2f}x memcpy"
                + vs
            )
            quantize_16bit(x, enc_json, q_gbs, base_core, args.repeat)
            continue
        parts = [
            np.frombuffer(b, np.uint8) for b in _core.encode(flat, "float32", [n, n], enc_json)
        ]
        out = np.empty((n, n), np.float32)
        out_b = out.reshape(-1).view(np.uint8)
        t_d = best_of(
            lambda parts=parts, enc_json=enc_json, out_b=out_b: _core.decode(
                parts, "float32", [n, n], enc_json, out_b
            ),
            args.repeat,
        )
        q = qt.quantize(x, enc)
        t_d_new = best_of(lambda q=q: qt.dequantize(q), args.repeat)

        # numpy reference on a smaller matrix, normalized per byte
        encd = enc.to_dict(2)
        t_rq = best_of(lambda encd=encd: reference.quantize(xr, encd), 1)
        rparts = reference.quantize(xr, encd)
        t_rd = best_of(
            lambda rparts=rparts, encd=encd: reference.dequantize(
                rparts, encd, xr.shape, "float32"
            ),
            1,
        )
        ref_q_gbs = xr.nbytes / t_rq / 1e9
        ref_d_gbs = xr.nbytes / t_rd / 1e9

        d_gbs = nbytes / t_d / 1e9
        dn_gbs = nbytes / t_d_new / 1e9
        rows.append((label, q_gbs, d_gbs, dn_gbs, ref_q_gbs, ref_d_gbs))
        print(f"\n{label}")
        print(
            f"  quantize                     {q_gbs:7.2f} GB/s  {q_gbs / copy_gbs:5.2f}x memcpy  "
            f"{q_gbs / ref_q_gbs:7.1f}x numpy ({ref_q_gbs:.3f} GB/s)"
        )
        print(
            f"  dequantize into preallocated {d_gbs:7.2f} GB/s  {d_gbs / copy_gbs:5.2f}x memcpy  "
            f"{d_gbs / ref_d_gbs:7.1f}x numpy ({ref_d_gbs:.3f} GB/s)"
        )
        print(
            f"  dequantize to a new array    {dn_gbs:7.2f} GB/s  {dn_gbs / copy_gbs:5.2f}x memcpy  "
            f"{dn_gbs / copy_new_gbs:5.2f}x x.copy()"
        )
        quantize_16bit(x, enc_json, q_gbs, base_core, args.repeat)
        for dt in ("float16", "bfloat16"):
            decode_16bit(parts, dt, n, enc_json, base_core, args.repeat)
    if not args.quantize_only:
        peers(x, args.repeat)


def aligned_empty(nbytes: int, offset: int = 0) -> np.ndarray:
    """`nbytes` bytes starting `offset` bytes past a 64-byte boundary: qtensors allocates its
    own outputs 64-byte aligned, as torch's CPU allocator does; numpy aligns to 16."""
    raw = np.empty(nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start : start + nbytes]


def decode_16bit(parts, dt: str, n: int, enc_json: str, base_core, repeat: int) -> None:
    """Dequantize to fp16 or bf16 into a 64-byte aligned buffer against a memcpy of the same
    output bytes and, given `base_core`, against that build decoding the same parts (all run
    alternately; the two builds must write the same bytes); then the same decode into a buffer
    16 bytes past a 64-byte boundary (a numpy array's alignment). The memcpy is the faster of
    `np.copyto` between aligned buffers and between numpy's own arrays."""
    hb = aligned_empty(2 * n * n)
    src, dst = aligned_empty(hb.nbytes), aligned_empty(hb.nbytes)
    src[:] = 1
    np_src, np_dst = np.ones(n * n, np.uint16), np.empty(n * n, np.uint16)
    off = aligned_empty(hb.nbytes, 16)
    fns = [
        lambda: np.copyto(dst, src),
        lambda: np.copyto(np_dst, np_src),
        lambda: _core.decode(parts, dt, [n, n], enc_json, hb),
        lambda: _core.decode(parts, dt, [n, n], enc_json, off),
    ]
    vs = ""
    if base_core is not None:
        other = aligned_empty(hb.nbytes)
        base_core.decode(parts, dt, [n, n], enc_json, other)
        _core.decode(parts, dt, [n, n], enc_json, hb)
        assert np.array_equal(hb, other), "builds disagree"
        fns.append(lambda: base_core.decode(parts, dt, [n, n], enc_json, other))
    t_ca, t_cn, t_h, t_off, *t_old = best_alternating(fns, repeat)
    t_c = min(t_ca, t_cn)
    h_gbs, hc_gbs = hb.nbytes / t_h / 1e9, hb.nbytes / t_c / 1e9
    if t_old:
        o_gbs = hb.nbytes / t_old[0] / 1e9
        vs = f"  {t_old[0] / t_h:5.2f}x baseline ({o_gbs:.2f} GB/s, {o_gbs / hc_gbs:.2f}x memcpy)"
    print(
        f"  dequantize to {dt:<8} (prealloc) {h_gbs:7.2f} GB/s  "
        f"{h_gbs / hc_gbs:5.2f}x memcpy of the {dt} bytes ({hc_gbs:.2f} GB/s: aligned "
        f"{hb.nbytes / t_ca / 1e9:.2f}, numpy {hb.nbytes / t_cn / 1e9:.2f}){vs}"
    )
    off_gbs = hb.nbytes / t_off / 1e9
    print(
        f"    into a buffer at 64k+16 bytes   {off_gbs:7.2f} GB/s  {off_gbs / hc_gbs:5.2f}x memcpy"
    )


def load_core(path: str):
    """Another build of the extension (e.g. main's), imported beside this one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline._core", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pair_with(base_core, src: np.ndarray, dt: str, n: int, enc_json: str, repeat: int):
    """Best times of quantizing `src` with this build and with `base_core`, run alternately;
    both must give the same parts."""

    def new():
        return _core.encode(src, dt, [n, n], enc_json)

    def old():
        return base_core.encode(src, dt, [n, n], enc_json)

    assert [bytes(p) for p in new()] == [bytes(p) for p in old()], "builds disagree"
    return best_pair(new, old, repeat)


def quantize_16bit(x: np.ndarray, enc_json: str, q_gbs: float, base_core, repeat: int) -> None:
    """Quantize from fp16 and bf16 input, per element against quantize from fp32 (`q_gbs`, same
    values rounded to the input dtype first) and, given `base_core`, against that build on the
    same bytes (run alternately)."""
    n = x.shape[0]
    for dt in ("float16", "bfloat16"):
        src = _as16(x, dt).reshape(-1).view(np.uint8)
        if base_core is None:
            t_new = best_of(lambda src=src, dt=dt: _core.encode(src, dt, [n, n], enc_json), repeat)
            vs = ""
        else:
            t_new, t_old = pair_with(base_core, src, dt, n, enc_json, repeat)
            vs = f"  {t_old / t_new:5.2f}x baseline ({x.nbytes / t_old / 1e9:.2f} GB/s)"
        q16 = x.nbytes / t_new / 1e9
        print(
            f"  quantize from {dt:<8}      {q16:7.2f} GB/s of fp32-equivalent  "
            f"{q16 / q_gbs:5.2f}x quantize from fp32{vs}"
        )


def _as16(x: np.ndarray, dt: str) -> np.ndarray:
    """`x` rounded to fp16 or bf16 (nearest even), as uint16 bits."""
    if dt == "float16":
        return x.astype(np.float16).view(np.uint16)
    b = x.view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def peers(x: np.ndarray, repeat: int) -> None:
    """Other libraries dequantizing the same matrix to fp16, where installed."""
    print("\npeers, dequantize the same matrix to fp16 (where installed)")
    half_bytes = x.size * 2
    try:
        import gguf

        q4 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
        t = best_of(
            lambda: gguf.quants.dequantize(q4, gguf.GGMLQuantizationType.Q4_0).astype(np.float16),
            max(1, repeat // 2),
        )
        print(f"  gguf-py Q4_0 (numpy)         {half_bytes / t / 1e9:7.2f} GB/s")
    except ImportError:
        print("  gguf-py: not installed")
    try:
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.from_numpy(x).to(torch.float16)
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
        t = best_of(lambda: bnbf.dequantize_4bit(packed, state), repeat)
        print(f"  bitsandbytes NF4 (CPU)       {half_bytes / t / 1e9:7.2f} GB/s")
    except ImportError:
        print("  bitsandbytes: not installed")


if __name__ == "__main__":
    main()
