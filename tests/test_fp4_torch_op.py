"""MXFP4 and NVFP4 through ``torch.ops.qtensors.dequantize``: the Triton kernels (under the
interpreter in a child process), plain torch and the Rust core all give the Rust core's decoding
bit for bit, and ``stream`` decodes FP4 tensors with the op."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import qtensors as qt
from qtensors.torch.ops import dequantize_cpu, dequantize_torch

CHILD = r"""
import sys, torch
import qtensors as qt
from qtensors.torch.kernels import dequant
from qtensors.torch.ops import dequantize_torch
CASES = [(qt.MXFP4(), (5, 70)), (qt.NVFP4(), (3, 50)), (qt.MXFP4(axis=0), (40, 6))]
for enc, shape in CASES:
    x = torch.randn(*shape) * 3
    x[0, :3] = 0.0
    q = qt.quantize(x, enc)
    want = q.dequantize()
    p = q.parts()
    e = q.encoding
    mins = p[2] if len(p) > 2 else None
    args = (list(shape), e["name"], 4, e["group_size"], e["axis"] % 2)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        # the stored scales, decoded in the kernel
        got = dequant.dequantize_triton(p[0], p[1], mins, *args, dt)
        bits = torch.int32 if dt == torch.float32 else torch.int16
        ok = torch.equal(got.view(bits), want.to(dt).view(bits))
        print(e["name"], dt, "OK" if ok else "MISMATCH")
for name, K in (("mxfp4", 512), ("nvfp4", 256)):
    # every scale byte (E8M0 0 and 255; E4M3 subnormals, negatives, NaN) as plain torch reads it
    codes = torch.randint(0, 256, (16 * K // 2,), dtype=torch.uint8)
    s = torch.arange(256).to(torch.uint8)
    s = s if name == "mxfp4" else s.view(torch.float8_e4m3fn)
    mins = torch.tensor([0.37]) if name == "nvfp4" else None
    args = (codes, s, mins, [16, K], name, 4, 32 if name == "mxfp4" else 16, 1, torch.float32)
    got = dequant.dequantize_triton(*args)
    ref = dequantize_torch(*args)
    same = torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
    print(name, "scale bytes", "OK" if same else "MISMATCH")
"""


def fp4_parts(enc, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    x[0, 0] = 0.0
    q = qt.quantize(x, enc)
    p = q.parts()
    e = q.encoding
    mins = p[2] if len(p) > 2 else None
    return q, (p[0], p[1], mins, list(shape), e["name"], 4, e["group_size"], e["axis"])


@pytest.mark.parametrize("enc", [qt.MXFP4(), qt.NVFP4(), qt.MXFP4(axis=0)], ids=str)
@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_and_rust_paths_match_the_core(enc, dt):
    q, args = fp4_parts(enc, (6, 96), seed=1)
    want = q.dequantize().to(dt)
    for got in (dequantize_torch(*args, dt), dequantize_cpu(*args, dt)):
        assert got.dtype == dt
        assert torch.equal(got.float(), want.float())
        assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_triton_kernel_matches_the_core():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 11 and all(ln.endswith("OK") for ln in lines), p.stdout


def test_stream_decodes_fp4_with_the_op(tmp_path):
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    path = tmp_path / "fp4.qtensors"
    qt.save_file({"m": x, "n": x}, path, quant={"m": qt.MXFP4(), "n": qt.NVFP4()})
    want = qt.load_file(path)
    got = dict(qt.stream(path, device="cpu"))
    for k in ("m", "n"):
        np.testing.assert_array_equal(got[k].numpy(), want[k])


def test_op_checks_fp4_arguments():
    _, args = fp4_parts(qt.NVFP4(), (4, 32), seed=2)
    codes, scales, _, shape, name, bits, g, axis = args
    with pytest.raises(ValueError, match="tensor_scale"):
        dequantize_torch  # noqa: B018
        torch.ops.qtensors.dequantize(
            codes, scales, None, shape, name, bits, g, axis, torch.float32
        )
    with pytest.raises(ValueError, match="mxfp4 scales must be"):
        torch.ops.qtensors.dequantize(
            codes, scales, None, shape, "mxfp4", bits, 32, axis, torch.float32
        )
