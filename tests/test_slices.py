"""safetensors parity: `get_slice` (decoding only the box an index touches), `load_file(path,
device)`, `save`/`load` of bytes, and decoding straight into the output dtype."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qtensors as qt

ENCODINGS = {
    "flexgen": qt.FLEXGEN,
    "affine-last": qt.Affine(bits=3, group_size=5, axis=-1),
    "symmetric-mid": qt.Symmetric(bits=8, group_size=4, axis=1),
    "nf4-last": qt.NF4(group_size=16, axis=-1),
    "raw": qt.Raw(),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One file holding a 3-D tensor per encoding, and its whole decoded values."""
    x = np.random.default_rng(0).standard_normal((6, 20, 9)).astype(np.float32)
    path = tmp_path_factory.mktemp("slices") / "t.qtensors"
    qt.save_file({n: x for n in ENCODINGS}, path, quant={n: e for n, e in ENCODINGS.items()})
    return path, qt.load_file(path)


KEYS = [
    np.s_[:],
    np.s_[2:5],
    np.s_[:, 3:17],
    np.s_[..., 4],
    np.s_[1, :, 2:7],
    np.s_[-1],
    np.s_[::2, ::-3, 1::4],
    np.s_[5:1:-2, 7],
    np.s_[:, 20:],  # empty
    np.s_[0, 0, 0],
]


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("key", KEYS, ids=str)
def test_slice_equals_slice_of_whole_tensor(stored, name, key):
    path, whole = stored
    with qt.safe_open(path) as f:
        got = f.get_slice(name)[key]
    want = whole[name][key]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_slice_torch_matches_numpy(stored, key):
    path, whole = stored
    with qt.safe_open(path, framework="pt") as f:
        got = f.get_slice("flexgen")[key]
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), whole["flexgen"][key])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_slice_property(stored, data):
    path, whole = stored
    name = data.draw(st.sampled_from(sorted(ENCODINGS)))
    key = tuple(
        data.draw(
            st.one_of(
                st.integers(-n, n - 1),
                st.builds(
                    slice,
                    st.none() | st.integers(-n - 2, n + 2),
                    st.none() | st.integers(-n - 2, n + 2),
                    st.none() | st.integers(1, 4) | st.integers(-4, -1),
                ),
            )
        )
        for n in (6, 20, 9)[: data.draw(st.integers(0, 3))]
    )
    with qt.safe_open(path) as f:
        got = f.get_slice(name)[key]
    np.testing.assert_array_equal(got, whole[name][key])


def test_slice_shape_dtype_and_errors(stored):
    path, _ = stored
    with qt.safe_open(path) as f:
        s = f.get_slice("flexgen")
        assert s.get_shape() == [6, 20, 9] and s.get_dtype() == "float32" and len(s) == 6
        with pytest.raises(IndexError, match="out of bounds"):
            s[6]
        with pytest.raises(IndexError, match="too many indices"):
            s[0, 0, 0, 0]
        with pytest.raises(TypeError, match="ints, slices"):
            s[[0, 1]]
        with pytest.raises(KeyError, match="no tensor named"):
            f.get_slice("missing")


def test_slice_box_outside_tensor_is_refused_by_the_core(stored):
    """The binding checks a box before sizing the output by it."""
    path, _ = stored
    reader = qt._core.Reader(str(path))
    with pytest.raises(ValueError, match="does not fit"):
        reader.decode("flexgen", region=[(0, 6), (0, 2**60), (0, 9)])
    with pytest.raises(ValueError, match="does not fit"):
        reader.decode("flexgen", region=[(0, 6)])


def test_slice_reads_only_the_groups_it_needs(tmp_path):
    """A row slice of a large tensor touches only its groups: corrupt every code byte outside
    them and the slice still decodes to the original rows."""
    x = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32)
    path = tmp_path / "t.qtensors"
    qt.save_file({"w": x}, path, quant=qt.Affine(bits=4, group_size=64, axis=-1))
    want = qt.load_file(path)["w"][100:110]
    with qt.safe_open(path) as f:
        info = f.tensor_info("w")["parts"]["codes"]
        start = f._data_start + info["offset"]
    row_bytes = 256 // 2
    data = bytearray(path.read_bytes())
    keep = range(start + 100 * row_bytes, start + 110 * row_bytes)
    for i in range(start, start + info["length"]):
        if i not in keep:
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with qt.safe_open(path) as f:
        np.testing.assert_array_equal(f.get_slice("w")[100:110], want)


def test_load_file_device_is_positional_as_in_safetensors(stored):
    path, whole = stored
    pt = qt.load_file(path, "cpu", framework="pt")
    assert isinstance(pt["raw"], torch.Tensor)
    np.testing.assert_array_equal(qt.load_file(path)["raw"], whole["raw"])
    with pytest.raises(TypeError, match="framework='pt'"):
        qt.load_file(path, "pt")
    with pytest.raises(ValueError, match="numpy arrays live on the CPU"):
        qt.load_file(path, "cuda", framework="np")


def test_save_and_load_bytes(stored):
    _, whole = stored
    tensors = {"w": whole["raw"], "b": np.arange(5, dtype=np.int32)}
    data = qt.save(tensors, metadata={"k": "v"})
    assert isinstance(data, bytes) and data[:8] == b"QTENSORS"
    out = qt.load(data)
    np.testing.assert_array_equal(out["b"], tensors["b"])
    np.testing.assert_array_equal(out["w"], qt.load(qt.save({"w": whole["raw"]}))["w"])
    assert isinstance(qt.load(data, framework="pt")["b"], torch.Tensor)
    # the same bytes as a file written by save_file
    assert data == qt.save(tensors, metadata={"k": "v"})
    with pytest.raises(qt.FormatError):
        qt.load(data[:100])


def test_bool_bytes_other_than_0_or_1_are_a_format_error(tmp_path):
    path = tmp_path / "b.qtensors"
    qt.save_file({"m": np.array([True, False, True])}, path)
    with qt.safe_open(path) as f:
        at = f._data_start + f.tensor_info("m")["parts"]["data"]["offset"]
    data = bytearray(path.read_bytes())
    data[at + 2] = 2
    path.write_bytes(bytes(data))
    for fw in ("np", "pt"):
        with qt.safe_open(path, framework=fw) as f:
            with pytest.raises(qt.FormatError, match="bool element 2 is stored as byte 2"):
                f.get_tensor("m")
            with pytest.raises(qt.FormatError, match="bool"):
                f.get_quantized("m")
            np.testing.assert_array_equal(np.asarray(f.get_slice("m")[:2]), [True, False])


def test_decode_to_float64_peaks_near_the_output_size(tmp_path):
    """1-bit codes with one scale and min per element, decoded to float64: memory grows by
    about the output, not by whole-tensor fp32 temporaries on top of it."""
    n = 16 << 20
    path = tmp_path / "one_bit.qtensors"
    x = np.random.default_rng(2).standard_normal(n)
    qt.save_file({"x": x}, path, quant=qt.Affine(bits=1, group_size=1, axis=0))
    del x
    code = f"""
import resource, qtensors as qt
f = qt.safe_open({str(path)!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
y = f.get_tensor("x")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / y.nbytes)
"""
    env = {**os.environ, "RAYON_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    ratio = float(out.stdout)
    # output 8n; the mapped parts (1 bit + 2 fp16 per element = 4.1n) may be paged in too.
    assert ratio < 1.7, f"decode peaked at {ratio:.2f}x its output"


def test_reference_reader_refuses_bad_bool_bytes_too():
    import reference as R

    R.raw_decode(bytes([0, 1, 1]), "bool", (3,))
    with pytest.raises(ValueError, match="bool"):
        R.raw_decode(bytes([0, 2]), "bool", (2,))
