"""Strided reads (a tensor-parallel rank's column block of row-major parts) through
``read_strided``, warm page cache, 64 MiB spans, 4 threads:

* its two ways at the boundary between them, on near-identical work: rows a page (4096 bytes)
  apart are read in spans of a chunk (8 MiB), gaps included; one byte more apart, one read per
  row (how every strided read went before);
* the row shapes of Llama 1.1B/8B row-wise shards at TP=2 (int4 codes) against one contiguous
  read of the whole span (the ceiling).

    python3 benches/bench_strided.py        # with OUT=DIR also files
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from _common import Report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import qtensors as qt  # noqa: E402
from qtensors import _core  # noqa: E402

SPAN = 64 << 20
PAGE_GAP = 4096  # rust/core/src/io/stream.rs
BOUNDARY_ROWS = [512, 1408]
#: (label, bytes kept per row, bytes per stored row)
SHARDS = [("1.1B o_proj", 512, 1024), ("1.1B down_proj", 1408, 2816), ("8B down_proj", 3584, 7168)]


def best(fn, *args, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def strided(reader, whole: np.ndarray, row: int, stride: int, rows: int) -> float:
    out = np.empty(rows * row, np.uint8)
    s = best(reader.read_strided, 0, 0, stride, row, out)
    want = whole[: rows * stride].reshape(rows, stride)[:, :row]
    assert np.array_equal(out.reshape(rows, row), want)
    return s


def main() -> None:
    report = Report()
    say = report.say
    results: dict = {"span_bytes": SPAN, "boundary": {}, "shards": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("QT_BENCH_DIR")) as work:
        path = os.path.join(work, "s.qtensors")
        rng = np.random.default_rng(0)
        qt.save_file({"w": rng.integers(0, 255, SPAN, dtype=np.uint8)}, path)
        reader = _core.StreamReader(path, mode="pread", threads=4, chunk_size=8 << 20)
        whole = np.empty(SPAN, np.uint8)
        reader.read(0, 0, whole, False)  # warm the page cache
        say(f"# read_strided, warm page cache, {SPAN >> 20} MiB spans, 4 threads")
        say(f"{'row B':>6} {'spans ms':>9} {'per row ms':>10} {'per row / spans':>15}")
        for row in BOUNDARY_ROWS:
            rows = SPAN // (row + PAGE_GAP + 1)
            s = strided(reader, whole, row, row + PAGE_GAP, rows)
            r = strided(reader, whole, row, row + PAGE_GAP + 1, rows)
            results["boundary"][row] = dict(rows=rows, spans_s=s, per_row_s=r)
            say(f"{row:>6} {s * 1e3:9.1f} {r * 1e3:10.1f} {r / s:14.2f}x")
        say(f"{'shard rows':<16} {'row B':>6} {'stride':>6} {'strided ms':>10} {'whole ms':>9}")
        for label, row, stride in SHARDS:
            rows = SPAN // stride
            s = strided(reader, whole, row, stride, rows)
            w = best(reader.read, 0, 0, whole[: rows * stride], False)
            results["shards"][label] = dict(row=row, stride=stride, strided_s=s, whole_s=w)
            say(f"{label:<16} {row:>6} {stride:>6} {s * 1e3:10.1f} {w * 1e3:9.1f}")
    report.write("bench_strided", results)


if __name__ == "__main__":
    main()
