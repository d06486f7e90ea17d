"""Quantize / dequantize speed of the Rust core on ONE core, against a plain memory copy of the
same bytes and against the numpy reference implementation of the spec (tests/reference.py).

    RAYON_NUM_THREADS=1 python benches/bench_codecs.py            # or: --size 2048 --repeat 5

Prints GB/s (of fp32 bytes: output for dequantize, input for quantize) and the ratios the
foundation issue asks for: dequantize >= 0.8x memcpy, quantize >= 0.4x memcpy, both >= 20x numpy.
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
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = args.size
    x = rng.standard_normal((n, n), dtype=np.float32)
    nbytes = x.nbytes
    print(
        f"# {platform.processor() or platform.machine()}, kernels {qt.kernels()}, "
        f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}"
    )
    print(f"# tensor {n}x{n} fp32 = {nbytes / 2**20:.0f} MiB, best of {args.repeat}")

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
        ("nf4 g64 axis=-1", qt.NF4(64, axis=-1)),
    ]
    for label, enc in cases:
        enc_json = json.dumps(enc.to_dict(2))
        flat = x.reshape(-1).view(np.uint8)
        t_q = best_of(
            lambda enc_json=enc_json, flat=flat: _core.encode(flat, "float32", [n, n], enc_json),
            args.repeat,
        )
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

        q_gbs = nbytes / t_q / 1e9
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


if __name__ == "__main__":
    main()
