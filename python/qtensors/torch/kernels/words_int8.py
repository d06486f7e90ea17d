"""``words_int8_kernel``: ``y = x @ W^T + b`` for 1-4 rows of ``x``, affine / symmetric 4- and
8-bit codes, NF4 and MXFP4 / NVFP4, with the activations rounded to int8 and multiplied by the
codes as integers (``dp4a``: four byte products and their sum in one instruction).

Why: the float kernel (``words.py``) is bound by instruction issue on the H200, not by HBM; it
spends ~5.5 instructions a weight (sm_90 SASS of its loop) turning each code into a float and
multiplying it. Here a 32-bit word's eight 4-bit codes are two masks (``w & 0x0F0F0F0F`` and
``(w >> 4) & 0x0F0F0F0F``: the even and the odd codes, one per byte) and two ``dp4a`` against
the matching activations as int8 bytes; one conversion and three FMAs per 64-bit unit of codes
and feature: ~2.4 instructions a weight at 8 features a thread, the activations' rounding (one
FMA a value, bytes packed with ``prmt``) included.

FP4: twice an E2M1 value is an integer (0, 1, 2, 3, 4, 6, 8, 12 and their negatives). A word's
magnitudes become bytes four codes at a time with ``prmt`` (each code's low 3 bits select a byte
of a two-register table), and its sign bits, through ``prmt``'s sign replication, split the
bytes between the activations and their negatives (both rounded once per unit, shared by the
features): ~5 instructions a weight against ~9 for ``words.py``'s FP4 path. NF4: its levels as
int8, ``round(level * 127)`` (each weight moves by at most 0.4% of its group's absmax), looked up
from two tables (levels 0-7, 8-15) and picked per byte by the code's bit 3, again with ``prmt``;
the dot is signed by signed.

Numerics (as llama.cpp's GPU matrix-vector kernels, which round activations to int8 per 32):
the activations of each 64-bit unit of codes (16 for 4-bit codes, 8 for 8-bit) are rounded to
``x~ = q * d`` with ``d = max(max|x|, 1e-30) / 127`` and ``q = round(x / d)`` in -127..127 (each
moves by at most ``d / 2``), and the result is the weight times ``x~``: ``sum(s c q d) +
m sum(q d)`` per unit, the integer sums exact, their scaling and the accumulation fp32. It
differs from the exact product by at most ``sum_k |W_nk| d(k) / 2``. ``launch.INT8_ACTIVATIONS``
switches the route off (``words.py`` then runs, exact to fp32 accumulation).

Layout as ``words.py``: a ``[KU, BLOCK_N]`` tile of int64 units, consecutive units on
consecutive lanes, the features in each thread's registers; each lane rounds its own unit's
activations (two 16-byte loads, no cross-lane step), once for all of its features. K is split
over grid axis 1 when the output tiles alone would not fill the GPU; ``epilogue.store_result``
finishes.

``EMULATE`` (the interpreter, which runs no inline assembly) computes ``dp4a`` with shifts and
multiplies: the same integers.

Options (constexprs, all off by default; ``benches/probe_words.py --int8-variants`` times
them): ``PAIRED``, affine scales and mins interleaved (``launch.paired_scales``) and read with
one 32-bit load a feature instead of two 16-bit ones; ``PREFETCH``, the next step's codes and
scales loaded before this step's are multiplied, so a thread keeps loads in flight through its
arithmetic (more bytes in flight per SM at the same occupancy: the long-K shapes, where few
programs share an SM); ``KSPEC``, the kernel compiled for one row length K (a compile per
distinct K of a model), so a feature's codes and scales are an immediate offset from the
first feature's address instead of a 64-bit address computed per feature and step;
``L2_AHEAD``, the codes that many steps on prefetched into L2 (``prefetch.global.L2`` a feature,
at units clamped into the slice; not in the interpreter, where it would change nothing but
time): latency hidden without registers held, at a 64-bit address a feature (ptxas folds no
immediate into the prefetch).

sm_90 SASS of a step (int4 g64, 2048 codes, 4 warps; Triton 3.6;
``benches/results/sass_int8_variants_triton36.txt``), instructions / registers:

=========================  ==============  ==============  ==============  ==============
options                    affine, 8 feat  symm., 8 feat   affine, 4 feat  symm., 4 feat
=========================  ==============  ==============  ==============  ==============
none (routed)              334 / 64        307 / 56        222 / 48        207 / 40
PAIRED                     323 / 56        (as none)       214 / 40        (as none)
KSPEC                      300 / 64        264 / 56        208 / 47        188 / 40
KSPEC, PAIRED              278 / 56        (as KSPEC)      195 / 40        (as KSPEC)
PREFETCH, KSPEC, PAIRED    287 / 56        274 / 55        210 / 40        196 / 40
L2_AHEAD 1, KSPEC, PAIRED  333 / 61        319 / 63        223 / 48        215 / 47
=========================  ==============  ==============  ==============  ==============

With ``PREFETCH`` ptxas issues the next step's loads late in the step (after most of its
``dp4a``) at these register counts, not at its top: ``maxnreg`` moves them up.

``STREAM``: the codes loaded ``.cg`` (L2 only), so the stream of codes does not evict the
activations from L1, which every step of every program on the SM reads first.

``PIPELINE`` (2 or 3; not with ``PREFETCH``): Triton's software pipeliner on the K loop, which
copies the next ``PIPELINE - 1`` steps' codes, scales and activations into shared memory with
``cp.async`` (LDGSTS) while a step is multiplied, no registers waiting for them: KSPEC and PAIRED
at 8 features, 296 instructions and 48 registers at 2 (16 KB of shared memory a program), 314
and 40 at 3 (32 KB: 7 programs an SM, fewer than 8192 x 8192's 1024 tiles need for one wave).
The interpreter runs it as the plain loop: only the GPU checks (``benches/probe_words.py``) see
the pipelined code.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._layout import NF4_LEVELS
from .epilogue import store_rows
from .scales import group_scale


def nf4_int8_tables() -> tuple[int, int, int, int]:
    """NF4's levels as int8, ``round(level * 127)`` (as the CPU kernel and llama.cpp's IQ4_NL),
    four to an int32 (little-endian, signed): levels 0-3, 4-7, 8-11, 12-15."""
    b = bytes((round(v * 127) & 0xFF) for v in NF4_LEVELS)
    return tuple(int.from_bytes(b[i : i + 4], "little", signed=True) for i in range(0, 16, 4))


NF4_T0, NF4_T1, NF4_T2, NF4_T3 = (tl.constexpr(t) for t in nf4_int8_tables())

# 1.5 * 2^23: x + MAGIC rounds x to an integer (ties to even) in the low mantissa bits, whose
# low byte is then that integer's two's complement for |x| <= 127
MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _dp4a(a, b, c, EMULATE: tl.constexpr, SIGNED: tl.constexpr = False):
    """``c + sum_j a_j * b_j`` over the four bytes: ``b`` signed, ``a`` unsigned (or signed)."""
    if EMULATE:
        for j in tl.static_range(4):
            if SIGNED:
                aj = (a << (24 - 8 * j)) >> 24
            else:
                aj = (a >> (8 * j)) & 0xFF
            c += aj * ((b << (24 - 8 * j)) >> 24)
        return c
    else:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;" if SIGNED else "dp4a.u32.s32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, c],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )


@triton.jit
def _prmt(a, b, sel: tl.constexpr, EMULATE: tl.constexpr):
    """Bytes of ``a`` (0-3) and ``b`` (4-7) picked by the nibbles of ``sel`` (PTX ``prmt``);
    only the two selectors ``_pack4`` uses are emulated."""
    if EMULATE:
        if sel == 0x0040:
            return (a & 0xFF) | ((b & 0xFF) << 8)
        else:  # 0x5410
            return (a & 0xFFFF) | (b << 16)
    else:
        return tl.inline_asm_elementwise(
            f"prmt.b32 $0, $1, $2, {sel};", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
        )


@triton.jit
def _pack4(t, EMULATE: tl.constexpr):
    """``[KU, 4]`` int32 as one int32 per unit: byte ``j`` the low byte of column ``j``."""
    even, odd = tl.split(t.reshape(t.shape[0], 2, 2))  # columns 0, 2 and 1, 3
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    lo = _prmt(c0, c1, 0x0040, EMULATE)
    hi = _prmt(c2, c3, 0x0040, EMULATE)
    return _prmt(lo, hi, 0x5410, EMULATE)


@triton.jit
def _lookup(a, b, c, EMULATE: tl.constexpr):
    """PTX ``prmt`` with a register selector: byte ``i`` of the result is byte ``c_i & 7`` of
    ``b:a`` (``a`` bytes 0-3), or that byte's sign replicated where ``c_i & 8`` (``c_i``: the
    ``i``-th nibble of ``c``'s low 16 bits)."""
    if EMULATE:
        d = tl.zeros_like(c)
        for i in tl.static_range(4):
            nib = (c >> (4 * i)) & 0xF
            idx = nib & 7
            byte = (tl.where(idx < 4, a, b) >> (8 * (idx & 3))) & 0xFF
            byte = tl.where((nib & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)
            d |= byte << (8 * i)
        return d
    else:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )


@triton.jit
def _fp4_word(w, q_lo, q_hi, n_lo, n_hi, acc, EMULATE: tl.constexpr):
    """``acc`` plus the dot of a word's eight E2M1 codes (doubled: the integers 0, 1, 2, 3, 4,
    6, 8, 12 with their signs) with activations ``q`` (bytes, 4 a word, ``[KU]``) and their
    negatives ``n``. The magnitudes are looked up four at a time with ``prmt`` (the code's low 3
    bits select a byte of the table); the sign bits, through ``prmt``'s sign replication, mask
    the negative codes' magnitudes to meet ``n`` instead of ``q``."""
    table_lo = tl.full(w.shape, 0x03020100, tl.int32)  # 2 x E2M1 of magnitudes 0-3
    table_hi = tl.full(w.shape, 0x0C080604, tl.int32)  # and 4-7
    signs = tl.full(w.shape, -2139062144, tl.int32)  # 0x80808080: -> 0xFF where negative
    mag = w & 0x77777777
    m_lo = _lookup(table_lo, table_hi, mag, EMULATE)  # codes 0-3, one byte each
    m_hi = _lookup(table_lo, table_hi, mag >> 16, EMULATE)  # codes 4-7
    s_lo = _lookup(signs, signs, w, EMULATE) & 0x7F7F7F7F  # 0x7F bytes for negative codes
    s_hi = _lookup(signs, signs, w >> 16, EMULATE) & 0x7F7F7F7F
    acc = _dp4a(m_lo & ~s_lo, q_lo[:, None], acc, EMULATE)
    acc = _dp4a(m_lo & s_lo, n_lo[:, None], acc, EMULATE)
    acc = _dp4a(m_hi & ~s_hi, q_hi[:, None], acc, EMULATE)
    acc = _dp4a(m_hi & s_hi, n_hi[:, None], acc, EMULATE)
    return acc


@triton.jit
def _nf4_quad(c, EMULATE: tl.constexpr):
    """Four NF4 codes (``c``'s low 16 bits) as their int8 levels, one byte each: levels 0-7 and
    8-15 looked up from two tables each with the codes' low 3 bits, then ``prmt`` picks each
    byte from the second where the code's bit 3 is set."""
    mag = c & 0x7777
    low = _lookup(tl.full(c.shape, NF4_T0, tl.int32), tl.full(c.shape, NF4_T1, tl.int32), mag,
                  EMULATE)  # fmt: skip
    high = _lookup(tl.full(c.shape, NF4_T2, tl.int32), tl.full(c.shape, NF4_T3, tl.int32), mag,
                   EMULATE)  # fmt: skip
    return _lookup(low, high, ((c >> 1) & 0x4444) | 0x3210, EMULATE)


@triton.jit
def _quads(t, EMULATE: tl.constexpr):
    """``[KU, 8]`` rounded values as two int32 of bytes: values 0-3 and 4-7."""
    first, last = tl.split(tl.permute(t.reshape(t.shape[0], 2, 4), (0, 2, 1)))
    return _pack4(first, EMULATE), _pack4(last, EMULATE)


@triton.jit
def _round(x, inv):
    """``round(x * inv)`` (ties to even) in the low byte, as int8 (two's complement)."""
    return (x * inv[:, None] + MAGIC).to(tl.int32, bitcast=True)


@triton.jit
def _row(wa, wb, x_ptr, r: tl.constexpr, M, stride_xm, xcol, xmask, s, m, acc,
         ENC: tl.constexpr, BITS: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """``acc`` plus row ``r``'s per-unit terms; ``wa`` / ``wb``: the units' low and high int32
    words, ``[KU, BLOCK_N]``; ``xcol``: the columns of each unit's first 8 activations."""
    mask = xmask & (xcol * 0 + r < M)  # a tensor: the interpreter's M is a Python int
    # 8 activations a load (16 bytes of fp16 / bf16): a unit's all stay in its thread
    xa = tl.load(x_ptr + r * stride_xm + xcol, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(xa), axis=1)
    if BITS == 4:
        xb = tl.load(x_ptr + r * stride_xm + xcol + 8, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=1))
    # a floor keeps 127 / amax finite (an all-zero unit rounds to zeros)
    amax = tl.maximum(amax, 1e-30)
    d = amax * (1.0 / 127.0)
    inv = tl.fdiv(tl.full(amax.shape, 127.0, tl.float32), amax)
    KU: tl.constexpr = amax.shape[0]
    zero = tl.zeros_like(wa)
    ones = tl.full((KU,), 0x01010101, tl.int32)  # dp4a against it: a word's byte sum
    if ENC == 3:
        # FP4: codes in order, each word against its activations and their negatives
        q0, q1 = _quads(_round(xa, inv), EMULATE)
        q2, q3 = _quads(_round(xb, inv), EMULATE)
        n0, n1 = _quads(_round(-xa, inv), EMULATE)  # round(-v) = -round(v): ties to even
        n2, n3 = _quads(_round(-xb, inv), EMULATE)
        dot = _fp4_word(wa, q0, q1, n0, n1, zero, EMULATE)
        dot = _fp4_word(wb, q2, q3, n2, n3, dot, EMULATE)
        acc += ((d * 0.5)[:, None] * s) * dot.to(tl.float32)  # the codes were doubled
    elif ENC == 2:
        # NF4: codes in order, their int8 levels against the activations (both signed)
        q0, q1 = _quads(_round(xa, inv), EMULATE)
        q2, q3 = _quads(_round(xb, inv), EMULATE)
        dot = _dp4a(_nf4_quad(wa, EMULATE), q0[:, None], zero, EMULATE, True)
        dot = _dp4a(_nf4_quad(wa >> 16, EMULATE), q1[:, None], dot, EMULATE, True)
        dot = _dp4a(_nf4_quad(wb, EMULATE), q2[:, None], dot, EMULATE, True)
        dot = _dp4a(_nf4_quad(wb >> 16, EMULATE), q3[:, None], dot, EMULATE, True)
        acc += ((d * (1.0 / 127.0))[:, None] * s) * dot.to(tl.float32)  # levels times 127
    else:
        if BITS == 4:
            # per word, the even codes are the low nibbles: codes 0-7 in wa, 8-15 in wb
            ea, oa = tl.split(_round(xa, inv).reshape(KU, 4, 2))
            eb, ob = tl.split(_round(xb, inv).reshape(KU, 4, 2))
            ea = _pack4(ea, EMULATE)
            oa = _pack4(oa, EMULATE)
            eb = _pack4(eb, EMULATE)
            ob = _pack4(ob, EMULATE)
            sq = _dp4a(ones, ea, _dp4a(ones, oa, _dp4a(ones, eb, _dp4a(ones, ob, 0, EMULATE),
                                                       EMULATE), EMULATE), EMULATE)  # fmt: skip
            dot = _dp4a(wa & 0x0F0F0F0F, ea[:, None], zero, EMULATE)
            dot = _dp4a((wa >> 4) & 0x0F0F0F0F, oa[:, None], dot, EMULATE)
            dot = _dp4a(wb & 0x0F0F0F0F, eb[:, None], dot, EMULATE)
            dot = _dp4a((wb >> 4) & 0x0F0F0F0F, ob[:, None], dot, EMULATE)
        else:
            q0, q1 = _quads(_round(xa, inv), EMULATE)  # 8-bit: codes 0-3 in wa, 4-7 in wb
            sq = _dp4a(ones, q0, _dp4a(ones, q1, 0, EMULATE), EMULATE)
            dot = _dp4a(wa, q0[:, None], zero, EMULATE)
            dot = _dp4a(wb, q1[:, None], dot, EMULATE)
        # the weights times the rounded activations q * d: sum(s c q d) + m sum(q d)
        if ENC == 0:
            acc += d[:, None] * (s * dot.to(tl.float32) + m * sq.to(tl.float32)[:, None])
        else:  # symmetric: codes offset by 2^(BITS - 1)
            acc += (d[:, None] * s) * (dot - (1 << (BITS - 1)) * sq[:, None]).to(tl.float32)
    return acc


@triton.jit
def _l2_prefetch(ptrs):
    """``prefetch.global.L2`` of each address: the line comes into L2 from HBM without a
    register waiting for it."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.b32 $0, 0;",
        "=r,l",
        [ptrs.to(tl.int64)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _weights(units_ptr, scales_ptr, mins_ptr, rows, row0, rmask, full, k0, k_hi, row_units, G,
             ENC: tl.constexpr, SFMT: tl.constexpr, PU: tl.constexpr, KU: tl.constexpr,
             GS: tl.constexpr, PAIRED: tl.constexpr, KSPEC: tl.constexpr,
             L2_AHEAD: tl.constexpr, STREAM: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """The step at ``k0``'s codes (int64 units, ``[KU, BLOCK_N]``), fp32 scales and mins (a
    stand-in where the encoding has none), zeros past ``k_hi`` and ``N``.

    Masked loads, although clamped indices would need no masks (a unit past the slice has its x
    masked to 0): with the masks ptxas issues every load of the step before the first use (64
    registers); without them it spreads them out at 40 registers, and the kernel ran 10-45%
    slower on the H200."""
    unit = k0 // PU + tl.arange(0, KU)
    wmask = rmask[None, :] & (unit < k_hi // PU)[:, None]
    # KSPEC (the row length K a constexpr): the tile's first row as a scalar 64-bit offset and
    # each feature's a constant multiple of the row length on top, so every feature's load is
    # an immediate offset from one address (the 64-bit sums per feature and step are gone)
    grp = unit * PU // GS  # a unit lies in one group (GS >= PU): one scale a feature
    if KSPEC:
        f = tl.arange(0, rows.shape[0]).to(tl.int64)
        u_rows = units_ptr + row0 * row_units + f[None, :] * row_units
        u_ptrs = u_rows + unit.to(tl.int64)[:, None]
        sidx = row0 * G + f[None, :] * G + grp.to(tl.int64)[:, None]
    else:
        u_rows = units_ptr + rows[None, :] * row_units
        u_ptrs = u_rows + unit[:, None]
        sidx = rows[None, :] * G + grp[:, None]
    if L2_AHEAD and not EMULATE:
        # the codes L2_AHEAD steps on into L2, at units clamped to the slice's last (in bounds
        # without a mask); a tile past N (the last) prefetches nothing
        if full:
            ahead = tl.minimum(unit + L2_AHEAD * KU, k_hi // PU - 1)
            _l2_prefetch(u_rows + ahead.to(tl.int64)[:, None])
    if STREAM:  # read once: past L1, which keeps the activations every step reads
        u = tl.load(u_ptrs, mask=wmask, other=0, cache_modifier=".cg")
    else:
        u = tl.load(u_ptrs, mask=wmask, other=0)
    if PAIRED:
        # affine: [scale, min] side by side, one 32-bit load a feature (launch.paired_scales)
        ty = scales_ptr.dtype.element_ty
        pair = tl.load(scales_ptr.to(tl.pointer_type(tl.int32)) + sidx, mask=wmask, other=0)
        s = pair.to(tl.int16).to(ty, bitcast=True).to(tl.float32)  # the low half (truncation)
        m = (pair >> 16).to(tl.int16).to(ty, bitcast=True).to(tl.float32)
    else:
        s = group_scale(scales_ptr, sidx, wmask, mins_ptr, SFMT)  # NVFP4: mins the tensor scale
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=wmask, other=0.0).to(tl.float32)
        else:
            m = s  # symmetric, NF4, FP4: no min (a stand-in _row ignores)
    return u, s, m


@triton.jit
def _step(u, s, m, x_ptr, k0, k_hi, M, stride_xm, acc0, acc1, acc2, acc3, ENC: tl.constexpr,
          BITS: tl.constexpr, PU: tl.constexpr, KU: tl.constexpr, BLOCK_M: tl.constexpr,
          EMULATE: tl.constexpr):  # fmt: skip
    """The accumulators plus the step at ``k0``: its codes ``u``, scales ``s`` and mins ``m``
    against each row's activations."""
    wa = u.to(tl.int32)  # the low word (truncation)
    wb = (u >> 32).to(tl.int32)
    unit = k0 // PU + tl.arange(0, KU)
    xcol = unit[:, None] * PU + tl.arange(0, 8)[None, :]
    xmask = (unit < k_hi // PU)[:, None]
    acc0 = _row(wa, wb, x_ptr, 0, M, stride_xm, xcol, xmask, s, m, acc0, ENC, BITS, EMULATE)
    if BLOCK_M > 1:
        acc1 = _row(wa, wb, x_ptr, 1, M, stride_xm, xcol, xmask, s, m, acc1, ENC, BITS, EMULATE)
    if BLOCK_M > 2:
        acc2 = _row(wa, wb, x_ptr, 2, M, stride_xm, xcol, xmask, s, m, acc2, ENC, BITS, EMULATE)
        acc3 = _row(wa, wb, x_ptr, 3, M, stride_xm, xcol, xmask, s, m, acc3, ENC, BITS, EMULATE)
    return acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=["M"])
def words_int8_kernel(
    x_ptr,
    units_ptr,
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
    row_units,
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
    EMULATE: tl.constexpr,
    PAIRED: tl.constexpr = False,
    PREFETCH: tl.constexpr = False,
    KSPEC: tl.constexpr = 0,
    L2_AHEAD: tl.constexpr = 0,
    PIPELINE: tl.constexpr = 0,
    STREAM: tl.constexpr = False,
):
    PU: tl.constexpr = 64 // BITS  # codes per int64 unit
    KU: tl.constexpr = BLOCK_K // PU  # units per row and step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc0 = tl.zeros((KU, BLOCK_N), tl.float32)
    acc1 = tl.zeros((KU, BLOCK_N), tl.float32)
    acc2 = tl.zeros((KU, BLOCK_N), tl.float32)
    acc3 = tl.zeros((KU, BLOCK_N), tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    rmask = rows < N
    row0 = pid_n.to(tl.int64) * BLOCK_N
    full = (pid_n + 1) * BLOCK_N <= N  # every feature of the tile in range
    if KSPEC:  # the row lengths as constants: see _weights
        row_units = KSPEC * BITS // 64
        G = (KSPEC + GS - 1) // GS
    if PREFETCH:
        u, s, m = _weights(units_ptr, scales_ptr, mins_ptr, rows, row0, rmask, full, k_lo, k_hi,
                           row_units, G, ENC, SFMT, PU, KU, GS, PAIRED, KSPEC, L2_AHEAD, STREAM,
                           EMULATE)  # fmt: skip
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # the next step's codes and scales in flight while this step's are multiplied (past
            # the slice: masked off)
            u_next, s_next, m_next = _weights(units_ptr, scales_ptr, mins_ptr, rows, row0, rmask,
                                              full, k0 + BLOCK_K, k_hi, row_units, G, ENC, SFMT, PU,
                                              KU, GS, PAIRED, KSPEC, L2_AHEAD, STREAM,
                                              EMULATE)  # fmt: skip
            acc0, acc1, acc2, acc3 = _step(u, s, m, x_ptr, k0, k_hi, M, stride_xm, acc0, acc1,
                                           acc2, acc3, ENC, BITS, PU, KU, BLOCK_M,
                                           EMULATE)  # fmt: skip
            u, s, m = u_next, s_next, m_next
    else:
        # PIPELINE: Triton's pipeliner, the loads of the next PIPELINE - 1 steps copied into
        # shared memory (cp.async) while this step's are multiplied, no registers held for them
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=PIPELINE if PIPELINE else None):
            u, s, m = _weights(units_ptr, scales_ptr, mins_ptr, rows, row0, rmask, full, k0, k_hi,
                               row_units, G, ENC, SFMT, PU, KU, GS, PAIRED, KSPEC, L2_AHEAD, STREAM,
                               EMULATE)  # fmt: skip
            acc0, acc1, acc2, acc3 = _step(u, s, m, x_ptr, k0, k_hi, M, stride_xm, acc0, acc1,
                                           acc2, acc3, ENC, BITS, PU, KU, BLOCK_M,
                                           EMULATE)  # fmt: skip
    store_rows(acc0, acc1, acc2, acc3, rows, M, N, out_ptr, stride_om, bias_ptr, ws_ptr,
               lock_ptr, pid_n, pid_k, BLOCK_M, HAS_BIAS, SPLIT_K)  # fmt: skip
