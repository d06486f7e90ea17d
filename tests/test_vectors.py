"""The spec's test vectors (spec/vectors/): qtensors decodes every one to exactly the expected
values, and its view of each file (encodings, parts, metadata) agrees with the reference
reader's."""

from __future__ import annotations

import os

import helpers as H
import numpy as np
import pytest
import reference as R
import torch

import qtensors as qt

VECTORS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec", "vectors"
)

NON_NUMPY = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _manifest():
    import json

    with open(os.path.join(VECTORS_DIR, "MANIFEST.json"), encoding="utf-8") as fh:
        return json.load(fh)["vectors"]


VECTORS = _manifest()


def decoded_bits(value, dtype: str) -> np.ndarray:
    """Bit patterns of a decoded value (numpy array or torch tensor)."""
    if isinstance(value, torch.Tensor):
        return H.torch_bits(value)
    assert dtype not in NON_NUMPY
    return H.np_bits(value)


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_exactly(vec):
    path = os.path.join(VECTORS_DIR, vec["file"])
    expected = np.load(os.path.join(VECTORS_DIR, vec["expected"]))
    dtypes = {t["name"]: t["dtype"] for t in vec["tensors"]}
    loaded_pt = qt.load_file(path, framework="pt")
    assert set(loaded_pt) == set(dtypes)
    numpy_names = [n for n, d in dtypes.items() if d not in NON_NUMPY]
    loaded_np = {}
    if len(numpy_names) == len(dtypes):
        loaded_np = qt.load_file(path, framework="np")
    else:
        with qt.safe_open(path, framework="np") as f:
            loaded_np = {n: f.get_tensor(n) for n in numpy_names}
    for t in vec["tensors"]:
        name, dtype, shape = t["name"], t["dtype"], tuple(t["shape"])
        want = H.np_bits(expected[name])
        got_pt = loaded_pt[name]
        assert isinstance(got_pt, torch.Tensor)
        assert got_pt.dtype == H.TORCH_DTYPES[dtype], (name, got_pt.dtype)
        assert tuple(got_pt.shape) == shape
        assert np.array_equal(decoded_bits(got_pt, dtype), want), (
            f"{vec['name']}/{name} (pt) differs"
        )
        if name in loaded_np:
            got = loaded_np[name]
            assert (
                isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype) and got.shape == shape
            )
            assert np.array_equal(decoded_bits(got, dtype), want), (
                f"{vec['name']}/{name} (np) differs"
            )


@pytest.mark.parametrize("vec", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_header_and_parts_agree_with_reference(vec):
    path = os.path.join(VECTORS_DIR, vec["file"])
    _, md, info = R.read_file(path, verify=True, strict=True)
    with qt.safe_open(path, framework="np", verify=True) as f:
        assert list(f.keys()) == [t["name"] for t in vec["tensors"]]  # file order
        assert (f.metadata() or {}) == (md or {})
        f.verify()
        for t in vec["tensors"]:
            name = t["name"]
            assert H.same_encoding(f.encoding(name), t["encoding"])
            if t["encoding"]["name"] == "raw":
                continue
            q = f.get_quantized(name)
            parts = info[name]["parts"]
            assert tuple(q.shape) == tuple(t["shape"]) and q.dtype == t["dtype"]
            assert H.as_np(q.codes).tobytes() == parts["codes"].tobytes()
            assert H.as_np(q.scales).tobytes() == parts["scales"].tobytes()
            if "mins" in parts:
                assert H.as_np(q.mins).tobytes() == parts["mins"].tobytes()
            else:
                assert q.mins is None


def test_vector_bf16_logical_needs_torch():
    path = os.path.join(VECTORS_DIR, "logical_dtypes.qtensors")
    with qt.safe_open(path, framework="np") as f:
        with pytest.raises(TypeError):
            f.get_tensor("bf16")
        q = f.get_quantized("bf16")
        with pytest.raises(TypeError):
            qt.dequantize(q)
        assert H.as_np(q.scales).dtype == np.uint16  # bf16 scales come back as raw bits


def test_vectors_cover_the_spec(manifest):
    """The vectors exercise what the spec promises (a guard against a shrinking vector set)."""
    encs = [t["encoding"] for v in manifest["vectors"] for t in v["tensors"]]
    assert {e["bits"] for e in encs if e["name"] == "affine"} >= {1, 2, 3, 4, 5, 6, 7, 8}
    assert {e["bits"] for e in encs if e["name"] == "symmetric"} >= {2, 4, 8}
    assert {e["scale_dtype"] for e in encs if e["name"] != "raw"} == {
        "float16",
        "bfloat16",
        "float32",
        "uint8",  # mxfp4's E8M0 scales
        "float8_e4m3fn",  # nvfp4's
    }
    assert {e["axis"] for e in encs if e["name"] in ("mxfp4", "nvfp4")} == {0, 1}
    dtypes = {t["dtype"] for v in manifest["vectors"] for t in v["tensors"]}
    assert dtypes == set(R.DTYPES)
    assert {v["alignment"] for v in manifest["vectors"]} == {64, 4096}
