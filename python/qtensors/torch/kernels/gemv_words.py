"""``y = x @ W^T + b`` for a few rows of ``x`` with 4- or 8-bit codes read as 32-bit words.

The main decode-time layout: groups along the input dim (``axis = -1`` of ``W [N, K]``), each
row's codes starting on a 4-byte boundary. The code stream of a row is read as int32 words
(``PACK = 32 / BITS`` codes each, lowest bits first, so code ``k`` is bits ``(k % PACK) * BITS``
of word ``k // PACK``): a ``[BLOCK_N, BLOCK_W]`` tile of words is one wide, coalesced load, and
the codes come out of registers with a shift and a mask. A code's value is assembled from bits
as ``1 + c / 2^BITS`` (exponent of 1.0, code at the top of the mantissa): no int-to-float
conversion, which would otherwise bound the kernel (Hopper converts at 1/8 of its FMA rate).
Per group ``D = (sum(x * v) - X) * 2^BITS`` and the group term of ``epilogue.py``.

A program owns ``BLOCK_N`` output features and one K-slice (split-K, reduced by
``store_result``); ``BLOCK_W`` words per step hold whole groups.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import min_term, store_result


@triton.jit(do_not_specialize=["M", "k_split"])
def gemv_words_kernel(
    x_ptr,
    words_ptr,
    scales_ptr,
    mins_ptr,
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
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 32 // BITS  # codes per word
    WPG: tl.constexpr = GS // PACK  # words per group
    NG: tl.constexpr = BLOCK_W // WPG  # groups per step
    MASK: tl.constexpr = (1 << BITS) - 1
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_words = K // PACK
    m_ids = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_lo = pid_k * (k_split // PACK)
    w_hi = tl.minimum(row_words, w_lo + k_split // PACK)
    offs_w = tl.arange(0, BLOCK_W)
    shifts = tl.arange(0, PACK) * BITS
    for w0 in range(w_lo, w_hi, BLOCK_W):
        ww = w0 + offs_w
        wmask = ww < w_hi
        words = tl.load(
            words_ptr + rows[:, None] * row_words + ww[None, :],
            mask=rmask[:, None] & wmask[None, :],
            other=0,
        )
        c = (words[:, :, None] >> shifts[None, None, :]) & MASK  # [BLOCK_N, BLOCK_W, PACK]
        v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
        gidx = w0 // WPG + tl.arange(0, NG)
        sidx = rows[:, None] * G + gidx[None, :]
        smask = rmask[:, None] & (gidx < G)[None, :]
        s = tl.load(scales_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
        mt = min_term(s, mins_ptr, sidx, smask, ENC, BITS)
        kk = ww[:, None] * PACK + tl.arange(0, PACK)[None, :]  # [BLOCK_W, PACK]
        for m in tl.static_range(BLOCK_M):
            xmask = wmask[:, None] & (tl.full((1, 1), m, tl.int32) < M)
            x = tl.load(x_ptr + m * stride_xm + kk, mask=xmask, other=0.0).to(tl.float32)
            p = tl.sum(v * x[None, :, :], axis=2)  # [BLOCK_N, BLOCK_W]
            d = tl.sum(tl.reshape(p, (BLOCK_N, NG, WPG)), axis=2)  # [BLOCK_N, NG]
            xg = tl.sum(tl.reshape(tl.sum(x, axis=1), (NG, WPG)), axis=1)  # [NG]
            d = (d - xg[None, :]) * (1 << BITS)
            part = tl.sum(d * s + mt * xg[None, :], axis=1)
            acc = tl.where(m_ids[:, None] == m, acc + part[None, :], acc)
    store_result(
        acc,
        m_ids,
        rows,
        M,
        N,
        out_ptr,
        stride_om,
        bias_ptr,
        ws_ptr,
        lock_ptr,
        pid_n,
        pid_k,
        HAS_BIAS,
        SPLIT_K,
    )
