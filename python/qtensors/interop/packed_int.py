"""How GPTQ, AWQ and compressed-tensors pack integer weights into int32 words, unpacked into
`IntGroups` (codes, scales, zeros, g_idx) with the weight as `[out, in]`, groups along `in`.

* GPTQ (AutoGPTQ, GPTQModel): `qweight` int32 `[in * bits / 32, out]`, packed along the input
  dimension, element j of a word in bits `[j*bits, (j+1)*bits)`; `qzeros` int32
  `[groups, out * bits / 32]` packed along the output dimension the same way; `scales`
  `[groups, out]` fp16; `g_idx` `[in]`. AutoGPTQ's v1 checkpoints ("checkpoint_format": "gptq",
  the default) store zero - 1 (so a zero of 0 wraps and reads back as 2^bits), GPTQModel's v2
  ("gptq_v2") the zero itself.
* AWQ GEMM (AutoAWQ): `qweight` int32 `[in, out * bits / 32]` and `qzeros` `[groups, out/8]`,
  both packed along the output dimension with the 8 nibbles of a word holding outputs
  [0, 2, 4, 6, 1, 3, 5, 7] of its run of 8; zeros stored as they are; `scales` `[groups, out]`.
* compressed-tensors `pack-quantized`: `weight_packed` int32 `[out, ceil(in * bits / 32)]`,
  each row one dense little-endian bit stream of `q + 2^(bits-1)` (the signed value made
  unsigned); `weight_zero_point` (asymmetric only) int32 `[ceil(out * bits / 32), groups]`,
  packed the same way down the columns; `weight_scale` `[out, groups]`; `weight_shape`;
  optional `weight_g_idx`. Decode: (q - zp) * scale, so the unsigned zero is zp + 2^(bits-1).
"""

from __future__ import annotations

import numpy as np

from ..errors import ForeignFormatError

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def _u32(a: np.ndarray, fmt: str, name: str) -> np.ndarray:
    if a.dtype not in (np.int32, np.uint32) or a.ndim != 2:
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: expected 2-D int32 words, got {a.dtype} of shape "
            f"{list(a.shape)}"
        )
    return np.ascontiguousarray(a).view(np.uint32)


def _fields(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Split each 32-bit word into its 32/bits fields (field j = bits [j*bits, (j+1)*bits)),
    laid out consecutively along `axis` (0: rows, 1: columns)."""
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:
        f = (words[:, None, :] >> shifts[None, :, None]) & mask
        return f.reshape(-1, words.shape[1]).astype(np.uint8)
    f = (words[:, :, None] >> shifts[None, None, :]) & mask
    return f.reshape(words.shape[0], -1).astype(np.uint8)


def _whole_words(bits: int, fmt: str) -> None:
    if bits not in (2, 4, 8):
        raise ForeignFormatError(
            f"{fmt}: bits = {bits} is not supported (fields that cross 32-bit words); "
            "2, 4 and 8 are"
        )


def gptq_codes(qweight: np.ndarray, bits: int, name: str) -> np.ndarray:
    """(out, in) codes of a GPTQ `qweight`."""
    _whole_words(bits, "GPTQ")
    return np.ascontiguousarray(_fields(_u32(qweight, "GPTQ", name), bits, 0).T)


def gptq_zeros(qzeros: np.ndarray, bits: int, out: int, v1: bool, name: str) -> np.ndarray:
    """(out, groups) zero points of a GPTQ `qzeros` (v1: stored + 1, as AutoGPTQ reads them)."""
    z = _fields(_u32(qzeros, "GPTQ", name), bits, 1).astype(np.int64)
    if z.shape[1] < out:
        raise ForeignFormatError(
            f"GPTQ tensor {name!r}: {z.shape[1]} zero points per group for {out} outputs"
        )
    z = z[:, :out]
    return (z + 1 if v1 else z).T


def awq_unpack(words: np.ndarray, out: int, name: str) -> np.ndarray:
    """(rows, out) 4-bit values of an AWQ tensor packed along the outputs in AWQ's order."""
    f = _fields(_u32(words, "AWQ", name), 4, 1)
    if f.shape[1] != out:
        raise ForeignFormatError(
            f"AWQ tensor {name!r}: {f.shape[1]} values per row for {out} outputs"
        )
    # nibble i of a word holds output 8*w + AWQ_ORDER[i]
    dest = (np.arange(out) // 8) * 8 + AWQ_ORDER[np.arange(out) % 8]
    vals = np.empty_like(f)
    vals[:, dest] = f
    return vals


def dense_unpack(words: np.ndarray, bits: int, count: int, fmt: str, name: str) -> np.ndarray:
    """The first `count` fields of each row's dense little-endian bit stream (fields may cross
    words, as compressed-tensors packs 3, 5, 6 and 7 bits)."""
    w = _u32(words, fmt, name)
    if w.shape[1] * 32 < count * bits:
        raise ForeignFormatError(
            f"{fmt} tensor {name!r}: {w.shape[1]} words per row hold fewer than {count} "
            f"values of {bits} bits"
        )
    if bits == 4:
        b = np.ascontiguousarray(w.astype("<u4")).view(np.uint8)
        return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(w.shape[0], -1)[:, :count]
    if bits == 8:
        return np.ascontiguousarray(w.astype("<u4")).view(np.uint8)[:, :count]
    stream = np.unpackbits(
        np.ascontiguousarray(w.astype("<u4")).view(np.uint8), axis=1, bitorder="little"
    )[:, : count * bits]
    planes = stream.reshape(w.shape[0], count, bits).astype(np.uint8)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
