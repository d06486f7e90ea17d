"""The CPU matmul (``torch.ops.qtensors.linear`` / ``qtensors._core.linear``) against
decode-then-matmul: every encoding, bits 2-8, ragged groups, odd shapes, batches 1, 3, 8, 33,
float32 / float16 / bfloat16 activations, and ``QuantizedLinear`` using it on CPU. Exact mode
(fp32 activations) within fp32 accumulation error; the default integer kernel (int8
activations) within the activations' rounding bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtensors as qt
from qtensors import _core
from qtensors.torch import QuantizedLinear
from qtensors.torch import linear as linear_mod
from qtensors.torch.linear import linear, linear_op

ENCODINGS = [
    qt.Affine(bits=4, group_size=64, axis=-1),
    qt.Symmetric(bits=4, group_size=32, axis=-1),
    qt.NF4(group_size=64, axis=-1),
    qt.Affine(bits=2, group_size=16, axis=-1),
    qt.Affine(bits=3, group_size=64, axis=-1, scale_dtype="bfloat16"),
    qt.Symmetric(bits=5, group_size=48, axis=-1),
    qt.Affine(bits=6, group_size=64, axis=-1, scale_dtype="float32"),
    qt.Symmetric(bits=7, group_size=64, axis=-1),
    qt.Affine(bits=8, group_size=128, axis=-1),
    qt.FLEXGEN,
    qt.Symmetric(bits=8, group_size=32, axis=0),
]
# (out, in): the packed kernel's shapes, a ragged last group, odd sizes; (70, 96): groups along
# the outputs (FlexGen, 64 rows) ragged, inputs in whole blocks of 32 (outgroups.rs)
SHAPES = [(48, 256), (17, 160), (9, 100), (13, 37), (70, 96)]


@pytest.fixture
def exact(monkeypatch):
    """fp32 activations throughout (no int8 kernel)."""
    monkeypatch.setattr(linear_mod, "CPU_INT8_ACTIVATIONS", False)


def ident(e) -> str:
    return f"{e.name}{e.bits}-g{e.group_size}-ax{e.axis}"


def weight(shape, enc) -> QuantizedLinear:
    torch.manual_seed(hash((shape, ident(enc))) % 2**31)
    lin = nn.Linear(shape[1], shape[0])
    return QuantizedLinear.from_linear(lin, enc).requires_grad_(False)


def args(q: QuantizedLinear):
    w, e = q.weight, q.weight.encoding
    return (
        w.codes, w.scales, w.mins, q.bias, list(w.shape),
        e["name"], w.bits, int(e["group_size"]), int(e["axis"]),
    )  # fmt: skip


@pytest.mark.parametrize("enc", ENCODINGS, ids=ident)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3, 8, 33])
def test_matches_decode_then_matmul(enc, shape, batch, exact):
    q = weight(shape, enc)
    x = torch.randn(batch, shape[1])
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.double())
    got = linear(x, *args(q))
    assert got.dtype == torch.float32 and got.shape == (batch, shape[0])
    # fp32 accumulation: error within n * eps * sum |w x|
    bound = (x.double().abs() @ w.abs().T + q.bias.double().abs()) * (shape[1] + 2) * 2**-23
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("enc", [ENCODINGS[0], qt.FLEXGEN], ids=ident)
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("n_in", [1800, 1792])
def test_large_layer_across_threads(enc, batch, n_in, exact):
    # beyond the core's INLINE_MAX_MACS (2^20) the rows are split across the rayon pool (the
    # smaller shapes above run on the calling thread): the same values either way. 1792
    # inputs (whole blocks of 32): FlexGen's batch-1 kernel (outgroups.rs) too
    q = weight((608, n_in), enc)
    x = torch.randn(batch, n_in)
    got = linear(x, *args(q))
    rows = torch.cat([linear(x[i : i + 1], *args(q)) for i in range(batch)])
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.double())
    bound = (x.double().abs() @ w.abs().T + q.bias.double().abs()) * (n_in + 2) * 2**-23
    assert ((got.double() - want).abs() <= bound).all()
    assert ((rows.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("enc", [*ENCODINGS[:3], qt.FLEXGEN], ids=ident)
def test_half_activations(enc, dtype, exact):
    q = weight((40, 192), enc)
    x = torch.randn(2, 3, 192).to(dtype)  # leading dimensions are kept
    got = linear(x, *args(q))
    assert got.dtype == dtype and got.shape == (2, 3, 40)
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.to(dtype).double())
    eps = 2**-10 if dtype == torch.float16 else 2**-7
    bound = (x.double().abs() @ w.abs().T + 1) * (192 * 2**-23 + eps)
    assert ((got.double() - want).abs() <= bound).all()


def test_op_dispatch_and_fake():
    q = weight((24, 64), ENCODINGS[0])
    x = torch.randn(4, 64)
    torch.testing.assert_close(linear_op(x, *args(q)), linear(x, *args(q)))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fa = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args(q)]
        out = linear_op(fx, *fa)
    assert out.shape == (4, 24) and out.dtype == torch.float32


def test_quantized_linear_uses_it_without_grad():
    q = weight((32, 128), ENCODINGS[2])
    x = torch.randn(3, 128)
    with torch.no_grad():
        got = q(x)
    torch.testing.assert_close(got, linear(x, *args(q)), rtol=0, atol=0)
    # With gradients wanted it decodes and calls F.linear, which autograd can differentiate.
    q.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    y.sum().backward()
    assert xg.grad is not None and q.bias.grad is not None
    torch.testing.assert_close(y.detach(), got, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    q = weight((8, 64), ENCODINGS[0])
    a = list(args(q))
    with pytest.raises(ValueError):
        linear(torch.randn(2, 64), a[0][:-1], *a[1:])  # codes too short
    with pytest.raises(ValueError, match="63 features"):
        linear(torch.randn(2, 63), *a)


INT8_ENCODINGS = [
    qt.Affine(bits=4, group_size=64, axis=-1),
    qt.Affine(bits=4, group_size=32, axis=-1),
    qt.Symmetric(bits=4, group_size=128, axis=-1, scale_dtype="bfloat16"),
    qt.Symmetric(bits=4, group_size=32, axis=-1, levels="full"),
    qt.Affine(bits=8, group_size=64, axis=-1, scale_dtype="float32"),
    qt.Symmetric(bits=8, group_size=32, axis=-1),
    # through int8 tables of their levels: exact for E2M1 (NVFP4: blocks of 16), within 0.5/127
    # of the scale for NF4
    qt.NF4(group_size=64, axis=-1),
    qt.NF4(group_size=32, axis=-1, scale_dtype="float32"),
    qt.MXFP4(axis=-1),
    qt.NVFP4(axis=-1),
]


def table_moves(w: torch.Tensor, enc) -> torch.Tensor:
    """How far the int8 kernel may move each weight: 0, or for NF4 (its levels rounded to
    multiples of 1/127) half a step of 1/127 of the group's scale, which is its largest decoded
    magnitude (the group's absmax decodes to +-scale)."""
    if enc.name != "nf4":
        return torch.zeros_like(w)
    g = min(enc.group_size, w.shape[1])
    s = w.abs().reshape(w.shape[0], -1, g).amax(-1).repeat_interleave(g, -1)[:, : w.shape[1]]
    return s * 0.5 / 127


def int8_bound(x: torch.Tensor, w: torch.Tensor, enc=None) -> torch.Tensor:
    """|y_int8 - y| <= sum_i |w_i| * max|x| over i's block of 32 / 254, and fp32 error; plus,
    with NF4's table moving w_i by up to d_i, sum_i d_i * (|x_i| + that step)."""
    d = torch.zeros_like(w) if enc is None else table_moves(w, enc)
    xd = x.double().reshape(-1, x.shape[-1])
    step = xd.abs().reshape(xd.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1) / 254
    fp32 = (xd.abs() @ (w.abs() + d).T) * (x.shape[-1] + 8) * 2**-23
    return (step @ (w.abs() + d).T) * 1.001 + xd.abs() @ d.T + fp32


@pytest.mark.skipif(not _core.linear_int8_available(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("enc", INT8_ENCODINGS, ids=ident)
@pytest.mark.parametrize("shape", [(48, 256), (19, 576)], ids=str)
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_int8_activations_within_rounding(enc, shape, batch):
    q = weight(shape, enc)
    x = torch.randn(batch, shape[1])
    x[:, 7] *= 30  # an outlier channel: its blocks get coarser steps
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.double())
    got = linear(x, *args(q))
    err = (got.double() - want).abs()
    assert (err <= int8_bound(x, w, enc)).all()
    # the integer kernel is what ran: exact mode gives other (closer) values
    linear_mod.CPU_INT8_ACTIVATIONS = False
    try:
        exact_y = linear(x, *args(q))
    finally:
        linear_mod.CPU_INT8_ACTIVATIONS = True
    assert not torch.equal(exact_y, got)
    assert (exact_y.double() - want).abs().max() < err.max()


@pytest.mark.skipif(not _core.linear_int8_available(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 20])
@pytest.mark.parametrize(
    "enc", [INT8_ENCODINGS[0], qt.MXFP4(axis=-1), qt.NVFP4(axis=-1)], ids=ident
)
def test_int8_half_activations(dtype, batch, enc):
    # (FP4 in bf16 past the int8 kernel's usual 16 rows too: decoding it would cost more)
    q = weight((40, 192), enc)
    x = torch.randn(batch, 192).to(dtype)
    got = linear(x, *args(q))
    assert got.dtype == dtype and got.shape == (batch, 40)
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.to(dtype).double())
    eps = 2**-10 if dtype == torch.float16 else 2**-7
    bound = int8_bound(x, w) + (want.abs() + 1e-30) * eps
    assert ((got.double() - want).abs() <= bound).all()
    if enc.name != "affine":  # the int8 kernel ran, not decode + F.linear
        exact = F.linear(x, q.weight.dequantize(dtype), q.bias.to(dtype))
        assert not torch.equal(got, exact)


def test_int8_non_finite_activations_propagate():
    q = weight((16, 128), INT8_ENCODINGS[0])
    x = torch.randn(2, 128)
    x[0, 5], x[1, 77] = float("nan"), float("inf")
    assert not linear(x, *args(q)).isfinite().any()


@pytest.mark.skipif(not _core.linear_int8_available(), reason="needs AVX-512 VNNI")
def test_int8_rows_independent_of_batch_and_threads():
    # each row is quantized on its own and each output summed in one fixed order, so a row's
    # result is the same alone or in a batch of 11 (tiles of 8 + 3), inline or across the pool
    q = weight((608, 1792), INT8_ENCODINGS[1])
    x = torch.randn(11, 1792)
    got = linear(x, *args(q))
    rows = torch.cat([linear(x[i : i + 1], *args(q)) for i in range(11)])
    assert torch.equal(got, rows)
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.double())
    assert ((got.double() - want).abs() <= int8_bound(x, w)).all()


@pytest.mark.skipif(not _core.linear_int8_available(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize(
    "enc, shape, applies",
    [
        (INT8_ENCODINGS[0], (8, 256), True),
        (INT8_ENCODINGS[5], (8, 576), True),
        (qt.Affine(bits=4, group_size=96, axis=-1), (8, 576), False),  # 3 blocks a group
        (qt.Affine(bits=4, group_size=32, axis=-1), (8, 160), False),  # not whole 64s
        (qt.NF4(group_size=64, axis=-1), (8, 256), True),
        (qt.MXFP4(axis=-1), (8, 256), True),
        (qt.MXFP4(axis=-1), (8, 160), False),  # not whole 64s
        (qt.NVFP4(axis=-1), (8, 256), True),  # blocks of 16: half an activation block
        (qt.NVFP4(axis=-1), (8, 160), False),
        (qt.Affine(bits=3, group_size=64, axis=-1), (8, 256), False),
    ],
    ids=str,
)
def test_python_mirror_of_the_int8_conditions(enc, shape, applies):
    # linear_cpu routes half-precision batches by _int8_applies; the core decides by its own
    # Plan::new: the int8 kernel ran exactly when the results differ from exact mode
    q = weight(shape, enc)
    a = args(q)
    assert linear_mod._int8_applies(a[5], a[6], a[7], 1, a[4]) == applies
    x = torch.randn(3, shape[1])
    got = linear(x, *a)
    linear_mod.CPU_INT8_ACTIVATIONS = False
    try:
        exact_y = linear(x, *a)
    finally:
        linear_mod.CPU_INT8_ACTIVATIONS = True
    assert torch.equal(got, exact_y) != applies


@pytest.mark.skipif(not _core.linear_int8_available(), reason="needs AVX-512 VNNI")
@pytest.mark.parametrize("dtype, rows", [(torch.bfloat16, 12), (torch.float16, 32)])
def test_int8_half_batches_of_large_weights(dtype, rows):
    # half precision beyond the GEMV batches: the int8 kernel (bf16 up to 16 rows, fp16 at
    # every batch), not decode + GEMM
    q = weight((2048, 2048), INT8_ENCODINGS[0])
    assert linear_mod._cpu_route(True, 2048, 2048, dtype, rows) == "int8"
    x = torch.randn(rows, 2048).to(dtype)
    got = linear(x, *args(q))
    w = q.weight.dequantize(torch.float64)
    want = F.linear(x.double(), w, q.bias.to(dtype).double())
    bound = int8_bound(x, w) + (want.abs() + 1e-30) * 2**-7
    assert ((got.double() - want).abs() <= bound).all()
    decoded = linear_mod.linear_dequantize(x, *args(q))
    assert not torch.equal(got, decoded)


BF16_TILES = pytest.mark.skipif(not _core.linear_bf16_available(), reason="needs AVX-512 BF16")


@BF16_TILES
@pytest.mark.parametrize("enc", ENCODINGS, ids=ident)
@pytest.mark.parametrize("shape", [*SHAPES, (70, 1030)], ids=str)
@pytest.mark.parametrize("rows", [9, 33])
def test_bf16_tiles_match_decode_to_bf16_then_matmul(enc, shape, rows, exact):
    # bf16 batches beyond the GEMV: the weight decoded to bf16 tile by tile (as dequantize gives
    # it in bf16) times the bf16 activations, fp32 sums: decode-then-matmul in bf16
    q = weight(shape, enc)
    assert linear_mod._cpu_route(False, *shape, torch.bfloat16, rows) == "exact"
    x = torch.randn(rows, shape[1]).to(torch.bfloat16)
    got = linear(x, *args(q))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, shape[0])
    w = q.weight.dequantize(torch.bfloat16).double()
    b = q.bias.to(torch.bfloat16).double()
    want = F.linear(x.double(), w, b)
    # fp32 sums, then the output's rounding to bf16
    bound = (x.double().abs() @ w.abs().T + b.abs()) * (shape[1] + 2) * 2**-23
    assert ((got.double() - want).abs() <= bound + want.abs() * 2**-8 + 1e-30).all()


@BF16_TILES
def test_bf16_routes_by_shape():
    route = linear_mod._cpu_route
    assert route(True, 4096, 4096, torch.bfloat16, 1) == "int8"  # GEMV batches
    assert route(True, 4096, 4096, torch.bfloat16, 16) == "int8"
    assert route(True, 4096, 4096, torch.bfloat16, 32) == "exact"  # bf16 tiles
    assert route(True, 384, 384, torch.bfloat16, 16) == "exact"
    assert route(False, 384, 384, torch.bfloat16, 64) == "exact"
    assert route(False, 384, 384, torch.bfloat16, 480) == "decode"  # torch's GEMM
    assert route(False, 4096, 4096, torch.bfloat16, 480) == "exact"  # a 32 MiB bf16 copy
    assert route(True, 384, 384, torch.float16, 480) == "int8"  # torch's fp16 GEMM is slow
    assert route(False, 384, 384, torch.float16, 480) == "exact"
    assert route(True, 384, 384, torch.float32, 480) == "int8"
    assert route(True, 384, 384, torch.float64, 1) == "decode"
