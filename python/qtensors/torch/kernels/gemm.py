"""``y = x @ W^T + b`` for many rows of ``x``: each weight tile is decoded in registers and fed
to ``tl.dot`` (tensor cores), fp32 accumulation; no weight-sized temporary.

A program owns a ``[BLOCK_M, BLOCK_N]`` tile of ``y`` (consecutive programs share a weight tile
and differ in ``M``, so the weight comes from HBM about once) and one K-slice (split-K, grid axis
1). The codes of a ``[BLOCK_K, BLOCK_N]`` weight tile are loaded as bytes; 4-bit bytes are split
into the low and high nibble (columns ``2j`` and ``2j + 1``), each multiplied with the even or
odd columns of ``x`` by its own ``tl.dot``: no interleaving in registers.

Groups along the input dim: ``BLOCK_K`` divides the group size, so a tile has one scale (and
min) per output feature: the codes go to the dot as small integers (exact in fp16 / bf16) and
the tile's sum is scaled afterwards (``s * D + m * X``, ``epilogue.py``). Groups along the
output dim (``AXIS0``, FlexGen's layout): ``BLOCK_N`` divides the group size, the tile shares a
row of scales along k, and the weights are decoded to the activation dtype before the dot.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import code_values, min_term, program_tile, store_result


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` in fp32; IEEE: exact fp32 products (fp32 activations, as cuBLAS without TF32;
    also the interpreter's way for bf16, whose ``tl.dot`` misreads bf16 operands)."""
    if IEEE:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit(do_not_specialize=["M", "k_split"])
def gemm_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    levels_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    G,
    stride_xm,
    stride_om,
    k_split,
    ENC: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    AXIS0: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid, pid_k, pid_m, pid_n = program_tile(M, BLOCK_M)
    PACK: tl.constexpr = 8 // BITS
    BKH: tl.constexpr = BLOCK_K // PACK
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    row_bytes = K // PACK
    first_k = tl.arange(0, BKH) * PACK  # first column of each byte of a tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    srow = (pid_n * BLOCK_N) // GS * K  # AXIS0: the tile's row of scales
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + first_k
        kmask = kk < k_hi
        # codes as [BLOCK_K / PACK, BLOCK_N]: k down, output features across (W^T)
        cptr = codes_ptr + offs_n[None, :] * row_bytes + (kk // PACK)[:, None]
        b = tl.load(cptr, mask=kmask[:, None] & nmask[None, :], other=0).to(tl.int32)
        xptr = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
        xmask = mmask[:, None] & kmask[None, :]
        x0 = tl.load(xptr, mask=xmask, other=0.0)
        if PACK == 2:
            x1 = tl.load(xptr + 1, mask=xmask, other=0.0)
            v0 = code_values(b & 15, levels_ptr, ENC, BITS, False)
            v1 = code_values(b >> 4, levels_ptr, ENC, BITS, False)
        else:
            v0 = code_values(b, levels_ptr, ENC, BITS, False)
        if AXIS0:
            s0 = tl.load(scales_ptr + srow + kk, mask=kmask, other=0.0).to(tl.float32)
            w0 = v0 * s0[:, None]
            if ENC != 2:
                w0 += min_term(s0, mins_ptr, srow + kk, kmask, ENC, BITS)[:, None]
            acc += _dot(x0, w0.to(dt), IEEE)
            if PACK == 2:
                s1 = tl.load(scales_ptr + srow + kk + 1, mask=kmask, other=0.0).to(tl.float32)
                w1 = v1 * s1[:, None]
                if ENC != 2:
                    w1 += min_term(s1, mins_ptr, srow + kk + 1, kmask, ENC, BITS)[:, None]
                acc += _dot(x1, w1.to(dt), IEEE)
        else:
            d = _dot(x0, v0.to(dt), IEEE)
            if PACK == 2:
                d += _dot(x1, v1.to(dt), IEEE)
            sidx = offs_n * G + k0 // GS
            s = tl.load(scales_ptr + sidx, mask=nmask, other=0.0).to(tl.float32)
            acc += d * s[None, :]
            if ENC != 2:
                X = tl.sum(x0.to(tl.float32), axis=1)
                if PACK == 2:
                    X += tl.sum(x1.to(tl.float32), axis=1)
                acc += X[:, None] * min_term(s, mins_ptr, sidx, nmask, ENC, BITS)[None, :]
    store_result(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        out_ptr,
        stride_om,
        bias_ptr,
        ws_ptr,
        lock_ptr,
        pid,
        pid_k,
        HAS_BIAS,
        SPLIT_K,
    )
