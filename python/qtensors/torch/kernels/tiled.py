"""``y = x @ W^T + b`` from int32 words of packed codes, for groups along the input dim (the
layout of every convert preset): two kernels over one weight-tile decoder.

``weight_tile`` loads a ``[BLOCK_N, BLOCK_K]`` tile of the weight as int32 words (``32 / BITS``
codes each, coalesced along K), splits them with shifts, and applies each group's scale / min
as a broadcast over ``[BLOCK_N, NG, GB]`` (``GB = min(group, BLOCK_K)``): one scale load per
group, not per weight. Affine / symmetric codes become floats from bits (``1 + c / 2^BITS``,
exponent of 1.0 and the code in the mantissa: no int-to-float conversion), the zero point and
the ``1`` folded into the per-group offset, so a weight costs a shift, a mask, an or and one
FMA. NF4 indexes its 16 levels; FP4 E2M1 values are built from bits; MXFP4 / NVFP4 scales are
decoded in the kernel (``scales.py``).

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

from .epilogue import program_tile, store_result
from .gemm import _dot
from .scales import group_scale

#: encoding ids of these kernels (NF4 indexes ``levels_ptr``; FP4 E2M1 values are built from bits)
TILED_ENC = {"affine": 0, "symmetric": 1, "nf4": 2, "mxfp4": 3, "nvfp4": 3}


@triton.jit
def _interleave8(w, BITS: tl.constexpr):
    """The 8 codes of each int32 word of 4-bit codes, in order, as a new trailing dim of 8 held
    by the thread that loaded the word (``tl.join`` adds register dims): no data moves."""
    a = tl.join(tl.join(w & 15, (w >> 16) & 15), tl.join((w >> 8) & 15, (w >> 24) & 15))
    b = tl.join(tl.join((w >> 4) & 15, (w >> 20) & 15), tl.join((w >> 12) & 15, (w >> 28) & 15))
    return tl.join(a, b)


@triton.jit
def _interleave4(w):
    """The 4 bytes of each int32 word of 8-bit codes, in order (see ``_interleave8``)."""
    return tl.join(tl.join(w & 255, (w >> 16) & 255), tl.join((w >> 8) & 255, (w >> 24) & 255))


@triton.jit
def _e2m1(c):
    """FP4 E2M1 codes as fp32, from bits (no table gather). The code's 3 magnitude bits placed
    at fp32 bits 22-24 (exponent field ``m >> 1``, top mantissa bit ``m & 1``) read as
    ``e2m1(m) * 2^-126``, the subnormals 0 / 0.5 included (exponent 0 is subnormal in both
    formats); bit 3 is the sign. One exact multiply by ``2^126`` (a normal number, no flush:
    Triton's ``mul.f32`` keeps subnormals) gives the value."""
    bits = ((c & 7) << 22) | ((c & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126


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
    row_words,
    G,
    ENC: tl.constexpr,
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The fp32 weights ``W[rows, k0:k0 + BLOCK_K]`` (zero past ``N``; finite past ``k_hi``) as
    ``[BLOCK_N, NG, GB]``: ``NG`` group slots of ``GB = min(group, BLOCK_K)`` columns."""
    PW: tl.constexpr = 32 // BITS  # codes per word
    GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GB
    WG: tl.constexpr = GB // PW  # words per group slot
    slot = k0 + tl.arange(0, NG) * GB  # first column of each group slot
    # contiguity 1 on purpose: one word (PW codes) per thread, the layout in which the decoded
    # codes sit where the activations' 16-byte loads put x (no layout conversion per step)
    word = tl.max_contiguous(k0 // PW + tl.arange(0, BLOCK_K // PW), 1).reshape(NG, WG)
    wptr = words_ptr + rows[:, None, None] * row_words + word[None, :, :]
    wmask = rmask[:, None, None] & (word < k_hi // PW)[None, :, :]
    w = tl.load(wptr, mask=wmask, other=0)
    if BITS == 4:
        c = _interleave8(w, BITS).reshape(BLOCK_N, NG, GB)
    else:
        c = _interleave4(w).reshape(BLOCK_N, NG, GB)
    gidx = slot // GS
    sidx = rows[:, None] * G + gidx[None, :]
    smask = rmask[:, None] & (gidx < G)[None, :]
    s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)
    if ENC == 2:
        v = tl.load(levels_ptr + c) * s[:, :, None]
    elif ENC == 3:
        v = _e2m1(c) * s[:, :, None]
    else:
        # 1 + c / 2^BITS from bits; value = (that - 1) * 2^BITS * s + offset
        f = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
        s2 = s * (1 << BITS)
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32) - s2
        else:
            off = -s2 - s * (1 << (BITS - 1))
        v = f * s2[:, :, None] + off[:, :, None]
    return v


@triton.jit(do_not_specialize=["M"])
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
    row_words,
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
    GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GB
    # one row of x: an accumulator the shape (and register layout) of the weight tile
    acc = tl.zeros((BLOCK_N, NG, GB) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N, NG, GB), tl.float32)
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
            row_words,
            G,
            ENC,
            SFMT,
            BITS,
            GS,
            BLOCK_N,
            BLOCK_K,
        )
        kk = tl.max_contiguous(tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K), BLOCK_K)
        xptr = x_ptr + m_ids[:, None] * stride_xm + kk[None, :]
        x = tl.load(xptr, mask=mmask[:, None] & (kk < k_hi)[None, :], other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            x1 = tl.load(x_ptr + kk, mask=kk < k_hi, other=0.0).to(tl.float32)
            acc += w * x1.reshape(1, NG, GB)
        else:
            acc += x.reshape(BLOCK_M, 1, NG, GB) * w[None, :, :, :]
    if BLOCK_M == 1:
        part = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    else:
        part = tl.sum(tl.sum(acc, axis=3), axis=2)
    store_result(
        part,
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


@triton.jit(do_not_specialize=["M"])
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
    row_words,
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
    pid, pid_k, pid_m, pid_n = program_tile(M, BLOCK_M)
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
            row_words,
            G,
            ENC,
            SFMT,
            BITS,
            GS,
            BLOCK_N,
            BLOCK_K,
        )
        kk = tl.max_contiguous(tl.multiple_of(k0, BLOCK_K) + tl.arange(0, BLOCK_K), BLOCK_K)
        xptr = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
        x = tl.load(xptr, mask=mmask[:, None] & (kk < k_hi)[None, :], other=0.0)
        acc += _dot(x, tl.trans(w.reshape(BLOCK_N, BLOCK_K).to(dt)), IEEE)
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
