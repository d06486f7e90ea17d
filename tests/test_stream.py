"""`qtensors.stream` on the CPU: order, completeness, the bounded read-ahead window, early stop,
files truncated / modified / corrupted mid-stream, model folders, and the Rust StreamReader."""

from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import qtensors as qt
from qtensors import _core

MODES = ("pread", "direct", "mmap", "auto")


def _tensors(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {}
    for i in range(n):
        t[f"layer{i}.weight"] = rng.standard_normal((64 + 8 * i, 96)).astype(np.float32)
        t[f"layer{i}.bias"] = rng.standard_normal(64 + 8 * i).astype(np.float16)
    t["step"] = np.array(7, dtype=np.int64)
    return t


@pytest.fixture
def model_file(tmp_path):
    t = _tensors()
    path = tmp_path / "m.qtensors"
    quant = {"layer1.*": qt.Affine(bits=3, group_size=32, axis=-1), "layer2.weight": qt.NF4()}
    qt.save_file(t, path, quant=quant)
    return str(path), qt.load_file(path, framework="pt")


def _entry_ranges(path: str) -> list[tuple[str, int, int]]:
    r = _core.StreamReader(path)
    names = [t["name"] for t in json.loads(r.header_json())["tensors"]]
    return [(n, *r.tensor_range(i)) for i, n in enumerate(names)]


@pytest.mark.parametrize("mode", MODES)
def test_file_order_and_values(model_file, mode):
    path, full = model_file
    got = list(qt.stream(path, device="cpu", mode=mode, verify=True, chunk_size=4096))
    assert [n for n, _ in got] == list(full)
    for n, v in got:
        assert v.dtype == full[n].dtype and v.shape == full[n].shape
        assert torch.equal(v, full[n]), n


def test_auto_mode_reads_pages_the_cache_dropped(model_file):
    # Every other 64 KiB of the file evicted: "auto" copies what is cached and reads the rest
    # with O_DIRECT (pread where the file system refuses it), the same bytes either way.
    path, full = model_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for at in range(0, os.path.getsize(path), 128 << 10):
            os.posix_fadvise(fd, at, 64 << 10, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    got = dict(qt.stream(path, device="cpu", mode="auto", verify=True, chunk_size=8192))
    assert got.keys() == full.keys() and all(torch.equal(got[n], full[n]) for n in full)
    s = qt.stream(path, device="cpu")
    assert s.stats()["mode"] in ("auto", "pread")  # the CPU default (pread: no O_DIRECT here)
    s.close()


def test_asked_order_numpy_and_packed(model_file):
    path, full = model_file
    names = ["step", "layer3.weight", "layer0.bias", "layer1.weight"]
    got = list(qt.stream(path, names, device="cpu", framework="np"))
    assert [n for n, _ in got] == names
    for n, v in got:
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, full[n].numpy())
    with qt.safe_open(path, "pt") as f:
        for n, q in qt.stream(path, names, device="cpu", quantized=True):
            assert isinstance(q, qt.QuantizedTensor)
            want = f.get_quantized(n)
            assert q.encoding == want.encoding
            for a, b in zip(q.parts(), want.parts(), strict=True):
                assert torch.equal(a, b)
            assert torch.equal(q.dequantize(), full[n])
    with pytest.raises(KeyError, match="nope"):
        qt.stream(path, ["layer0.bias", "nope"], device="cpu")


def test_reader_matches_file_bytes(model_file):
    path, _ = model_file
    data = open(path, "rb").read()
    for mode in MODES:
        r = _core.StreamReader(path, mode=mode, threads=3, chunk_size=4096)
        assert r.file_len == len(data)
        for i, (_, a, b) in enumerate(_entry_ranges(path)):
            buf = np.empty(b - a, dtype=np.uint8)
            r.read(i, 0, buf, verify=True)
            assert buf.tobytes() == data[a:b]
            if b - a > 100:  # a piece from the middle
                piece = np.empty(50, dtype=np.uint8)
                r.read(i, 30, piece)
                assert piece.tobytes() == data[a + 30 : a + 80]
        _, a0, b0 = _entry_ranges(path)[0]
        with pytest.raises(ValueError, match="outside tensor"):
            r.read(0, 1, np.empty(b0 - a0, dtype=np.uint8))


def test_prefetch_window_is_bounded(tmp_path):
    # 20 tensors of ~40 KB; a 100 KB window holds two of them at most.
    t = {f"w{i}": np.full((100, 100), i, dtype=np.float32) for i in range(20)}
    path = tmp_path / "w.qtensors"
    qt.save_file(t, path, quant={"*": None})
    size = max(b - a for _, a, b in _entry_ranges(str(path)))
    window = 100_000
    s = qt.stream(path, device="cpu", prefetch=window)
    seen = []
    for name, v in s:
        time.sleep(0.01)  # a slow consumer: the reader runs ahead as far as it may
        assert s.stats()["peak_window_bytes"] <= window
        seen.append(name)
        assert float(v[0, 0]) == int(name[1:])
    assert seen == list(t)
    st = s.stats()
    assert st["tensors"] == 20 and st["peak_window_bytes"] >= 2 * size  # it did read ahead
    # A window smaller than one tensor still streams, one tensor at a time.
    s = qt.stream(path, device="cpu", prefetch=1)
    assert [n for n, _ in s] == list(t)
    assert s.stats()["peak_window_bytes"] == size


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qtensors-stream"]


def test_early_stop_releases_the_thread(model_file):
    path, _full = model_file
    before = len(_stream_threads())
    s = qt.stream(path, device="cpu", prefetch=1 << 30)
    for i, (_name, _) in enumerate(s):
        if i == 2:
            break
    thread = s._pipe.thread
    s.close()
    assert not thread.is_alive()
    s.close()  # idempotent
    assert list(s) == []
    # Dropping the iterator mid-way stops its thread too; so does leaving a with block.
    it = iter(qt.stream(path, device="cpu"))
    next(it)
    thread = it._pipe.thread
    del it
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
    with qt.stream(path, device="cpu") as s:
        next(s)
        thread = s._pipe.thread
    assert not thread.is_alive()
    assert len(_stream_threads()) == before


@pytest.mark.parametrize("mode", MODES)
def test_truncated_mid_stream(model_file, mode):
    path, full = model_file
    ranges = _entry_ranges(path)
    names = list(full)
    s = qt.stream(path, device="cpu", mode=mode, prefetch=1)
    # Opened (header validated), then the file loses the second half of tensor #5.
    name5, a, b = ranges[5]
    os.truncate(path, (a + b) // 2)
    got = []
    with pytest.raises(qt.FormatError) as ei:
        for n, v in s:
            got.append(n)
            assert torch.equal(v, full[n])
    assert got == names[:5]
    msg = str(ei.value)
    assert f"truncated while streaming tensor '{name5}'" in msg
    assert "bytes at offset" in msg
    assert not s._pipe.thread.is_alive()


def test_modified_mid_stream(model_file):
    path, _full = model_file
    s = qt.stream(path, device="cpu", prefetch=1)
    first = next(s)
    assert first[0] == "layer0.weight"
    # Rewritten in place (same size): the next read notices the new modification time.
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - 1)
        fh.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(qt.FormatError, match="modified while streaming tensor"):
        list(s)


def test_checksum_mismatch_names_the_tensor(model_file):
    path, full = model_file
    name, a, _b = _entry_ranges(path)[4]
    data = bytearray(open(path, "rb").read())
    data[a + 3] ^= 0x55
    open(path, "wb").write(bytes(data))
    got = []
    with pytest.raises(qt.ChecksumError, match=f"tensor '{name}' part 'codes'"):
        for n, _ in qt.stream(path, device="cpu", verify=True):
            got.append(n)
    assert got == list(full)[:4]
    # Without verify the (corrupted) bytes stream on.
    assert len(list(qt.stream(path, device="cpu"))) == len(full)


def test_model_folder(tmp_path):
    t = _tensors(4)
    names = list(t)
    folder = tmp_path / "model"
    folder.mkdir()
    shards = {
        "model-00001-of-00002.qtensors": names[:5],
        "model-00002-of-00002.qtensors": names[5:],
    }
    weight_map = {}
    for shard, ns in shards.items():
        qt.save_file({n: t[n] for n in ns}, folder / shard)
        weight_map.update(dict.fromkeys(ns, shard))
    (folder / "model.qtensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    full = {
        n: v for shard in shards for n, v in qt.load_file(folder / shard, framework="pt").items()
    }
    got = list(qt.stream(folder, device="cpu", verify=True))
    assert [n for n, _ in got] == names
    assert all(torch.equal(v, full[n]) for n, v in got)
    got = list(qt.stream(folder, [names[-1], names[0]], device="cpu"))
    assert [n for n, _ in got] == [names[-1], names[0]]
    # Without an index: every .qtensors file of the folder, sorted.
    (folder / "model.qtensors.index.json").unlink()
    assert [n for n, _ in qt.stream(folder, device="cpu")] == names


def test_empty_and_scalar_tensors(tmp_path):
    t = {
        "empty": np.zeros((0, 64), dtype=np.float32),
        "scalar": np.array(1.5, dtype=np.float32),
        "w": np.ones((64, 64), dtype=np.float32),
    }
    path = tmp_path / "e.qtensors"
    qt.save_file(t, path, quant={"empty": qt.FLEXGEN})
    full = qt.load_file(path, framework="pt")
    got = dict(qt.stream(path, device="cpu", verify=True))
    assert list(got) == list(t)
    for n, v in got.items():
        assert v.shape == full[n].shape and torch.equal(v, full[n])


GAP = 3 << 29  # 1.5 GiB


def _spread_parts(src: str, dst: str, gap: int) -> None:
    """Rewrite `src` (one quantized tensor) with its scales and mins `gap` bytes past its codes,
    as another writer may place them. The file is sparse: the gap takes no disk space."""
    with open(src, "rb") as fh:
        blob = fh.read()
    (header_len,) = struct.unpack("<Q", blob[16:24])
    header = json.loads(blob[24 : 24 + header_len])
    data = blob[24 + header_len :]
    (t,) = header["tensors"]
    chunks = []
    pos = 0
    for k, name in enumerate(("codes", "scales", "mins")):
        p = t["parts"][name]
        chunks.append((pos, data[p["offset"] : p["offset"] + p["length"]]))
        p["offset"] = pos
        pos += gap if k == 0 else 64
    text = json.dumps(header).encode()
    text += b" " * (-(24 + len(text)) % header["alignment"])
    with open(dst, "wb") as fh:
        fh.write(blob[:16] + struct.pack("<Q", len(text)) + text)
        base = fh.tell()
        for off, b in chunks:
            fh.seek(base + off)
            fh.write(b)


RSS_SCRIPT = """
import resource, sys
import qtensors as qt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = dict(qt.stream(sys.argv[1], device="cpu", framework="np", verify=True))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_parts_far_apart_are_read_alone(tmp_path):
    src, dst = tmp_path / "a.qtensors", tmp_path / "spread.qtensors"
    w = np.linspace(-1, 1, 64, dtype=np.float32)
    qt.save_file({"w": w}, src, quant={"w": qt.FLEXGEN})
    _spread_parts(str(src), str(dst), GAP)
    assert os.path.getsize(dst) > GAP
    # Layout: the parts, each at its own place in a buffer of a few KiB, not the 1.5 GiB span.
    r = _core.StreamReader(str(dst))
    start, end = r.tensor_range(0)
    nbytes, layout = r.tensor_layout(0)
    assert end - start > GAP and nbytes < 2 * 4096
    assert [(n, ln) for n, _, ln in layout] == [("codes", 32), ("scales", 2), ("mins", 2)]
    # Same values (and checksums) as the original; peak RSS of a fresh process stays small.
    want = qt.load_file(src)["w"]
    got = dict(qt.stream(dst, device="cpu", framework="np", verify=True))
    assert np.array_equal(got["w"], want)
    assert np.array_equal(qt.load_file(dst)["w"], want)
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "python"))
    p = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(dst)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    grew_mib = int(p.stdout.strip())
    assert grew_mib < 64, f"streaming one 64-element tensor grew the peak RSS by {grew_mib} MiB"
