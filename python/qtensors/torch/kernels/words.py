"""``words_kernel``: ``y = x @ W^T + b`` for 1-4 rows of ``x`` on the CUDA cores, from int32 WORDS
of packed codes, accumulating per GROUP (groups along the input dim, as ``tiled.py``).

A step loads a ``[BLOCK_N, NG, WG]`` tile of words (``NG`` group slots of ``WG`` words), one
word per thread (contiguity 1 on purpose: the layout in which the word's ``32 / BITS`` codes,
split into a trailing register dim, sit where the 16-byte loads of the matching activations
put them, so x needs no layout conversion), and reduces ``sum_k v_k * x_k`` per group slot in
registers. The group's scale / min then apply once to that partial sum, and the accumulator is
``[BLOCK_N, NG]``: few registers, many programs per SM, many loads in flight.

Measured on the H200 against the per-word accumulator it replaces (which loaded ``x`` with a
stride of ``32 / BITS`` and a scale per word): 26.2 against 36.7 us at batch 1 on 8192 x 8192
int4-g64 (`benches/probe_gemv_variants.py`, `benches/results/gpu_gemv_probe_h200.txt`).

Per group slot, with ``d = sum v_k x_k`` and ``X = sum x_k``:

* affine / symmetric: ``v = 1 + c / 2^BITS`` built from bits (exponent of 1.0, the code in the
  mantissa: a shift, an and-or, no int-to-float conversion), so the term is
  ``2^BITS s * d + (min - 2^BITS s) * X`` (symmetric: ``min = -2^(BITS-1) s``);
* NF4: ``v`` its level (a 64-byte table, L1-resident), term ``s * d``;
* MXFP4 / NVFP4: ``v`` the E2M1 value from bits (``tiled._e2m1``), term ``s * d`` with the
  scale decoded in the kernel (``scales.py``).

Rows of ``x`` (``BLOCK_M`` = the batch rounded up to 1, 2 or 4) share the decoded codes, each with
its own accumulator. K is split over grid axis 1 when the output tiles alone would not fill the
GPU; ``epilogue.store_result`` finishes (in-kernel split-K reduction, CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import store_result
from .scales import group_scale
from .tiled import _e2m1, _interleave4, _interleave8


@triton.jit
def _values(w, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr):
    """The codes of each word as the fp32 values ``d`` sums (see the module), in a new trailing
    dim of ``32 / BITS`` held by the thread that loaded the word."""
    if BITS == 4:
        c = _interleave8(w, BITS)
    else:
        c = _interleave4(w)
    if ENC == 2:
        v = tl.load(levels_ptr + c)
    elif ENC == 3:
        v = _e2m1(c)
    else:
        v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _partial(v, x_ptr, r: tl.constexpr, M, stride_xm, xcol, xmask):
    """``(d, X)`` of row ``r`` of ``x`` per group slot: ``[BLOCK_N, NG]`` and ``[NG]``."""
    mask = xmask & (xcol * 0 + r < M)  # a tensor: the interpreter's M is a Python int
    x = tl.load(x_ptr + r * stride_xm + xcol, mask=mask, other=0.0).to(tl.float32)
    d = tl.sum(tl.sum(v * x[None, :, :, :], axis=3), axis=2)
    X = tl.sum(tl.sum(x, axis=2), axis=1)
    return d, X


@triton.jit
def _term(d, X, s, off, ENC: tl.constexpr, BITS: tl.constexpr):
    """A group slot's contribution from its partial ``d`` and activation sum ``X``."""
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
    GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K  # codes per group slot
    NG: tl.constexpr = BLOCK_K // GB  # group slots per step
    WG: tl.constexpr = GB // PW  # words per group slot
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc0 = tl.zeros((BLOCK_N, NG), tl.float32)
    acc1 = tl.zeros((BLOCK_N, NG), tl.float32)
    acc2 = tl.zeros((BLOCK_N, NG), tl.float32)
    acc3 = tl.zeros((BLOCK_N, NG), tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    lane = tl.arange(0, PW)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # one word per thread (contiguity 1): see the module
        word = tl.max_contiguous(k0 // PW + tl.arange(0, BLOCK_K // PW), 1).reshape(NG, WG)
        wmask = rmask[:, None, None] & (word < k_hi // PW)[None, :, :]
        w = tl.load(
            words_ptr + rows[:, None, None] * row_words + word[None, :, :], mask=wmask, other=0
        )
        v = _values(w, levels_ptr, ENC, BITS).reshape(BLOCK_N, NG, WG, PW)
        xcol = word[:, :, None] * PW + lane[None, None, :]
        xmask = xcol < k_hi
        gidx = (k0 + tl.arange(0, NG) * GB) // GS
        sidx = rows[:, None] * G + gidx[None, :]
        smask = rmask[:, None] & (gidx * GS < k_hi)[None, :]
        s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32) - s * (1 << BITS)
        else:
            off = -s * ((1 << BITS) + (1 << (BITS - 1)))  # symmetric; unused by the others
        d, X = _partial(v, x_ptr, 0, M, stride_xm, xcol, xmask)
        acc0 += _term(d, X, s, off, ENC, BITS)
        if BLOCK_M > 1:
            d, X = _partial(v, x_ptr, 1, M, stride_xm, xcol, xmask)
            acc1 += _term(d, X, s, off, ENC, BITS)
        if BLOCK_M > 2:
            d, X = _partial(v, x_ptr, 2, M, stride_xm, xcol, xmask)
            acc2 += _term(d, X, s, off, ENC, BITS)
            d, X = _partial(v, x_ptr, 3, M, stride_xm, xcol, xmask)
            acc3 += _term(d, X, s, off, ENC, BITS)
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
