"""Self-checks of the numpy reference (tests/reference.py) and of the spec's test vectors.

These run without qtensors: they make sure the yardstick the other tests use is itself right, by
comparing it with hand-computed values, with torch's own float conversions, with a second
(big-integer) bit packer, and with the error bounds the spec states.
"""

from __future__ import annotations

import json
import os

import helpers as H
import make_vectors
import malformed_cases as M
import numpy as np
import pytest
import reference as R
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

# ------------------------------------------------------------------------------------------------
# scalar formats
# ------------------------------------------------------------------------------------------------


def test_bf16_known_values():
    x = np.array(
        [1.0, 1.00390625, 1.01171875, -2.0, 0.0, -0.0, 3.4e38, -3.4e38, np.inf, 1e-45],
        dtype=np.float32,
    )
    # ties to even: 1 + 2^-8 -> 1.0 (even), 1 + 3*2^-8 -> 1 + 2^-6 (even); 3.4e38 overflows to inf
    want = [0x3F80, 0x3F80, 0x3F82, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x7F80, 0x0000]
    assert R.fp32_to_bf16_bits(x).tolist() == want
    assert np.isnan(R.bf16_bits_to_fp32(R.fp32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_bf16_every_pattern_round_trips():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    wide = R.bf16_bits_to_fp32(bits)
    finite = ~np.isnan(wide)
    assert np.array_equal(R.fp32_to_bf16_bits(wide)[finite], bits[finite])
    assert np.array_equal(wide.view(np.uint32) >> 16, bits.astype(np.uint32))


@given(st.integers(0, 2**32 - 1), st.sampled_from(["random", "ties"]))
def test_bf16_matches_torch(seed, mode):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    if mode == "ties":  # lower half exactly 0x8000: the rounding direction depends on the kept lsb
        u = (u & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    x = u.view(np.float32)
    x = x[~np.isnan(x)]
    want = H.torch_bits(torch.from_numpy(x.copy()).to(torch.bfloat16))
    assert np.array_equal(R.fp32_to_bf16_bits(x), want)


@given(st.integers(0, 2**32 - 1))
def test_st_matches_torch_conversions(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(2048) * 10.0 ** rng.integers(-9, 6, 2048)).astype(np.float32)
    t = torch.from_numpy(x.copy())
    assert np.array_equal(R.st(x, "float16"), t.half().float().numpy())
    assert np.array_equal(R.st(x, "bfloat16"), t.bfloat16().float().numpy())
    assert np.array_equal(R.st(x, "float32"), x)


def test_st_rounds_to_nearest_even_fp16():
    # 1 + 2^-11 is halfway between 1 and 1 + 2^-10 in fp16: ties to even -> 1.0
    assert R.st(np.float32(1 + 2**-11), "float16") == np.float32(1.0)
    assert R.st(np.float32(1 + 3 * 2**-11), "float16") == np.float32(1 + 2**-9)
    assert np.isinf(R.st(np.float32(65520.0), "float16"))  # rounds past the max 65504
    assert R.st(np.float32(65519.0), "float16") == np.float32(65504.0)


def test_float64_inputs_are_rounded_to_fp32_first():
    x = np.array([1 + 2**-30, 1 + 2**-23 + 2**-30], np.float64)
    assert R.to_fp32(x, "float64").tolist() == [1.0, np.float32(1 + 2**-23)]


# ------------------------------------------------------------------------------------------------
# groups
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis,g,layout,sshape",
    [
        ((10, 6), 0, 4, (1, 10, 6, 3), (3, 6)),
        ((10, 6), -1, 4, (10, 6, 1, 2), (10, 2)),
        ((3, 7, 4), 1, 3, (3, 7, 4, 3), (3, 3, 4)),
        ((2, 3, 5), 2, 64, (6, 5, 1, 1), (2, 3, 1)),
        ((), 0, 64, (1, 1, 1, 1), (1,)),
        ((0, 5), 1, 2, (0, 5, 1, 3), (0, 3)),
        ((4, 0), 0, 4, (1, 4, 0, 1), (1, 0)),
        ((5, 0), 1, 4, (5, 0, 1, 0), (5, 0)),
        ((8,), 0, 1, (1, 8, 1, 8), (8,)),
    ],
)
def test_group_layout(shape, axis, g, layout, sshape):
    assert R.group_layout(shape, axis, g) == layout
    assert R.scale_shape(shape, axis, g) == sshape


def test_group_index_follows_spec_formula():
    # s(e) = (p*G + floor(l/g))*Q + q, checked element by element against the vectorized layout
    shape, axis, g = (3, 7, 4), 1, 3
    _, L, Q, G = R.group_layout(shape, axis, g)
    x = np.arange(R.prod(shape), dtype=np.float32).reshape(shape)
    q = R.quantize(
        x, {"name": "symmetric", "bits": 8, "group_size": g, "axis": axis, "scale_dtype": "float32"}
    )
    scales = q["scales"].reshape(-1)
    for e in range(x.size):
        p, li, qq = e // (L * Q), (e // Q) % L, e % Q
        s_e = (p * G + li // g) * Q + qq
        members = [
            f
            for f in range(x.size)
            if f // (L * Q) == p and ((f // Q) % L) // g == li // g and f % Q == qq
        ]
        absmax = np.float32(max(members))
        assert scales[s_e] == np.float32(absmax / np.float32(127))


# ------------------------------------------------------------------------------------------------
# bit packing
# ------------------------------------------------------------------------------------------------


def bigint_pack(codes, bits):
    """Second, independent packer: the stream as one integer, code e shifted by e*bits."""
    total = 0
    for e, c in enumerate(codes):
        total |= int(c) << (e * bits)
    return total.to_bytes((len(codes) * bits + 7) // 8, "little")


def test_pack_hand_examples():
    assert R.pack_codes([1, 2, 3, 4, 5, 6, 7, 0], 3).tobytes() == bytes([0xD1, 0x58, 0x1F])
    assert R.pack_codes([0, 15, 1, 14], 4).tobytes() == bytes([0xF0, 0xE1])
    assert R.pack_codes([0, 1, 2, 3, 3, 2, 1, 0], 2).tobytes() == bytes([0xE4, 0x1B])
    assert R.pack_codes([1, 0, 1, 1, 0, 0, 0, 0, 1], 1).tobytes() == bytes([0x0D, 0x01])
    assert R.pack_codes([7, 200, 255], 8).tobytes() == bytes([7, 200, 255])
    # code 2 of a 3-bit stream: low two bits at bits 6-7 of byte 0, high bit at bit 0 of byte 1
    assert R.pack_codes([0, 0, 0b101], 3).tobytes() == bytes([0b01000000, 0b00000001])
    assert R.pack_codes([], 5).tobytes() == b""


@pytest.mark.parametrize("bits", range(1, 9))
@given(data=st.data())
def test_pack_unpack_round_trip(bits, data):
    n = data.draw(st.integers(0, 70))
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    packed = R.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
    assert packed.tobytes() == bigint_pack(codes, bits)
    assert R.unpack_codes(packed, bits, n).tolist() == codes
    # unused high bits of the last byte are zero
    if n * bits % 8:
        assert packed[-1] >> (n * bits % 8) == 0


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        R.pack_codes([8], 3)
    with pytest.raises(ValueError):
        R.pack_codes([1], 9)
    with pytest.raises(ValueError):
        R.unpack_codes(b"\0\0", 4, 5)


# ------------------------------------------------------------------------------------------------
# codecs
# ------------------------------------------------------------------------------------------------


@given(H.cases(in_dtypes=("float32", "float64", "float16")))
def test_reference_error_bound(case):
    x = case["values"]
    enc = H.ref_dict(
        case["kind"], case["bits"], case["group_size"], case["axis"], case["scale_dtype"], x.ndim
    )
    try:
        q = R.quantize(x, enc)
    except R.ReferenceError:
        return  # values beyond the scale dtype (checked in test_rejects_*)
    y = R.dequantize_fp32(q, enc, x.shape)
    x32 = R.to_fp32(x, case["dtype"])
    bound = H.spec_error_bound(
        case["kind"],
        case["bits"],
        x32,
        q,
        x.shape,
        enc["axis"],
        case["group_size"],
        case["scale_dtype"],
    )
    err = np.abs(x32.astype(np.float64) - y.astype(np.float64)).reshape(bound.shape)
    assert np.all(err <= bound), float((err - bound).max())


@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 300.0]))
def test_reference_nf4_is_nearest_level(seed, mag):
    x = (np.random.default_rng(seed).standard_normal((4, 64)) * mag).astype(np.float32)
    enc = {"name": "nf4", "group_size": 64, "axis": 1, "scale_dtype": "float32"}
    q = R.quantize(x, enc)
    codes = R.unpack_codes(q["codes"], 4, x.size).reshape(x.shape)
    s = q["scales"].astype(np.float32)
    t = (x * (np.float32(1) / s)).astype(np.float32)
    d = np.abs(t[..., None].astype(np.float64) - R.NF4_LEVELS.astype(np.float64))
    nearest = d.argmin(axis=-1)
    srt = np.sort(d, axis=-1)
    clear = srt[..., 1] - srt[..., 0] > 1e-6
    assert np.array_equal(codes[clear], nearest[clear])


def test_nf4_midpoints_take_the_lower_level():
    mids = R.NF4_MIDS
    assert mids.dtype == np.float32
    assert np.array_equal(
        mids, ((R.NF4_LEVELS[:-1] + R.NF4_LEVELS[1:]) / np.float32(2)).astype(np.float32)
    )
    x = np.concatenate([mids, [1.0]]).astype(np.float32)
    q = R.quantize(x, {"name": "nf4", "group_size": 16, "axis": 0, "scale_dtype": "float16"})
    assert R.unpack_codes(q["codes"], 4, 16).tolist() == [*range(15), 15]
    up = np.concatenate([np.nextafter(mids, np.float32(2)), [1.0]]).astype(np.float32)
    q = R.quantize(up, {"name": "nf4", "group_size": 16, "axis": 0, "scale_dtype": "float16"})
    assert R.unpack_codes(q["codes"], 4, 16).tolist() == [*range(1, 16), 15]


def test_affine_ties_round_half_even():
    x = np.array([0.0, 3.0, 0.5, 1.5, 2.5, 1.0], np.float32)  # lo 0, hi 3, 2 bits: s = 1, m = 0
    q = R.quantize(
        x, {"name": "affine", "bits": 2, "group_size": 8, "axis": 0, "scale_dtype": "float16"}
    )
    assert R.unpack_codes(q["codes"], 2, 6).tolist() == [0, 3, 0, 2, 2, 1]


def test_symmetric_codes_and_zero_point():
    x = np.array([-127.0, 0.0, 127.0, 1.0, -0.5, 0.5, 1.5], np.float32)
    q = R.quantize(
        x, {"name": "symmetric", "bits": 8, "group_size": 64, "axis": 0, "scale_dtype": "float32"}
    )
    assert R.unpack_codes(q["codes"], 8, 7).tolist() == [1, 128, 255, 129, 128, 128, 130]
    z = R.quantize(
        np.zeros(5, np.float32),
        {"name": "symmetric", "bits": 4, "group_size": 2, "axis": 0, "scale_dtype": "float16"},
    )
    assert R.unpack_codes(z["codes"], 4, 5).tolist() == [8] * 5
    assert np.all(z["scales"] == 0)


def test_flat_group_decodes_to_min_exactly():
    x = np.full((5, 3), 0.1, np.float32)
    enc = {"name": "affine", "bits": 4, "group_size": 2, "axis": 0, "scale_dtype": "float16"}
    q = R.quantize(x, enc)
    assert np.all(q["scales"] == 0)
    assert np.all(R.unpack_codes(q["codes"], 4, x.size) == 0)
    assert np.all(R.dequantize(q, enc, x.shape, "float32") == np.float32(np.float16(0.1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite(bad):
    x = np.ones((4, 4), np.float32)
    x[1, 2] = bad
    for enc in (
        {"name": "affine", "bits": 4, "group_size": 2, "axis": 0, "scale_dtype": "float32"},
        {"name": "nf4", "group_size": 2, "axis": 1, "scale_dtype": "float32"},
    ):
        with pytest.raises(ValueError, match="tensor"):
            R.quantize(x, enc, name="tensor")


def test_rejects_scale_beyond_scale_dtype():
    x = np.array([[-70000.0, 1.0]], np.float32)  # the min is not finite in fp16
    with pytest.raises(ValueError):
        R.quantize(
            x, {"name": "affine", "bits": 4, "group_size": 2, "axis": 1, "scale_dtype": "float16"}
        )
    y = np.array([[0.0, 1e6]], np.float32)  # (hi - lo) / 15 is not finite in fp16
    with pytest.raises(ValueError):
        R.quantize(
            y, {"name": "affine", "bits": 4, "group_size": 2, "axis": 1, "scale_dtype": "float16"}
        )
    R.quantize(
        y, {"name": "affine", "bits": 4, "group_size": 2, "axis": 1, "scale_dtype": "bfloat16"}
    )


# ------------------------------------------------------------------------------------------------
# writer / reader
# ------------------------------------------------------------------------------------------------


def test_xxh3_known_value():
    assert R.xxh3_64_hex(b"") == "2d06800538d394c2"
    assert R.xxh3_64_hex(b"abc") == xxhash.xxh3_64(b"abc").hexdigest()
    assert len(R.checksum_string(b"x" * 1000)) == len("xxh3-64:") + 16


def test_writer_layout(tmp_path):
    x = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    entries = [
        R.make_entry(
            "w",
            x,
            {"name": "affine", "bits": 3, "group_size": 4, "axis": 0, "scale_dtype": "bfloat16"},
        ),
        R.make_entry("b", np.arange(3, dtype=np.int64), {"name": "raw"}),
    ]
    path = tmp_path / "f.qtensors"
    R.write_file(path, entries, metadata={"k": "v"}, alignment=128)
    blob = path.read_bytes()
    assert (
        blob[:8] == b"QTENSORS" and blob[8:12] == b"\x01\x00\x00\x00" and blob[12:16] == b"\0" * 4
    )
    hdr = R.read_header(path)
    assert hdr["data_start"] % 128 == 0
    h = hdr["header"]
    assert h["alignment"] == 128 and h["metadata"] == {"k": "v"}
    w = h["tensors"][0]
    assert w["parts"]["codes"] == {
        "dtype": "uint8",
        "shape": [17],
        "offset": 0,
        "length": 17,
        "checksum": R.checksum_string(blob[hdr["data_start"] : hdr["data_start"] + 17]),
    }
    assert w["parts"]["scales"]["shape"] == [3, 5] and w["parts"]["scales"]["offset"] == 128
    tensors, md, _ = R.read_file(path)
    assert md == {"k": "v"}
    assert tensors["b"].tolist() == [0, 1, 2]
    assert len(blob) == hdr["data_start"] + h["tensors"][1]["parts"]["data"]["offset"] + 24


def test_reader_checksum_mismatch():
    blob = bytearray(M.base_blob())
    h = R.read_header(bytes(blob))
    rec = next(t for t in h["header"]["tensors"] if t["name"] == "blk.s")["parts"]["scales"]
    blob[h["data_start"] + rec["offset"]] ^= 1
    R.read_file(bytes(blob), verify=False)
    with pytest.raises(ValueError, match=r"blk\.s.*scales"):
        R.read_file(bytes(blob), verify=True)


@pytest.mark.parametrize("case", M.cases(), ids=lambda c: c.id)
def test_reference_rejects_malformed(case):
    """Each crafted file really breaks a rule: the reference reader rejects it with a clear
    message."""
    with pytest.raises(R.ReferenceError) as ei:
        R.read_header(case.blob)
    msg = str(ei.value).lower()
    for word in case.mentions:
        assert word.lower() in msg


@pytest.mark.parametrize("name,blob", M.valid_variants(), ids=[n for n, _ in M.valid_variants()])
def test_reference_accepts_valid_variants(name, blob):
    tensors, _, _ = R.read_file(blob)
    assert set(tensors) == {"blk.w", "blk.s", "blk.n", "blk.r"} or name == "name_1024_bytes"


def test_reference_huge_group_size_and_rank32():
    blob, expected = M.huge_group_size_file()
    tensors, _, _ = R.read_file(blob)
    assert np.array_equal(tensors["huge.g"], expected)
    tensors, _, _ = R.read_file(M.rank32_file())
    assert tensors["rank32"].shape == (1,) * 31 + (2,)


# ------------------------------------------------------------------------------------------------
# the spec's test vectors
# ------------------------------------------------------------------------------------------------


def test_vectors_are_reproducible(tmp_path, vectors_dir):
    """make_vectors.py regenerates spec/vectors byte for byte (they are not stale)."""
    make_vectors.main(str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(os.listdir(vectors_dir))
    for n in names:
        assert (tmp_path / n).read_bytes() == open(os.path.join(vectors_dir, n), "rb").read(), n


def test_vectors_small_and_listed(vectors_dir, manifest):
    total = sum(os.path.getsize(os.path.join(vectors_dir, n)) for n in os.listdir(vectors_dir))
    assert total < 200 * 1024
    listed = {v["file"] for v in manifest["vectors"]} | {v["expected"] for v in manifest["vectors"]}
    assert listed | {"MANIFEST.json"} == set(os.listdir(vectors_dir))
    kinds = {t["encoding"]["name"] for v in manifest["vectors"] for t in v["tensors"]}
    assert kinds == {"raw", "affine", "symmetric", "nf4", "mxfp4", "nvfp4"}


def test_reference_reads_vectors(vectors_dir, manifest):
    import hashlib

    for v in manifest["vectors"]:
        path = os.path.join(vectors_dir, v["file"])
        blob = open(path, "rb").read()
        assert hashlib.sha256(blob).hexdigest() == v["sha256"]
        tensors, md, info = R.read_file(blob, verify=True, strict=True)
        assert md == v["metadata"]
        expected = np.load(os.path.join(vectors_dir, v["expected"]))
        assert sorted(expected.files) == sorted(tensors)
        for t in v["tensors"]:
            got, want = tensors[t["name"]], expected[t["name"]]
            assert got.shape == tuple(t["shape"]) == want.shape
            assert str(want.dtype) == t["expected_npz_dtype"]
            assert H.np_bits(got).tobytes() == H.np_bits(want).tobytes(), (v["name"], t["name"])
            assert info[t["name"]]["encoding"] == t["encoding"]


def test_manifest_is_json_with_notes(manifest):
    assert manifest["format_version"] == "1.0"
    assert any("uint16" in n for n in manifest["notes"])
    json.dumps(manifest)
