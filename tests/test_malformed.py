"""Hostile files (spec section 7): every rule has crafted files that must be refused at open, with
the right exception class and a message naming the problem; truncations and random corruption never
crash the reader; checksum mismatches are caught by verify()."""

from __future__ import annotations

import json

import malformed_cases as M
import numpy as np
import pytest
import reference as R
from hypothesis import given
from hypothesis import strategies as st

import qtensors as qt

CASES = M.cases()
VALID = M.valid_variants()


def open_all(path, framework="pt", verify=False):
    """Open, decode every tensor and (optionally) verify: what a user of the file would do.

    torch is the default framework because it has every dtype of the spec (numpy lacks bf16/fp8).
    """
    with qt.safe_open(str(path), framework=framework, verify=verify) as f:
        for name in f.keys():
            f.get_tensor(name)
        if verify:
            f.verify()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rule_violation_is_refused_at_open(case, tmp_path):
    path = tmp_path / "bad.qtensors"
    path.write_bytes(case.blob)
    cls = getattr(qt, case.error)
    # every check happens when the file is opened, before any part is read
    with pytest.raises(cls) as ei:
        qt.safe_open(str(path), framework="np")
    assert not isinstance(ei.value, qt.ChecksumError), (
        "a malformed header is not a checksum problem"
    )
    msg = str(ei.value).lower()
    for word in case.mentions:
        assert word.lower() in msg, f"message {str(ei.value)!r} does not mention {word!r}"
    with pytest.raises(qt.FormatError):
        qt.load_file(str(path))


@pytest.mark.parametrize("name,blob", VALID, ids=[n for n, _ in VALID])
def test_unusual_but_valid_files_are_accepted(name, blob, tmp_path):
    path = tmp_path / "ok.qtensors"
    path.write_bytes(blob)
    want, _, _ = R.read_file(blob)
    got = qt.load_file(str(path))
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    with qt.safe_open(str(path), verify=True) as f:
        f.verify()


def test_huge_group_size_is_valid(tmp_path):
    """group_size up to u64::MAX is legal (one group per axis); ceil(L/g) must not overflow."""
    blob, expected = M.huge_group_size_file()
    path = tmp_path / "g.qtensors"
    path.write_bytes(blob)
    assert np.array_equal(qt.load_file(str(path))["huge.g"], expected)


def test_rank_32_is_valid(tmp_path):
    path = tmp_path / "r32.qtensors"
    path.write_bytes(M.rank32_file())
    assert qt.load_file(str(path))["rank32"].shape == (1,) * 31 + (2,)


def test_alignment_1mib_is_valid(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    entry = R.make_entry(
        "x", x, {"name": "affine", "bits": 8, "group_size": 2, "axis": 0, "scale_dtype": "float32"}
    )
    path = tmp_path / "a.qtensors"
    R.write_file(path, [entry], alignment=1 << 20)
    assert np.array_equal(qt.load_file(str(path))["x"], R.read_file(path)[0]["x"])


def test_safetensors_file_is_not_a_qtensors_file(tmp_path):
    from safetensors.numpy import save

    path = tmp_path / "model.safetensors"
    path.write_bytes(save({"x": np.ones((2, 2), np.float32)}))
    with pytest.raises(qt.FormatError) as ei:
        qt.safe_open(str(path))
    assert "magic" in str(ei.value).lower() or "qtensors" in str(ei.value).lower()


def test_missing_file_is_not_a_format_error(tmp_path):
    with pytest.raises((FileNotFoundError, OSError)):
        qt.safe_open(str(tmp_path / "nope.qtensors"))


# ------------------------------------------------------------------------------------------------
# truncation and corruption
# ------------------------------------------------------------------------------------------------


def test_every_truncation_is_refused(tmp_path):
    blob = M.base_blob()
    path = tmp_path / "t.qtensors"
    for n in range(len(blob)):
        path.write_bytes(blob[:n])
        with pytest.raises(qt.FormatError):
            qt.safe_open(str(path))
    path.write_bytes(blob)
    open_all(path, verify=True)


def test_deeply_nested_unknown_key_does_not_crash(tmp_path):
    """Valid JSON, but 100000 levels deep under a key readers ignore: accept it or refuse it, never
    crash."""
    h, d = M.base()
    text = json.dumps(h, separators=(",", ":")).encode()
    text = text[:-1] + b',"x":' + b"[" * 100000 + b"]" * 100000 + b"}"
    path = tmp_path / "deep.qtensors"
    path.write_bytes(R.assemble(None, d, alignment=64, header_text=text))
    try:
        open_all(path, verify=True)
    except qt.FormatError:
        pass


def test_trailing_garbage_does_not_crash(tmp_path):
    path = tmp_path / "t.qtensors"
    path.write_bytes(M.base_blob() + b"\x00" * 10 + b"junk")
    try:
        open_all(path, verify=True)
    except qt.FormatError:
        pass  # rejecting bytes after the last part is allowed (spec section 1)


@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=6))
def test_random_byte_flips_never_crash(tmp_path_factory, flips):
    blob = bytearray(M.base_blob())
    for pos, xor in flips:
        blob[pos % len(blob)] ^= xor
    path = tmp_path_factory.mktemp("flip") / "f.qtensors"
    path.write_bytes(bytes(blob))
    try:
        open_all(path, verify=True)
    except qt.QtensorsError:
        pass  # any qtensors error is fine; anything else (or a crash) is a bug


@given(st.integers(0, 10**9), st.integers(1, 255))
def test_header_byte_flips_never_crash(tmp_path_factory, pos, xor):
    """Flips confined to the JSON header, where the parser and validation do their work."""
    blob = bytearray(M.base_blob())
    hl = int.from_bytes(blob[16:24], "little")
    blob[24 + pos % hl] ^= xor
    path = tmp_path_factory.mktemp("hflip") / "f.qtensors"
    path.write_bytes(bytes(blob))
    try:
        open_all(path, verify=True)
    except qt.QtensorsError:
        pass


def _header_variants():
    h, _ = M.base()
    fields = []
    for ti, t in enumerate(h["tensors"]):
        for key in ("shape",):
            fields.append(("tensor", ti, key))
        for pname in t["parts"]:
            for key in ("offset", "length", "shape"):
                fields.append(("part", ti, pname, key))
        for key in ("bits", "group_size", "axis"):
            if key in t["encoding"]:
                fields.append(("encoding", ti, key))
    return fields


FIELDS = _header_variants()
NUMBERS = st.one_of(
    st.integers(-2, 300),
    st.sampled_from([2**31, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64, 10**30]),
    st.just(None),
    st.just("1"),
    st.just(1.5),
)


@given(st.sampled_from(FIELDS), NUMBERS)
def test_lying_numbers_never_crash(tmp_path_factory, field, value):
    """Structured fuzzing: one number of the header replaced by an odd value."""
    h, d = M.base()
    h = json.loads(json.dumps(h))
    t = h["tensors"][field[1]]
    if field[0] == "tensor":
        t[field[2]] = [value] if field[2] == "shape" and not isinstance(value, list) else value
    elif field[0] == "encoding":
        t["encoding"][field[2]] = value
    else:
        rec = t["parts"][field[2]]
        rec[field[3]] = [value] if field[3] == "shape" else value
    blob = R.assemble(h, d)
    path = tmp_path_factory.mktemp("lie") / "f.qtensors"
    path.write_bytes(blob)
    ref_ok = True
    try:
        R.read_file(blob, verify=True, strict=False)
    except R.ReferenceError:
        ref_ok = False
    try:
        open_all(path, verify=True)
        qt_ok = True
    except qt.QtensorsError:
        qt_ok = False
    assert qt_ok == ref_ok, (
        f"qtensors {'accepts' if qt_ok else 'refuses'} a file "
        f"the reference {'accepts' if ref_ok else 'refuses'}"
    )


# ------------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor,part",
    [
        ("blk.w", "scales"),
        ("blk.w", "codes"),
        ("blk.s", "scales"),
        ("blk.n", "codes"),
        ("blk.r", "data"),
    ],
)
def test_checksum_mismatch_is_caught_by_verify(tensor, part, tmp_path):
    blob = bytearray(M.base_blob())
    hdr = R.read_header(bytes(blob))
    rec = next(t for t in hdr["header"]["tensors"] if t["name"] == tensor)["parts"][part]
    blob[hdr["data_start"] + rec["offset"] + rec["length"] - 1] ^= 0x10
    path = tmp_path / "c.qtensors"
    path.write_bytes(bytes(blob))
    # opening without verification is instant and fine; data is only hashed on demand
    with qt.safe_open(str(path), verify=False) as f:
        f.get_tensor(tensor)
        with pytest.raises(qt.ChecksumError) as ei:
            f.verify()
    msg = str(ei.value)
    assert tensor in msg and part in msg, msg
    with pytest.raises(qt.ChecksumError):
        qt.safe_open(str(path), verify=True)


def test_checksum_error_is_a_format_error():
    assert issubclass(qt.ChecksumError, qt.FormatError)
    assert issubclass(qt.UnsupportedError, qt.FormatError)
    assert issubclass(qt.FormatError, qt.QtensorsError) and issubclass(qt.FormatError, ValueError)
    assert issubclass(qt.QuantizationError, qt.QtensorsError) and issubclass(
        qt.QuantizationError, ValueError
    )


# ------------------------------------------------------------------------------------------------
# listing newer files (qtensors inspect), messages, header amplification
# ------------------------------------------------------------------------------------------------


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "qtensors", *map(str, args)], capture_output=True, text=True
    )


def _hostile_headers():
    """Headers that broke the old unvalidated fallback of `inspect` (RecursionError,
    AttributeError, TypeError, OverflowError), each with an unknown dtype so that only a lenient
    reader gets past the first tensor."""
    h, _ = M.base()
    t0 = dict(h["tensors"][3], dtype="float4_e2m1")
    out = {"deep": b'{"alignment":64,"tensors":' + b"[" * 100000 + b"]" * 100000 + b"}"}
    for key, value in [
        ("tensors", {"a": 1}),
        ("metadata", [1, 2]),
    ]:
        out[f"top_{key}"] = json.dumps({"alignment": 64, "tensors": [t0], key: value}).encode()
    for key, value in [("shape", 7), ("parts", [1]), ("shape", [10**30]), ("parts", {"data": 3})]:
        out[f"tensor_{key}_{value}"] = json.dumps(
            {"alignment": 64, "tensors": [dict(t0, **{key: value})]}
        ).encode()
    return out


@pytest.mark.parametrize("major", [1, 2])
@pytest.mark.parametrize("case", sorted(_hostile_headers()))
def test_inspect_validates_every_header(case, major, tmp_path):
    from qtensors.inspect import inspect_file

    path = tmp_path / "x.qtensors"
    _, d = M.base()
    path.write_bytes(R.assemble(None, d, header_text=_hostile_headers()[case], major=major))
    with pytest.raises(qt.FormatError):
        inspect_file(str(path))
    p = _cli("inspect", path)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_major_version_2_is_unsupported_even_when_listing(tmp_path):
    path = tmp_path / "v2.qtensors"
    path.write_bytes(R.assemble(*M.base(), major=2, minor=3))
    with pytest.raises(qt.UnsupportedError, match=r"2\.3.*1\.1"):
        qt._core.Reader(str(path), lenient=True)


def test_lenient_reader_lists_unknown_dtypes_and_refuses_to_decode_them(tmp_path):
    h, d = M.base()
    t = next(t for t in h["tensors"] if t["name"] == "blk.r")
    t["dtype"] = t["parts"]["data"]["dtype"] = "float4_e2m1"
    path = tmp_path / "fp4.qtensors"
    path.write_bytes(R.assemble(h, d))
    with pytest.raises(qt.UnsupportedError, match="float4_e2m1"):
        qt._core.Reader(str(path))
    r = qt._core.Reader(str(path), lenient=True)
    listed = {t["name"]: t for t in json.loads(r.header_json())["tensors"]}
    assert listed["blk.r"]["dtype"] == "float4_e2m1"
    assert listed["blk.r"]["parts"]["data"]["dtype"] == "float4_e2m1"
    with pytest.raises(qt.UnsupportedError):
        r.decode("blk.r")
    # the structure is still checked: a lying offset is refused
    t["parts"]["data"]["offset"] = 1 << 40
    path.write_bytes(R.assemble(h, d))
    with pytest.raises(qt.FormatError, match=r"blk\.r"):
        qt._core.Reader(str(path), lenient=True)


def test_shapes_that_pass_can_be_materialised_empty(tmp_path):
    """The largest empty shapes rule 7 allows for int32 can be created in numpy and torch."""
    import torch

    for dims in ([0, 2**61 - 1], [2**61 - 1, 0], [0, 2**30, 2**31 - 1]):
        h, d = M.base()
        t = next(t for t in h["tensors"] if t["name"] == "blk.r")
        t["shape"] = t["parts"]["data"]["shape"] = dims
        t["parts"]["data"]["length"] = 0
        path = tmp_path / "e.qtensors"
        path.write_bytes(R.assemble(h, d))
        assert qt.load_file(str(path))["blk.r"].shape == tuple(dims)
        assert tuple(qt.load_file(str(path), framework="pt")["blk.r"].shape) == tuple(dims)
        assert torch.empty(dims, dtype=torch.int32).numel() == 0


def test_safetensors_file_gets_the_convert_hint(tmp_path):
    from safetensors.numpy import save

    path = tmp_path / "model.safetensors"
    path.write_bytes(save({"x": np.ones((2, 2), np.float32)}))
    for open_it in (qt._core.Reader, qt._core.StreamReader, qt.load_file):
        with pytest.raises(qt.FormatError, match=r"safetensors.*qtensors convert") as e:
            open_it(str(path))
        assert f"qtensors convert {path}`" in str(e.value)
    p = _cli("inspect", path)
    assert p.returncode != 0 and "qtensors convert" in p.stderr and "Traceback" not in p.stderr


AMPLIFY = """
import resource, sys
from qtensors import _core
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_core.StreamReader(sys.argv[1])
r = _core.Reader(sys.argv[1], lenient=True)
r.header_json()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_header_memory_is_a_small_multiple_of_its_length(tmp_path):
    """A 10 MiB header of ~57,000 empty tensors, read by both readers and given back as JSON: the
    old Value-tree reader grew by 21 times the header, the typed reader by about 5."""
    import subprocess
    import sys

    entry = (
        '{"name":"t%d","dtype":"float32","shape":[0],"encoding":{"name":"raw"},"parts":{"data":'
        '{"dtype":"float32","shape":[0],"offset":0,"length":0,"checksum":"%s"}}}'
    )
    empty = R.checksum_string(b"")
    text = ",".join(entry % (i, empty) for i in range(57_000))
    text = ('{"alignment":64,"tensors":[' + text + "]}").encode()
    path = tmp_path / "many.qtensors"
    path.write_bytes(R.assemble(None, b"", header_text=text))
    p = subprocess.run(
        [sys.executable, "-c", AMPLIFY, str(path)], capture_output=True, text=True, check=True
    )
    growth = int(p.stdout)
    assert growth < 8 * len(text), f"{growth / len(text):.1f} times the header"
