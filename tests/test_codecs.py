"""qt.quantize / qt.dequantize against the independent numpy reference (spec section 4).

Codes, scales and mins must be bit-exact; decoded values equal the reference up to one fp32 ulp (the
spec lets decoders fuse the multiply-add); the error stays within the spec's bounds.
"""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest
import reference as R
import torch
from hypothesis import given
from hypothesis import strategies as st

import qtensors as qt


def run_qt(case, as_torch=False):
    x, dtype = case["values"], case["dtype"]
    enc = H.qt_encoding(
        case["kind"], case["bits"], case["group_size"], case["axis"], case["scale_dtype"]
    )
    arg = H.to_torch(x, dtype) if (as_torch or dtype == "bfloat16") else x
    return qt.quantize(arg, enc)


def ref_case(case):
    x = case["values"]
    enc = H.ref_dict(
        case["kind"], case["bits"], case["group_size"], case["axis"], case["scale_dtype"], x.ndim
    )
    return enc, R.quantize(x, enc, dtype=case["dtype"])


def assert_matches_reference(q, case, enc, ref):
    x = case["values"]
    assert tuple(q.shape) == x.shape
    assert q.dtype == case["dtype"]
    assert H.same_encoding(q.encoding, enc), (q.encoding, enc)
    codes = H.as_np(q.codes)
    assert codes.dtype == np.uint8 and codes.ndim == 1
    assert codes.tobytes() == ref["codes"].tobytes(), "codes differ from the reference"
    scales = H.as_np(q.scales)
    if x.ndim >= 1:
        assert scales.shape == ref["scales"].shape
    H.assert_stored_equal(scales, ref["scales"], "scales")
    if ref["mins"] is None:
        assert q.mins is None
    else:
        mins = H.as_np(q.mins)
        if x.ndim >= 1:
            assert mins.shape == ref["mins"].shape
        # min(x) of a group holding both +0.0 and -0.0 may be either zero (IEEE min is unspecified)
        H.assert_stored_equal(mins, ref["mins"], "mins", signed_zero_ok=True)


# ------------------------------------------------------------------------------------------------
# exactness against the reference
# ------------------------------------------------------------------------------------------------


@given(H.cases(), st.booleans())
def test_quantize_matches_reference(case, as_torch):
    try:
        enc, ref = ref_case(case)
    except R.ReferenceError:
        # NaN/Inf (e.g. fp16 input overflow) or a scale beyond the scale dtype: qtensors must
        # refuse too
        with pytest.raises(qt.QuantizationError):
            run_qt(case, as_torch)
        return
    q = run_qt(case, as_torch)
    assert_matches_reference(q, case, enc, ref)


def dequant_tolerance(case, enc, ref):
    """|y - r| allowed: one fp32 ulp of r, plus one of code*s for affine (a fused multiply-add)."""
    x = case["values"]
    r = R.dequantize_fp32(ref, enc, x.shape).astype(np.float64)
    tol = H.fp32_spacing(r)
    if enc["name"] == "affine":
        P, L, Q, G = R.group_layout(x.shape, enc["axis"], enc["group_size"])
        mins = R.storage_to_fp32(ref["mins"], enc["scale_dtype"]).reshape(P, G, Q)
        m = mins[:, R.group_index(L, enc["group_size"]), :].reshape(x.shape).astype(np.float64)
        tol = tol + H.fp32_spacing(np.abs(r) + np.abs(m))
    return r, tol


@given(H.cases(in_dtypes=("float32", "float16", "float64")))
def test_dequantize_matches_reference(case):
    try:
        enc, ref = ref_case(case)
    except R.ReferenceError:
        return
    q = run_qt(case)
    y = qt.dequantize(q)
    assert isinstance(y, np.ndarray)
    assert y.dtype == H.NP_FLOAT[case["dtype"]]
    assert y.shape == case["values"].shape
    want = R.dequantize(ref, enc, y.shape, case["dtype"])
    if np.array_equal(y, want):
        return
    # otherwise only an fma-sized difference is allowed
    r, tol = dequant_tolerance(case, enc, ref)
    if case["dtype"] == "float16":
        tol = tol + np.spacing(np.abs(want)).astype(np.float64)
    err = np.abs(y.astype(np.float64) - r)
    assert np.all(err <= tol), f"max excess {float((err - tol).max())}"


@given(H.cases(in_dtypes=("bfloat16",)))
def test_bf16_dequantize_returns_torch(case):
    """bfloat16 has no numpy dtype: a bf16 tensor quantized from torch decodes to a torch tensor."""
    try:
        enc, ref = ref_case(case)
    except R.ReferenceError:
        return
    q = run_qt(case)
    assert q.dtype == "bfloat16"
    y = qt.dequantize(q)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    assert tuple(y.shape) == case["values"].shape
    got = H.torch_bits(y).reshape(-1)
    want = R.dequantize(ref, enc, case["values"].shape, "bfloat16").reshape(-1)
    if enc["name"] == "affine" and enc["scale_dtype"] == "float32":
        # a fused multiply-add may move the fp32 value by an ulp and so cross a bf16 rounding
        # boundary
        gv, wv = R.bf16_bits_to_fp32(got), R.bf16_bits_to_fp32(want)
        spacing = np.spacing(np.abs(R.bf16_bits_to_fp32(want)).astype(np.float32)) * 2**16
        assert np.all(np.abs(gv.astype(np.float64) - wv) <= spacing)
    else:
        assert np.array_equal(got, want)


@given(H.cases(in_dtypes=("float32", "float64")))
def test_error_within_spec_bound(case):
    """|x - x_hat| <= s/2 + metadata rounding (spec 4.5, 4.6; nf4: half the widest level gap)."""
    x = case["values"]
    enc = H.ref_dict(
        case["kind"], case["bits"], case["group_size"], case["axis"], case["scale_dtype"], x.ndim
    )
    try:
        q = qt.quantize(
            x,
            H.qt_encoding(
                case["kind"], case["bits"], case["group_size"], case["axis"], case["scale_dtype"]
            ),
        )
    except qt.QuantizationError:
        with pytest.raises(R.ReferenceError):
            R.quantize(x, enc)
        return
    parts = {"codes": H.as_np(q.codes), "scales": H.as_np(q.scales), "mins": q.mins}
    y = np.asarray(qt.dequantize(q)).astype(np.float64)
    x32 = R.to_fp32(x, case["dtype"])
    bound = H.spec_error_bound(
        case["kind"],
        case["bits"],
        x32,
        parts,
        x.shape,
        enc["axis"],
        case["group_size"],
        case["scale_dtype"],
    )
    err = np.abs(x32.astype(np.float64) - y).reshape(bound.shape)
    assert np.all(err <= bound), f"max excess {float((err - bound).max())}"


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["float16", "bfloat16", "float32"]),
    st.sampled_from([1e-2, 1.0, 50.0]),
)
def test_nf4_codes_are_nearest_levels(seed, sd, mag):
    x = (np.random.default_rng(seed).standard_normal((6, 40)) * mag).astype(np.float32)
    q = qt.quantize(x, qt.NF4(group_size=16, axis=-1, scale_dtype=sd))
    codes = R.unpack_codes(H.as_np(q.codes), 4, x.size).reshape(x.shape)
    s = R.storage_to_fp32(H.as_np(q.scales), sd).reshape(6, 3)[:, R.group_index(40, 16)]
    inv = np.where(s == 0, np.float32(0), np.float32(1) / s).astype(np.float32)
    t = (x * inv).astype(np.float32).astype(np.float64)
    d = np.abs(t[..., None] - R.NF4_LEVELS.astype(np.float64))
    srt = np.sort(d, axis=-1)
    clear = srt[..., 1] - srt[..., 0] > 1e-6 * np.maximum(1.0, np.abs(t))  # not (nearly) a tie
    assert np.array_equal(codes[clear], d.argmin(axis=-1)[clear])


def test_nf4_exact_midpoints_take_lower_level():
    mids = R.NF4_MIDS
    x = np.concatenate([mids, [1.0]]).astype(np.float32)  # absmax 1: s = 1, t = x exactly
    q = qt.quantize(x, qt.NF4(group_size=16, axis=0, scale_dtype="float16"))
    assert R.unpack_codes(H.as_np(q.codes), 4, 16).tolist() == [*range(15), 15]
    up = np.concatenate([np.nextafter(mids, np.float32(2)), [1.0]]).astype(np.float32)
    q = qt.quantize(up, qt.NF4(group_size=16, axis=0, scale_dtype="float16"))
    assert R.unpack_codes(H.as_np(q.codes), 4, 16).tolist() == [*range(1, 16), 15]
    y = qt.dequantize(
        qt.quantize(R.NF4_LEVELS.copy(), qt.NF4(group_size=16, axis=0, scale_dtype="float32"))
    )
    assert np.array_equal(y, R.NF4_LEVELS)  # every level decodes to itself


# ------------------------------------------------------------------------------------------------
# known answers (independent of the reference)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,values,packed",
    [
        (3, [1, 2, 3, 4, 5, 6, 7, 0], bytes([0xD1, 0x58, 0x1F])),  # codes cross byte boundaries
        (4, [0, 15, 1, 14], bytes([0xF0, 0xE1])),  # low nibble first
        (2, [0, 1, 2, 3, 3, 2, 1, 0], bytes([0xE4, 0x1B])),
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], bytes([0x0D, 0x01])),  # unused high bits are 0
        (8, [0, 255, 7, 200], bytes([0, 255, 7, 200])),
        (5, [31, 0, 17], bytes([0x1F, 0x44])),
    ],
)
def test_bit_packing_known_answers(bits, values, packed):
    """Integer values with lo = 0 and hi = 2^b - 1: s = 1, m = 0, so every code equals its value."""
    x = np.array(values, np.float32)
    assert x.min() == 0 and x.max() == 2**bits - 1
    q = qt.quantize(x, qt.Affine(bits=bits, group_size=64, axis=0, scale_dtype="float16"))
    assert H.as_np(q.codes).tobytes() == packed
    assert H.as_np(q.scales).tolist() == [1.0] and H.as_np(q.mins).tolist() == [0.0]
    assert np.array_equal(qt.dequantize(q), x)


def test_symmetric_known_answer():
    x = np.array([-127.0, 0.0, 127.0, 1.0, -0.5, 0.5, 1.5], np.float32)  # s = 1; ties to even
    q = qt.quantize(x, qt.Symmetric(bits=8, group_size=64, axis=0, scale_dtype="float32"))
    assert H.as_np(q.codes).tolist() == [1, 128, 255, 129, 128, 128, 130]
    assert q.mins is None
    z = qt.quantize(
        np.zeros((2, 3), np.float32),
        qt.Symmetric(bits=4, group_size=2, axis=-1, scale_dtype="float16"),
    )
    assert np.all(R.unpack_codes(H.as_np(z.codes), 4, 6) == 8)  # zero point; code 0 never written
    assert np.all(qt.dequantize(z) == 0)


def test_affine_ties_to_even():
    x = np.array([0.0, 3.0, 0.5, 1.5, 2.5, 1.0], np.float32)  # lo 0, hi 3, 2 bits: s = 1
    q = qt.quantize(x, qt.Affine(bits=2, group_size=8, axis=0, scale_dtype="float16"))
    assert R.unpack_codes(H.as_np(q.codes), 2, 6).tolist() == [0, 3, 0, 2, 2, 1]


def test_flat_group_decodes_to_its_min():
    x = np.tile(np.array([[0.1, -3.3, 7.0, 0.0]], np.float32), (5, 1))  # every column constant
    for sd in ("float16", "bfloat16", "float32"):
        q = qt.quantize(x, qt.Affine(bits=4, group_size=2, axis=0, scale_dtype=sd))
        assert np.all(R.storage_to_fp32(H.as_np(q.scales), sd) == 0)
        assert np.all(R.unpack_codes(H.as_np(q.codes), 4, x.size) == 0)
        assert np.array_equal(qt.dequantize(q), np.broadcast_to(R.st(x[0], sd), x.shape))


def test_float64_is_rounded_to_fp32_first():
    x64 = np.array([[1.0 + 2**-30, -2.0, 0.3, 5.0 - 2**-40]], np.float64)
    enc = qt.Symmetric(bits=8, group_size=4, axis=-1, scale_dtype="float32")
    a, b = qt.quantize(x64, enc), qt.quantize(x64.astype(np.float32), enc)
    assert H.as_np(a.codes).tobytes() == H.as_np(b.codes).tobytes()
    assert H.as_np(a.scales).tobytes() == H.as_np(b.scales).tobytes()
    assert a.dtype == "float64" and qt.dequantize(a).dtype == np.float64


# ------------------------------------------------------------------------------------------------
# shapes at the edges
# ------------------------------------------------------------------------------------------------

EDGE_SHAPES = [(), (0,), (1,), (0, 5), (5, 0), (3, 0, 2), (1, 1), (7,), (3, 5)]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
@pytest.mark.parametrize("kind,bits", [("affine", 3), ("affine", 8), ("symmetric", 4), ("nf4", 4)])
@pytest.mark.parametrize("group_size", [1, 4, 1000])
def test_edge_shapes(shape, kind, bits, group_size):
    x = (np.arange(R.prod(shape), dtype=np.float32).reshape(shape) * np.float32(0.37)) - np.float32(
        1.0
    )
    for axis in range(-max(len(shape), 1), max(len(shape), 1)):
        case = dict(
            kind=kind,
            bits=bits,
            group_size=group_size,
            axis=axis,
            scale_dtype="float16",
            dtype="float32",
            values=x,
        )
        enc, ref = ref_case(case)
        q = run_qt(case)
        assert_matches_reference(q, case, enc, ref)
        assert H.as_np(q.codes).size == (x.size * bits + 7) // 8
        y = qt.dequantize(q)
        assert y.shape == shape and y.dtype == np.float32
        assert np.array_equal(y, R.dequantize(ref, enc, shape, "float32"))


def test_rank0_encoding_dict():
    q = qt.quantize(
        np.array(2.5, np.float32), qt.Affine(bits=4, group_size=64, axis=-1, scale_dtype="float16")
    )
    assert q.encoding["axis"] == 0 and tuple(q.shape) == ()
    assert H.as_np(q.scales).size == 1 and H.as_np(q.codes).size == 1
    assert qt.dequantize(q).shape == () and float(qt.dequantize(q)) == 2.5


# ------------------------------------------------------------------------------------------------
# inputs: torch, non-contiguous, bfloat16
# ------------------------------------------------------------------------------------------------


def test_torch_and_numpy_inputs_agree():
    x = np.random.default_rng(1).standard_normal((12, 70)).astype(np.float32)
    for enc in (
        qt.FLEXGEN,
        qt.Symmetric(bits=8, group_size=32, axis=-1, scale_dtype="bfloat16"),
        qt.NF4(group_size=64, axis=-1, scale_dtype="float16"),
    ):
        a, b = qt.quantize(x, enc), qt.quantize(torch.from_numpy(x.copy()), enc)
        assert H.as_np(a.codes).tobytes() == H.as_np(b.codes).tobytes()
        assert H.as_np(a.scales).tobytes() == H.as_np(b.scales).tobytes()


def test_non_contiguous_inputs():
    base = np.random.default_rng(2).standard_normal((16, 24)).astype(np.float32)
    enc = qt.Affine(bits=4, group_size=8, axis=0, scale_dtype="float16")
    for view in (base.T, base[:, ::3], base[::2, 1:], np.asfortranarray(base)):
        want = R.quantize(np.ascontiguousarray(view), H.ref_dict("affine", 4, 8, 0, "float16", 2))
        got = qt.quantize(view, enc)
        assert H.as_np(got.codes).tobytes() == want["codes"].tobytes()
        assert tuple(got.shape) == view.shape
    t = torch.from_numpy(base.copy()).t()  # non-contiguous torch tensor
    want = R.quantize(np.ascontiguousarray(base.T), H.ref_dict("affine", 4, 8, 0, "float16", 2))
    assert H.as_np(qt.quantize(t, enc).codes).tobytes() == want["codes"].tobytes()


def test_bfloat16_torch_input_matches_reference():
    v = np.random.default_rng(3).standard_normal((10, 33)).astype(np.float32)
    bits = R.fp32_to_bf16_bits(v)
    t = H.torch_from_bits(bits, "bfloat16")
    for kind, b, sd in (
        ("affine", 4, "bfloat16"),
        ("symmetric", 8, "float16"),
        ("nf4", 4, "float32"),
    ):
        case = dict(
            kind=kind, bits=b, group_size=16, axis=-1, scale_dtype=sd, dtype="bfloat16", values=bits
        )
        enc, ref = ref_case(case)
        q = qt.quantize(t, H.qt_encoding(kind, b, 16, -1, sd))
        assert_matches_reference(q, case, enc, ref)
        if sd == "bfloat16":
            assert H.as_np(q.scales).dtype == np.uint16


def test_float16_torch_input():
    x = np.random.default_rng(4).standard_normal((4, 9)).astype(np.float16)
    q = qt.quantize(torch.from_numpy(x.copy()), qt.FLEXGEN)
    ref = R.quantize(x, H.ref_dict("affine", 4, 64, 0, "float16", 2))
    assert q.dtype == "float16" and H.as_np(q.codes).tobytes() == ref["codes"].tobytes()


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "enc",
    [
        qt.FLEXGEN,
        qt.Symmetric(bits=8, group_size=4, axis=-1, scale_dtype="float32"),
        qt.NF4(group_size=4, axis=0, scale_dtype="bfloat16"),
    ],
    ids=["affine", "symmetric", "nf4"],
)
def test_non_finite_input_is_rejected(bad, enc):
    x = np.ones((6, 4), np.float32)
    x[4, 1] = bad
    with pytest.raises(qt.QuantizationError):
        qt.quantize(x, enc)
    with pytest.raises(ValueError):  # QuantizationError is a ValueError
        qt.quantize(torch.from_numpy(x), enc)


def test_float64_overflowing_fp32_is_rejected():
    with pytest.raises(qt.QuantizationError):
        qt.quantize(
            np.array([[1e39, 0.0]]), qt.Affine(bits=4, group_size=2, axis=-1, scale_dtype="float32")
        )


def test_scale_not_finite_in_scale_dtype_is_rejected():
    with pytest.raises(qt.QuantizationError):  # min -70000 overflows fp16
        qt.quantize(
            np.array([[-70000.0, 1.0]], np.float32),
            qt.Affine(bits=4, group_size=2, axis=1, scale_dtype="float16"),
        )
    with pytest.raises(
        qt.QuantizationError
    ):  # scale 1e6 / 15 is fine, but 1e6 absmax for nf4 is not
        qt.quantize(
            np.array([[0.0, 1e6]], np.float32), qt.NF4(group_size=2, axis=1, scale_dtype="float16")
        )
    # the same values are fine with bfloat16 scales
    qt.quantize(
        np.array([[-70000.0, 1.0]], np.float32),
        qt.Affine(bits=4, group_size=2, axis=1, scale_dtype="bfloat16"),
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: qt.Affine(bits=0, group_size=64, axis=0, scale_dtype="float16"),
        lambda: qt.Affine(bits=9, group_size=64, axis=0, scale_dtype="float16"),
        lambda: qt.Symmetric(bits=1, group_size=64, axis=0, scale_dtype="float16"),
        lambda: qt.Affine(bits=4, group_size=0, axis=0, scale_dtype="float16"),
        lambda: qt.Affine(bits=4, group_size=64, axis=0, scale_dtype="float64"),
        lambda: qt.NF4(group_size=64, axis=0, scale_dtype="int8"),
    ],
)
def test_invalid_encoding_parameters(make):
    with pytest.raises((ValueError, qt.QtensorsError)):
        qt.quantize(np.ones((4, 4), np.float32), make())


def test_axis_out_of_range():
    with pytest.raises((ValueError, IndexError, qt.QtensorsError)):
        qt.quantize(
            np.ones((4, 4), np.float32),
            qt.Affine(bits=4, group_size=2, axis=2, scale_dtype="float16"),
        )
    with pytest.raises((ValueError, IndexError, qt.QtensorsError)):
        qt.quantize(
            np.ones((4, 4), np.float32),
            qt.Affine(bits=4, group_size=2, axis=-3, scale_dtype="float16"),
        )


def test_integer_input_cannot_be_quantized():
    with pytest.raises((TypeError, ValueError, qt.QtensorsError)):
        qt.quantize(np.arange(16, dtype=np.int32).reshape(4, 4), qt.FLEXGEN)


# ------------------------------------------------------------------------------------------------
# encoding objects
# ------------------------------------------------------------------------------------------------


def test_encoding_dicts():
    assert qt.FLEXGEN.to_dict(2) == {
        "name": "affine",
        "bits": 4,
        "group_size": 64,
        "axis": 0,
        "scale_dtype": "float16",
    }
    assert qt.FLEXGEN.to_dict(2) == qt.Affine(
        bits=4, group_size=64, axis=0, scale_dtype="float16"
    ).to_dict(2)
    assert qt.Affine(bits=3, group_size=8, axis=-1, scale_dtype="bfloat16").to_dict(3) == {
        "name": "affine",
        "bits": 3,
        "group_size": 8,
        "axis": 2,
        "scale_dtype": "bfloat16",
    }
    assert qt.Symmetric(bits=8, group_size=128, axis=-2, scale_dtype="float32").to_dict(2) == {
        "name": "symmetric",
        "bits": 8,
        "group_size": 128,
        "axis": 0,
        "scale_dtype": "float32",
    }
    assert H.same_encoding(
        qt.NF4(group_size=64, axis=-1, scale_dtype="float16").to_dict(2),
        {"name": "nf4", "group_size": 64, "axis": 1, "scale_dtype": "float16"},
    )
    assert qt.Raw().to_dict(2) == {"name": "raw"}
    assert qt.Affine(bits=4, group_size=64, axis=-1, scale_dtype="float16").to_dict(0)["axis"] == 0
