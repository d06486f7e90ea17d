"""Compressed parts (spec 2.1): lossless round trips, the independent zstandard-based reader
(tests/reference.py), random access that decodes only the chunks it needs, and hostile files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import reference as R
import zstandard

import qtensors as qt
from qtensors import _core
from qtensors.errors import FormatError, UnsupportedError

SMALL = 4096  # the smallest chunk size: many chunks in small tensors


def write(path, tensors, chunk_size=SMALL, quant="raw"):
    """save_file's writer with a chosen chunk size (save_file uses the 1 MiB default)."""
    from qtensors._arrays import as_bytes
    from qtensors.encodings import Raw, choose_encoding, normalize_quant

    q = normalize_quant(quant)
    plans, data = [], []
    for name, x in tensors.items():
        b, dtype, shape = as_bytes(x)
        enc = choose_encoding(name, dtype, shape, q)
        ed = {"name": "raw"} if isinstance(enc, Raw) else enc.to_dict(len(shape))
        plans.append((name, dtype, list(shape), json.dumps(ed)))
        data.append((b, dtype))
    w = _core.Writer(str(path), plans, {}, 64, "zstd", chunk_size=chunk_size)
    for i, (b, dtype) in enumerate(data):
        w.write_tensor(i, b, dtype)
    w.finish()


def sample(rng, dtype, shape):
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("float"):
        return (rng.standard_normal(shape) * 0.05).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)


DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
DTYPES += ["float16", "float32", "float64"]
# Sizes in bytes around the chunk boundaries (SMALL), empty, scalar and odd shapes.
SHAPES = [(0,), (), (1,), (3, 5), (SMALL // 8,), (SMALL // 8 + 1,), (3 * SMALL // 8 - 1,), (777, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_round_trip_every_dtype_and_the_reference_reads_it(tmp_path, dtype):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": sample(rng, dtype, s) for i, s in enumerate(SHAPES)}
    path = tmp_path / "l.qtensors"
    write(path, tensors)
    back = qt.load_file(str(path))
    for k, x in tensors.items():
        assert back[k].dtype == x.dtype and back[k].shape == x.shape
        assert back[k].tobytes() == x.tobytes(), k
    ref, _, _ = R.read_file(str(path))  # zstandard, checksums of the stored bytes
    for k, x in tensors.items():
        assert ref[k].tobytes() == x.tobytes(), k
    with qt.safe_open(str(path)) as f:
        f.verify()
        if np.dtype(dtype).itemsize > 1:  # random bytes do not compress
            parts = f.tensor_info("t7")["parts"]["data"]
            assert parts["compression"]["chunk_size"] == SMALL  # it was compressed


def test_compressing_writer_places_parts_in_write_order(tmp_path):
    # Each part is compressed while the one before it is still being written in the background:
    # out of plan order, a repeat of the part in flight, an unwritten part and an abort.
    rng = np.random.default_rng(5)
    tensors = {f"t{i}": sample(rng, "float16", (3000 + 1000 * i,)) for i in range(4)}
    tensors["plain"] = rng.integers(0, 256, 5000).astype(np.uint8)  # incompressible: as it is
    plans = [(n, str(x.dtype), [x.size], '{"name": "raw"}') for n, x in tensors.items()]
    path = tmp_path / "w.qtensors"
    w = _core.Writer(str(path), plans, {}, 64, "zstd", chunk_size=SMALL)
    order = [2, 4, 0, 3]
    names = list(tensors)
    for i in order:
        w.write_parts(i, [tensors[names[i]].view(np.uint8)])
    with pytest.raises(ValueError, match="'t3' part 'data' is written already"):
        w.write_parts(3, [tensors["t3"].view(np.uint8)])
    with pytest.raises(ValueError, match="'t1' part 'data' was never written"):
        w.finish()
    assert not path.exists() and os.listdir(tmp_path) == []  # finish failed: nothing left
    w = _core.Writer(str(path), plans, {}, 64, "zstd", chunk_size=SMALL)
    for i in [*order, 1]:
        w.write_parts(i, [tensors[names[i]].view(np.uint8)])
    w.finish()
    h = R.read_header(str(path))["header"]
    by_name = {t["name"]: t["parts"]["data"] for t in h["tensors"]}
    offsets = [by_name[names[i]]["offset"] for i in [*order, 1]]
    assert offsets == sorted(offsets)
    assert "compression" not in by_name["plain"] and "compression" in by_name["t0"]
    got = qt.load_file(str(path))
    assert all(np.array_equal(got[n], x) for n, x in tensors.items())
    qt.safe_open(str(path)).verify()
    # Dropped unfinished with a part in flight: no file, no temporary.
    w = _core.Writer(str(tmp_path / "x.qtensors"), plans, {}, 64, "zstd", chunk_size=SMALL)
    w.write_parts(0, [tensors["t0"].view(np.uint8)])
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["w.qtensors"]


def test_parts_shorter_than_a_chunk_are_batched_in_write_order(tmp_path):
    # With 1 MiB chunks these parts are staged until they add up to a batch (8 MiB), then
    # compressed together with the next part of a chunk or more: more than one batch here,
    # incompressible and empty parts among them, written out of plan order.
    rng = np.random.default_rng(9)
    tensors = {}
    for i in range(40):
        if i % 7 == 3:
            tensors[f"s{i}"] = rng.integers(0, 256, 300_000).astype(np.uint8)  # stored as is
        elif i % 11 == 5:
            tensors[f"s{i}"] = np.zeros((0, 4), np.float32)
        else:
            tensors[f"s{i}"] = sample(rng, "float16", (150_000 + 1000 * i,))
    tensors["big"] = sample(rng, "float32", (700_000,))  # 2.7 chunks: flushes the batch
    plans = [(n, str(x.dtype), list(x.shape), '{"name": "raw"}') for n, x in tensors.items()]
    names = list(tensors)
    order = [*range(20, 40), 40, *range(20)]
    path = tmp_path / "b.qtensors"
    w = _core.Writer(str(path), plans, {}, 64, "zstd")
    for i in order:
        w.write_parts(i, [tensors[names[i]].reshape(-1).view(np.uint8)])
    with pytest.raises(ValueError, match="'s7' part 'data' is written already"):
        w.write_parts(7, [tensors["s7"].view(np.uint8)])  # staged, not yet written
    header = json.loads(w.finish())
    assert header == R.read_header(str(path))["header"]  # finish returns what it wrote
    by_name = {t["name"]: t["parts"]["data"] for t in header["tensors"]}
    offsets = [by_name[names[i]]["offset"] for i in order]
    assert offsets == sorted(offsets)
    assert "compression" not in by_name["s3"] and "compression" in by_name["s0"]
    assert "compression" in by_name["big"] and by_name["s5"]["length"] == 0
    got = qt.load_file(str(path))
    assert all(np.array_equal(got[n], x) for n, x in tensors.items())
    # Written out of plan order: the header still lists the tensors in file order (strict).
    ref, _, _ = R.read_file(str(path))
    assert all(ref[n].tobytes() == x.tobytes() for n, x in tensors.items())
    qt.safe_open(str(path)).verify()
    # Dropped with parts staged and a batch in flight: no file, no temporary.
    w = _core.Writer(str(tmp_path / "x.qtensors"), plans, {}, 64, "zstd")
    for i in order[:30]:
        w.write_parts(i, [tensors[names[i]].reshape(-1).view(np.uint8)])
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["b.qtensors"]


def test_parts_longer_than_a_piece_compress_in_pieces(tmp_path):
    # Parts over 32 chunks (128 KiB with 4 KiB chunks) are compressed and written a piece at a
    # time (staged parts go with the first piece) and judged whole: one record over all their
    # chunks, or, when compression does not pay, their bytes as they are in place of the chunks
    # written.
    rng = np.random.default_rng(11)
    tensors = {
        "a": sample(rng, "float16", (1000,)),  # staged
        "big": sample(rng, "float32", (100_001,)),  # 3+ pieces and a ragged chunk
        "b": sample(rng, "float16", (3000,)),
        "noise": rng.integers(0, 256, 300_000).astype(np.uint8),  # does not pay
        "c": sample(rng, "float32", (500,)),
    }
    path = tmp_path / "p.qtensors"
    write(path, tensors)
    header = R.read_header(str(path))["header"]
    by_name = {t["name"]: t["parts"]["data"] for t in header["tensors"]}
    big = by_name["big"]["compression"]
    assert len(big["chunks"]) == -(-100_001 * 4 // SMALL)
    assert by_name["big"]["length"] == sum(big["chunks"]) < 100_001 * 4
    assert "compression" not in by_name["noise"] and by_name["noise"]["length"] == 300_000
    offsets = [by_name[n]["offset"] for n in tensors]
    assert offsets == sorted(offsets)
    got = qt.load_file(str(path))
    assert all(np.array_equal(got[n], x) for n, x in tensors.items())
    ref, _, _ = R.read_file(str(path))  # strict: in order, zero padding, nothing after
    assert all(ref[n].tobytes() == x.tobytes() for n, x in tensors.items())
    qt.safe_open(str(path)).verify()


def test_bfloat16_and_save_file_lossless(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    t = {"w": torch.randn(300, 500, generator=g).to(torch.bfloat16), "i": torch.arange(10)}
    path = tmp_path / "b.qtensors"
    qt.save_file(t, str(path), lossless=True)
    back = qt.load_file(str(path), framework="pt")
    for k in t:
        assert torch.equal(back[k].view(torch.uint8), t[k].view(torch.uint8)), k
    assert os.path.getsize(path) < t["w"].numel() * 2 / 1.3
    with open(path, "rb") as fh:
        assert fh.read(12)[8:12] == b"\x01\x00\x01\x00"  # version 1.1
    ref, _, _ = R.read_file(str(path))
    assert np.array_equal(ref["w"], t["w"].view(torch.int16).numpy().view(np.uint16))


def test_uncompressed_files_stay_version_1_0(tmp_path):
    path = tmp_path / "u.qtensors"
    qt.save_file({"a": np.arange(4, dtype=np.float32)}, str(path))
    with open(path, "rb") as fh:
        assert fh.read(12)[8:12] == b"\x01\x00\x00\x00"
    with pytest.raises(ValueError):
        qt.save_file({"a": np.ones(3)}, str(path), compression="lz4")
    with pytest.raises(ValueError):
        qt.save_file({"a": np.ones(3)}, str(path), lossless=True, quant="nf4")


def test_quantized_parts_compressed_where_it_pays(tmp_path):
    rng = np.random.default_rng(2)
    t = {"w": (rng.standard_normal((256, 384)) * 0.02).astype(np.float32)}
    t["n"] = np.ones(384, np.float32)
    a, b = tmp_path / "a.qtensors", tmp_path / "b.qtensors"
    write(a, t, quant=None)
    qt.save_file(t, str(b))
    x, y = qt.load_file(str(a)), qt.load_file(str(b))
    for k in t:
        assert x[k].tobytes() == y[k].tobytes()
    ref, _, _ = R.read_file(str(a))
    assert ref["w"].tobytes() == y["w"].tobytes()
    with qt.safe_open(str(a)) as f, qt.safe_open(str(b)) as g:
        parts = f.tensor_info("w")["parts"]
        # fp16 scales and mins shrink; each compressed part saves at least 5%.
        assert "compression" in parts["scales"]
        for p in parts.values():
            if "compression" in p:
                decoded = int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
                assert p["length"] <= decoded * 0.95
        qa, qb = f.get_quantized("w"), g.get_quantized("w")
        for n in ("codes", "scales", "mins"):
            assert np.array_equal(getattr(qa, n), getattr(qb, n)), n
        box = (slice(10, 100), slice(33, 300))
        assert np.array_equal(f.get_slice("w")[box], g.get_slice("w")[box])


def chunk_spans(path, name, part):
    """Absolute (start, end) of each stored chunk of a part."""
    h = R.read_header(str(path))
    rec = next(t for t in h["header"]["tensors"] if t["name"] == name)["parts"][part]
    at = h["data_start"] + rec["offset"]
    spans = []
    for n in rec["compression"]["chunks"]:
        spans.append((at, at + n))
        at += n
    return spans


def break_chunks(path, spans):
    blob = bytearray(path.read_bytes())
    for a, _ in spans:
        blob[a : a + 4] = b"\xde\xad\xbe\xef"  # no longer a zstd frame
    path.write_bytes(bytes(blob))


def test_slices_decode_only_the_chunks_they_need(tmp_path):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 256)) * 0.1).astype(np.float32)  # 64 KiB: 16 chunks of 4 KiB
    path = tmp_path / "r.qtensors"
    write(path, {"x": x})
    spans = chunk_spans(path, "x", "data")
    assert len(spans) == 16
    # Rows 20..23 are bytes 20480..24576: chunks 5 only. Break every other chunk.
    break_chunks(path, spans[:5] + spans[6:])
    with qt.safe_open(str(path)) as f:
        assert np.array_equal(f.get_slice("x")[20:24], x[20:24])
        assert np.array_equal(f.get_slice("x")[20:24, 7:9], x[20:24, 7:9])
        with pytest.raises(FormatError, match="tensor 'x' part 'data' chunk 4"):
            f.get_slice("x")[19:24]
        with pytest.raises(FormatError, match="chunk 0"):
            f.get_tensor("x")


def test_broken_chunks_name_the_first_one_every_time(tmp_path):
    """Chunks decode in parallel; the error names the lowest broken chunk whichever thread ends
    first (get_tensor and the stream alike)."""
    x = (np.random.default_rng(5).standard_normal((64, 256)) * 0.1).astype(np.float32)
    path = tmp_path / "b.qtensors"
    write(path, {"x": x})
    spans = chunk_spans(path, "x", "data")
    break_chunks(path, spans[3:])
    for _ in range(20):
        with qt.safe_open(str(path)) as f:
            with pytest.raises(FormatError, match="part 'data' chunk 3:"):
                f.get_tensor("x")
        with pytest.raises(FormatError, match="part 'data' chunk 3:"):
            list(qt.stream(str(path), device="cpu", framework="np"))


def test_quantized_slice_needs_only_its_codes_and_scales(tmp_path):
    rng = np.random.default_rng(4)
    # Few distinct values: the codes compress too.
    x = (np.round(rng.standard_normal((512, 256)) * 3) / 30).astype(np.float32)
    enc = qt.encodings.from_dict(
        {"name": "affine", "bits": 8, "group_size": 64, "axis": 1, "scale_dtype": "float32"}
    )
    path = tmp_path / "q.qtensors"
    write(path, {"x": x}, quant=enc)
    whole = qt.load_file(str(path))["x"]
    codes = chunk_spans(path, "x", "codes")  # 128 KiB of codes: 32 chunks, 2 rows per 4 KiB...
    assert len(codes) == 32  # ...16 rows each
    # Rows 64..79 use codes chunk 4 and the scales/mins of those rows only.
    break_chunks(path, codes[:4] + codes[5:])
    with qt.safe_open(str(path)) as f:
        assert np.array_equal(f.get_slice("x")[64:80, 3:200], whole[64:80, 3:200])
        with pytest.raises(FormatError):
            f.get_slice("x")[60:80]


def craft(frames, decoded, chunk_size=SMALL, filt="none", codec="zstd", dtype="uint8"):
    """A file with one raw tensor whose part is the given stored chunks."""
    data = b"".join(frames)
    k = np.dtype(dtype).itemsize
    rec = {
        "dtype": dtype,
        "shape": [decoded // k],
        "offset": 0,
        "length": len(data),
        "checksum": R.checksum_string(data),
        "compression": {
            "codec": codec,
            "level": 1,
            "filter": filt,
            "chunk_size": chunk_size,
            "chunks": [len(f) for f in frames],
        },
    }
    t = {"name": "x", "dtype": dtype, "shape": [decoded // k], "encoding": {"name": "raw"}}
    t["parts"] = {"data": rec}
    return R.assemble({"alignment": 64, "metadata": {}, "tensors": [t]}, data, minor=1)


def z(b, **kw):
    return zstandard.ZstdCompressor(level=1, **kw).compress(b)


ZEROS = bytes(SMALL)
PATTERN = bytes(range(256)) * (SMALL // 256)


def test_crafted_valid_file_reads(tmp_path):
    path = tmp_path / "ok.qtensors"
    path.write_bytes(craft([z(PATTERN), PATTERN[:100]], SMALL + 100))
    assert qt.load_file(str(path))["x"].tobytes() == PATTERN + PATTERN[:100]


# (id, file bytes, error class, words the message has) - refused at open
OPEN_CASES = [
    ("unknown_codec", lambda: craft([z(ZEROS)], SMALL, codec="lz4"), UnsupportedError, ["lz4"]),
    ("unknown_filter", lambda: craft([z(ZEROS)], SMALL, filt="bits"), UnsupportedError, ["bits"]),
    ("float_filter_on_ints", lambda: craft([z(ZEROS)], SMALL, filt="float"), FormatError, []),
    ("chunk_size_odd", lambda: craft([z(ZEROS)], SMALL, chunk_size=5000), FormatError, []),
    ("too_few_chunks", lambda: craft([z(ZEROS)], 2 * SMALL), FormatError, ["chunk table"]),
    ("chunk_longer_than_data", lambda: craft([ZEROS + b"x"], SMALL), FormatError, ["chunk 0"]),
    ("empty_chunk", lambda: craft([b"", z(ZEROS)], 2 * SMALL), FormatError, ["chunk 0"]),
    # 64 MiB claimed by 8 bytes: more than zstd can expand, refused before reading.
    ("bomb", lambda: craft([b"12345678"], 64 << 20, chunk_size=64 << 20), FormatError, ["32768"]),
]


@pytest.mark.parametrize("case", OPEN_CASES, ids=[c[0] for c in OPEN_CASES])
def test_hostile_records_are_refused_at_open(tmp_path, case):
    _, make, err, words = case
    path = tmp_path / "h.qtensors"
    path.write_bytes(make())
    with pytest.raises(err) as ei:
        qt.safe_open(str(path))
    for w in words:
        assert w in str(ei.value)
    with pytest.raises(R.ReferenceError):
        R.read_file(str(path))


def test_lying_chunk_table_sum(tmp_path):
    blob = craft([z(ZEROS)], SMALL)
    h = R.read_header(blob)
    h["header"]["tensors"][0]["parts"]["data"]["compression"]["chunks"] = [3]
    path = tmp_path / "lie.qtensors"
    path.write_bytes(R.assemble(h["header"], blob[h["data_start"] :], minor=1))
    with pytest.raises(FormatError, match="add up"):
        qt.safe_open(str(path))


# chunks whose bytes lie: found when decoded (get_tensor, get_slice, stream)
DATA_CASES = [
    ("decodes_to_more", [z(ZEROS + b"\0")], SMALL),
    ("decodes_to_less", [z(ZEROS[:-1]) + b""], SMALL),
    ("no_content_size", [z(PATTERN, write_content_size=False)], SMALL),
    ("truncated_frame", [z(PATTERN)[:-3]], SMALL),
    ("two_frames", [z(PATTERN[:2048]) + z(PATTERN[2048:])], SMALL),
    ("garbage", [b"\x28\xb5\x2f\xfd" + b"\xff" * 60], SMALL),
    # A 16 MiB bomb in a 4 KiB chunk: its frame header says 16 MiB, refused before decoding.
    ("bomb_frame", [z(bytes(16 << 20))], SMALL),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_hostile_chunks_are_format_errors(tmp_path, case):
    _, frames, decoded = case
    path = tmp_path / "d.qtensors"
    path.write_bytes(craft(frames, decoded))
    with qt.safe_open(str(path)) as f:
        with pytest.raises(FormatError, match="tensor 'x' part 'data' chunk 0"):
            f.get_tensor("x")
        with pytest.raises(FormatError):
            f.get_slice("x")[10:20]
        with pytest.raises(FormatError):
            f.get_quantized("x")
    with pytest.raises(FormatError):
        list(qt.stream(str(path), device="cpu", framework="np"))
    with pytest.raises(R.ReferenceError):
        R.read_file(str(path))


def test_stream_reads_compressed_parts_piecewise_and_verifies(tmp_path):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(40_000) * 0.1).astype(np.float32)
    q = (rng.standard_normal((128, 192)) * 0.1).astype(np.float32)
    path = tmp_path / "s.qtensors"
    write(path, {"x": x})
    r = _core.StreamReader(str(path), threads=3, chunk_size=4096)
    n, layout = r.tensor_layout(0)
    assert n == x.nbytes and layout == [("data", 0, x.nbytes)]
    buf = np.zeros(n, np.uint8)
    for a in range(0, n, 10_000):  # pieces that cut chunks: boundary chunks are read twice
        r.read(0, a, buf[a : a + 10_000], True)
    assert buf.tobytes() == x.tobytes()
    # A corrupted stored byte: checksum error on the verified read.
    spans = chunk_spans(path, "x", "data")
    blob = bytearray(path.read_bytes())
    blob[spans[3][0] + 20] ^= 1
    path.write_bytes(bytes(blob))
    r = _core.StreamReader(str(path))
    with pytest.raises(qt.errors.ChecksumError):
        r.read(0, 0, np.zeros(n, np.uint8), True)
    # Quantized tensors through the CPU stream and with quantized=True.
    p2 = tmp_path / "s2.qtensors"
    write(p2, {"q": q, "x": x}, quant=None)
    want = qt.load_file(str(p2))
    got = dict(qt.stream(str(p2), device="cpu", framework="np", verify=True))
    for k in want:
        assert got[k].tobytes() == want[k].tobytes()
    with qt.safe_open(str(p2)) as f:
        ref = f.get_quantized("q")
    for _, qq in qt.stream(str(p2), ["q"], device="cpu", framework="np", quantized=True):
        assert np.array_equal(qq.scales, ref.scales) and np.array_equal(qq.codes, ref.codes)


def lossless_pair(tmp_path):
    """A safetensors file and its lossless conversion (small chunks: several per tensor)."""
    from safetensors.numpy import save_file as st_save

    rng = np.random.default_rng(11)
    src = tmp_path / "m.safetensors"
    tensors = {
        "w": (rng.standard_normal((96, 80)) * 0.02).astype(np.float32),
        "h": (rng.standard_normal(5000) * 0.5).astype(np.float16),
        "ids": np.arange(3000, dtype=np.int64),
        "tiny": rng.standard_normal(3).astype(np.float32),  # saves nothing: stored as it is
    }
    st_save(tensors, str(src))
    dst = tmp_path / "m.qtensors"
    write(dst, tensors)
    return src, dst, tensors


def test_inspect_lists_compressed_parts(tmp_path, capsys):
    from qtensors.cli import main
    from qtensors.inspect import format_inspect, inspect_file

    _, dst, tensors = lossless_pair(tmp_path)
    h = R.read_header(str(dst))["header"]
    info = inspect_file(str(dst))
    rows = {r["name"]: r for r in info["tensors"]}
    packed = 0
    for t in h["tensors"]:
        rec = t["parts"]["data"]
        row = rows[t["name"]]["parts"]["data"]
        decoded = tensors[t["name"]].nbytes
        if "compression" not in rec:
            assert "compression" not in row and rows[t["name"]]["compression"] is None
            continue
        packed += 1
        c = row["compression"]
        assert c["codec"] == "zstd" and c["filter"] == rec["compression"]["filter"]
        assert c["chunks"] == len(rec["compression"]["chunks"]) == -(-decoded // SMALL)
        assert c["decoded_bytes"] == decoded and c["ratio"] == decoded / rec["length"]
        summary = rows[t["name"]]["compression"]
        assert summary["parts"] == 1 and summary["stored_bytes"] == rec["length"]
    assert packed == 3  # all but "tiny"
    total = info["totals"]["compression"]
    assert total["parts"] == packed and total["codecs"] == ["zstd"]
    want = sum(tensors[n].nbytes for n in ("w", "h", "ids"))
    assert total["decoded_bytes"] == want and total["ratio"] > 1.1
    text = format_inspect(info)
    assert f"compression: zstd on 3 parts: {want / 1000:.1f} kB stored in" in text
    assert "compressed" in text.splitlines()[2]  # the column, only in files that have it
    # `inspect --json` carries the same data.
    assert main(["inspect", str(dst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["compression"] == total
    # A file without compressed parts: no column, no line.
    plain = tmp_path / "plain.qtensors"
    qt.save_file(tensors, str(plain), quant="raw")
    info = inspect_file(str(plain))
    assert info["totals"]["compression"]["parts"] == 0
    assert "compression" not in format_inspect(info)


def test_inspect_of_a_folder_totals_the_compression(tmp_path):
    from qtensors.inspect import format_inspect, inspect_path

    folder = tmp_path / "model"
    folder.mkdir()
    _, first, tensors = lossless_pair(folder)
    second = folder / "b.qtensors"
    write(second, tensors)
    plain = folder / "plain.qtensors"  # no compressed part: counts in no compression total
    qt.save_file(tensors, str(plain), quant="raw")
    info = inspect_path(str(folder))
    total = info["totals"]["compression"]
    one = next(f["totals"]["compression"] for f in info["files"] if f["file"] == str(first))
    assert total["parts"] == 2 * one["parts"] == 6
    assert total["stored_bytes"] == 2 * one["stored_bytes"]
    assert total["decoded_bytes"] == 2 * one["decoded_bytes"]
    text = format_inspect(info)
    last = text.split("\n\n")[-1].splitlines()
    assert last[0].startswith("total: 3 files")
    assert last[1] == (
        f"compression: zstd on 6 parts: {2 * one['decoded_bytes'] / 1000:.1f} kB stored in "
        f"{2 * one['stored_bytes'] / 1000:.1f} kB ({total['ratio']:.2f}x)"
    )
    # A folder without compressed parts: no such line.
    first.unlink()
    second.unlink()
    assert "compression" not in format_inspect(inspect_path(str(folder)))


def test_verify_and_diff_read_compressed_files(tmp_path):
    from qtensors.diff import diff
    from qtensors.inspect import verify_file

    src, dst, _ = lossless_pair(tmp_path)
    assert verify_file(str(dst)).ok
    rep = diff(str(src), str(dst), progress=False)
    assert not rep.problems and len(rep.raw) == 4 and all(r.exact for r in rep.raw)
    # A flipped stored byte: verify names the part, diff reports the tensor.
    spans = chunk_spans(dst, "w", "data")
    blob = bytearray(dst.read_bytes())
    blob[spans[1][0] + 30] ^= 4
    bad = tmp_path / "bad.qtensors"
    bad.write_bytes(bytes(blob))
    r = verify_file(str(bad))
    assert not r.ok and "tensor 'w' part 'data'" in r.errors[0]
    rep = diff(str(src), str(bad), progress=False)
    assert [p.name for p in rep.problems] == ["w"]
    # A chunk whose checksum matches but whose frame lies: verify decodes it and says so.
    lying = tmp_path / "lying.qtensors"
    lying.write_bytes(craft([z(ZEROS[:-1])], SMALL))
    r = verify_file(str(lying))
    assert not r.ok and "tensor 'x' part 'data' chunk 0" in r.errors[0]
