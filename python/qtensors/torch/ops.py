"""``torch.ops.qtensors.dequantize``: decode group-quantized parts into a tensor, on any device.

    out = torch.ops.qtensors.dequantize(codes, scales, mins, shape, "affine", 4, 64, 0,
                                        torch.float16)

* CUDA: a Triton kernel (``kernels/dequant.py``), bit-exact with the spec (no fused
  multiply-add); plain torch when Triton is missing.
* CPU: the Rust core (``qtensors._core.decode``), bit-exact with the spec.
* any other device: plain torch (``dequantize_torch``), also bit-exact (no fused multiply-add).
* meta / FakeTensor: shape and dtype only, so the op traces under ``torch.compile``.

Arguments: ``codes`` is the packed uint8 code stream (1-D, ``ceil(N * bits / 8)`` bytes),
``scales`` (and ``mins`` for affine, else None) hold one value per group in the scale dtype
(float16, bfloat16 or float32) and any shape with the right number of elements; ``shape`` is the
tensor's shape, ``axis`` its group axis (negative allowed), ``out_dtype`` a floating dtype.

``dequantize`` (below) is the same with the dispatcher skipped in eager mode (modules use it).

``torch.ops.qtensors.linear(x, codes, scales, mins, bias, shape, encoding, bits, group_size,
axis)`` is ``F.linear(x, W, bias)`` for a 2-D quantized weight ``W`` of ``shape`` ``[out, in]``:
on CPU with float16, bfloat16 or float32 activations the Rust core multiplies by the packed
codes without decoding ``W`` to memory (``qtensors._core.linear``); elsewhere it decodes ``W`` in
the activations' dtype and calls ``F.linear``. ``linear`` (below) skips the dispatcher in eager
mode.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from ._layout import (
    BITS_RANGE,
    E2M1_LEVELS,
    NF4_LEVELS,
    codes_nbytes,
    group_layout,
    normalize_axis,
)

SCHEMA = (
    "(Tensor codes, Tensor scales, Tensor? mins, int[] shape, str encoding, int bits, "
    "int group_size, int axis, ScalarType out_dtype) -> Tensor"
)
SCALE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
OUT_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}

try:  # Triton is optional: without it CUDA tensors decode with plain torch
    from .kernels import dequant as _tk

    HAVE_TRITON = True
except Exception:
    _tk = None  # type: ignore[assignment]
    HAVE_TRITON = False


def check_args(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
) -> int:
    """Validate the arguments (raising ValueError naming the problem); returns the axis
    normalized."""
    if encoding not in BITS_RANGE:
        raise ValueError(f"unknown encoding {encoding!r}: expected one of {sorted(BITS_RANGE)}")
    lo, hi = BITS_RANGE[encoding]
    if not lo <= bits <= hi:
        raise ValueError(f"{encoding}: bits must be in {lo}..{hi}, not {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, not {group_size}")
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {list(shape)}")
    a = normalize_axis(axis, len(shape))
    if out_dtype not in OUT_DTYPES:
        raise ValueError(
            f"out_dtype must be a floating dtype ({list(OUT_DTYPES)}), not {out_dtype}"
        )
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, not {codes.dtype}")
    want = codes_nbytes(shape, bits)
    if codes.numel() != want:
        raise ValueError(
            f"codes has {codes.numel()} bytes; shape {list(shape)} at {bits} bits needs {want}"
        )
    want_scales = FP4_SCALE_DTYPES.get(encoding)
    if want_scales is not None:
        if scales.dtype != want_scales:
            raise ValueError(f"{encoding} scales must be {want_scales}, not {scales.dtype}")
    elif scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be float16, bfloat16 or float32, not {scales.dtype}")
    P, _, Q, G = group_layout(shape, a, group_size)
    if scales.numel() != P * G * Q:
        raise ValueError(f"scales has {scales.numel()} values, {P * G * Q} groups expected")
    if encoding == "affine":
        if mins is None:
            raise ValueError("affine needs mins")
        if mins.dtype != scales.dtype or mins.numel() != scales.numel():
            raise ValueError("mins must have the dtype and size of scales")
    elif encoding == "nvfp4":  # the per-tensor scale goes where mins go
        if mins is None or mins.dtype != torch.float32 or mins.numel() != 1:
            raise ValueError("nvfp4 needs its tensor_scale (one float32) in place of mins")
    elif mins is not None:
        raise ValueError(f"{encoding} has no mins")
    for name, t in (("scales", scales), ("mins", mins)):
        if t is not None and t.device != codes.device:
            raise ValueError(f"{name} is on {t.device}, codes on {codes.device}")
    return a


# ------------------------------------------------------------------------------------------------
# plain torch (any device): the same math, op by op
# ------------------------------------------------------------------------------------------------


def unpack_codes_torch(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of the LSB-first bit stream ``codes`` (uint8), as uint8 (bits <= 8)
    or int64 values."""
    codes = codes.reshape(-1)
    mask = (1 << bits) - 1
    if bits == 8:
        return codes[:n]
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return ((codes[:, None] >> shifts) & mask).reshape(-1)[:n]
    # 8 codes fill exactly `bits` bytes: read each run of `bits` bytes as one 64-bit word
    n8 = -(-n // 8)
    padded = torch.zeros(n8 * bits, dtype=torch.uint8, device=codes.device)
    padded[: codes.numel()] = codes
    b = padded.reshape(n8, bits).to(torch.int64)
    word = torch.zeros(n8, dtype=torch.int64, device=codes.device)
    for k in range(bits):
        word |= b[:, k] << (8 * k)
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int64, device=codes.device)
    return ((word[:, None] >> shifts) & mask).reshape(-1)[:n]


def _expand_groups(v: torch.Tensor, P: int, L: int, Q: int, G: int, g: int) -> torch.Tensor:
    """Per-group values (P*G*Q) -> per-element fp32 values (P, L, Q): group k covers rows
    [k*g, (k+1)*g) of the axis, the last one cut at L (ragged)."""
    v = v.reshape(P, G, 1, Q).to(torch.float32)
    return v.expand(P, G, g, Q).reshape(P, G * g, Q)[:, :L]


FP4_SCALE_DTYPES = {"mxfp4": torch.uint8, "nvfp4": torch.float8_e4m3fn}


def codebook_scales(encoding: str, scales: torch.Tensor, mins: torch.Tensor | None):
    """The fp32 scale each group's level is multiplied by: NF4's own; MXFP4's E8M0 byte ``b`` as
    ``2^(b - 127)`` (255: NaN); NVFP4's ``E4M3 scale * tensor_scale`` rounded once (spec 4.9).
    Every product ``level * scale`` then matches the spec's decoding bit for bit."""
    if encoding == "mxfp4":
        b = scales.to(torch.int32)
        one = torch.ones_like(b, dtype=torch.float32)
        pow2 = torch.ldexp(one, b - 127)
        return torch.where(b == 255, torch.full_like(pow2, float("nan")), pow2)
    if encoding == "nvfp4":
        assert mins is not None
        return scales.to(torch.float32) * mins.reshape(()).to(torch.float32)
    return scales


def _levels_of(encoding: str, device: torch.device) -> torch.Tensor:
    table = NF4_LEVELS if encoding == "nf4" else E2M1_LEVELS
    return torch.tensor(table, dtype=torch.float32, device=device)


def dequantize_torch(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The spec's decoding in plain torch ops (no fused multiply-add: bit-exact)."""
    shape = [int(d) for d in shape]
    P, L, Q, G = group_layout(shape, axis, group_size)
    n = P * L * Q
    if n == 0:
        return torch.empty(shape, dtype=out_dtype, device=codes.device)
    c = unpack_codes_torch(codes, bits, n).reshape(P, L, Q)
    s = _expand_groups(scales, P, L, Q, G, group_size)
    if encoding == "affine":
        assert mins is not None
        m = _expand_groups(mins, P, L, Q, G, group_size)
        out = c.to(torch.float32) * s
        out = out + m
    elif encoding == "symmetric":
        out = (c.to(torch.int32) - (1 << (bits - 1))).to(torch.float32) * s
    else:  # a codebook: NF4 levels or FP4 values, times the group's fp32 scale
        s = _expand_groups(codebook_scales(encoding, scales, mins), P, L, Q, G, group_size)
        out = _levels_of(encoding, codes.device)[c.to(torch.int64)] * s
    return out.to(out_dtype).reshape(shape)


def quantize_affine_torch(
    x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spec's affine encoding (4.5) along the last axis in plain torch ops (any device),
    for ``bits`` dividing 8 and rows of whole bytes: ``(codes, scales, mins)`` with ``codes``
    of shape ``[..., D * bits / 8]`` (each row's slice of the code stream) and the scales and
    mins ``[..., G]``. No NaN / Inf check: the Rust core's encoder is the one that refuses
    them."""
    D = x.shape[-1]
    G = -(-D // group_size)
    qmax = (1 << bits) - 1
    xf = x.to(torch.float32)
    pad = G * group_size - D
    lead = xf.shape[:-1]
    lo = torch.nn.functional.pad(xf, (0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(xf, (0, pad), value=float("-inf"))
    lo = lo.reshape(*lead, G, group_size).amin(-1)
    hi = hi.reshape(*lead, G, group_size).amax(-1)
    m = lo.to(scale_dtype).to(torch.float32) + 0.0
    s = ((hi - lo) / qmax).to(scale_dtype).to(torch.float32) + 0.0
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    m_e = m.repeat_interleave(group_size, -1)[..., :D]
    inv_e = inv.repeat_interleave(group_size, -1)[..., :D]
    code = torch.round((xf - m_e) * inv_e).clamp_(0, qmax).to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=x.device)
    packed = (code.reshape(*lead, D // per, per) << shifts).sum(-1).to(torch.uint8)
    return packed, s.to(scale_dtype), m.to(scale_dtype)


# ------------------------------------------------------------------------------------------------
# CPU: the Rust core
# ------------------------------------------------------------------------------------------------


def _byte_view(t: torch.Tensor):
    """A contiguous CPU tensor's bytes as a numpy uint8 array (no copy when already so)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def encoding_dict(encoding: str, bits: int, group_size: int, axis: int, scale_dtype: str) -> dict:
    """The header ``encoding`` object (spec section 2)."""
    d: dict[str, Any] = {"name": encoding, "group_size": group_size, "axis": axis}
    if encoding != "nf4":
        d["bits"] = bits
    d["scale_dtype"] = scale_dtype
    return d


def dequantize_cpu(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Rust core's decoding; ``out`` (contiguous, ``shape`` and ``out_dtype``) receives the
    values when given."""
    from .. import _core

    shape = [int(d) for d in shape]
    if out is None:
        out = torch.empty(shape, dtype=out_dtype)
    elif not out.is_contiguous() or list(out.shape) != shape or out.dtype != out_dtype:
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape}")
    if out.numel() == 0:
        return out
    fp4_names = {"mxfp4": "uint8", "nvfp4": "float8_e4m3fn"}
    scale_dtype = fp4_names.get(encoding) or SCALE_DTYPES[scales.dtype]
    enc = encoding_dict(encoding, bits, group_size, axis, scale_dtype)
    parts = [_byte_view(codes), _byte_view(scales)]
    if mins is not None:
        parts.append(_byte_view(mins))
    _core.decode(parts, OUT_DTYPES[out_dtype], shape, json.dumps(enc), out=_byte_view(out))
    return out


# ------------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("qtensors::dequantize", mutates_args=(), schema=SCHEMA)
def dequantize_op(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    a = check_args(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype)
    return dequantize_torch(codes, scales, mins, shape, encoding, bits, group_size, a, out_dtype)


@dequantize_op.register_kernel("cpu")
def _dequantize_cpu_kernel(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype):
    a = check_args(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype)
    return dequantize_cpu(codes, scales, mins, shape, encoding, bits, group_size, a, out_dtype)


@dequantize_op.register_kernel("cuda")
def _dequantize_cuda_kernel(
    codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype
):
    a = check_args(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype)
    if not HAVE_TRITON:
        return dequantize_torch(
            codes, scales, mins, shape, encoding, bits, group_size, a, out_dtype
        )
    return _tk.dequantize_triton(
        codes.contiguous(),
        scales.contiguous(),
        None if mins is None else mins.contiguous(),
        shape,
        encoding,
        bits,
        group_size,
        a,
        out_dtype,
    )


@dequantize_op.register_fake
def _dequantize_fake(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype):
    check_args(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype)
    return codes.new_empty([int(d) for d in shape], dtype=out_dtype)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``torch.ops.qtensors.dequantize``, calling the CPU / CUDA implementation directly in eager
    mode on plain tensors (the dispatcher costs some 20 us a call, more than the kernel of a
    small layer); under ``torch.compile``, fake or wrapped tensors it goes through the op."""
    if type(codes) is torch.Tensor and not torch.compiler.is_compiling():
        kind = codes.device.type
        if kind == "cuda":
            return _dequantize_cuda_kernel(
                codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype
            )
        if kind == "cpu":
            return _dequantize_cpu_kernel(
                codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype
            )
    return dequantize_op(codes, scales, mins, shape, encoding, bits, group_size, axis, out_dtype)
