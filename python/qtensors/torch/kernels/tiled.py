"""``y = x @ W^T + b`` from int32 words of packed codes, for groups along the input dim (the
layout of every convert preset): two kernels over one weight-tile decoder.

``weight_tile`` loads a ``[BLOCK_N, BLOCK_K]`` tile of the weight as int32 words (``32 / BITS``
codes each, coalesced along K), splits them with shifts, and applies each group's scale / min
as a broadcast over ``[BLOCK_N, NG, GB]`` (``GB = min(group, BLOCK_K)``): one scale load per
group, not per weight. Affine / symmetric codes become floats from bits (``1 + c / 2^BITS``,
exponent of 1.0 and the code in the mantissa: no int-to-float conversion), the zero point and
the ``1`` folded into the per-group offset, so a weight costs a shift, a mask, an or and one
FMA. Codebooks (NF4, FP4 E2M1) index their 16 levels; MXFP4 / NVFP4 scales are decoded in the
kernel (``scales.py``).

* ``fma_kernel`` (a few rows of ``x``): the CUDA cores; the products go into an fp32
  accumulator the shape of the tile (``[BLOCK_M, BLOCK_N, BLOCK_K]``) and are summed over K
  once, after the loop, so an iteration is loads and FMAs only.
* ``dot_kernel`` (more rows): the decoded tile, in the activations' dtype, is the B operand of
  ``tl.dot`` (tensor cores; wgmma on Hopper), x tiles of ``BLOCK_M`` rows (>= 16) the A operand.

Both split K over grid axis 1 when the output tiles alone would not fill the GPU, and finish
through ``epilogue.store_result`` (in-kernel split-K reduction, CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import store_result
from .gemm import _dot
from .scales import group_scale

#: encoding ids of these kernels (codebooks index ``levels_ptr``)
TILED_ENC = {"affine": 0, "symmetric": 1, "nf4": 2, "mxfp4": 2, "nvfp4": 2}


@triton.jit
def weight_tile(
    words_ptr,
    scales_ptr,
    mins_ptr,
    levels_ptr,
    rows,
    rmask,
    k0,
    k_hi,
    K,
    G,
    ENC: tl.constexpr,
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 weights ``W[rows, k0:k0 + BLOCK_K]`` (zero past ``k_hi`` and ``N``)."""
    PW: tl.constexpr = 32 // BITS  # codes per word
    GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GB
    WG: tl.constexpr = GB // PW  # words per group slot
    MASK: tl.constexpr = (1 << BITS) - 1
    slot = k0 + tl.arange(0, NG) * GB  # first column of each group slot
    col = slot[:, None] + tl.arange(0, WG)[None, :] * PW  # first column of each word
    wptr = words_ptr + rows[:, None, None] * (K // PW) + (col // PW)[None, :, :]
    wmask = rmask[:, None, None] & (col < k_hi)[None, :, :]
    w = tl.load(wptr, mask=wmask, other=0)
    shifts = tl.arange(0, PW) * BITS
    c = (w[:, :, :, None] >> shifts[None, None, None, :]) & MASK
    c = c.reshape(BLOCK_N, NG, GB)
    gidx = slot // GS
    sidx = rows[:, None] * G + gidx[None, :]
    smask = rmask[:, None] & (gidx < G)[None, :]
    s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)
    if ENC == 2:
        v = tl.load(levels_ptr + c) * s[:, :, None]
    else:
        # 1 + c / 2^BITS from bits; value = (that - 1) * 2^BITS * s + offset
        f = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
        s2 = s * (1 << BITS)
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32) - s2
        else:
            off = -s2 - s * (1 << (BITS - 1))
        v = f * s2[:, :, None] + off[:, :, None]
    return v.reshape(BLOCK_N, BLOCK_K)


@triton.jit(do_not_specialize=["M", "k_split"])
def fma_kernel(
    x_ptr,
    words_ptr,
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
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    m_ids = tl.arange(0, BLOCK_M)
    mmask = m_ids < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = weight_tile(
            words_ptr,
            scales_ptr,
            mins_ptr,
            levels_ptr,
            rows,
            rmask,
            k0,
            k_hi,
            K,
            G,
            ENC,
            SFMT,
            BITS,
            GS,
            BLOCK_N,
            BLOCK_K,
        )
        kk = k0 + tl.arange(0, BLOCK_K)
        xptr = x_ptr + m_ids[:, None] * stride_xm + kk[None, :]
        x = tl.load(xptr, mask=mmask[:, None] & (kk < k_hi)[None, :], other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
    store_result(
        tl.sum(acc, axis=2),
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


@triton.jit(do_not_specialize=["M", "k_split"])
def dot_kernel(
    x_ptr,
    words_ptr,
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
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # consecutive programs share a weight tile (differ in M): the weight comes from HBM ~once
    n_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_m
    pid_n = pid // n_m
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = weight_tile(
            words_ptr,
            scales_ptr,
            mins_ptr,
            levels_ptr,
            rows,
            rmask,
            k0,
            k_hi,
            K,
            G,
            ENC,
            SFMT,
            BITS,
            GS,
            BLOCK_N,
            BLOCK_K,
        )
        kk = k0 + tl.arange(0, BLOCK_K)
        xptr = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
        x = tl.load(xptr, mask=mmask[:, None] & (kk < k_hi)[None, :], other=0.0)
        acc += _dot(x, tl.trans(w.to(dt)), IEEE)
    store_result(
        acc,
        offs_m,
        rows,
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
