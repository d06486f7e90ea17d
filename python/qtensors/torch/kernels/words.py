"""``words_kernel``: ``y = x @ W^T + b`` for 1-4 rows of ``x`` on the CUDA cores, from int32 WORDS
of packed codes (groups along the input dim, as ``tiled.py``).

A step loads a ``[KW, BLOCK_N]`` tile of words: consecutive words on consecutive lanes, one word
per lane and row, the tile's rows in each thread's registers. Each word's ``32 / BITS`` activations
are one 16-byte load in the same layout, shared by the thread's rows, and so are the word's scale
and min (a word lies in one group: the lanes of a group read one address). Every product is
accumulated per word, ``s * sum(c x) + m * sum(x)``, so nothing crosses threads until the loop
ends and no operand changes layout (no shared-memory round trip in the loop).

Why this shape: on the H200 the batch-1 kernel is bound by instruction issue, not by HBM (ncu:
~0.6 issued instructions per cycle per scheduler, DRAM at 30%). The layout it replaces (rows
across lanes, a group's 8 words in one thread, ``x`` through shared memory, the group sums
reduced across lanes each step) took ~490 instructions per 64 weights a thread; this one ~370,
and 21.1 against 25.0 us on 8192 x 8192 int4-g64 (``benches/probe_words.py``,
``benches/results/gpu_words_probe_h200.txt``). K is the tile's first dim on purpose: where axis
analysis ties (the scales' addresses repeat along K), Triton 3.6 orders dim 0 first.

Codes as floats, per position ``k`` of a word:

* affine / symmetric 4-bit: code ``k`` shifted to bit ``q`` (15 for even ``k``, 19 for odd: two
  codes share a shift) and read in place, ``v = 1 + c * 2^(q - 23)``: one LOP3 a code. The
  activation is scaled by ``F = 2^(23 - q)``, so ``sum(v x F) - sum(x F) = sum(c x)`` (``q >= 15``
  keeps fp32 activations within 1e-5 of the exact product);
* other widths: ``v = 1 + c / 2^BITS``, ``F = 2^BITS``;
* NF4: ``v`` its level (a 64-byte table, L1-resident); FP4: the E2M1 value from bits
  (``tiled._e2m1``), the scale decoded in the kernel (``scales.py``); ``F = 1``.

Rows of ``x`` (``BLOCK_M`` = the batch rounded up to 1, 2 or 4) share the decoded codes, each with
its own accumulator. K is split over grid axis 1 when the output tiles alone would not fill the
GPU; ``epilogue.store_result`` finishes (in-kernel split-K reduction, CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import store_rows
from .scales import group_scale
from .tiled import _e2m1


@triton.jit
def _code(w, k: tl.constexpr, masks, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr):
    """Code ``k`` of each word as the fp32 value the dot takes: ``1 + c * 2^(q - 23)`` for
    affine / symmetric (``_row`` scales x to undo the ``q``), the level (NF4), the E2M1 value
    (FP4)."""
    if ENC <= 1 and BITS == 4:
        # moved to bit q = 15 (k even) or 19 (k odd) and read in place: codes 2j and 2j + 1
        # share one shift, then one and-or (LOP3) each. The lower q, the fewer bits of x * c
        # survive beside x * 2^(23 - q) in fp32: 15 keeps fp32 activations within 1e-5
        q: tl.constexpr = 15 + 4 * (k % 2)
        sh: tl.constexpr = q - 4 * k
        if sh >= 0:
            a = w << sh
        else:
            a = w >> -sh  # the sign bits shifted in lie above the mask
        mask = masks[k % 2]  # a register: see words_kernel
        v = ((a & mask) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        c = (w >> (BITS * k)) & ((1 << BITS) - 1)
        if ENC == 2:
            v = tl.load(levels_ptr + c)
        elif ENC == 3:
            v = _e2m1(c)
        else:
            v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    return v


@triton.jit
def _codes(w, masks, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr):
    """Every code of each word as ``[..., PW]``, in order (``tl.join`` adds register dims: no
    data moves)."""
    if BITS == 4:
        a = tl.join(
            tl.join(
                _code(w, 0, masks, levels_ptr, ENC, BITS), _code(w, 4, masks, levels_ptr, ENC, BITS)
            ),
            tl.join(
                _code(w, 2, masks, levels_ptr, ENC, BITS), _code(w, 6, masks, levels_ptr, ENC, BITS)
            ),
        )
        b = tl.join(
            tl.join(
                _code(w, 1, masks, levels_ptr, ENC, BITS), _code(w, 5, masks, levels_ptr, ENC, BITS)
            ),
            tl.join(
                _code(w, 3, masks, levels_ptr, ENC, BITS), _code(w, 7, masks, levels_ptr, ENC, BITS)
            ),
        )
        v = tl.join(a, b)
        v = v.reshape(v.shape[0], v.shape[1], 8)
    else:
        v = tl.join(
            tl.join(
                _code(w, 0, masks, levels_ptr, ENC, BITS), _code(w, 2, masks, levels_ptr, ENC, BITS)
            ),
            tl.join(
                _code(w, 1, masks, levels_ptr, ENC, BITS), _code(w, 3, masks, levels_ptr, ENC, BITS)
            ),
        )
        v = v.reshape(v.shape[0], v.shape[1], 4)
    return v


@triton.jit
def _row(v, x_ptr, r: tl.constexpr, M, stride_xm, xcol, xmask, s, m, acc,
         ENC: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """``acc`` plus row ``r`` of ``x``'s per-word terms (see the module); ``v``: the codes as
    ``_codes`` gives them, ``[KW, BLOCK_N, PW]``."""
    mask = xmask & (xcol * 0 + r < M)  # a tensor: the interpreter's M is a Python int
    x = tl.load(x_ptr + r * stride_xm + xcol, mask=mask, other=0.0).to(tl.float32)
    PW: tl.constexpr = 32 // BITS
    pos = tl.arange(0, PW)
    if ENC <= 1 and BITS == 4:
        f = tl.where(pos % 2 == 0, 256.0, 16.0)  # 2^(23 - q), see _code
    elif ENC <= 1:
        f = tl.full((PW,), 1 << BITS, tl.float32)
    else:
        f = tl.full((PW,), 1.0, tl.float32)
    xf = x * f[None, :]
    d = tl.sum(v * xf[:, None, :], axis=2)
    if ENC <= 1:
        acc += (d - tl.sum(xf, axis=1)[:, None]) * s + m * tl.sum(x, axis=1)[:, None]
    else:
        acc += d * s
    return acc


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
    KW: tl.constexpr = BLOCK_K // PW  # words per row and step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc0 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc1 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc2 = tl.zeros((KW, BLOCK_N), tl.float32)
    acc3 = tl.zeros((KW, BLOCK_N), tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    lane = tl.arange(0, PW)
    # K >= 0, so K >> 31 is a zero the compiler cannot see through. The code masks of _code
    # (bits 15-18, 19-22) built on it stay in registers rather than being re-materialised
    # before every and-or (two immediates do not fit one LOP3)
    zero = K >> 31
    masks = (zero + (15 << 15), zero + (15 << 19))
    for k0 in range(k_lo, k_hi, BLOCK_K):
        # [KW, BLOCK_N]: one word per lane and row, consecutive words on consecutive lanes, the
        # rows in each thread's registers. Contiguity 2 makes K the fastest dim; the opaque
        # zero (alignment unknown) keeps each load at one word, whose activations are one
        # 16-byte load in the same layout
        word = tl.max_contiguous(k0 // PW + zero + tl.arange(0, KW), 2)
        inside = word < k_hi // PW
        w = tl.load(
            words_ptr + rows[None, :] * row_words + word[:, None],
            mask=rmask[None, :] & inside[:, None],
            other=0,
        )
        xcol = word[:, None] * PW + lane[None, :]
        xmask = inside[:, None]  # whole words: one mask per 16-byte load of x
        # each word's group: lanes of one group read one address (one transaction)
        sidx = rows[None, :] * G + (word * PW // GS)[:, None]
        smask = rmask[None, :] & inside[:, None]
        s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32)
        else:
            m = -s * (1 << (BITS - 1))  # symmetric; unused by the others
        v = _codes(w, masks, levels_ptr, ENC, BITS)
        acc0 = _row(v, x_ptr, 0, M, stride_xm, xcol, xmask, s, m, acc0, ENC, BITS)
        if BLOCK_M > 1:
            acc1 = _row(v, x_ptr, 1, M, stride_xm, xcol, xmask, s, m, acc1, ENC, BITS)
        if BLOCK_M > 2:
            acc2 = _row(v, x_ptr, 2, M, stride_xm, xcol, xmask, s, m, acc2, ENC, BITS)
            acc3 = _row(v, x_ptr, 3, M, stride_xm, xcol, xmask, s, m, acc3, ENC, BITS)
    store_rows(acc0, acc1, acc2, acc3, rows, M, N, out_ptr, stride_om, bias_ptr, ws_ptr,
               lock_ptr, pid_n, pid_k, BLOCK_M, HAS_BIAS, SPLIT_K)  # fmt: skip
