"""Independent plain-numpy reference of the qtensors format.

Written only from ``spec/FORMAT.md``. It is deliberately simple (readability over speed) and meant
for small data: the test-suite compares the Rust core against it, and ``make_vectors.py`` writes the
spec's test vectors with it.

Conventions used here:

* A *logical* tensor is a numpy array of its dtype, except ``bfloat16`` (numpy has none), which is
  carried as ``np.uint16`` raw bits, and the float8 dtypes, carried as ``np.uint8`` raw bits.
* An *encoding dict* is the header's ``encoding`` object, e.g.
  ``{"name": "affine", "bits": 4, "group_size": 64, "axis": 0, "scale_dtype": "float16"}``.
  The reference accepts a negative axis in ``quantize`` (it normalizes); the file always holds the
  normalized one.
* All errors are ``ValueError`` (``ReferenceError`` below), with a message naming what is wrong.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct

import numpy as np
import xxhash

MAGIC = b"QTENSORS"
MAJOR = 1
MINOR = 1
PREAMBLE = 24
MAX_HEADER_LEN = 100 * 1024 * 1024
MAX_TENSORS = 1_000_000
MAX_NAME_BYTES = 1024
MAX_RANK = 32
U64_MAX = 2**64 - 1

# name -> (itemsize, numpy dtype used to carry the values, little-endian)
DTYPES = {
    "bool": (1, np.dtype("bool")),
    "uint8": (1, np.dtype("u1")),
    "int8": (1, np.dtype("i1")),
    "uint16": (2, np.dtype("<u2")),
    "int16": (2, np.dtype("<i2")),
    "uint32": (4, np.dtype("<u4")),
    "int32": (4, np.dtype("<i4")),
    "uint64": (8, np.dtype("<u8")),
    "int64": (8, np.dtype("<i8")),
    "float16": (2, np.dtype("<f2")),
    "bfloat16": (2, np.dtype("<u2")),  # raw bits
    "float32": (4, np.dtype("<f4")),
    "float64": (8, np.dtype("<f8")),
    "float8_e4m3fn": (1, np.dtype("u1")),  # raw bits
    "float8_e5m2": (1, np.dtype("u1")),  # raw bits
}
FLOAT_LOGICAL = ("float16", "bfloat16", "float32", "float64")
SCALE_DTYPES = ("float16", "bfloat16", "float32")

NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# mid[k] = (level[k] + level[k+1]) / 2, each operation in fp32
NF4_MIDS = ((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)).astype(np.float32)


class ReferenceError(ValueError):
    """Any error of the reference (bad input, malformed file)."""


F32 = np.float32


# ------------------------------------------------------------------------------------------------
# Scalar formats
# ------------------------------------------------------------------------------------------------


def fp32_to_bf16_bits(x) -> np.ndarray:
    """Round fp32 values to bfloat16 (round-to-nearest-even), returning the 16-bit patterns."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    upper = bits >> np.uint64(16)
    lower = bits & np.uint64(0xFFFF)
    # round up when the dropped half is above 0x8000, or exactly 0x8000 and the kept lsb is odd
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & np.uint64(1)) == 1))
    rounded = upper + round_up.astype(np.uint64)
    # NaN stays NaN (quiet bit set); the rounding above could turn a NaN payload into Inf
    is_nan = np.isnan(x)
    rounded = np.where(is_nan, upper | np.uint64(0x0040), rounded)
    return rounded.astype(np.uint16)


def bf16_bits_to_fp32(b) -> np.ndarray:
    """Widen bfloat16 bit patterns to fp32 (exact)."""
    b = np.asarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_fp32(x, dtype: str) -> np.ndarray:
    """Logical values -> fp32 (fp16/bf16 exactly, float64 rounded to nearest even)."""
    x = np.asarray(x)
    if dtype == "bfloat16":
        return bf16_bits_to_fp32(x)
    if dtype in ("float16", "float32", "float64"):
        with np.errstate(over="ignore"):
            return x.astype(np.float32)
    raise ReferenceError(f"dtype {dtype!r} cannot be quantized (need a float dtype)")


def from_fp32(v, dtype: str) -> np.ndarray:
    """fp32 values -> the logical dtype, rounded once to nearest even (bf16 as uint16 bits)."""
    v = np.asarray(v, dtype=np.float32)
    if dtype == "bfloat16":
        return fp32_to_bf16_bits(v)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16)
    if dtype == "float32":
        return v.copy()
    if dtype == "float64":
        return v.astype(np.float64)
    raise ReferenceError(f"dtype {dtype!r} is not a decodable float dtype")


def st(v, scale_dtype: str) -> np.ndarray:
    """Round fp32 ``v`` to ``scale_dtype`` (nearest even) and widen back to fp32."""
    v = np.asarray(v, dtype=np.float32)
    if scale_dtype == "float32":
        return v.copy()
    if scale_dtype == "float16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16).astype(np.float32)
    if scale_dtype == "bfloat16":
        return bf16_bits_to_fp32(fp32_to_bf16_bits(v))
    raise ReferenceError(f"unknown scale_dtype {scale_dtype!r}")


def scales_to_storage(v, scale_dtype: str) -> np.ndarray:
    """fp32 values that are already representable in ``scale_dtype`` -> stored array (bf16 as
    bits)."""
    v = np.asarray(v, dtype=np.float32)
    if scale_dtype == "float32":
        return v.astype("<f4")
    if scale_dtype == "float16":
        return v.astype("<f2")
    if scale_dtype == "bfloat16":
        return fp32_to_bf16_bits(v).astype("<u2")
    raise ReferenceError(f"unknown scale_dtype {scale_dtype!r}")


def storage_to_fp32(arr, scale_dtype: str) -> np.ndarray:
    """Stored scale/min array (or its bytes) -> fp32."""
    if isinstance(arr, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(arr), dtype=DTYPES[scale_dtype][1])
    arr = np.asarray(arr)
    if scale_dtype == "bfloat16":
        return bf16_bits_to_fp32(arr.view(np.uint16) if arr.dtype != np.uint16 else arr)
    if scale_dtype in ("float16", "float32"):
        return arr.astype(np.float32)
    raise ReferenceError(f"unknown scale_dtype {scale_dtype!r}")


# ------------------------------------------------------------------------------------------------
# Groups (spec 4.1)
# ------------------------------------------------------------------------------------------------


def prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def effective_shape(shape) -> tuple[int, ...]:
    """A rank-0 tensor is treated as shape [1]."""
    shape = tuple(int(d) for d in shape)
    return shape if len(shape) > 0 else (1,)


def normalize_axis(axis: int, rank: int) -> int:
    r = max(rank, 1)
    if not -r <= axis < r:
        raise ReferenceError(f"axis {axis} out of range for rank {rank}")
    return axis + r if axis < 0 else axis


def group_layout(shape, axis: int, group_size: int) -> tuple[int, int, int, int]:
    """(P, L, Q, G) of spec 4.1 for a tensor of ``shape`` grouped along ``axis``."""
    if group_size < 1:
        raise ReferenceError(f"group_size {group_size} must be >= 1")
    s = effective_shape(shape)
    a = normalize_axis(axis, len(shape))
    P = prod(s[:a])
    L = s[a]
    Q = prod(s[a + 1 :])
    G = (L + group_size - 1) // group_size  # ceil(L / g)
    return P, L, Q, G


def scale_shape(shape, axis: int, group_size: int) -> tuple[int, ...]:
    """Shape of the ``scales``/``mins`` parts: S with S[a] replaced by G (rank 0 -> [1])."""
    s = list(effective_shape(shape))
    a = normalize_axis(axis, len(shape))
    s[a] = group_layout(shape, axis, group_size)[3]
    return tuple(s)


def codes_length(n_elements: int, bits: int) -> int:
    return (n_elements * bits + 7) // 8


# ------------------------------------------------------------------------------------------------
# Bit packing (spec 4.2)
# ------------------------------------------------------------------------------------------------


def pack_codes(codes, bits: int) -> np.ndarray:
    """Pack codes (row-major order) into the LSB-first bit stream; returns uint8 of ceil(N*b/8)."""
    if not 1 <= bits <= 8:
        raise ReferenceError(f"bits {bits} out of range 1..8")
    codes = np.asarray(codes).reshape(-1).astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ReferenceError(f"a code does not fit in {bits} bits")
    n = codes.size
    # stream bit j = e*bits + i holds bit i of code e
    stream = np.zeros(codes_length(n, bits) * 8, dtype=np.uint8)
    for i in range(bits):
        j = np.arange(n, dtype=np.int64) * bits + i
        stream[j] = (codes >> i) & 1
    # stream bit j is bit (j mod 8) of byte floor(j / 8)
    weights = np.array([1 << k for k in range(8)], dtype=np.int64)
    out = (stream.reshape(-1, 8).astype(np.int64) * weights).sum(axis=1)
    return out.astype(np.uint8)


def unpack_codes(data, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``n`` codes (int64) out of the packed bytes."""
    if not 1 <= bits <= 8:
        raise ReferenceError(f"bits {bits} out of range 1..8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(bytes(data), dtype=np.uint8)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size != codes_length(n, bits):
        raise ReferenceError(f"codes has {data.size} bytes, expected {codes_length(n, bits)}")
    stream = np.zeros(data.size * 8, dtype=np.int64)
    for k in range(8):
        stream[k::8] = (data.astype(np.int64) >> k) & 1
    codes = np.zeros(n, dtype=np.int64)
    for i in range(bits):
        j = np.arange(n, dtype=np.int64) * bits + i
        codes |= stream[j] << i
    return codes


# ------------------------------------------------------------------------------------------------
# Encodings (spec 4.5 - 4.7)
# ------------------------------------------------------------------------------------------------


#: The FP4 block formats (spec 4.8, 4.9) fix everything but the axis: bits, group size, scale dtype.
FP4_FIXED = {"mxfp4": (4, 32, "uint8"), "nvfp4": (4, 16, "float8_e4m3fn")}


def encoding_params(enc: dict, rank: int) -> dict:
    """Validate an encoding dict and return it with a normalized axis."""
    name = enc.get("name")
    if name == "raw":
        return {"name": "raw"}
    if name in FP4_FIXED:
        out = dict(enc)
        for key, want in zip(("bits", "group_size", "scale_dtype"), FP4_FIXED[name], strict=True):
            if out.setdefault(key, want) != want:
                raise ReferenceError(f"{name}: {key} is fixed at {want!r}, got {out[key]!r}")
        if not _is_int(out.get("axis")):
            raise ReferenceError(f"{name}: axis {out.get('axis')!r} must be an integer")
        out["axis"] = normalize_axis(out["axis"], rank)
        return out
    if name not in ("affine", "symmetric", "nf4"):
        raise ReferenceError(f"unknown encoding {name!r}")
    out = dict(enc)
    if name == "nf4":
        if out.get("bits", 4) != 4:
            raise ReferenceError(f"nf4 bits must be 4, got {out.get('bits')!r}")
        out["bits"] = 4
    lo_bits = 1 if name == "affine" else 2
    bits = out.get("bits")
    if not _is_int(bits) or not lo_bits <= bits <= 8:
        raise ReferenceError(f"{name}: bits {bits!r} out of range {lo_bits}..8")
    g = out.get("group_size")
    if not _is_int(g) or g < 1:
        raise ReferenceError(f"{name}: group_size {g!r} must be an integer >= 1")
    if not _is_int(out.get("axis")):
        raise ReferenceError(f"{name}: axis {out.get('axis')!r} must be an integer")
    out["axis"] = normalize_axis(out["axis"], rank)
    if name == "symmetric" and out.get("levels", "balanced") not in ("balanced", "full"):
        raise ReferenceError(f"symmetric: levels {out.get('levels')!r} not 'balanced' or 'full'")
    if out.get("scale_dtype") not in SCALE_DTYPES:
        raise ReferenceError(
            f"{name}: scale_dtype {out.get('scale_dtype')!r} not one of {SCALE_DTYPES}"
        )
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _group_arrays(v32: np.ndarray, shape, axis: int, g: int):
    """Return v as (P, L, Q) and the group index of each l (length L)."""
    P, L, Q, G = group_layout(shape, axis, g)
    return v32.reshape(P, L, Q), group_index(L, g), G


def group_index(L: int, g: int) -> np.ndarray:
    """floor(l / g) for l in 0..L-1 (the group of each position along the axis)."""
    if g >= L:  # one (possibly ragged) group; also avoids huge integers in numpy
        return np.zeros(L, dtype=np.int64)
    return np.arange(L, dtype=np.int64) // g


def _per_group(v3: np.ndarray, G: int, g: int, fn) -> np.ndarray:
    """Apply reduction ``fn(segment, axis=1)`` to every group; result shape (P, G, Q)."""
    P, _, Q = v3.shape
    out = np.zeros((P, G, Q), dtype=np.float32)
    for k in range(G):
        seg = v3[:, k * g : min((k + 1) * g, v3.shape[1]), :]
        out[:, k, :] = fn(seg, axis=1)
    return out


def _inverse(s: np.ndarray) -> np.ndarray:
    """inv = (s == 0) ? 0 : 1 / s, in fp32."""
    with np.errstate(divide="ignore"):
        inv = (F32(1) / s).astype(np.float32)
    return np.where(s == 0, F32(0), inv).astype(np.float32)


def _check_finite(arr: np.ndarray, what: str, name: str):
    if not np.all(np.isfinite(arr)):
        raise ReferenceError(f"tensor {name!r}: {what} would not be finite")


def quantize(x, enc: dict, dtype: str | None = None, name: str = "tensor") -> dict:
    """Quantize a logical tensor per spec section 4.

    ``x`` is a numpy array (bfloat16 given as uint16 bits with ``dtype="bfloat16"``). Returns
    ``dict(codes=uint8 packed 1-D, scales=stored array of the scale shape, mins=... or None)``.
    """
    x = np.asarray(x)
    if dtype is None:
        dtype = str(x.dtype)
    if dtype not in FLOAT_LOGICAL:
        raise ReferenceError(f"tensor {name!r}: dtype {dtype} cannot be quantized")
    shape = x.shape
    p = encoding_params(enc, len(shape))
    kind, bits, g, axis, sd = p["name"], p["bits"], p["group_size"], p["axis"], p["scale_dtype"]
    v = to_fp32(x, dtype).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ReferenceError(f"tensor {name!r}: holds NaN or Inf (or overflows fp32)")
    v3, gidx, G = _group_arrays(v, shape, axis, g)
    sshape = scale_shape(shape, axis, g)
    if kind in FP4_FIXED:
        return fp4_quantize(kind, v3, gidx, G, g, sshape)

    if kind == "affine":
        qmax = F32(2**bits - 1)
        lo = _per_group(v3, G, g, np.min)
        hi = _per_group(v3, G, g, np.max)
        # "+ 0" stores a zero min or scale as +0.0 (spec 4.5), whichever zero min/max picked.
        m = (st(lo, sd) + F32(0)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            s = (st((hi - lo).astype(np.float32) / qmax, sd) + F32(0)).astype(np.float32)
        _check_finite(m, "a stored min", name)
        _check_finite(s, "a stored scale", name)
        inv = _inverse(s)
        t = ((v3 - m[:, gidx, :]).astype(np.float32) * inv[:, gidx, :]).astype(np.float32)
        codes = np.clip(np.rint(t), F32(0), qmax).astype(np.int64)
        return {
            "codes": pack_codes(codes.reshape(-1), bits),
            "scales": scales_to_storage(s, sd).reshape(sshape),
            "mins": scales_to_storage(m, sd).reshape(sshape),
        }

    if kind == "symmetric" and p.get("levels") == "full":
        # All 2^b levels (llama.cpp's Q4_0): the value of largest magnitude, the positive one on
        # a tie, goes to level -zero, so the scale is negative when that value is positive.
        zero = 2 ** (bits - 1)
        lo = _per_group(v3, G, g, np.min)
        hi = _per_group(v3, G, g, np.max)
        peak = np.where(hi >= -lo, hi, lo).astype(np.float32)
        s = (st((peak / F32(-zero)).astype(np.float32), sd) + F32(0)).astype(np.float32)
        _check_finite(s, "a stored scale", name)
        inv = _inverse(s)
        t = (v3 * inv[:, gidx, :]).astype(np.float32)
        codes = np.clip(np.rint(t), -zero, zero - 1).astype(np.int64) + zero
        return {
            "codes": pack_codes(codes.reshape(-1), bits),
            "scales": scales_to_storage(s, sd).reshape(sshape),
            "mins": None,
        }

    absmax = _per_group(np.abs(v3), G, g, np.max)
    if kind == "symmetric":
        qmax = F32(2 ** (bits - 1) - 1)
        zero = 2 ** (bits - 1)
        with np.errstate(over="ignore"):
            s = st((absmax / qmax).astype(np.float32), sd)
        _check_finite(s, "a stored scale", name)
        inv = _inverse(s)
        t = (v3 * inv[:, gidx, :]).astype(np.float32)
        codes = np.clip(np.rint(t), -qmax, qmax).astype(np.int64) + zero
    else:  # nf4
        s = st(absmax, sd)
        _check_finite(s, "a stored scale", name)
        inv = _inverse(s)
        t = (v3 * inv[:, gidx, :]).astype(np.float32)
        codes = nf4_code(t)
    return {
        "codes": pack_codes(codes.reshape(-1), bits),
        "scales": scales_to_storage(s, sd).reshape(sshape),
        "mins": None,
    }


# ------------------------------------------------------------------------------------------------
# FP4 block formats (spec 4.8 mxfp4, 4.9 nvfp4)
# ------------------------------------------------------------------------------------------------

#: E2M1 values by code (bit 3 the sign; code 8 is -0).
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _e4m3_table() -> np.ndarray:
    """The value of every E4M3 byte 0..126 (the non-negative finite ones), from the definition:
    bias 7, 3 mantissa bits, subnormals m * 2^-9."""
    out = []
    for b in range(127):
        e, m = b >> 3, b & 7
        out.append(m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(out, dtype=np.float64)


E4M3_VALUES = _e4m3_table()


def e4m3_byte(r) -> np.ndarray:
    """Non-negative fp32 values -> the nearest E4M3 byte (ties to the even byte), saturating at
    448 (byte 126): a search over the table, not bit arithmetic."""
    r = np.asarray(r, dtype=np.float64)
    d = np.abs(r[..., None] - E4M3_VALUES)
    best = d.min(axis=-1, keepdims=True)
    ties = d == best
    # Among the nearest (one, or two at a tie), the even byte.
    even = ties & (np.arange(127) % 2 == 0)
    pick = np.where(even.any(axis=-1), even.argmax(axis=-1), ties.argmax(axis=-1))
    return np.where(r >= 448.0, 126, pick).astype(np.uint8)


def e2m1_codes(x, t) -> np.ndarray:
    """Codes of elements ``x`` scaled to ``t``: the nearest E2M1 magnitude to |t| (ties to the
    even code), saturating at 6, with the sign bit of ``x < 0``."""
    a = np.abs(np.asarray(t, dtype=np.float64))[..., None]
    d = np.abs(a - E2M1[:8].astype(np.float64))
    best = d.min(axis=-1, keepdims=True)
    ties = d == best
    even = ties & (np.arange(8) % 2 == 0)
    mag = np.where(even.any(axis=-1), even.argmax(axis=-1), ties.argmax(axis=-1))
    mag = np.where(a[..., 0] >= 6, 7, mag)
    return (mag + 8 * (np.asarray(x) < 0)).astype(np.int64)


def e8m0_value(b) -> np.ndarray:
    """2^(b - 127) as fp32 (2^-127 is subnormal); 255 is NaN."""
    b = np.asarray(b).astype(np.int64)
    v = np.ldexp(np.float64(1), b - 127)
    return np.where(b == 255, np.nan, v).astype(np.float32)


def fp4_quantize(kind: str, v3: np.ndarray, gidx, G: int, g: int, sshape) -> dict:
    absmax = _per_group(np.abs(v3), G, g, np.max)
    if kind == "mxfp4":
        # floor(log2(amax)) from frexp (amax = f * 2^e, f in [0.5, 1)): e - 1; amax = 0 -> 0.
        _, e = np.frexp(absmax.astype(np.float64))
        biased = np.where(absmax == 0, 0, np.clip(e - 1 - 2 + 127, 0, 254)).astype(np.uint8)
        x_scale = e8m0_value(biased)[:, gidx, :].astype(np.float64)
        t = v3.astype(np.float64) / x_scale  # a power of two: exact
        return {
            "codes": pack_codes(e2m1_codes(v3, t).reshape(-1), 4),
            "scales": biased.reshape(sshape),
            "mins": None,
        }
    amax = np.float32(np.abs(v3).max()) if v3.size else F32(0)
    gs = max(np.float32(amax / F32(2688)), np.float32(2.0**-126))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (absmax / np.float32(F32(6) * gs)).astype(np.float32)
    s_bytes = e4m3_byte(np.clip(r, 2.0**-9, 448.0))
    s_bytes = np.where(r == 0, np.uint8(0x38), s_bytes).astype(np.uint8)  # 0x38 = 1.0
    s = E4M3_VALUES[s_bytes].astype(np.float32)
    d = (s * gs).astype(np.float32)[:, gidx, :]
    t = (v3 / d).astype(np.float32)  # fp32 division, rounded once
    return {
        "codes": pack_codes(e2m1_codes(v3, t).reshape(-1), 4),
        "scales": s_bytes.reshape(sshape),
        "mins": None,
        "tensor_scale": np.array(gs, dtype=np.float32),
    }


def fp4_block_scales(parts: dict, kind: str) -> np.ndarray:
    """The full fp32 scale of every block: 2^(b-127), or E4M3 value times the tensor scale."""
    raw = np.frombuffer(bytes(np.ascontiguousarray(parts["scales"])), dtype=np.uint8)
    if kind == "mxfp4":
        return e8m0_value(raw)
    s = np.where((raw & 0x7F) == 0x7F, np.nan, E4M3_VALUES[np.minimum(raw & 0x7F, 126)])
    s = np.where(raw & 0x80, -s, s).astype(np.float32)
    gs = np.frombuffer(bytes(np.ascontiguousarray(parts["tensor_scale"])), dtype="<f4")[0]
    return (s * gs).astype(np.float32)


def nf4_code(t) -> np.ndarray:
    """code = number of k in 0..14 with t > mid[k] (a value on a midpoint takes the lower level)."""
    t = np.asarray(t, dtype=np.float32)
    code = np.zeros(t.shape, dtype=np.int64)
    for k in range(15):
        code += (t > NF4_MIDS[k]).astype(np.int64)
    return code


def dequantize_fp32(parts: dict, enc: dict, shape) -> np.ndarray:
    """Decode the parts to fp32 values (before the final rounding to the logical dtype)."""
    shape = tuple(int(d) for d in shape)
    p = encoding_params(enc, len(shape))
    kind, bits, g, axis, sd = p["name"], p["bits"], p["group_size"], p["axis"], p["scale_dtype"]
    n = prod(shape)
    P, L, Q, G = group_layout(shape, axis, g)
    codes = unpack_codes(parts["codes"], bits, n).reshape(P, L, Q)
    gidx = group_index(L, g)
    if kind in FP4_FIXED:
        s = fp4_block_scales(parts, kind).reshape(P, G, Q)[:, gidx, :]
        return (E2M1[codes] * s).astype(np.float32).reshape(shape)
    s = storage_to_fp32(parts["scales"], sd).reshape(P, G, Q)[:, gidx, :]
    if kind == "affine":
        m = storage_to_fp32(parts["mins"], sd).reshape(P, G, Q)[:, gidx, :]
        prod_ = (codes.astype(np.float32) * s).astype(np.float32)  # rounded once
        out = (prod_ + m).astype(np.float32)  # rounded once (no fma)
    elif kind == "symmetric":
        zero = 2 ** (bits - 1)
        out = ((codes - zero).astype(np.float32) * s).astype(np.float32)
    else:
        out = (NF4_LEVELS[codes] * s).astype(np.float32)
    return out.reshape(shape)


def dequantize(parts: dict, enc: dict, shape, dtype: str) -> np.ndarray:
    """Decode the parts of a quantized tensor to the logical dtype (bf16 as uint16 bits)."""
    return from_fp32(dequantize_fp32(parts, enc, shape), dtype)


def raw_decode(data: bytes, dtype: str, shape) -> np.ndarray:
    if dtype == "bool" and any(b > 1 for b in bytes(data)):
        raise ReferenceError("bool tensor holds a byte other than 0 or 1 (spec 3)")
    return np.frombuffer(bytes(data), dtype=DTYPES[dtype][1]).reshape(tuple(shape)).copy()


# ------------------------------------------------------------------------------------------------
# Checksums (spec 6)
# ------------------------------------------------------------------------------------------------


def xxh3_64_hex(data) -> str:
    return xxhash.xxh3_64_hexdigest(bytes(data))


def checksum_string(data) -> str:
    return "xxh3-64:" + xxh3_64_hex(data)


CHECKSUM_RE = re.compile(r"^xxh3-64:[0-9a-f]{16}$")


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------
#
# An entry is (name, dtype, shape, encoding_dict, parts) with parts = {part_name: (bytes, dtype,
# shape)} in the order the parts are laid out in the data section.


def expected_parts(dtype: str, shape, enc: dict) -> dict:
    """{part: (dtype, shape, length)} the spec requires for this tensor (section 4 / rule 9)."""
    shape = tuple(int(d) for d in shape)
    n = prod(shape)
    if enc["name"] == "raw":
        return {"data": (dtype, shape, n * DTYPES[dtype][0])}
    p = encoding_params(enc, len(shape))
    sshape = scale_shape(shape, p["axis"], p["group_size"])
    slen = prod(sshape) * DTYPES[p["scale_dtype"]][0]
    clen = codes_length(n, p["bits"])
    out = {"codes": ("uint8", (clen,), clen), "scales": (p["scale_dtype"], sshape, slen)}
    if p["name"] == "affine":
        out["mins"] = (p["scale_dtype"], sshape, slen)
    if p["name"] == "nvfp4":
        out["tensor_scale"] = ("float32", (), 4)
    return out


def logical_to_bytes(x, dtype: str) -> bytes:
    """Row-major little-endian bytes of a logical tensor (bf16/float8 given as raw bits)."""
    arr = np.ascontiguousarray(np.asarray(x))
    return arr.astype(DTYPES[dtype][1], copy=False).tobytes()


def make_entry(name: str, x, enc: dict, dtype: str | None = None):
    """Quantize (or store raw) a tensor and return a writer entry."""
    x = np.asarray(x)
    if dtype is None:
        dtype = str(x.dtype)
    shape = tuple(x.shape)
    if enc["name"] == "raw":
        return (
            name,
            dtype,
            shape,
            {"name": "raw"},
            {"data": (logical_to_bytes(x, dtype), dtype, shape)},
        )
    p = encoding_params(enc, len(shape))
    q = quantize(x, p, dtype=dtype, name=name)
    header_enc = {k: p[k] for k in ("name", "bits", "group_size", "axis", "scale_dtype")}
    if p["name"] == "nf4":
        del header_enc["bits"]
    sshape = scale_shape(shape, p["axis"], p["group_size"])
    parts = {"codes": (q["codes"].tobytes(), "uint8", (q["codes"].size,))}
    parts["scales"] = (q["scales"].tobytes(), p["scale_dtype"], sshape)
    if q["mins"] is not None:
        parts["mins"] = (q["mins"].tobytes(), p["scale_dtype"], sshape)
    if "tensor_scale" in q:
        parts["tensor_scale"] = (q["tensor_scale"].astype("<f4").tobytes(), "float32", ())
    return (name, dtype, shape, header_enc, parts)


def align_up(v: int, alignment: int) -> int:
    return (v + alignment - 1) // alignment * alignment


def build(entries, metadata=None, alignment: int = 64) -> tuple[dict, bytes]:
    """Lay out the entries: returns (header dict, data section bytes).

    Every part starts at the next multiple of ``alignment`` after the previous part's end (zero
    padding between parts). A zero-length part also sits at such an aligned offset.
    """
    tensors = []
    data = bytearray()
    for name, dtype, shape, enc, parts in entries:
        records = {}
        for pname, (raw, pdtype, pshape) in parts.items():
            offset = align_up(len(data), alignment)
            data.extend(b"\0" * (offset - len(data)))
            data.extend(raw)
            records[pname] = {
                "dtype": pdtype,
                "shape": [int(d) for d in pshape],
                "offset": offset,
                "length": len(raw),
                "checksum": checksum_string(raw),
            }
        tensors.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": [int(d) for d in shape],
                "encoding": dict(enc),
                "parts": records,
            }
        )
    header = {"alignment": alignment}
    if metadata is not None:
        header["metadata"] = dict(metadata)
    header["tensors"] = tensors
    return header, bytes(data)


def _has_compression(header) -> bool:
    try:
        return any("compression" in p for t in header["tensors"] for p in t["parts"].values())
    except (TypeError, KeyError, AttributeError):
        return False


def assemble(
    header,
    data: bytes,
    *,
    alignment: int | None = None,
    magic: bytes = MAGIC,
    major: int = MAJOR,
    minor: int | None = None,
    reserved: int = 0,
    header_len: int | None = None,
    header_text: bytes | str | None = None,
) -> bytes:
    """Serialize a header (dict, or explicit ``header_text``) and data section into file bytes.

    The header is padded with spaces so that 24 + header_len is a multiple of ``alignment``
    (default: the header's own alignment when it is a sane integer, else 64). ``header_len``
    overrides the value written in the preamble (the bytes written stay the same) - for crafting
    malformed files.
    """
    if header_text is None:
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:
        text = header_text.encode("utf-8") if isinstance(header_text, str) else bytes(header_text)
    if alignment is None:
        a = header.get("alignment") if isinstance(header, dict) else None
        alignment = a if _is_int(a) and a >= 1 and a <= 1 << 20 else 64
    total = align_up(PREAMBLE + len(text), alignment)
    text = text + b" " * (total - PREAMBLE - len(text))
    hl = len(text) if header_len is None else header_len
    if minor is None:  # as writers do: 1.0 unless a part is compressed
        minor = MINOR if _has_compression(header) else 0
    pre = magic + struct.pack("<HHIQ", major, minor, reserved, hl)
    return pre + text + data


def file_bytes(entries, metadata=None, alignment: int = 64) -> bytes:
    header, data = build(entries, metadata, alignment)
    return assemble(header, data, alignment=alignment)


def write_file(path, entries, metadata=None, alignment: int = 64) -> None:
    """Write a complete qtensors file (the reference writer)."""
    blob = file_bytes(entries, metadata, alignment)
    with open(path, "wb") as fh:
        fh.write(blob)


def save_tensors(
    path, tensors: dict, encodings: dict, metadata=None, alignment: int = 64, dtypes=None
):
    """Convenience: ``tensors`` name -> array, ``encodings`` name -> encoding dict (missing:
    raw)."""
    dtypes = dtypes or {}
    entries = [
        make_entry(name, x, encodings.get(name, {"name": "raw"}), dtypes.get(name))
        for name, x in tensors.items()
    ]
    write_file(path, entries, metadata, alignment)


# ------------------------------------------------------------------------------------------------
# Reader (spec 7: every check before any part is read)
# ------------------------------------------------------------------------------------------------


def _fail(msg: str):
    raise ReferenceError(msg)


def _u64(v, what: str) -> int:
    if not _is_int(v) or v < 0 or v > U64_MAX:
        _fail(f"{what}: {v!r} is not an unsigned 64-bit integer")
    return v


def read_header(src) -> dict:
    """Parse and check the preamble and header (rules 1-12) of a file (path or bytes).

    Returns dict(major, minor, header_len, data_start, header, data_len, file_size, blob).
    """
    blob = _load(src)
    if len(blob) < PREAMBLE:
        _fail(f"file is {len(blob)} bytes, shorter than the 24-byte preamble")
    if blob[:8] != MAGIC:
        _fail(f"bad magic {blob[:8]!r}, expected b'QTENSORS'")
    major, minor, reserved, header_len = struct.unpack("<HHIQ", blob[8:24])
    if major == 0:
        _fail(f"version {major}.{minor} is invalid: versions start at 1.0")
    if major != MAJOR or minor > MINOR:
        _fail(f"unsupported version {major}.{minor} (this reader knows {MAJOR}.{MINOR})")
    if reserved != 0:
        _fail(f"reserved field is {reserved}, must be 0")
    if header_len > MAX_HEADER_LEN:
        _fail(f"header_len {header_len} exceeds 100 MiB")
    if PREAMBLE + header_len > len(blob):
        _fail(f"header_len {header_len} runs past the end of the {len(blob)}-byte file")
    raw = blob[PREAMBLE : PREAMBLE + header_len]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"header is not UTF-8: {e}")
    try:
        header = json.loads(text, object_pairs_hook=_object_without_repeats)
    except (ValueError, RecursionError) as e:
        _fail(f"header is not JSON: {e}")
    data_start = PREAMBLE + header_len
    data_len = len(blob) - data_start
    _check_header(header, data_start, data_len)
    return {
        "major": major,
        "minor": minor,
        "header_len": header_len,
        "data_start": data_start,
        "data_len": data_len,
        "file_size": len(blob),
        "header": header,
        "blob": blob,
    }


def _object_without_repeats(pairs) -> dict:
    """Rule 4: a key may not appear twice in one object (which one would count?)."""
    out = {}
    for k, v in pairs:
        if k in out:
            _fail(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def _load(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    with open(os.fspath(src), "rb") as fh:
        return fh.read()


def _check_header(h, data_start: int, data_len: int):
    if not isinstance(h, dict):
        _fail("header is not a JSON object")
    if "alignment" not in h:
        _fail("header has no 'alignment'")
    alignment = _u64(h["alignment"], "alignment")
    if alignment < 64 or alignment > 1 << 20 or alignment & (alignment - 1):
        _fail(f"alignment {alignment} is not a power of two in [64, 1 MiB]")
    if data_start % alignment:
        _fail(f"data_start {data_start} is not a multiple of alignment {alignment}")
    if "metadata" in h:
        md = h["metadata"]
        if not isinstance(md, dict):
            _fail("metadata is not an object")
        for k, v in md.items():
            if not isinstance(v, str):
                _fail(f"metadata value of key {k!r} is not a string")
    if not isinstance(h.get("tensors"), list):
        _fail("header 'tensors' is missing or not an array")
    tensors = h["tensors"]
    if len(tensors) > MAX_TENSORS:
        _fail(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    names = set()
    intervals = []
    for i, t in enumerate(tensors):
        if not isinstance(t, dict):
            _fail(f"tensor #{i} is not an object")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            _fail(f"tensor #{i}: name {name!r} is not a non-empty string")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            _fail(f"tensor #{i}: name is longer than {MAX_NAME_BYTES} bytes")
        if name in names:
            _fail(f"tensor {name!r}: duplicate name")
        names.add(name)
        intervals.extend(_check_tensor(name, t, alignment, data_len))
    # rule 11: no two parts overlap (zero-length parts overlap nothing)
    intervals = sorted((o, o + n, who) for o, n, who in intervals if n > 0)
    for (_, e1, w1), (o2, _, w2) in itertools.pairwise(intervals):
        if o2 < e1:
            _fail(f"{w1} and {w2} overlap")


def _check_tensor(name: str, t: dict, alignment: int, data_len: int):
    dtype = t.get("dtype")
    if not isinstance(dtype, str):
        _fail(f"tensor {name!r}: dtype is not a string")
    if dtype not in DTYPES:
        _fail(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = _check_shape(t.get("shape"), f"tensor {name!r}")
    if not shape_fits(shape, DTYPES[dtype][0]):
        _fail(f"tensor {name!r}: shape {list(shape)} is too large (rule 7)")
    enc = t.get("encoding")
    if not isinstance(enc, dict) or not isinstance(enc.get("name"), str):
        _fail(f"tensor {name!r}: encoding is not an object with a string 'name'")
    if enc["name"] not in ("raw", "affine", "symmetric", "nf4", *FP4_FIXED):
        _fail(f"tensor {name!r}: unknown encoding {enc['name']!r}")
    if enc["name"] != "raw":
        if dtype not in FLOAT_LOGICAL:
            _fail(f"tensor {name!r}: logical dtype {dtype} not allowed for encoding {enc['name']}")
        for key in ("group_size", "axis"):
            if key in enc or enc["name"] not in FP4_FIXED:  # FP4 may leave group_size out
                _u64(enc.get(key), f"tensor {name!r}: encoding {key}")
        if enc["axis"] >= max(len(shape), 1):
            _fail(f"tensor {name!r}: axis {enc['axis']} out of range for rank {len(shape)}")
        try:
            encoding_params(enc, len(shape))
        except ReferenceError as e:
            _fail(f"tensor {name!r}: {e}")
    parts = t.get("parts")
    if not isinstance(parts, dict):
        _fail(f"tensor {name!r}: parts is not an object")
    want = expected_parts(dtype, shape, enc)
    if set(parts) != set(want):
        _fail(f"tensor {name!r}: parts {sorted(parts)} are not the encoding's parts {sorted(want)}")
    out = []
    for pname, rec in parts.items():
        where = f"tensor {name!r} part {pname!r}"
        if not isinstance(rec, dict):
            _fail(f"{where}: record is not an object")
        pdtype = rec.get("dtype")
        if not isinstance(pdtype, str) or pdtype not in DTYPES:
            _fail(f"{where}: unknown dtype {pdtype!r}")
        pshape = _check_shape(rec.get("shape"), where)
        offset = _u64(rec.get("offset"), f"{where}: offset")
        length = _u64(rec.get("length"), f"{where}: length")
        wd, ws, wl = want[pname]
        if "compression" in rec:
            check_compression(rec["compression"], wd, wl, length, where)
            wl = length  # the stored bytes; the decoded length is checked by the chunk table
        if pdtype != wd or pshape != ws or length != wl or wl > U64_MAX:
            _fail(
                f"{where}: dtype/shape/length {pdtype}/{list(pshape)}/{length}, "
                f"expected {wd}/{list(ws)}/{wl}"
            )
        if offset % alignment:
            _fail(f"{where}: offset {offset} is not a multiple of alignment {alignment}")
        if offset + length > U64_MAX or offset + length > data_len:
            _fail(
                f"{where}: offset {offset} + length {length} exceeds the data section "
                f"({data_len} bytes)"
            )
        cs = rec.get("checksum")
        if not isinstance(cs, str) or not CHECKSUM_RE.match(cs):
            _fail(f"{where}: malformed checksum {cs!r}")
        out.append((offset, length, f"{name}/{pname}"))
    return out


# --- compressed parts (spec 2.1) -------------------------------------------------------------

FILTERS = ("none", "bytes", "float")


def check_compression(c, dtype: str, decoded: int, stored: int, where: str) -> None:
    """Rule 9 for a part's `compression` record."""
    if not isinstance(c, dict):
        _fail(f"{where}: compression is not an object")
    if c.get("codec") != "zstd":
        _fail(f"{where}: unsupported compression codec {c.get('codec')!r}")
    if c.get("filter") not in FILTERS:
        _fail(f"{where}: unsupported compression filter {c.get('filter')!r}")
    if c["filter"] == "float" and dtype not in FLOAT_LOGICAL:
        _fail(f"{where}: filter 'float' on a {dtype} part")
    if not _is_int(c.get("level")) or not -(2**31) <= c["level"] < 2**31:
        _fail(f"{where}: compression level {c.get('level')!r} is not a 32-bit integer")
    cs = c.get("chunk_size")
    if not _is_int(cs) or cs < 4096 or cs > 64 << 20 or cs & (cs - 1):
        _fail(f"{where}: chunk_size {cs!r} is not a power of two in [4096, 64 MiB]")
    chunks = c.get("chunks")
    if not isinstance(chunks, list) or not all(_is_int(n) and n >= 0 for n in chunks):
        _fail(f"{where}: chunks is not an array of non-negative integers")
    if len(chunks) != -(-decoded // cs):
        _fail(f"{where}: {len(chunks)} chunks for {decoded} bytes in chunks of {cs}")
    for i, n in enumerate(chunks):
        m = min(cs, decoded - i * cs)
        if not 1 <= n <= m or m > n * 32768:
            _fail(f"{where}: chunk {i} of {n} stored bytes for {m} decoded bytes")
    if sum(chunks) != stored:
        _fail(f"{where}: chunks add up to {sum(chunks)} bytes, the part has {stored}")


def decompress_part(stored: bytes, c: dict, dtype: str, decoded: int, where: str) -> bytes:
    """The decoded bytes of a compressed part, with the `zstandard` package."""
    import zstandard

    k = DTYPES[dtype][0]
    out = bytearray()
    pos = 0
    for i, n in enumerate(c["chunks"]):
        m = min(c["chunk_size"], decoded - i * c["chunk_size"])
        piece = stored[pos : pos + n]
        pos += n
        if n == m:
            filtered = piece
        else:
            try:
                size = zstandard.frame_content_size(piece)
            except zstandard.ZstdError as e:
                _fail(f"{where} chunk {i}: {e}")
            if size != m:
                _fail(f"{where} chunk {i}: the frame does not state {m} decoded bytes")
            d = zstandard.ZstdDecompressor().decompressobj()
            try:
                filtered = d.decompress(piece)
            except zstandard.ZstdError as e:
                _fail(f"{where} chunk {i}: {e}")
            if not d.eof or d.unused_data or len(filtered) != m:
                _fail(f"{where} chunk {i}: not exactly one frame of {m} bytes")
        out += unfilter(filtered, c["filter"], k)
    return bytes(out)


def unfilter(b: bytes, filt: str, k: int) -> bytes:
    if filt == "none" or k == 1:
        return bytes(b)
    planes = np.frombuffer(b, np.uint8).reshape(k, -1)
    v = np.ascontiguousarray(planes.T).view(f"<u{k}").ravel()
    if filt == "float":
        bits = 8 * k
        v = (v >> np.array(1, v.dtype)) | (v << np.array(bits - 1, v.dtype))
    return v.astype(f"<u{k}").tobytes()


def shape_fits(shape, itemsize: int) -> bool:
    """Rule 7: the byte size with each zero dimension counted as 1 is below 2^63, so that every
    dimension, the element count and every stride fit a signed 64-bit integer in any order of
    multiplication (numpy and torch need that even for an empty tensor)."""
    return prod(max(int(d), 1) for d in shape) * itemsize < 2**63


def _check_shape(shape, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        _fail(f"{where}: shape is not an array")
    if len(shape) > MAX_RANK:
        _fail(f"{where}: rank {len(shape)} exceeds {MAX_RANK}")
    for d in shape:
        _u64(d, f"{where}: shape")
    if prod(shape) > U64_MAX:
        _fail(f"{where}: element count overflows u64")
    return tuple(shape)


def read_file(src, verify: bool = True, strict: bool = True):
    """Read and decode a whole file.

    Returns (tensors, metadata, info): ``tensors`` name -> decoded numpy array in file order (bf16
    as uint16 bits, float8 as uint8 bits); ``info`` name -> dict(dtype, shape, encoding, parts)
    where parts maps part name -> numpy array of the part (its storage dtype, its shape).

    ``verify`` compares every checksum. ``strict`` also checks what a conforming *writer* must do
    (beyond the reader's rules): only spaces after the JSON text, zero padding between parts,
    parts in tensor order, and no bytes after the last part.
    """
    hdr = read_header(src)
    blob, h, ds = hdr["blob"], hdr["header"], hdr["data_start"]
    data = blob[ds:]
    if strict:
        _strict_checks(hdr)
    tensors, info = {}, {}
    for t in h["tensors"]:
        name, dtype, shape, enc = t["name"], t["dtype"], tuple(t["shape"]), t["encoding"]
        parts_bytes = {}
        parts_arrays = {}
        for pname, rec in t["parts"].items():
            raw = data[rec["offset"] : rec["offset"] + rec["length"]]
            if verify and checksum_string(raw) != rec["checksum"]:
                _fail(f"tensor {name!r} part {pname!r}: checksum mismatch")
            if "compression" in rec:
                decoded = DTYPES[rec["dtype"]][0] * prod(rec["shape"])
                raw = decompress_part(raw, rec["compression"], rec["dtype"], decoded, pname)
            parts_bytes[pname] = raw
            parts_arrays[pname] = np.frombuffer(raw, dtype=DTYPES[rec["dtype"]][1]).reshape(
                tuple(rec["shape"])
            )
        if enc["name"] == "raw":
            value = raw_decode(parts_bytes["data"], dtype, shape)
        else:
            value = dequantize(
                {
                    "codes": parts_bytes["codes"],
                    "scales": parts_bytes["scales"],
                    "mins": parts_bytes.get("mins"),
                    "tensor_scale": parts_bytes.get("tensor_scale"),
                },
                enc,
                shape,
                dtype,
            )
        tensors[name] = value
        info[name] = {"dtype": dtype, "shape": shape, "encoding": enc, "parts": parts_arrays}
    return tensors, h.get("metadata"), info


def _strict_checks(hdr: dict):
    blob, ds = hdr["blob"], hdr["data_start"]
    text = blob[PREAMBLE:ds].decode("utf-8")
    _, end = json.JSONDecoder().raw_decode(text)
    if text[end:].strip(" ") != "":
        _fail("header has bytes other than spaces after the JSON text")
    data = blob[ds:]
    spans = []
    prev_end = 0
    for t in hdr["header"]["tensors"]:
        recs = sorted(t["parts"].values(), key=lambda r: (r["offset"], r["length"]))
        for r in recs:
            if r["length"] == 0:
                continue
            if r["offset"] < prev_end:
                _fail(f"tensor {t['name']!r}: parts are not in tensor order")
            spans.append((r["offset"], r["offset"] + r["length"]))
            prev_end = r["offset"] + r["length"]
    spans.sort()
    pos = 0
    for o, e in spans:
        if any(data[pos:o]):
            _fail(f"non-zero padding bytes in data section at [{pos}, {o})")
        pos = e
    last = max(
        (r["offset"] + r["length"] for t in hdr["header"]["tensors"] for r in t["parts"].values()),
        default=0,
    )
    if len(data) != last:
        _fail(f"data section is {len(data)} bytes but the last part ends at {last}")


def relative_rmse(x, y) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    denom = math.sqrt(float(np.mean(x * x))) if x.size else 0.0
    err = math.sqrt(float(np.mean((x - y) ** 2))) if x.size else 0.0
    return err / denom if denom > 0 else err
