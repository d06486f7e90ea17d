"""``words_kernel``: ``y = x @ W^T + b`` for 1-4 rows of ``x`` on the CUDA cores, accumulating
per int32 WORD of packed codes rather than per weight (groups along the input dim, as
``tiled.py``).

Why: ``tiled.fma_kernel`` keeps an fp32 accumulator the shape of its weight tile (8 x 1024 =
64 registers a thread before any decoded value), so an SM holds 1-2 programs and has a few KB of
loads in flight, far from the 30-60 KB an H200 needs to stream HBM at full rate. Here a program
owns a ``[BLOCK_N, BLOCK_KW]`` tile of WORDS: for each of the ``32 / BITS`` codes ``j`` of a word
it takes the code from bits, multiplies it by ``x[PW * kw + j]`` (a ``[BLOCK_KW]`` vector with
stride ``PW``, shared by all rows and L1-resident) and sums into a per-word partial; the word's
group scale / min are applied to that partial once. Everything stays in one 2-D layout (no
``tl.join`` / reshape, no layout conversion), the accumulator is ``PW`` times smaller, so many
programs fit an SM and keep many loads in flight.

Per word, with ``d = sum_j v_j * x_j`` and ``X = sum_j x_j``:

* affine / symmetric: ``v_j = 1 + c_j / 2^BITS`` built from bits (exponent of 1.0, the code in
  the mantissa: a shift, an and-or, no int-to-float conversion), so the word's term is
  ``2^BITS s * d + (min - 2^BITS s) * X`` (symmetric: ``min = -2^(BITS-1) s``);
* NF4: ``v_j`` its level (a 64-byte table, L1-resident), term ``s * d``;
* MXFP4 / NVFP4: ``v_j`` the E2M1 value from bits (``tiled._e2m1``), term ``s * d`` with the
  scale decoded in the kernel (``scales.py``).

Rows of ``x`` (``BLOCK_M`` = the batch rounded up to 1, 2 or 4) share the decoded codes: each has
its own accumulator. K is split over grid axis 1 when the output tiles alone would not fill the
GPU; ``epilogue.store_result`` finishes (in-kernel split-K reduction, CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qtensors.torch.kernels.epilogue import store_result
from qtensors.torch.kernels.scales import group_scale
from qtensors.torch.kernels.tiled import _e2m1


@triton.jit
def _code(w, j: tl.constexpr, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of each word as the fp32 value the per-word partial sums (see the module)."""
    c = (w >> (BITS * j)) & ((1 << BITS) - 1)
    if ENC == 2:
        v = tl.load(levels_ptr + c)
    elif ENC == 3:
        v = _e2m1(c)
    else:
        v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _x(x_ptr, r: tl.constexpr, M, stride_xm, xcol, kmask):
    """Row ``r`` of ``x`` at columns ``xcol`` (zero past ``M`` and the slice) in fp32."""
    mask = kmask & (xcol * 0 + r < M)  # a tensor: the interpreter's M is a Python int
    return tl.load(x_ptr + r * stride_xm + xcol, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _term(d, X, s, off, ENC: tl.constexpr, BITS: tl.constexpr):
    """A word's contribution from its partial ``d`` and activation sum ``X``."""
    if ENC <= 1:
        t = d * (s * (1 << BITS)) + off * X[None, :]
    else:
        t = d * s
    return t


@triton.jit(do_not_specialize=["M"])
def words_kernel(
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
    PW: tl.constexpr = 32 // BITS  # codes per word
    BLOCK_KW: tl.constexpr = BLOCK_K // PW  # words per row and step
    WPG: tl.constexpr = GS // PW  # words per group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc0 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    kw_lo = pid_k * (k_split // PW)
    kw_hi = tl.minimum(row_words, kw_lo + k_split // PW)
    for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        kmask = kw < kw_hi
        mask = rmask[:, None] & kmask[None, :]
        w = tl.load(words_ptr + rows[:, None] * row_words + kw[None, :], mask=mask, other=0)
        # the word's group: repeated addresses, served by L1 after the first
        sidx = rows[:, None] * G + (kw // WPG)[None, :]
        s = group_scale(scales_ptr, sidx, mask, mins_ptr, SFMT)
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=mask, other=0.0).to(tl.float32) - s * (1 << BITS)
        else:
            off = -s * ((1 << BITS) + (1 << (BITS - 1)))  # symmetric; unused by the others
        d0 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        d1 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        d2 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        d3 = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
        X0 = tl.zeros((BLOCK_KW,), tl.float32)
        X1 = tl.zeros((BLOCK_KW,), tl.float32)
        X2 = tl.zeros((BLOCK_KW,), tl.float32)
        X3 = tl.zeros((BLOCK_KW,), tl.float32)
        for j in tl.static_range(PW):
            v = _code(w, j, levels_ptr, ENC, BITS)
            xcol = kw * PW + j
            x0 = _x(x_ptr, 0, M, stride_xm, xcol, kmask)
            d0 += v * x0[None, :]
            X0 += x0
            if BLOCK_M > 1:
                x1 = _x(x_ptr, 1, M, stride_xm, xcol, kmask)
                d1 += v * x1[None, :]
                X1 += x1
            if BLOCK_M > 2:
                x2 = _x(x_ptr, 2, M, stride_xm, xcol, kmask)
                x3 = _x(x_ptr, 3, M, stride_xm, xcol, kmask)
                d2 += v * x2[None, :]
                d3 += v * x3[None, :]
                X2 += x2
                X3 += x3
        acc0 += _term(d0, X0, s, off, ENC, BITS)
        if BLOCK_M > 1:
            acc1 += _term(d1, X1, s, off, ENC, BITS)
        if BLOCK_M > 2:
            acc2 += _term(d2, X2, s, off, ENC, BITS)
            acc3 += _term(d3, X3, s, off, ENC, BITS)
    m_ids = tl.arange(0, BLOCK_M)
    part = tl.where(m_ids[:, None] == 0, tl.sum(acc0, axis=1)[None, :], 0.0)
    if BLOCK_M > 1:
        part = tl.where(m_ids[:, None] == 1, tl.sum(acc1, axis=1)[None, :], part)
    if BLOCK_M > 2:
        part = tl.where(m_ids[:, None] == 2, tl.sum(acc2, axis=1)[None, :], part)
        part = tl.where(m_ids[:, None] == 3, tl.sum(acc3, axis=1)[None, :], part)
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
