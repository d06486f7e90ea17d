"""QuantizedWeight / QuantizedLinear / QuantizedEmbedding: forward against the reference decode,
state_dict and torch.save round trips, device / dtype moves, torch.compile."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import QuantizedEmbedding, QuantizedLinear, QuantizedWeight

ENCODINGS = [
    qt.FLEXGEN,
    qt.Affine(bits=4, group_size=64, axis=-1),
    qt.Affine(bits=3, group_size=16, axis=-1, scale_dtype="bfloat16"),
    qt.Symmetric(bits=8, group_size=32, axis=0, scale_dtype="float32"),
    qt.NF4(group_size=64, axis=-1),
]


def reference_weight(linear: nn.Linear | nn.Embedding, enc) -> torch.Tensor:
    """The weight as the Rust core quantizes and decodes it (independent of qtensors.torch)."""
    q = qt.quantize(linear.weight.detach(), enc, framework="pt")
    return qt.dequantize(q, framework="pt")


@pytest.mark.parametrize("enc", ENCODINGS, ids=lambda e: f"{e.name}{e.bits}-ax{e.axis}")
def test_linear_forward(enc):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = QuantizedLinear.from_linear(lin, enc)
    x = torch.randn(5, 96)
    want = F.linear(x, reference_weight(lin, enc), lin.bias)
    # the CPU multiplies by the packed codes (fp32 sums in its own order): equal up to rounding
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-6)
    # half inputs decode the weight in half
    y = q(x.half())
    assert y.dtype == torch.float16
    assert q.in_features == 96 and q.out_features == 40


def test_linear_state_dict_round_trip():
    torch.manual_seed(1)
    src = QuantizedLinear.from_linear(nn.Linear(64, 48), qt.FLEXGEN)
    sd = src.state_dict()
    assert set(sd) == {
        "weight.codes",
        "weight.scales",
        "weight.mins",
        "weight._extra_state",
        "bias",
    }
    assert sd["weight.codes"].dtype == torch.uint8
    assert sd["weight._extra_state"]["encoding"]["name"] == "affine"
    # a module built with another encoding takes the incoming one
    dst = QuantizedLinear(64, 48, encoding=qt.NF4(group_size=32))
    assert dst.weight.mins is None
    dst.load_state_dict(sd)
    assert dst.weight.encoding == src.weight.encoding
    assert dst.weight.op_args == src.weight.op_args == ((48, 64), "affine", 4, 64, 0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd2 = torch.load(buf, weights_only=True)
    dst2 = QuantizedLinear(64, 48, encoding=qt.Symmetric(bits=8, group_size=16))
    dst2.load_state_dict(sd2)
    torch.testing.assert_close(dst2(x), src(x), rtol=0, atol=0)
    # assign=True on a meta module
    with torch.device("meta"):
        meta = QuantizedLinear(64, 48)
    meta.load_state_dict(sd, assign=True)
    torch.testing.assert_close(meta(x), src(x), rtol=0, atol=0)


def test_missing_key_reported():
    src = QuantizedLinear.from_linear(nn.Linear(32, 16), qt.FLEXGEN)
    sd = src.state_dict()
    del sd["weight.scales"]
    dst = QuantizedLinear(32, 16)
    res = dst.load_state_dict(sd, strict=False)
    assert "weight.scales" in res.missing_keys
    with pytest.raises(RuntimeError, match=r"weight\.scales"):
        QuantizedLinear(32, 16).load_state_dict(sd)


def test_dtype_moves_keep_parts():
    q = QuantizedLinear.from_linear(nn.Linear(32, 16), qt.Affine(scale_dtype="float32"))
    scales = q.weight.scales.clone()
    q.half()
    assert q.weight.scales.dtype == torch.float32 and torch.equal(q.weight.scales, scales)
    assert q.weight.dtype == torch.float16 and q.bias.dtype == torch.float16
    assert q.weight.dequantize().dtype == torch.float16
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.codes.dtype == torch.uint8
    q2 = copy.deepcopy(q)
    assert q2.weight.encoding == q.weight.encoding
    assert torch.equal(q2.weight.codes, q.weight.codes)


def test_copies_and_pickles_carry_no_plan():
    """A layer's per-weight plans (kept on its codes tensor after a call) stay with the original:
    ``copy.deepcopy`` and pickling a used model work even where a plan holds what cannot be
    copied (a kept launch's CUDA tensor map; here a lock), and the copy builds its own plan and
    gives the same result."""
    import pickle
    import threading

    from qtensors.torch import linear as lin

    torch.manual_seed(3)
    q = QuantizedLinear.from_linear(nn.Linear(64, 16), qt.Affine(bits=4, group_size=32))
    x = torch.randn(3, 64)
    y = q(x)
    codes = q.weight.codes
    assert isinstance(codes._qt_cpu_plan, lin._CpuPlan)
    # a CUDA plan's kept launches hold tensor maps; built here on the CPU parts
    w = q.weight
    cuda_plan = lin._CudaPlan(codes, w.scales, w.mins, list(w.shape), *w.op_args[1:])
    cuda_plan.gemm16s[("kept",)] = threading.Lock()
    codes._qt_cuda_plan = cuda_plan
    with pytest.raises(TypeError):
        pickle.dumps(cuda_plan.gemm16s)
    twin = copy.deepcopy(q)
    assert twin.weight.codes._qt_cpu_plan is None and twin.weight.codes._qt_cuda_plan is None
    assert torch.equal(twin(x), y) and twin.weight.codes._qt_cpu_plan is not None
    back = pickle.loads(pickle.dumps(q))
    assert getattr(back.weight.codes, "_qt_cuda_plan", None) is None
    assert torch.equal(back(x), y)
    assert codes._qt_cuda_plan is cuda_plan  # the original keeps its own


def test_quantized_weight_to_quantized_and_file(tmp_path):
    torch.manual_seed(2)
    lin = nn.Linear(80, 24)
    q = QuantizedLinear.from_linear(lin, qt.Affine(bits=4, group_size=16, axis=0))
    path = tmp_path / "w.qtensors"
    qt.save_file({"w": q.weight.to_quantized()}, path)
    with qt.safe_open(path, framework="pt") as f:
        back = QuantizedWeight.from_quantized(f.get_quantized("w"))
    torch.testing.assert_close(back.dequantize(), q.weight.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(qt.load_file(path, framework="pt")["w"], q.weight.dequantize())
    # numpy parts too
    with qt.safe_open(path, framework="np") as f:
        back_np = qtt.dequantize(f.get_quantized("w"))
    torch.testing.assert_close(back_np, q.weight.dequantize(), rtol=0, atol=0)


def test_from_parts_checks_sizes():
    q = QuantizedLinear.from_linear(nn.Linear(32, 16), qt.FLEXGEN).weight
    with pytest.raises(ValueError, match="codes"):
        QuantizedWeight.from_parts(q.codes[:-1], q.scales, q.mins, (16, 32), q.encoding)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight.from_parts(q.codes, q.scales.float(), q.mins, (16, 32), q.encoding)


@pytest.mark.parametrize(
    "enc,dim",
    [
        (qt.Affine(bits=4, group_size=8, axis=-1), 24),  # rows on byte boundaries: gather
        (qt.Affine(bits=4, group_size=4, axis=0), 24),  # groups along the vocabulary: gather
        (qt.Affine(bits=3, group_size=5, axis=-1), 13),  # rows not byte aligned: full decode
        (qt.NF4(group_size=16, axis=-1), 32),
        (qt.Symmetric(bits=8, group_size=3, axis=0), 10),
    ],
)
def test_embedding(enc, dim):
    torch.manual_seed(3)
    emb = nn.Embedding(50, dim, padding_idx=1)
    q = QuantizedEmbedding.from_embedding(emb, enc)
    ids = torch.tensor([[0, 5, 49, 5], [1, 2, 3, 48]])
    want = F.embedding(ids, reference_weight(emb, enc))
    torch.testing.assert_close(q(ids), want, rtol=0, atol=0)
    assert q.padding_idx == 1 and q(ids).shape == (2, 4, dim)
    many = torch.randint(0, 50, (60,))  # more ids than rows: decoded whole
    torch.testing.assert_close(q(many), F.embedding(many, reference_weight(emb, enc)))


def test_quantize_model_and_save_load(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=16), embeddings=True, skip=("3",))
    assert isinstance(model[0], QuantizedEmbedding) and isinstance(model[1], QuantizedLinear)
    assert isinstance(model[3], nn.Linear)
    ids = torch.tensor([[1, 2, 3]])
    want = model(ids)
    path = tmp_path / "m.qtensors"
    qtt.save_model(model, path)
    with qt.safe_open(path) as f:
        assert f.encoding("1.weight")["group_size"] == 16
        assert f.encoding("3.weight")["name"] == "affine"  # default policy (FLEXGEN)
    # into a model that already has the quantized modules
    with torch.device("meta"):
        fresh = nn.Sequential(
            QuantizedEmbedding(30, 16), QuantizedLinear(16, 32), nn.ReLU(), nn.Linear(32, 8)
        )
    res = qtt.load_model(fresh, path, device="cpu")
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(fresh[:3](ids), model[:3](ids), rtol=0, atol=0)
    assert fresh(ids).shape == want.shape


def test_torch_compile_linear():
    torch.manual_seed(5)
    q = QuantizedLinear.from_linear(nn.Linear(64, 32), qt.FLEXGEN)
    x = torch.randn(4, 64)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)
    # the compiled call guards on the weight's static arguments (``op_args``): loading another
    # encoding into the module must recompile, not replay the old layout
    other = QuantizedLinear.from_linear(nn.Linear(64, 32), qt.NF4(group_size=32))
    q.load_state_dict(other.state_dict())
    assert q.weight.op_args[1:] == ("nf4", 4, 32, 1)
    torch.testing.assert_close(compiled(x), other(x), rtol=0, atol=0)
