"""``y = x @ W^T + b`` for a few rows of ``x`` (batch 1-16): the weight read once, decoded in
registers, multiplied on the CUDA cores; no weight-sized temporary.

A program owns ``BLOCK_N`` output features (rows of ``W``) and one K-slice (split-K, grid axis 1)
and walks it ``BLOCK_K`` columns at a time. A tile of codes is loaded as ``[BLOCK_N, NG, GH]``
bytes: ``NG`` group slots of ``GB = min(group_size, BLOCK_K)`` columns, ``GH = GB / codes per
byte`` bytes each, so each slot lies in one group. 4-bit bytes are split into their low and high
nibble (columns ``2j`` and ``2j + 1``), multiplied with the even and odd activations: no
interleaving in registers. Per group: ``s * D + m * X`` (see ``epilogue.py``); each row of ``x``
reuses the decoded codes of the tile.

Groups along the output dim (``AXIS0``, FlexGen's layout): ``BLOCK_N`` divides the group size,
so the whole tile shares one row of scales along k; the activations are scaled instead of the
weights (``sum(x * s * code) + sum(x * m)``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import code_values, min_term, store_result


@triton.jit(do_not_specialize=["M", "k_split"])
def gemv_kernel(
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
    FAST_CVT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    PACK: tl.constexpr = 8 // BITS  # codes per byte (4 or 8 bits)
    if AXIS0:
        GB: tl.constexpr = BLOCK_K
    else:
        GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GB
    GH: tl.constexpr = GB // PACK
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_bytes = K // PACK
    m_ids = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    # the first column of each byte of a tile, as (group slot, byte)
    slot_k = tl.arange(0, NG)[:, None] * GB + tl.arange(0, GH)[None, :] * PACK
    srow = (pid_n * BLOCK_N) // GS * K  # AXIS0: the tile's row of scales
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + slot_k
        kmask = kk < k_hi
        cptr = codes_ptr + rows[:, None, None] * row_bytes + (kk // PACK)[None, :, :]
        b = tl.load(cptr, mask=rmask[:, None, None] & kmask[None, :, :], other=0).to(tl.int32)
        if PACK == 2:
            v0 = code_values(b & 15, levels_ptr, ENC, BITS, FAST_CVT)
            v1 = code_values(b >> 4, levels_ptr, ENC, BITS, FAST_CVT)
        else:
            v0 = code_values(b, levels_ptr, ENC, BITS, FAST_CVT)
        if AXIS0:
            s0 = tl.load(scales_ptr + srow + kk, mask=kmask, other=0.0).to(tl.float32)
            m0 = min_term(s0, mins_ptr, srow + kk, kmask, ENC, BITS)
            if PACK == 2:
                s1 = tl.load(scales_ptr + srow + kk + 1, mask=kmask, other=0.0).to(tl.float32)
                m1 = min_term(s1, mins_ptr, srow + kk + 1, kmask, ENC, BITS)
        else:
            gidx = (k0 + tl.arange(0, NG) * GB) // GS
            sidx = rows[:, None] * G + gidx[None, :]
            smask = rmask[:, None] & (gidx < G)[None, :]
            s = tl.load(scales_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
            mt = min_term(s, mins_ptr, sidx, smask, ENC, BITS)
        for m in tl.static_range(BLOCK_M):
            xrow = x_ptr + m * stride_xm
            xmask = kmask & (tl.full((1, 1), m, tl.int32) < M)
            x0 = tl.load(xrow + kk, mask=xmask, other=0.0).to(tl.float32)
            if PACK == 2:
                x1 = tl.load(xrow + kk + 1, mask=xmask, other=0.0).to(tl.float32)
            if AXIS0:
                xs = x0 * s0
                prod = v0 * xs[None, :, :]
                if PACK == 2:
                    xs1 = x1 * s1
                    prod += v1 * xs1[None, :, :]
                d = tl.sum(tl.sum(prod, axis=2), axis=1)
                if FAST_CVT:
                    xsum = tl.sum(tl.sum(xs, axis=1), axis=0)
                    if PACK == 2:
                        xsum += tl.sum(tl.sum(xs1, axis=1), axis=0)
                    d = (d - xsum) * (1 << BITS)
                if ENC != 2:
                    xm = x0 * m0
                    if PACK == 2:
                        xm += x1 * m1
                    d += tl.sum(tl.sum(xm, axis=1), axis=0)
                part = d
            else:
                prod = v0 * x0[None, :, :]
                xg = x0
                if PACK == 2:
                    prod += v1 * x1[None, :, :]
                    xg += x1
                d = tl.sum(prod, axis=2)  # [BLOCK_N, NG]
                X = tl.sum(xg, axis=1)  # [NG]
                if FAST_CVT:
                    d = (d - X[None, :]) * (1 << BITS)
                t = d * s
                if ENC != 2:
                    t += mt * X[None, :]
                part = tl.sum(t, axis=1)
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
