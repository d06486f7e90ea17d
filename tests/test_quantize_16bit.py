"""Quantizing fp16 and bf16 input: the kernels read the 16-bit values in place (widening in
registers), which must give exactly the parts of quantizing the same values widened to fp32
first, and those of the numpy reference, for every encoding, ragged groups, both group axes and
unaligned buffers; NaN/Inf in 16-bit input is the usual QuantizationError.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference as R

import qtensors as qt
from qtensors import _core

ENCODINGS = {
    "affine4": qt.Affine(4, 64, axis=-1),
    "affine4_axis0": qt.FLEXGEN,
    "affine8": qt.Affine(8, 32, axis=-1, scale_dtype="float32"),
    "affine3": qt.Affine(3, 48, axis=-1),
    "affine2_axis0": qt.Affine(2, 16, axis=0),
    "symmetric4": qt.Symmetric(4, 64, axis=-1),
    "symmetric8_axis0": qt.Symmetric(8, 128, axis=0, scale_dtype="bfloat16"),
    "symmetric4_full": qt.Symmetric(4, 32, levels="full"),
    "symmetric3_full": qt.Symmetric(3, 40, levels="full"),
    "nf4": qt.NF4(64, axis=-1),
    "nf4_axis0": qt.NF4(64, axis=0),
    "mxfp4": qt.MXFP4(),
    "mxfp4_axis0": qt.MXFP4(axis=0),
    "nvfp4": qt.NVFP4(),
}

# Odd sizes: ragged last groups, rows that are not a multiple of any vector width.
SHAPES = [(37, 203), (130, 67), (5, 1031)]


def bits16(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` (fp32) rounded to fp16 or bf16 (nearest even) as uint16 bits."""
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    return R.fp32_to_bf16_bits(x)


def widened(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return R.bf16_bits_to_fp32(bits)


def unaligned(a: np.ndarray) -> np.ndarray:
    """The bytes of `a` at an odd address."""
    raw = a.reshape(-1).view(np.uint8)
    buf = np.empty(raw.size + 1, np.uint8)
    buf[1:] = raw
    return buf[1:]


def encode(data: np.ndarray, dtype: str, shape, enc: qt.Encoding) -> list[bytes]:
    return [bytes(p) for p in _core.encode(data, dtype, list(shape), json.dumps(enc.to_dict(2)))]


def values(shape, seed: int) -> np.ndarray:
    """Normal values with per-row magnitudes over a few binades, zeros and repeated values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-6, 6, size=(shape[0], 1)))
    x = np.where(rng.random(shape) < 0.05, 0.0, x)
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_16bit_input_equals_widening_first_and_reference(name, dtype):
    enc = ENCODINGS[name]
    for i, shape in enumerate(SHAPES):
        bits = bits16(values(shape, i), dtype)
        want = encode(widened(bits, dtype).reshape(-1).view(np.uint8), "float32", shape, enc)
        assert encode(bits.reshape(-1).view(np.uint8), dtype, shape, enc) == want, shape
        assert encode(unaligned(bits), dtype, shape, enc) == want, (shape, "unaligned")
        if i == 0:
            logical = bits.view(np.float16) if dtype == "float16" else bits  # bf16 as bits
            ref = R.quantize(logical, R.encoding_params(enc.to_dict(2), 2), dtype=dtype)
            assert want[0] == ref["codes"].tobytes()
            assert want[1] == np.ascontiguousarray(ref["scales"]).tobytes()
            if ref.get("mins") is not None:
                assert want[2] == np.ascontiguousarray(ref["mins"]).tobytes()


def test_unaligned_fp32_input():
    x = values((37, 203), 7)
    for enc in (qt.Affine(4, 64, axis=-1), qt.NVFP4(), qt.FLEXGEN):
        want = encode(x.reshape(-1).view(np.uint8), "float32", x.shape, enc)
        assert encode(unaligned(x), "float32", x.shape, enc) == want


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["affine4", "affine4_axis0", "symmetric4_full", "nf4", "nvfp4"])
def test_non_finite_16bit_input_is_rejected(name, bad, dtype):
    x = values((9, 100), 3)
    x[7, 61] = bad
    bits = bits16(x, dtype)
    with pytest.raises(qt.QuantizationError, match="NaN or infinite"):
        encode(bits.reshape(-1).view(np.uint8), dtype, x.shape, ENCODINGS[name])
