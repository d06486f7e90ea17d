"""FlexGen (groups along axis 0) decode speed by column count, on one core, against a memcpy of
the same output bytes in the same run.

    RAYON_NUM_THREADS=1 python3 benches/bench_flexgen_columns.py

Same element count per shape; only the row length changes. A row's fp32 scales and mins take
8 bytes a column, read by every row of its 64-row group: at 4096 columns (32 KiB) they no longer
stay in L1 next to the streaming codes and output, which is what keeps fp16/bf16 below memcpy.
"""

import json

import numpy as np
from _common import best_ms

import qtensors as qt
from qtensors import _core


def main() -> None:
    enc_json = json.dumps(qt.FLEXGEN.to_dict(2))
    print("rows x cols       dtype      decode GB/s  memcpy GB/s  ratio")
    for rows, cols in [(4096, 4096), (8192, 2048), (16384, 1024), (65536, 256)]:
        x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        flat = x.reshape(-1).view(np.uint8)
        parts = [
            np.frombuffer(b, np.uint8)
            for b in _core.encode(flat, "float32", [rows, cols], enc_json)
        ]
        for dt, size in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
            out = np.empty(rows * cols * size, np.uint8)
            src = np.ones_like(out)
            shape = [rows, cols]
            t_d = best_ms(
                lambda out=out, dt=dt, parts=parts, shape=shape: _core.decode(
                    parts, dt, shape, enc_json, out
                ),
                9,
            )
            t_d /= 1e3
            t_c = best_ms(lambda out=out, src=src: np.copyto(out, src), 9) / 1e3
            d, c = out.nbytes / t_d / 1e9, out.nbytes / t_c / 1e9
            print(f"{rows:>6} x {cols:<6}  {dt:<9} {d:10.2f}  {c:11.2f}  {d / c:5.2f}x")


if __name__ == "__main__":
    main()
