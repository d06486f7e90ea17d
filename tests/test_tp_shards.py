"""Tensor-parallel shards read from the file (`qtensors.shards`): a rank's shard, read still
quantized through the StreamReader and decoded, equals the same block of the whole decoded
tensor; splits that cut a group or a byte are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import qtensors as qt
from qtensors.shards import ShardEntry, ShardError, bounds
from qtensors.stream import decode_host, open_entries

ENCODINGS = {
    "int4-g64-last": qt.Affine(bits=4, group_size=64, axis=-1),
    "flexgen": qt.FLEXGEN,  # groups along the rows
    "sym8-g32": qt.Symmetric(bits=8, group_size=32, axis=1),
    "int3-g64": qt.Affine(bits=3, group_size=64, axis=1),
    "nf4-g64": qt.NF4(group_size=64, axis=-1),
    "raw": qt.Raw(),
}
# rows x columns: odd rows, columns in whole groups per rank for world sizes 1, 2 and 3
SHAPES = {"odd-rows": (7, 384), "even": (130, 192)}


def read_shard(e, dim, rank, world):
    s = ShardEntry.of(e, dim, rank, world)
    buf = np.zeros(max(s.nbytes, 1), dtype=np.uint8)[: s.nbytes]
    for pos, n in s.pieces(chunk=256):  # small chunks: strided pieces of several rows
        s.read_into(pos, buf[pos : pos + n])
    return s, buf


@pytest.fixture(scope="module", params=[None, "zstd"])
def stored(request, tmp_path_factory):
    rng = np.random.default_rng(1)
    tensors, quant = {}, {}
    for sname, shape in SHAPES.items():
        for ename, enc in ENCODINGS.items():
            tensors[f"{sname}/{ename}"] = rng.standard_normal(shape).astype(np.float32)
            quant[f"{sname}/{ename}"] = enc
        tensors[f"{sname}/bias"] = rng.standard_normal(shape[0]).astype(np.float16)
        quant[f"{sname}/bias"] = qt.Raw()
    path = tmp_path_factory.mktemp("tp") / "t.qtensors"
    qt.save_file(tensors, path, quant=quant, compression=request.param)
    return path, qt.load_file(path)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_equal_blocks_of_the_whole_tensor(stored, world):
    path, whole = stored
    entries = open_entries(path)
    for name, e in entries.items():
        dims = [0] if name.endswith("bias") else [0, 1]
        for dim in dims:
            size = e.info["shape"][dim]
            enc = e.info["encoding"]
            for rank in range(world):
                a, b = bounds(size, rank, world)
                grouped = enc["name"] != "raw" and enc["axis"] == dim
                if grouped and (a % enc["group_size"] or (b % enc["group_size"] and b != size)):
                    continue  # refused: test_group_cut_is_refused
                s, buf = read_shard(e, dim, rank, world)
                assert s.info["shape"][dim] == b - a and s.region == (dim, a, b)
                got = decode_host(buf, s, "np")
                want = np.take(whole[name], np.arange(a, b), axis=dim)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} dim {dim} {rank}/{world}")


def test_bounds_are_array_split():
    for size in (0, 1, 5, 7, 64, 130):
        for world in (1, 2, 3, 4):
            got = [bounds(size, r, world) for r in range(world)]
            sizes = [len(c) for c in np.array_split(np.arange(size), world)]
            assert [b - a for a, b in got] == sizes
            assert got[0][0] == 0 and got[-1][1] == size
            assert all(got[r][1] == got[r + 1][0] for r in range(world - 1))
    with pytest.raises(ValueError):
        bounds(4, 2, 2)


def test_bytes_read_are_the_shard(stored):
    path, _ = stored
    e = open_entries(path)["odd-rows/int4-g64-last"]
    for dim in (0, 1):
        for r in range(2):  # each rank's share of the stored bytes, whichever dimension
            s = ShardEntry.of(e, dim, r, 2)
            a, b = s.region[1:]
            share = e.nbytes * (b - a) / e.info["shape"][dim]
            # parts start 64-byte aligned in either buffer
            assert abs(s.nbytes - share) < 0.02 * e.nbytes + 3 * 64, (dim, r, s.nbytes)


def test_group_cut_is_refused(tmp_path):
    path = tmp_path / "g.qtensors"
    x = np.ones((4, 192), np.float32)
    qt.save_file({"w": x}, path, quant=qt.Affine(bits=4, group_size=64, axis=1))
    e = open_entries(path)["w"]
    ShardEntry.of(e, 1, 0, 3)  # 64 columns each: whole groups
    with pytest.raises(ShardError, match=r"'w'.*world size 2.*group of 64"):
        ShardEntry.of(e, 1, 1, 2)  # [96, 192) starts inside group 1
    with pytest.raises(ShardError, match="has no dimension 2"):
        ShardEntry.of(e, 2, 0, 2)


def test_split_inside_a_byte_is_refused(tmp_path):
    path = tmp_path / "b.qtensors"
    # 7 four-bit codes a row: rank 1 of 2 starts at row 3, bit 84 of the codes
    enc = qt.Affine(bits=4, group_size=64, axis=1)
    qt.save_file({"w": np.ones((5, 7), np.float32)}, path, quant=enc)
    e = open_entries(path)["w"]
    for rank in range(2):  # rows [0, 3) end at bit 84, rows [3, 5) start there
        with pytest.raises(ShardError, match=r"'w' part 'codes'.*inside a byte"):
            ShardEntry.of(e, 0, rank, 2)
