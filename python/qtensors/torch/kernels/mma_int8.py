"""``mma_int8_kernel``: ``y = x @ W^T + b`` on the int8 tensor cores ("W4A8") for a few dozen
rows of ``x`` and 4-bit affine / symmetric codes with groups of at least 64 along the input dim.

Why: ``mma.py`` (fp16 / bf16 ``tl.dot``) is bound by turning each 4-bit code into a 16-bit float
and by joining the low / high nibbles back into K order, not by memory (~1.0x cuBLAS bf16 at 16
rows where the bytes would allow ~4x). With the activations rounded to int8 the codes need no
conversion: a 32-bit word of codes gives its 4 low nibbles as bytes with one ``and`` and its 4
high nibbles with a shift and an ``and`` (``_nibbles``), and ``tl.dot(int8, int8) -> int32`` runs
on the integer tensor cores (IMMA / wgmma s8).

No join either: the activations are permuted instead of the codes. ``quantize_kernel`` (a
pre-pass launch, once per call, not once per feature tile) writes each group of ``GS``
activations as int8 in the order "the even k of the group, then the odd k", so a group's low
nibbles (the even k: column ``2j`` is byte ``j``'s low nibble) meet the first half and its high
nibbles the second: two dots of ``K = GS / 2`` into one int32 sum per (feature, row, group).

Numerics (as ``words_int8.py``, per (row, group) instead of per 16): the group's activations are
rounded to ``x~ = q * d`` with ``d = max(max|x|, 1e-30) / 127`` and ``q = round(x / d)`` in
-127..127 (ties to even; each moves by at most ``d / 2``). With ``I = sum(c * q)`` (exact int32)
and ``X = d * sum(q)`` (the group sum of ``x~``), the group adds, in fp32,

* affine:    ``(s * d) * I + min * X``
* symmetric: ``(s * d) * I - 8 * s * X``   (codes ``c - 8``)

so the result is the weight times ``x~``: it differs from the exact product by at most
``sum_k |W_nk| d(k) / 2``. ``launch.INT8_ACTIVATIONS`` off: never taken.

Layout as ``mma.py`` ("swap AB"): a program computes a ``[BLOCK_N, BLOCK_M]`` tile of ``y^T`` as
``W_tile @ x_tile^T``, so the features (>= 64) fill the MMA's M dim and the batch (16-64) its N.
A K step covers ``GROUPS`` groups (1, 2 or 4, dividing the row's), whose scales and mins come as
one tile loaded a step ahead (``_factor_tiles``). K is split over grid axis 1 when the output
tiles alone would not fill the GPU (in whole steps); ``epilogue.store_result`` finishes.

Cost (Triton 3.6, sm_90 SASS of the loop, 128 features x 16 rows, ``benches/sass_loop_count.py
--mma``, ``benches/results/sass_mma_loop_h200.txt``): 2.87 instructions a weight at 2 groups a
step (symmetric 2.77), against 6.11 (6.00) for ``mma.py``. On the H200 that buys 1.2-1.4x
``mma.py`` on the large weights, still ~30% of the bytes' bound: the per-group scaling of the
int32 sums needs each feature's scale in the accumulator's layout, which Triton reaches through
shared memory and barriers (see ``_factor_tiles``): a variant with the scales replaced by
constants ran 22.5 us on 8192 x 8192 at 16 rows (this kernel: 29.7), and neither prefetching
them nor passing them through a one-hot MMA (no barriers) gained.

``EMULATE`` (the interpreter, which runs no inline assembly): the nibbles with tensor ops.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import program_tile, store_result

#: encoding ids of this kernel (``mma.MMA_ENC``'s)
MMA_INT8_ENC = {"affine": 0, "symmetric": 1}
#: the smallest group: one IMMA k-step (32) per nibble half
MMA_INT8_MIN_GROUP = 64
# 1.5 * 2^23: v + MAGIC rounds v to an integer (ties to even) in the low mantissa bits;
# subtracting MAGIC's bits leaves that integer as an int32
MAGIC = tl.constexpr(12582912.0)
MAGIC_BITS = tl.constexpr(0x4B400000)


@triton.jit
def quantize_kernel(
    x_ptr,
    xq_ptr,
    xs_ptr,
    M,
    MP,
    K,
    G,
    stride_xm,
    GS: tl.constexpr,
    GROUPS: tl.constexpr,
    FRAGMENT: tl.constexpr = False,
    DUP: tl.constexpr = False,
    BLOCKED: tl.constexpr = False,
):
    """Row ``program_id(0)`` of ``x`` (of ``MP``: ``M`` rounded up to whole row tiles; the rows
    past ``M`` as zeros, so the matmul reads them unmasked), ``GROUPS`` groups a program: each
    group's activations as int8 ``q`` (``xq [MP, K]``), its ``d`` at ``xs[0, g, m]`` and the sum
    of its ``x~ = q * d`` at ``xs[1, g, m]`` (fp32; rows contiguous: a feature tile's loads of a
    group's values are vectors). The order of a group's ``q``: the even k, then the odd (this
    kernel's), or with ``FRAGMENT`` each 64-code chunk as ``mma_int8_gluon.fragment_order``
    stores it (slot ``s = 16a + 8h + 4b + c`` holds code ``16a + 8b + 2c + h``). ``DUP``: ``K``
    and ``GS`` count each of x's values twice (code ``k`` is ``x[k // 2]``): 8-bit codes read as
    pairs of nibbles, each nibble meeting its byte's activation (``mma_int8_gluon.GLUON_ENC``).
    ``BLOCKED`` (with ``FRAGMENT``, groups of 32 or 16: MXFP4's and NVFP4's blocks): each
    64-code chunk holds 2 or 4 groups, as ``fragment_order(blocked=True)`` stores them (slot
    ``16a + 8B + 4h + c`` holds code ``32B + 8a + 2c + h``; group ``B``, or ``2B + a // 2``), so a
    group's slots are not contiguous."""
    m = tl.program_id(0)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    gmask = grp < G
    xmask = gmask & (grp * 0 + m < M)  # a tensor: the interpreter's M is an int
    row = x_ptr + m * stride_xm + grp[:, None] * (GS // 2 if DUP else GS)
    out = xq_ptr + m * K + grp[:, None] * GS
    # the code each slot s of the group holds; one gather load (the row is small, read once)
    s = tl.arange(0, GS)
    dst = s[None, :]
    if FRAGMENT and BLOCKED:
        # element s = 8a' + 4h + c of group j = grp % (64 / GS) of its chunk: in k-step
        # B = j // (32 / GS), quad lane a = a' + (j % (32 / GS)) * 2 (groups of 16: the lanes'
        # halves)
        j = grp[:, None] % (64 // GS)
        a = (s[None, :] >> 3) + (j % (32 // GS)) * (GS // 8)
        code = 8 * (s >> 3) + 2 * (s & 3) + ((s >> 2) & 1)
        slot = 16 * a + 8 * (j // (32 // GS)) + 4 * ((s[None, :] >> 2) & 1) + (s[None, :] & 3)
        dst = slot - GS * j  # from the group's start
    elif FRAGMENT:
        r = s % 64
        code = (s - r) + 16 * (r >> 4) + 8 * ((r >> 2) & 1) + 2 * (r & 3) + ((r >> 3) & 1)
    else:
        HB: tl.constexpr = GS // 2
        code = tl.where(s < HB, 2 * s, 2 * (s - HB) + 1)
    if DUP:
        code = code // 2
    xv = tl.load(row + code[None, :], mask=xmask[:, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xv), axis=1), 1e-30)  # an all-zero group rounds to zeros
    d = amax * (1.0 / 127.0)
    inv = 127.0 / amax
    q = (xv * inv[:, None] + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
    tl.store(out + dst, q.to(tl.int8), mask=gmask[:, None])
    total = tl.sum(q, axis=1).to(tl.float32)
    tl.store(xs_ptr + grp * MP + m, d, mask=gmask)
    tl.store(xs_ptr + (G + grp) * MP + m, d * total, mask=gmask)


@triton.jit
def _nibbles(b, EMULATE: tl.constexpr):
    """Bytes of codes ``[.., HB]`` (uint8) as their low and high nibbles (int8 0..15): four
    bytes a 32-bit register, one ``and`` (a shift and an ``and``) a register."""
    if EMULATE:
        lo = (b & 15).to(tl.int8)
        hi = (b >> 4).to(tl.int8)
    else:
        lo = tl.inline_asm_elementwise(
            "and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4
        )
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }",
            "=r,r",
            [b],
            dtype=tl.int8,
            is_pure=True,
            pack=4,
        )
    return lo, hi


@triton.jit
def _factor_tiles(scales_ptr, mins_ptr, rows, rmask, g0, G, ENC: tl.constexpr,
                  GROUPS: tl.constexpr):  # fmt: skip
    """Groups ``g0 .. g0 + GROUPS - 1``'s scales and (affine) mins, ``[BLOCK_N, GROUPS]`` as
    stored. Why tiles, loaded a step ahead: a feature's scale is a 2-byte load ``G`` apart from
    the next feature's, which Triton neither pipelines nor loads in the accumulator's layout
    (each load is moved there through shared memory, a barrier pair each); one tile of several
    groups is one such move for all of them, and loading it a step early hides its latency."""
    cols = tl.arange(0, GROUPS)
    idx = rows[:, None] * G + g0 + cols[None, :]
    st = tl.load(scales_ptr + idx, mask=rmask[:, None], other=0.0)
    tt = st
    if ENC == 0:
        tt = tl.load(mins_ptr + idx, mask=rmask[:, None], other=0.0)
    return st, tt


@triton.jit
def _column(tile, j: tl.constexpr, GROUPS: tl.constexpr):
    """Column ``j`` of a ``[BLOCK_N, GROUPS]`` tile (GROUPS 1, 2 or 4), by splits (no data
    movement where the columns share a thread)."""
    if GROUPS == 1:
        return tl.reshape(tile, (tile.shape[0],))
    elif GROUPS == 2:
        a, b = tl.split(tile)
        return a if j == 0 else b
    else:
        even, odd = tl.split(tile.reshape(tile.shape[0], 2, 2))  # columns 0, 2 and 1, 3
        half = even if j % 2 == 0 else odd
        a, b = tl.split(half)
        return a if j < 2 else b


@triton.jit(do_not_specialize=["M"])
def mma_int8_kernel(
    xq_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    xs_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    K,
    row_bytes,
    G,
    MP,
    stride_xm,
    stride_om,
    k_split,
    ENC: tl.constexpr,
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EMULATE: tl.constexpr,
    GROUPS: tl.constexpr = 1,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile from ``quantize_kernel``'s ``xq`` / ``xs`` (``MP``
    rows: a multiple of ``BLOCK_M``; K a multiple of ``GS``; a K-slice ``k_split`` too)."""
    pid, pid_k, pid_m, pid_n = program_tile(M, BLOCK_M)
    HB: tl.constexpr = GS // 2  # bytes of one row of one group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    jb = tl.arange(0, HB)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    # the scales and mins of GROUPS groups as one [BLOCK_N, GROUPS] tile, a step ahead (see
    # _factor_tiles); group indices written as multiples of GROUPS, so that Triton sees the
    # tiles' alignment (vector loads)
    g_lo = (k_lo // (GS * GROUPS)) * GROUPS
    st, tt = _factor_tiles(scales_ptr, mins_ptr, rows, rmask, g_lo, G, ENC, GROUPS)
    for k0 in range(k_lo, k_hi, GS * GROUPS):
        k0 = tl.multiple_of(k0, GS * GROUPS)
        g_next = (k0 // (GS * GROUPS)) * GROUPS + GROUPS
        g_next = tl.minimum(g_next, G - GROUPS)  # the last step's is not used
        st1, tt1 = _factor_tiles(scales_ptr, mins_ptr, rows, rmask, g_next, G, ENC, GROUPS)
        for gi in tl.static_range(GROUPS):
            kg = k0 + gi * GS
            b = tl.load(
                codes_ptr + rows[:, None] * row_bytes + (tl.multiple_of(kg // 2, HB) + jb)[None, :],
                mask=rmask[:, None],
                other=0,
            )
            lo, hi = _nibbles(b, EMULATE)
            xp = xq_ptr + offs_m[:, None] * stride_xm + (kg + jb)[None, :]
            xe = tl.load(xp)  # MP rows: those past M are zeros
            xo = tl.load(xp + HB)
            i = tl.dot(lo, tl.trans(xe), out_dtype=tl.int32)
            i = tl.dot(hi, tl.trans(xo), i, out_dtype=tl.int32)
            g = kg // GS
            d = tl.load(xs_ptr + g * MP + offs_m)
            X = tl.load(xs_ptr + (G + g) * MP + offs_m)
            s = _column(st, gi, GROUPS).to(tl.float32)
            if ENC == 0:
                t = _column(tt, gi, GROUPS).to(tl.float32)
            else:
                t = -8.0 * s
            # a multiply, a conversion and two FMAs per (feature, row, group)
            acc = tl.fma(s[:, None] * d[None, :], i.to(tl.float32), acc)
            acc = tl.fma(t[:, None], X[None, :], acc)
        st, tt = st1, tt1
    store_result(
        tl.trans(acc),
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
