"""MXFP4 and NVFP4 (spec 4.8, 4.9) against the numpy reference, known answers, and the
ecosystem's own implementations: torchao (MXFP4 and NVFP4) and NVIDIA ModelOpt (NVFP4), whose
codes and scales must be byte-identical, so that parts can be handed over without re-packing.
"""

from __future__ import annotations

import json
import struct

import helpers as H
import numpy as np
import pytest
import reference as R
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qtensors as qt

FP4 = {"mxfp4": qt.MXFP4, "nvfp4": qt.NVFP4}


def u8(t) -> np.ndarray:
    """The bytes of a part (torch float8 or numpy) as a uint8 array."""
    if isinstance(t, torch.Tensor):
        return t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(t).view(np.uint8).reshape(-1)


def assert_matches_reference(q, x, dtype: str, kind: str, axis: int):
    enc = q.encoding
    ref = R.quantize(x, enc, dtype=dtype)
    assert enc == R.encoding_params({"name": kind, "axis": axis}, x.ndim)
    assert u8(q.codes).tobytes() == ref["codes"].tobytes(), "codes differ from the reference"
    assert u8(q.scales).tobytes() == ref["scales"].tobytes(), "scales differ from the reference"
    assert tuple(q.scales.shape) == ref["scales"].shape
    if kind == "nvfp4":
        assert u8(q.tensor_scale).tobytes() == ref["tensor_scale"].astype("<f4").tobytes()
        assert tuple(q.tensor_scale.shape) == ()
    else:
        assert q.tensor_scale is None
    # Decoding is one rounding of level * scale: bit-exact, in every output dtype.
    want = R.dequantize(ref, enc, x.shape, dtype)
    got = qt.dequantize(q, "pt" if dtype == "bfloat16" else "np")
    got = H.as_np(got.view(torch.int16)).view(np.uint16) if dtype == "bfloat16" else got
    assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))


@st.composite
def fp4_cases(draw):
    kind = draw(st.sampled_from(sorted(FP4)))
    rank = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 70), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "float64"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Per-row magnitudes over many binades, exact zeros and E2M1 midpoints (ties).
    span = 10 if dtype == "float16" else 30
    rows = shape[:1] + (1,) * (rank - 1)
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-span, span, size=rows))
    x = np.where(rng.random(shape) < 0.1, 0.0, x)
    x = np.where(rng.random(shape) < 0.1, rng.choice([0.25, 0.75, 2.5, 5.0, -1.25], shape), x)
    return kind, axis, dtype, x


@settings(max_examples=60, deadline=None)
@given(fp4_cases())
def test_quantize_and_decode_match_reference(case):
    kind, axis, dtype, x = case
    if dtype == "bfloat16":
        t = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        arg, xr = t, t.view(torch.int16).numpy().view(np.uint16)
    else:
        arg = xr = x.astype(dtype)
    q = qt.quantize(arg, FP4[kind](axis=axis))
    assert_matches_reference(q, xr, dtype, kind, axis)


def test_known_answers_mxfp4():
    # amax 6 -> X = 2^(2-2) = 1 (byte 127): elements are themselves, ties to even codes.
    x = np.array(
        [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.1, -0.0, 5.5, -6] + [0] * 20, np.float32
    )
    q = qt.quantize(x, qt.MXFP4())
    assert q.scales.tolist() == [127]
    codes = R.unpack_codes(q.codes, 4, 32)[:12].tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 0, 7, 15]
    # Even element in the low nibble.
    assert q.codes[0] == 7 | 0 << 4 and q.codes[1] == 2 | 2 << 4
    # amax 7.99 keeps X = 1 (floor), so 7.99 saturates to 6; amax 8 doubles X.
    assert qt.quantize(np.full(32, 7.99, np.float32), qt.MXFP4()).scales.tolist() == [127]
    assert qt.quantize(np.full(32, 8.0, np.float32), qt.MXFP4()).scales.tolist() == [128]
    # An all-zero block stores the smallest scale, 2^-127.
    assert qt.quantize(np.zeros(32, np.float32), qt.MXFP4()).scales.tolist() == [0]


def test_known_answers_nvfp4():
    # amax 2688 -> g = 1; a block of amax 6 takes scale 1.0 (0x38), a zero block 1.0 too.
    x = np.zeros(48, np.float32)
    x[0], x[16], x[17] = 2688.0, 6.0, 2.5
    q = qt.quantize(x, qt.NVFP4())
    assert float(q.tensor_scale) == 1.0
    assert q.scales.tolist() == [0x7E, 0x38, 0x38]  # 448, 1, 1
    codes = R.unpack_codes(q.codes, 4, 48)
    assert codes[0] == 7 and codes[16] == 7 and codes[17] == 4  # 2.5 ties to 2
    # Subnormal block scales: a block 1e-5 of the tensor amax takes E4M3 2^-9 * k.
    x = np.zeros(32, np.float32)
    x[0], x[16] = 1.0, 1e-6
    q = qt.quantize(x, qt.NVFP4())
    assert q.scales.tolist()[1] == 1  # clamped up to 2^-9, the smallest E4M3


def test_ragged_last_block_is_pad_free():
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    for kind, n_blocks in (("mxfp4", 2), ("nvfp4", 3)):
        q = qt.quantize(x, kind)
        assert q.scales.shape == (3, n_blocks)
        assert q.codes.shape == (60,)  # 120 codes, no padding
        assert_matches_reference(q, x, "float32", kind, -1)


@pytest.mark.parametrize("kind", sorted(FP4))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(kind, bad):
    x = np.ones((4, 64), np.float32)
    x[2, 5] = bad
    with pytest.raises(qt.QuantizationError, match="NaN or infinite"):
        qt.quantize(x, kind)


@pytest.mark.parametrize("kind", sorted(FP4))
def test_file_round_trip_slices_and_inspect(tmp_path, kind):
    x = np.random.default_rng(2).standard_normal((40, 70)).astype(np.float32)
    path = tmp_path / "m.qtensors"
    qt.save_file({"w": x, "b": x[0]}, path, quant=kind)
    want = qt.quantize(x, kind).dequantize()
    with qt.safe_open(path, "np") as f:
        assert np.array_equal(f.get_tensor("w"), want)
        assert np.array_equal(f.get_slice("w")[5:9, 17:50], want[5:9, 17:50])
        q = f.get_quantized("w")
        assert q.encoding["name"] == kind
        f.verify()
    from qtensors.inspect import format_file, inspect_file

    text = format_file(inspect_file(str(path)))
    want = "mxfp4 g32" if kind == "mxfp4" else "nvfp4 g16"
    assert want in text, text


def test_other_axis_groups_along_rows():
    x = np.random.default_rng(3).standard_normal((50, 6)).astype(np.float32)
    for kind in FP4:
        q = qt.quantize(x, FP4[kind](axis=0))
        assert q.scales.shape == (-(-50 // FP4[kind].group_size), 6)
        assert_matches_reference(q, x, "float32", kind, 0)


def _header_with(path, edit):
    data = bytearray(path.read_bytes())
    (hl,) = struct.unpack("<Q", data[16:24])
    h = json.loads(data[24 : 24 + hl])
    edit(h["tensors"][0]["encoding"])
    text = json.dumps(h, separators=(",", ":")).encode()
    assert len(text) <= hl
    path.write_bytes(bytes(data[:24]) + text.ljust(hl, b" ") + bytes(data[24 + hl :]))


@pytest.mark.parametrize(
    "key,value",
    [("group_size", 16), ("bits", 8), ("scale_dtype", "float16")],
)
def test_fixed_parameters_cannot_change(tmp_path, key, value):
    path = tmp_path / "m.qtensors"
    qt.save_file({"w": np.ones((4, 64), np.float32)}, path, quant="mxfp4")
    _header_with(path, lambda e: e.__setitem__(key, value))
    with pytest.raises(qt.FormatError, match="fixed"):
        qt.load_file(path)


def test_fixed_parameters_may_be_left_out(tmp_path):
    path = tmp_path / "m.qtensors"
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    qt.save_file({"w": x}, path, quant="nvfp4")
    _header_with(path, lambda e: [e.pop(k) for k in ("bits", "group_size", "scale_dtype")])
    assert np.array_equal(qt.load_file(path)["w"], qt.quantize(x, "nvfp4").dequantize())


# ------------------------------------------------------------------------------------------------
# the ecosystem's implementations
# ------------------------------------------------------------------------------------------------


def weights(seed: int, rows: int = 64, cols: int = 256, spread: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.exp(torch.randn(rows, 1, generator=g) * spread)


@pytest.mark.parametrize("seed,spread", [(0, 0.0), (1, 3.0), (2, 8.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_bytes_equal_torchao(seed, spread, dtype):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    x = weights(seed, spread=spread).to(dtype)
    scale, data = mx.to_mx(x, torch.float4_e2m1fn_x2, 32)
    q = qt.quantize(x, qt.MXFP4())
    assert np.array_equal(u8(q.scales), u8(scale))
    assert np.array_equal(u8(q.codes), u8(data))
    # And the other way: torchao's parts decode through our reader as torchao decodes them.
    want = mx.to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)
    got = qt.dequantize(
        qt.QuantizedTensor(
            data.view(torch.uint8).reshape(-1),
            scale.view(torch.uint8),
            None,
            tuple(x.shape),
            "float32",
            q.encoding,
            "pt",
        )
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_bytes_equal_torchao(seed):
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    # torchao clamps block scales to at least 2^-6 where this format (and ModelOpt) go down to
    # 2^-9, so the comparison uses blocks within 2^6 of the tensor's amax.
    x = weights(seed, rows=128, cols=512)
    g = nv.per_tensor_amax_to_scale(x.abs().max())
    scale, data = nv.nvfp4_quantize(x, 16, g)
    q = qt.quantize(x, qt.NVFP4())
    assert float(q.tensor_scale) == float(g)
    assert np.array_equal(u8(q.scales), u8(scale))
    assert np.array_equal(u8(q.codes), u8(data))


@pytest.mark.parametrize("seed,spread", [(0, 0.0), (1, 3.0), (2, 6.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nvfp4_bytes_equal_modelopt(seed, spread, dtype):
    mod = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    # (float16 holds a smaller range: the spread is capped so that it stays finite.)
    x = weights(seed, spread=min(spread, 2.0) if dtype == torch.float16 else spread).to(dtype)
    qm, scale, g = mod.NVFP4QTensor.quantize(x.clone(), 16)
    q = qt.quantize(x, qt.NVFP4())
    assert float(q.tensor_scale) == float(g)
    assert np.array_equal(u8(q.scales), u8(scale))
    assert np.array_equal(u8(q.codes), u8(qm._quantized_data))
    # ModelOpt decodes as the spec does: level * (scale * tensor scale), rounded once.
    want = qm.dequantize(torch.float32, scale=scale, double_scale=g, block_sizes={-1: 16})
    assert torch.equal(qt.dequantize(q).float(), want.to(dtype).float())


def test_mxfp4_decodes_as_gguf_after_repacking():
    """GGUF's MXFP4 block (spec 4.10): the E8M0 byte, then byte j holding elements j and j + 16,
    with doubled levels and a halved scale. Our parts, re-laid out so, decode through the gguf
    package's own dequantizer to our values."""
    quants = pytest.importorskip("gguf.quants")
    gguf = pytest.importorskip("gguf")
    x = weights(3, rows=8, cols=128, spread=4.0).numpy()
    q = qt.quantize(x, qt.MXFP4())
    codes = R.unpack_codes(q.codes, 4, x.size).reshape(-1, 2, 16).astype(np.uint8)
    blocks = np.concatenate([q.scales.reshape(-1, 1), codes[:, 0] | codes[:, 1] << 4], axis=1)
    got = quants.dequantize(blocks.reshape(8, -1), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(got.reshape(x.shape), q.dequantize())


@pytest.mark.parametrize("kind", sorted(FP4))
def test_torch_load_model_keeps_or_decodes(tmp_path, kind, monkeypatch):
    qtt = pytest.importorskip("qtensors.torch")
    # fp32 activations in the CPU matmul (its int8 kernel, which FP4 takes too, rounds them)
    monkeypatch.setattr("qtensors.torch.linear.CPU_INT8_ACTIVATIONS", False)
    m = torch.nn.Sequential(torch.nn.Linear(64, 16))
    path = tmp_path / "m.qtensors"
    qt.save_file(m.state_dict(), path, quant=kind)
    want = torch.from_numpy(qt.load_file(path)["0.weight"])
    x = torch.randn(3, 64)
    for keep in (False, True):
        m2 = torch.nn.Sequential(torch.nn.Linear(64, 16))
        result = qtt.load_model(m2, path, keep_quantized=keep)
        if keep:  # a QuantizedLinear through torch.ops.qtensors, decoding as the core does
            assert isinstance(m2[0], qtt.QuantizedLinear) and result.decoded == []
            assert torch.equal(m2[0].weight.dequantize(torch.float32), want)
            torch.testing.assert_close(m2(x), x @ want.t() + m[0].bias.detach())
        else:  # decoded by the torch op, equal to the Rust core's decode
            assert torch.equal(m2[0].weight.data, want)
            assert result.decoded == ["0.weight"]
    q = qtt.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 16)), kind)
    assert q[0].weight.encoding["name"] == kind
