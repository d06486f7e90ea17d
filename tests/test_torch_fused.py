"""The fused matmul kernels (``torch.ops.qtensors.linear``'s CUDA path) on the CPU under
``TRITON_INTERPRET=1``, against decode-then-matmul in fp32; the op on the CPU; torch.compile.

The interpreter is chosen when Triton's ``jit`` decorates a kernel, so the kernels run in child
processes (``fused_child.py``) that set the variable before importing them. Every path: the
CUDA-core GEMV, its split-K reduction, the ``tl.dot`` GEMM (with and without split-K), the
tensor-core kernel of ``mma.py``, and the
configurations picked from the shape; every encoding the kernels take (affine / symmetric 4 and
8 bits, NF4, groups along either dim), odd shapes, batch 1/3/16/33, fp16/bf16/fp32 activations,
with and without bias.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtensors as qt
from qtensors import quantized as Q
from qtensors.torch import QuantizedLinear
from qtensors.torch.linear import linear_op
from qtensors.torch.ops import dequantize

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(
    "group",
    [
        "gemv",
        "splitk",
        "gemm",
        "dispatch",
        "tiled-fma",
        "tiled-words",
        "tiled-int8",
        "tiled-int8-variants",
        "tiled-dot",
        "tiled-dispatch",
        "mma",
        "mma-int8",
    ],
)
def test_fused_kernels_match_decode_then_matmul(group):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), TESTS_DIR) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS_DIR, "fused_child.py"), group],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] > 0
    assert not result["failures"], "\n".join(result["failures"])


@pytest.mark.parametrize(
    "enc",
    [
        qt.FLEXGEN,
        qt.NF4(group_size=32, axis=-1),
        qt.Symmetric(bits=4, group_size=32, axis=-1, levels="full"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_cpu(enc, dtype):
    torch.manual_seed(3)
    lin = nn.Linear(96, 40)
    q = QuantizedLinear.from_linear(lin, enc)
    x = torch.randn(2, 5, 96, dtype=dtype)
    want = F.linear(x.float(), q.weight.dequantize(torch.float32), q.bias.float())
    # the Rust matmul accumulates in fp32 in its own order: equal within rounding
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q(x).float(), want, rtol=tol, atol=tol)
    assert q(x).dtype == dtype and q(x).shape == (2, 5, 40)


def test_linear_op_rejects_bad_arguments():
    q = QuantizedLinear.from_linear(nn.Linear(64, 8), qt.FLEXGEN)
    w = q.weight
    args = (w.codes, w.scales, w.mins, None, [8, 64], "affine", 4, 64, 0)
    with pytest.raises(ValueError, match="features"):
        linear_op(torch.randn(3, 32), *args)
    with pytest.raises(ValueError, match="bias"):
        linear_op(torch.randn(3, 64), *args[:3], torch.zeros(7), *args[4:])


def test_linear_op_backward(exact_cpu_matmul):
    torch.manual_seed(4)
    q = QuantizedLinear.from_linear(nn.Linear(64, 16), qt.Affine(bits=4, group_size=32, axis=-1))
    x = torch.randn(3, 64, requires_grad=True)
    q(x).square().sum().backward()
    w = q.weight.dequantize(torch.float32).detach()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    F.linear(x2, w, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.bias.grad, b2.grad)


def test_torch_compile_fullgraph_one_op():
    """fullgraph tracing of a QuantizedLinear (the fake impl) leaves one qtensors.linear call."""
    torch.manual_seed(6)
    q = QuantizedLinear.from_linear(nn.Linear(64, 24), qt.Affine(bits=4, group_size=32, axis=-1))
    q.requires_grad_(False)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(5, 64)
    compiled = torch.compile(q, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)
    assert "qtensors.linear.default" in seen
    assert not any("dequantize" in s for s in seen)


@pytest.mark.parametrize("enc", [qt.MXFP4(), qt.NVFP4()], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_op_cpu_fp4(enc, dtype):
    """The op on the CPU takes FP4 parts as stored (E8M0 / E4M3 scales, NVFP4's tensor scale)."""
    torch.manual_seed(5)
    q = Q.quantize(torch.randn(40, 96), enc, framework="pt")
    p = q.parts()
    name = q.encoding["name"]
    tscale = p[2].reshape(1) if len(p) > 2 else None
    w = dequantize(p[0], p[1], tscale, [40, 96], name, 4, enc.group_size, 1, torch.float32)
    x = torch.randn(3, 96, dtype=dtype)
    got = linear_op(x, p[0], p[1], tscale, None, [40, 96], name, 4, enc.group_size, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), F.linear(x.float(), w), rtol=tol, atol=tol)


def test_route_follows_the_dispatch_settings(monkeypatch):
    """``launch.route``: the tiled kernels up to TILED_MAX_M rows, a "decode" table entry and
    NF4 on the dot kernel go to decode + cuBLAS; the words kernel takes at most 4 rows."""
    pytest.importorskip("triton")
    from qtensors.torch.kernels import launch as L

    def route(M, N=64, K=128, enc="affine"):
        L.route.cache_clear()
        return L.route(M, N, K, enc, 4, 64, 1, True)

    monkeypatch.setattr(L, "TILED_MAX_M", 16)
    monkeypatch.setattr(L, "FMA_MAX_M", 4)
    assert route(1) == route(4) == route(16) == "tiled"
    assert route(17) == "decode"
    assert route(16, enc="nf4") == "decode" and route(4, enc="nf4") == "tiled"
    monkeypatch.setitem(L.TILED_TABLE, (4, 64, 128), L.TiledConfig("decode"))
    assert route(3) == route(4) == "decode" and route(2) == "tiled"
    assert route(1, K=100) == "gemv"  # K not whole words: the byte-tile GEMV

    # fp16 / bf16 activations: the tensor-core kernel from MMA_ROUTED's batch to MMA_MAX_M
    def half(M, enc="affine", g=64, N=64, K=128):
        L.route.cache_clear()
        return L.route(M, N, K, enc, 4, g, 1, True, True)

    assert half(3) == half(16) == half(32) == half(16, "symmetric") == "mma"
    assert half(1) == half(2) == half(2, "symmetric") == "tiled"  # the words kernel
    assert half(33) == "decode"  # 33-64 rows: only wide weights
    assert half(64, N=8192, K=4096) == "mma" and half(65, N=8192, K=4096) == "decode"
    # GEMM16_ROWS (on by default: 65-256; None: off) on GEMM16_TABLE's weights only:
    # gemm16_gluon.py, int4 affine / symmetric in groups of 64k; decode + cuBLAS elsewhere
    big = dict(N=8192, K=8192)
    assert L.GEMM16_ROWS == L.GEMM16_ROWS_ON
    monkeypatch.setattr(L, "GEMM16_ROWS", None)
    assert half(100, **big) == "decode"
    monkeypatch.setattr(L, "GEMM16_ROWS", L.GEMM16_ROWS_ON)
    assert half(65, **big) == half(256, "symmetric", 128, **big) == "gemm16"
    assert half(257, **big) == "decode" and half(200, N=4096, K=4096) == "decode"
    assert half(100, "nf4", **big) == half(100, "mxfp4", 32, **big) == "decode"
    assert half(100, g=32, **big) == "decode"  # groups not whole steps of 64
    assert route(100, **big) == "decode"  # fp32 activations: exact decode + matmul
    assert L.gemm16_config(100, 8192, 8192) == L.GEMM16_TABLE[(128, 8192, 8192)]
    assert L.gemm16_config(129, 8192, 8192) == L.GEMM16_TABLE[(256, 8192, 8192)]
    monkeypatch.setitem(L.GEMM16_TABLE, (128, 64, 128), L.Gemm16Config())
    assert half(100) == "gemm16" and half(100, K=96) == "decode"  # K not a multiple of 64
    monkeypatch.setitem(L.GEMM16_TABLE, (128, 64, 192), L.Gemm16Config())
    assert half(100, K=192) == "gemm16" and half(100, g=128, K=192) == "decode"  # a part group
    # a weight of GEMM16_REGS_TABLE alone takes the route too (gemm16_regs_gluon.py runs it)
    regs = dict(N=14336, K=4096)
    monkeypatch.delitem(L.GEMM16_TABLE, (128, 14336, 4096))
    assert L.gemm16_config(100, **regs) is None and half(100, **regs) == "gemm16"
    assert L.gemm16_regs_config(100, **regs) == L.GEMM16_REGS_TABLE[(128, 14336, 4096)]
    assert L.gemm16_regs_config(200, **regs) == L.GEMM16_REGS_TABLE[(256, 14336, 4096)]
    assert L.gemm16_regs_config(100, 2048, 2048) is None and half(100, N=2048, K=2048) == "decode"
    # 4096^2: the 128-row bucket only (at 256 rows decode + cuBLAS was as fast)
    assert half(100, N=4096, K=4096) == "gemm16" and half(200, N=4096, K=4096) == "decode"
    monkeypatch.setattr(L, "GEMM16_ROWS", None)
    assert half(100) == half(200, **big) == half(100, **regs) == "decode"
    monkeypatch.delitem(L.GEMM16_TABLE, (128, 64, 128))
    monkeypatch.delitem(L.GEMM16_TABLE, (128, 64, 192))
    assert half(3, "mxfp4", 32) != "mma" and half(4, "mxfp4", 32) == "mma"
    assert half(16, "nvfp4", 16) != "mma" and half(16, "nf4") != "mma"
    assert route(16) == "tiled"  # fp32 activations never take it

    # int8 activations (INT8_ACTIVATIONS, passed by the caller): the int8 kernel's 1-4 rows of
    # affine / symmetric / NF4 / FP4 codes in whole 64-bit units go to the tiled path first
    def int8(M, enc="affine", g=64, K=128, bits=4):
        L.route.cache_clear()
        return L.route(M, 64, K, enc, bits, g, 1, True, True, True)

    assert int8(3) == int8(4) == int8(4, "symmetric") == int8(2, bits=8, g=32) == "tiled"
    assert int8(4, "mxfp4", 32) == int8(4, "nvfp4", 16) == int8(3, "nf4") == "tiled"
    assert int8(5) == "mma" and int8(3, K=136) == "mma"  # K not whole 64-bit units
    assert int8(5, "mxfp4", 32) == "mma"
    assert not L.int8_shape(2, 128, "affine", 8, 4)  # groups smaller than a unit: words.py
    assert half(3) == "mma"  # the switch off
    L.route.cache_clear()
    with pytest.raises(ValueError, match="64-bit units"):
        words = L.TiledConfig("words8", 0, 4, 8)
        L._tiled_plan(1, 64, 128, "affine", 4, 64, torch.float16, False, -1, words, True)
    with pytest.raises(ValueError, match="int8 words kernel"):
        words = L.TiledConfig("words8", 0, 4, 64)
        L._tiled_plan(5, 64, 128, "nf4", 4, 64, torch.float16, False, -1, words, True)
    with pytest.raises(ValueError, match="words kernel"):
        words = L.TiledConfig("words", 0, 4, 64)
        L._tiled_plan(5, 64, 128, "affine", 4, 64, torch.float16, False, -1, words, True)
    with pytest.raises(ValueError, match="word pairs"):  # one word a step: 8 codes
        words = L.TiledConfig("words", 0, 4, 8)
        L._tiled_plan(1, 64, 128, "affine", 4, 64, torch.float16, False, -1, words, True)


def test_int8_variant_switches(monkeypatch):
    """``words_int8.py``'s options as the launch configuration carries them: per-K kernels by
    default and nothing else, each switch, ``INT8_TABLE`` first, what the plan refuses, the
    constexprs it passes; the interleaved scales and the plan that holds them (kernels: group
    ``tiled-int8-variants``)."""
    pytest.importorskip("triton")
    from qtensors.torch import linear as lin
    from qtensors.torch.kernels import launch as L

    def config(M=1, N=4096, K=4096, bits=4):
        L.int8_config.cache_clear()
        return L.int8_config(M, N, K, -1, bits)

    routed = config()  # the default: per-K kernels, nothing else
    assert (routed.prefetch, routed.kspec, routed.l2_ahead, routed.pipeline) == (False, True, 0, 0)
    monkeypatch.setattr(L, "INT8_KSPEC", False)
    off = config()
    assert (off.prefetch, off.kspec, off.l2_ahead, off.pipeline) == (False, False, 0, 0)
    monkeypatch.setattr(L, "INT8_PREFETCH", True)
    monkeypatch.setattr(L, "INT8_KSPEC", True)
    assert config().prefetch and config().kspec
    assert not config(bits=8).prefetch  # two units a lane: too many registers
    monkeypatch.setattr(L, "INT8_PIPELINE", 2)
    assert config().pipeline == 2 and not config().prefetch  # prefetch yields to it
    table = L.TiledConfig("words8", 0, 8, 1024, 0, 2, 2, kspec=True)
    monkeypatch.setitem(L.INT8_TABLE, (1, 4096, 4096), table)
    assert config() is table and config(M=2) is not table and config(N=2048) is not table
    L.int8_config.cache_clear()

    def plan(cfg, enc="affine", paired=False, K=128):
        return L._tiled_plan(1, 64, K, enc, 4, 64, torch.float16, False, -1, cfg, True, paired)

    meta = plan(L.TiledConfig("words8", 0, 4, 64, kspec=True, l2_ahead=1, pipeline=3), K=192)[4]
    assert (meta["KSPEC"], meta["L2_AHEAD"], meta["PIPELINE"], meta["PAIRED"]) == (192, 1, 3, False)
    assert plan(L.TiledConfig("words8", 0, 4, 64, prefetch=True), paired=True)[4]["PAIRED"]
    with pytest.raises(ValueError, match="int8 words kernel's"):
        plan(L.TiledConfig("words", 0, 4, 64, prefetch=True))
    with pytest.raises(ValueError, match="2 or 3 stages"):
        plan(L.TiledConfig("words8", 0, 4, 64, pipeline=4))
    with pytest.raises(ValueError, match="without prefetch"):
        plan(L.TiledConfig("words8", 0, 4, 64, pipeline=2, prefetch=True))
    with pytest.raises(ValueError, match="for affine codes"):
        plan(L.TiledConfig("words8", 0, 4, 64), "symmetric", paired=True)

    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    m = -s
    assert L.paired_scales(s, m).tolist() == [1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0]
    with pytest.raises(ValueError, match="fp16 / bf16"):
        L.paired_scales(s.float(), m.float())
    codes = torch.zeros(2 * 128 // 2, dtype=torch.uint8)
    args = ([2, 128], "affine", 4, 64, 1)
    assert lin._CudaPlan(codes, s, m, *args).pairs is None  # PAIRED_SCALES off
    monkeypatch.setattr(L, "PAIRED_SCALES", True)
    p = lin._CudaPlan(codes, s, m, *args)
    assert torch.equal(p.pairs, L.paired_scales(s, m))
    assert lin._CudaPlan(codes, s, None, [2, 128], "symmetric", 4, 64, 1).pairs is None
    with torch.inference_mode():  # no version counter to see a change by: not paired
        si, mi = s.clone(), m.clone()
    assert lin._CudaPlan(codes, si, mi, *args).pairs is None


def test_int8_mma_switch(monkeypatch):
    """``mma_int8.py`` runs only inside ``INT8_MMA_ROWS`` (None: never), with
    ``INT8_ACTIVATIONS``, for fp16 / bf16 activations and affine / symmetric codes in whole groups
    of at least 64; its plan refuses what it cannot run."""
    pytest.importorskip("triton")
    from qtensors.torch.kernels import launch as L

    f16, f32 = torch.float16, torch.float32

    def applies(M, K=128, enc="affine", g=64, dt=f16, N=1 << 20):
        return L.int8_mma_applies(M, N, K, enc, g, dt)

    assert L.INT8_MMA_ROWS == (5, 64)  # the default, as measured on the H200
    monkeypatch.setattr(L, "INT8_MMA_ROWS", None)
    assert not applies(16)
    monkeypatch.setattr(L, "INT8_MMA_ROWS", (5, 64))
    assert applies(5) and applies(64, 256, "symmetric", 128, torch.bfloat16)
    assert not applies(4) and not applies(65)  # outside the rows
    assert not applies(17, N=(L.INT8_MMA_MIN_ELEMENTS // 128) - 1)  # a small weight: mma.py
    # up to 16 rows, from 16.8M elements (the Gluon kernel's measured win)
    assert L.INT8_MMA_NARROW_M == 16
    assert applies(16, N=L.INT8_MMA_NARROW_MIN_ELEMENTS // 128)
    assert not applies(16, N=(L.INT8_MMA_NARROW_MIN_ELEMENTS // 128) - 1)
    monkeypatch.setattr(L, "INT8_MMA_GLUON", False)  # the tl.dot kernel: 32M+ only
    assert not applies(16, N=L.INT8_MMA_NARROW_MIN_ELEMENTS // 128)
    monkeypatch.setattr(L, "INT8_MMA_GLUON", True)
    assert not applies(16, dt=f32)
    assert not applies(16, g=32)  # half a k-step a nibble half
    assert not applies(16, K=192, g=128)  # a ragged last group
    assert not applies(16, enc="mxfp4")
    monkeypatch.setattr(L, "INT8_ACTIVATIONS", False)
    assert not applies(16)
    with pytest.raises(ValueError, match="groups of at least 64"):
        L._mma_int8_plan(16, 64, 192, "affine", 128, False, -1, None, True)
    with pytest.raises(ValueError, match="block_n >= 64"):
        cfg = L.MmaConfig(16, 32, 1, 1, 4, 1)
        L._mma_int8_plan(16, 64, 128, "affine", 64, False, -1, cfg, True)


def test_cuda_path_checks_devices_and_reuses_the_weight_plan():
    """linear_cuda's cached weight side: parts on different devices, or x elsewhere, are named
    errors; the plan is rebuilt when the parts change."""
    from qtensors.torch import linear as lin

    w = torch.randn(8, 64)
    q = Q.quantize(w, qt.Affine(bits=4, group_size=32, axis=-1), framework="pt")
    c, s, m = q.parts()
    args = ([8, 64], "affine", 4, 32, 1)
    with pytest.raises(ValueError, match="several devices"):
        lin.linear_cuda(torch.randn(2, 64), c, s.to("meta"), m, None, *args)
    with pytest.raises(ValueError, match="several devices"):
        lin.linear_cuda(torch.randn(2, 64, device="meta"), c, s, m, None, *args)
    plan = lin._cuda_weight(c, s, m, *args)
    assert lin._cuda_weight(c, s, m, *args) is plan
    s2 = s.clone()
    assert lin._cuda_weight(c, s2, m, *args) is not plan
