"""Write the crafted seeds of the reader fuzz target into fuzz/seeds/ (run from the repo root:
`PYTHONPATH=python:tests python3 fuzz/make_seeds.py`). The seeds are committed; rerun this when
the format or the malformed cases change. spec/vectors/ adds the conformance files at run time.

Seeds: every crafted malformed file of tests/malformed_cases.py (one or more per rule of spec
section 7) and a few valid files at the edges (1-bit codes, every raw dtype, empty and scalar
tensors, 4096 alignment, many tiny tensors, parts of one tensor in reverse order, compressed
parts in small chunks)."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
from malformed_cases import cases

import qtensors as qt

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LEN = 65536  # run.sh's -max_len


def valid_files(tmp: str) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    specs = {
        "bits1": ({"w": w}, {"w": qt.Affine(bits=1, group_size=16, axis=1)}, 64),
        "nf4_f16": (
            {"w": w.astype(np.float16)},
            {"w": qt.NF4(group_size=32, axis=0)},
            64,
        ),
        "symmetric8": ({"w": w}, {"w": qt.Symmetric(bits=8, group_size=128, axis=-1)}, 64),
        "raw_dtypes": (
            {
                "b": np.array([0, 1, 1], dtype=np.bool_),
                "i": np.arange(5, dtype=np.int64),
                "h": np.ones(7, dtype=np.float16),
                "u": np.arange(3, dtype=np.uint8),
            },
            None,
            64,
        ),
        "empty_scalar": (
            {"e": np.zeros((0, 64), dtype=np.float32), "s": np.array(2.5, dtype=np.float32)},
            {"e": qt.FLEXGEN},
            64,
        ),
        "align4096": ({"w": w[:4]}, None, 4096),
        "many_tiny": ({f"t{i}": np.array([i], dtype=np.float32) for i in range(200)}, None, 64),
    }
    out = {}
    for name, (tensors, quant, alignment) in specs.items():
        path = os.path.join(tmp, name + ".qtensors")
        qt.save_file(tensors, path, quant=quant, alignment=alignment)
        with open(path, "rb") as fh:
            out[name] = fh.read()
    out["reversed_parts"] = reverse_parts(out["bits1"])
    # Compressed parts (spec 2.1): lossless (every filter), quantized with compressed scales, and
    # several small chunks in one part.
    small = {
        "f": (rng.standard_normal(3000) * 0.05).astype(np.float32),
        "h": np.ones(5000, dtype=np.float16),
        "i": np.arange(2000, dtype=np.int32),
        "u": np.zeros(9000, dtype=np.uint8),
        "e": np.zeros(0, dtype=np.float32),
    }
    for name, tensors, quant in [
        ("zstd_lossless", small, "raw"),
        ("zstd_quantized", {"w": np.round(w * 4) / 4}, None),
    ]:
        path = os.path.join(tmp, name + ".qtensors")
        w_ = qt._core.Writer(path, *plan(tensors, quant), {}, 64, "zstd", chunk_size=4096)
        for i, x in enumerate(tensors.values()):
            w_.write_tensor(i, np.ascontiguousarray(x).view(np.uint8).reshape(-1), str(x.dtype))
        w_.finish()
        with open(path, "rb") as fh:
            out[name] = fh.read()
    return out


def plan(tensors, quant):
    """`_core.Writer`'s plans for `tensors` (save_file's choice of encodings)."""
    from qtensors.encodings import Raw, choose_encoding, normalize_quant

    q = normalize_quant(quant)
    plans = []
    for name, x in tensors.items():
        enc = choose_encoding(name, str(x.dtype), x.shape, q)
        ed = {"name": "raw"} if isinstance(enc, Raw) else enc.to_dict(x.ndim)
        plans.append((name, str(x.dtype), list(x.shape), json.dumps(ed)))
    return (plans,)


def reverse_parts(blob: bytes) -> bytes:
    """The same tensor with its parts stored in reverse order (valid: offsets are free)."""
    (hl,) = struct.unpack("<Q", blob[16:24])
    header = json.loads(blob[24 : 24 + hl])
    data = blob[24 + hl :]
    (t,) = header["tensors"]
    pieces, pos = [], 0
    for p in reversed(list(t["parts"].values())):
        b = data[p["offset"] : p["offset"] + p["length"]]
        p["offset"] = pos
        pieces.append(b + b"\0" * (-len(b) % 64))
        pos += len(pieces[-1])
    text = json.dumps(header).encode()
    text += b" " * (-(24 + len(text)) % 64)
    return blob[:16] + struct.pack("<Q", len(text)) + text + b"".join(pieces)


def main() -> None:
    import tempfile

    seeds = os.path.join(HERE, "seeds")
    os.makedirs(seeds, exist_ok=True)
    for f in os.listdir(seeds):
        os.remove(os.path.join(seeds, f))
    blobs = {f"malformed-{c.id}": c.blob for c in cases()}
    # Hostile compressed parts: lying chunk tables, bombs, frames of the wrong size.
    from test_compression import DATA_CASES, OPEN_CASES, craft

    blobs.update({f"malformed-zstd-{c[0]}": c[1]() for c in OPEN_CASES})
    blobs.update({f"malformed-zstd-{c[0]}": craft(c[1], c[2]) for c in DATA_CASES})
    with tempfile.TemporaryDirectory() as tmp:
        blobs.update({f"valid-{k}": v for k, v in valid_files(tmp).items()})
    kept = 0
    for name, blob in blobs.items():
        if len(blob) > MAX_LEN:
            continue
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
        digest = hashlib.sha1(blob).hexdigest()[:8]
        with open(os.path.join(seeds, f"{safe}-{digest}.qtensors"), "wb") as fh:
            fh.write(blob)
        kept += 1
    print(f"{kept} seeds in {seeds}")


if __name__ == "__main__":
    main()
