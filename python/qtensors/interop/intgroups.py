"""Integer weights with a scale and zero point per group (GPTQ, AWQ, compressed-tensors), mapped
onto our encodings without loss.

Every such format decodes `x = (q - z) * s`: unsigned code q, integer zero z, float scale s of
the group, computed in the scale's dtype (fp16 or bf16, one rounding). Our decode computes
`code * s + m` exactly in fp32 and rounds once to the logical dtype, so with the logical dtype
set to the scale's dtype:

* z = 2^(bits-1) for every group -> `symmetric` with levels "full": x = (code - 2^(bits-1)) * s,
  the same decode, codes and scales copied.
* otherwise -> `affine` with code = q, scale = s and min m = -z * s. m is exact in fp32 (at
  most 9 + 11 significant bits), so `code * s + m = (q - z) * s` exactly in fp32. The mins
  are stored in the source's scale dtype when every -z * s of the tensor is representable there
  (z a power of two, or small z times a short scale), else scales and mins in float32 (the
  scales widened exactly): the tensor decodes bit for bit either way.

Act-order (`g_idx` not in column order): our groups are runs of consecutive columns, so the
permutation is folded, exactly: the group size becomes the longest run length g' (dividing the
row) on which g_idx is constant, and each run gets its group's scale (and zero) repeated. With a
real act-order permutation g' is usually 1, which keeps the weights exact but stores a scale per
element; we chose this over a permutation part because no kernel of ours applies one yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..encodings import Affine, Encoding, Symmetric
from ..errors import ForeignFormatError


@dataclass
class IntGroups:
    """One 2-D weight `[out, in]` as a foreign format holds it, unpacked: x = (q - z) * s. The
    codes (the bulk) are packed separately, by `codes_part`."""

    shape: tuple[int, int]  #: (out, in)
    scales: np.ndarray  #: (out, groups) float64 holding the stored scale values exactly
    scale_dtype: str  #: "float16", "bfloat16" or "float32": the dtype the source computes in
    zeros: np.ndarray | None  #: (out, groups) integer zero points; None: 2^(bits-1)
    bits: int
    group_size: int
    g_idx: np.ndarray | None = None  #: (in,) group of each input column; None: column order


@dataclass
class Mapped:
    encoding: Encoding
    scale_parts: list[np.ndarray]  #: scales (and mins): the parts after the codes
    dtype: str  #: the logical dtype: the source's scale dtype, so decodes agree bit for bit
    note: str  #: how it was mapped, for the report


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in row-major order -> our LSB-first bit stream (spec 4.2)."""
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return flat
    if bits == 4:
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        return flat[0::2] | (flat[1::2] << 4)
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def as_dtype_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values exact in `dtype` -> an array of that dtype (bf16 as uint16 bits)."""
    f32 = values.astype(np.float32)
    if dtype == "float16":
        return f32.astype(np.float16)
    if dtype == "bfloat16":
        return (f32.view(np.uint32) >> 16).astype(np.uint16)
    return f32


def exact_in(values: np.ndarray, dtype: str) -> bool:
    """Whether every float64 value is finite and representable in `dtype` exactly."""
    if not np.all(np.isfinite(values)):
        return False
    f32 = values.astype(np.float32)
    if not np.array_equal(f32.astype(np.float64), values):
        return False
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return bool(np.array_equal(f32.astype(np.float16).astype(np.float32), f32))
    if dtype == "bfloat16":
        return not np.any(f32.view(np.uint32) & 0xFFFF)
    return True


def fold_g_idx(g: IntGroups, fmt: str, name: str) -> tuple[IntGroups, str]:
    """`g` with its groups as runs of consecutive columns (see the module doc)."""
    cols = g.shape[1]
    n_groups = g.scales.shape[1]
    if g.g_idx is None:
        return g, ""
    gi = np.asarray(g.g_idx).astype(np.int64).reshape(-1)
    if gi.shape != (cols,) or gi.min(initial=0) < 0 or gi.max(initial=0) >= n_groups:
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: g_idx must hold {cols} group numbers in 0..{n_groups - 1}"
        )
    natural = np.arange(cols) // g.group_size
    if np.array_equal(gi, natural):  # column order: nothing to fold
        return IntGroups(g.shape, g.scales, g.scale_dtype, g.zeros, g.bits, g.group_size), ""
    run = 1
    for cand in range(cols, 0, -1):  # the longest aligned run on which g_idx is constant
        if cols % cand == 0 and np.all(gi.reshape(-1, cand) == gi[::cand, None]):
            run = cand
            break
    first = gi[::run]
    zeros = None if g.zeros is None else g.zeros[:, first]
    folded = IntGroups(g.shape, g.scales[:, first], g.scale_dtype, zeros, g.bits, run)
    return folded, f"act-order g_idx folded: group size {g.group_size} -> {run}"


def map_exact(g: IntGroups, fmt: str, name: str) -> Mapped:
    """The encoding and scale parts that decode exactly as the source does (module doc)."""
    g, note = fold_g_idx(g, fmt, name)
    out, cols = g.shape
    groups = -(-cols // g.group_size)
    if g.scales.shape != (out, groups):
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: scales of shape {list(g.scales.shape)}, expected "
            f"{[out, groups]} for a weight {[out, cols]} in groups of {g.group_size}"
        )
    if not np.all(np.isfinite(g.scales)):
        raise ForeignFormatError(f"{fmt} tensor {name!r}: a scale is not finite")
    half = 1 << (g.bits - 1)
    notes = [note] if note else []
    if g.bits >= 2 and (g.zeros is None or np.all(g.zeros == half)):
        enc: Encoding = Symmetric(
            bits=g.bits,
            group_size=g.group_size,
            axis=-1,
            scale_dtype=g.scale_dtype,
            levels="full",
        )
        parts = [as_dtype_bytes(g.scales, g.scale_dtype)]
        notes.insert(0, f"zero {half} everywhere: symmetric")
        return Mapped(enc, parts, g.scale_dtype, "; ".join(notes))
    if g.zeros is None:
        g.zeros = np.full((out, groups), half, np.int64)
    if g.zeros.shape != (out, groups):
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: zero points of shape {list(g.zeros.shape)}, expected "
            f"{[out, groups]}"
        )
    mins = -g.zeros.astype(np.float64) * g.scales + 0.0  # exact in float64; + 0.0: no -0
    sd = g.scale_dtype if exact_in(mins, g.scale_dtype) else "float32"
    enc = Affine(bits=g.bits, group_size=g.group_size, axis=-1, scale_dtype=sd)
    parts = [as_dtype_bytes(g.scales, sd), as_dtype_bytes(mins, sd)]
    if sd == g.scale_dtype:
        notes.insert(0, f"affine, min = -zero*scale exact in {sd}")
    else:
        notes.insert(0, f"affine, min = -zero*scale not exact in {g.scale_dtype}: fp32 scale+min")
    return Mapped(enc, parts, g.scale_dtype, "; ".join(notes))


def codes_part(codes: np.ndarray, bits: int, shape: tuple[int, int], fmt: str, name: str):
    """The codes part of a weight from its unpacked (out, in) codes, checked."""
    if codes.shape != shape:
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: {list(codes.shape)} codes for a weight {list(shape)}"
        )
    return pack_codes(codes, bits)
