"""``gemm16_regs_kernel`` (Gluon, sm_90: Hopper's ``wgmma``): ``y = x @ W^T + b`` for a
prompt's worth of rows of ``x`` (65-256), int4 affine / symmetric codes in groups of 64+ along
the input dim, the weight decoded in registers straight into the ``wgmma``'s left operand.

Why not ``gemm16_gluon.py`` (the weight decoded into shared memory, the activations the
``wgmma``'s left operand): there the product's N dim is the weight's features, 64-128 a tile,
so every column tile re-reads all the activations from L2 and each ``wgmma`` reads its
activations' operand from shared memory for a narrow product (without any decode its pipeline
ran 68 us against cuBLAS's 49 on 8192^2 at 256 rows). Here the roles swap, as CUTLASS's
mixed-input Hopper GEMMs have them: the weight is the left operand (M: 64 features a
warpgroup), from registers, so no decoded tile goes through shared memory and no fence waits
for one; the activations are the right operand (N: up to 256 rows, the widest ``wgmma``), by
TMA into a ring of ``STAGES`` steps.

A step is 64 codes of K. The left operand's register layout gives quad lane ``a`` columns
``16 j + 8 p + 2 a + e`` (``j`` < 4, ``p``, ``e`` < 2); those are byte ``a`` of the row's
32-bit word ``2 j + p``, nibble ``e``: so each thread loads its two rows' 8 words of the step
(two 16-byte loads a row, the four lanes of a quad the same ones) and takes byte ``a`` of each,
and the activations keep their order (no pre-pass). Its two nibbles are one register of the
operand: a pair of 16-bit values made in 5 instructions (``_values_x2``), or (``PACKED`` off)
through fp32 as the dequantize kernel makes them.

Each warpgroup issues its step's product asynchronously and waits for the one before, so the
next step's decode overlaps a product in flight. The steps go in pairs, each with its own
operand registers: with one set (stop 37's loop) the next step's decode wrote the registers of
the product still reading them (undefined, triton-lang/triton#9433; seen in the SASS, which the
tests now check for it). Each step's activations and codes come by TMA into a ring of
``STAGES`` steps; the scales and mins are loaded into registers a step ahead (by TMA in the
ring with ``SCALES_TMA``, which faults on the H200 under Triton 3.6).
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 (launch)

    from .gemm16_gluon import _cta_barrier, _tma_load
    from .mma_int8_gluon import _store

    HAVE_GEMM16_REGS = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GEMM16_REGS = False

#: ``_values_x2``'s PTX: a byte's two nibbles as a pair of 16-bit values. ``prmt`` puts the
#: byte (``$3``: its selector) in byte 0 and the byte of the word shifted down 4 in byte 2; one
#: ``lop3`` keeps a nibble of each onto ``magic`` (the bits of a power of two whose mantissa
#: step is 1, in both halves; 0xEA: ``(a & b) | c``), which is then subtracted (exact); ``t``:
#: the pair's type
_X2_ASM = (
    "{{ .reg .b32 h, v, k;\n"
    "shr.b32 h, $1, 4;\n"
    "prmt.b32 v, $1, h, $3;\n"
    "mov.b32 k, {magic};\n"
    "lop3.b32 v, v, 983055, k, 0xEA;\n"
    "sub.rn.{t} v, v, k;\n"
    "fma.rn.{t} $0, v, $5, $6; }}"
)

#: encoding ids (as ``gemm16_gluon.GEMM16_ENC``)
GEMM16_REGS_ENC = {"affine": 0, "symmetric": 1}


def _linear(reg, lane, warp, shape):
    return gl.DistributedLinearLayout(
        reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[], shape=shape
    )


def layouts(block_f: int, block_t: int) -> dict:
    """Constexpr layouts for ``block_f`` features (64 a warpgroup: 4 warps of 16) and
    ``block_t`` rows of x (8-256, a power of two): the accumulator ``[block_f, block_t]``, the
    left operand ``[block_f, 64]`` (``wgmma``'s register layout for 16-bit values), the codes'
    values ``[block_f, 8 words, 4 bytes, 2 nibbles]`` laid out so that their reshape to
    ``[block_f, 64]`` is that operand's layout, and the activations' shared ring."""
    if block_f % 64 or block_f > 256 or block_t < 8 or block_t > 256 or block_t & (block_t - 1):
        raise ValueError(f"gemm16_regs: no layout for {block_f} features x {block_t} rows")
    warps = block_f // 16
    acc = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_t, 16]
    )
    warp_rows = [[16 << i, 0, 0, 0] for i in range(warps.bit_length() - 1)]
    lane_rows = [[1, 0], [2, 0], [4, 0]]
    return dict(
        ACC=acc,
        DOT_A=gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2),
        # registers: nibble, row + 8, the 8 words; lanes: the byte (quad lane), rows 1, 2, 4
        L4=_linear(
            [[0, 0, 0, 1], [8, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
            [[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
            warp_rows,
            [block_f, 8, 4, 2],
        ),
        # the codes' words ``[block_f, 8]`` as loaded: a row's 8 in consecutive registers (two
        # 16-byte loads), then rows + 8; the four lanes of a quad load the same words
        LWV=_linear(
            [[0, 1], [0, 2], [0, 4], [8, 0]],
            [[0, 0], [0, 0], *lane_rows],
            [r[:2] for r in warp_rows],
            [block_f, 8],
        ),
        # a row's scale (or min) of a step: column 0 of the TMA tile of 8 groups, rows as LWV's
        LSV=_linear(
            [[8, 0]], [[0, 0], [0, 0], *lane_rows], [r[:2] for r in warp_rows], [block_f, 1]
        ),
        X_SL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        C_SL=gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2),
        S_SL=gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2),
        num_warps=warps,
    )


if HAVE_GEMM16_REGS:
    _X2_BF16 = gl.constexpr(_X2_ASM.format(magic="0x43004300", t="bf16x2"))
    _X2_F16 = gl.constexpr(_X2_ASM.format(magic="0x64006400", t="f16x2"))

    @gluon.jit
    def _scales_ring(ss, ms, slot, LSV: gl.constexpr, LR: gl.constexpr, ENC: gl.constexpr):
        """A ring slot's scales and mins (affine; else the scales again) in fp32, each row's in
        ``LR``: column 0 of the slot's tile of groups (this step's)."""
        BLOCK_F: gl.constexpr = ss.shape[1]
        s = ss.index(slot).slice(0, 1, dim=1).load(LSV).reshape([BLOCK_F]).to(gl.float32)
        s = gl.convert_layout(s, LR)
        m = s
        if ENC == 0:
            m = ms.index(slot).slice(0, 1, dim=1).load(LSV).reshape([BLOCK_F]).to(gl.float32)
            m = gl.convert_layout(m, LR)
        return s, m

    @gluon.jit
    def _scales_global(scales_ptr, mins_ptr, N, G, f0, group, BLOCK_F: gl.constexpr,
                       LR: gl.constexpr, ENC: gl.constexpr):  # fmt: skip
        """Group ``group``'s scales and mins of the tile's rows (those below ``N``; 0 past
        them), from global memory, in fp32."""
        rows = f0 + gl.arange(0, BLOCK_F, layout=LR)
        at = rows * G + group
        s = gl.load(scales_ptr + at, mask=rows < N, other=0.0).to(gl.float32)
        m = s
        if ENC == 0:
            m = gl.load(mins_ptr + at, mask=rows < N, other=0.0).to(gl.float32)
        return s, m

    @gluon.jit
    def _decode(words, s, m, dt: gl.constexpr, ENC: gl.constexpr, L4: gl.constexpr,
                DOT_A: gl.constexpr, PACKED: gl.constexpr):  # fmt: skip
        """A step's words ``[BLOCK_F, 8]`` as the left operand ``[BLOCK_F, 64]`` in ``dt``: this
        lane's byte of each word, both nibbles (``_values_fp32`` or ``_values_x2``)."""
        BLOCK_F: gl.constexpr = words.shape[0]
        # [1, 1, 4, 1] bytes and [1, 1, 1, 2] nibbles of L4, each from a 1-D slice of it
        byte = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(3, L4))))
        byte = gl.expand_dims(gl.expand_dims(gl.expand_dims(byte, 0), 0), 3)
        u = gl.expand_dims(gl.expand_dims(words.to(gl.uint32, bitcast=True), 2), 3)
        s4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(s, 1), 2), 3)
        m4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(m, 1), 2), 3)
        nib = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(0, gl.SliceLayout(0, L4))))
        nib = gl.expand_dims(gl.expand_dims(gl.expand_dims(nib, 0), 0), 0)
        if PACKED:  # (the nibble's dim kept: a pair takes both)
            a = _values_x2(u, (byte + (byte + 4) * 256 + nib * 0).to(gl.uint32), s4, m4, dt, ENC)
        else:
            a = _values_fp32(u, (byte * 8 + nib * 4).to(gl.uint32), s4, m4, dt, ENC)
        a = gl.convert_layout(a.reshape([BLOCK_F, 64]), DOT_A, assert_trivial=True)
        # a copy for the product (the pattern Triton adopted for triton#9433, so that ptxas
        # keeps the operand until the wait that retires it; here it compiles to nothing, the
        # pairs of steps are what give each product registers of its own)
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [a], dtype=a.dtype,
                                         is_pure=False, pack=2)  # fmt: skip

    @gluon.jit
    def _values_fp32(u, shift, s4, m4, dt: gl.constexpr, ENC: gl.constexpr):
        """As the dequantize kernel makes them: each code a float from its bits (``2^23 + c``
        less ``2^23``: exact, no conversion instruction), then fp32 ``c * s + min`` or ``(c -
        8) * s``, rounded to ``dt``: ~5.5 instructions a weight."""
        c = (u >> shift) & 15
        cf = (c | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
        if ENC == 0:
            v = cf * s4 + m4
        else:
            v = (cf - 8.0) * s4
        return v.to(dt)

    @gluon.jit
    def _values_x2(u, sel, s4, m4, dt: gl.constexpr, ENC: gl.constexpr):
        """Both nibbles of a byte at once, in ``dt`` pairs (``bf16x2`` / ``f16x2``, ``_X2_ASM``;
        ``sel``: the ``prmt`` selector of this lane's byte): the low nibble into the low half's
        mantissa and the high one into the high half's, on the bits of ``2^7`` (bf16) or
        ``2^10`` (fp16), whose mantissa step there is 1, that constant subtracted (exact:
        ``c``), then one paired FMA by the scale and the min (symmetric: ``-8 s``, exact): 5
        instructions a pair. The scale and min are rounded to ``dt`` first, so a weight can
        differ from the fp32 decode by up to ``15 |ds| + |dmin|`` (each a half ulp of ``dt``)
        on top of its own rounding."""
        if ENC == 0:
            m = m4
        else:
            m = -8.0 * s4
        sv = s4.to(dt)
        # $0: the pair; $1 $2: the word (twice), $3 $4: the selector (twice), $5 the scale pair,
        # $6 the min pair
        if dt == gl.bfloat16:
            asm: gl.constexpr = _X2_BF16
        else:
            asm: gl.constexpr = _X2_F16
        return gl.inline_asm_elementwise(asm, "=r,r,r,r,r,r,r", [u, sel, sv, m.to(dt)],
                                         dtype=sv.dtype, is_pure=True, pack=2)  # fmt: skip

    @gluon.jit
    def _refill(x_desc, c_desc, s_desc, m_desc, xs, cs, ss, ms, bars, i, n_steps, t0, f0, s0,
                GS: gl.constexpr, ENC: gl.constexpr, SCALES_TMA: gl.constexpr):  # fmt: skip
        """Start copying step ``i``'s activations, codes and (8 groups from its own) scales and
        mins (if the slice has the step) into its ring slot, on one barrier."""
        STAGES: gl.constexpr = xs.shape[0]
        slot = i % STAGES
        pred = i < n_steps
        SB: gl.constexpr = (s_desc.block_type.nbytes * (2 if ENC == 0 else 1)) if SCALES_TMA else 0
        NB: gl.constexpr = x_desc.block_type.nbytes + c_desc.block_type.nbytes + SB
        bar = bars.index(slot)
        mbarrier.expect(bar, NB, pred=pred)
        k = s0 + i
        _tma_load(x_desc, [t0, k * 64], bar, xs.index(slot), pred=pred)
        _tma_load(c_desc, [f0, k * 8], bar, cs.index(slot), pred=pred)
        if SCALES_TMA:
            _tma_load(s_desc, [f0, (k * 64) // GS], bar, ss.index(slot), pred=pred)
            if ENC == 0:
                _tma_load(m_desc, [f0, (k * 64) // GS], bar, ms.index(slot), pred=pred)

    @gluon.jit
    def _issue(acc, i, s_i, m_i, n_steps, N, xs, cs, ss, ms, bars, scales_ptr, mins_ptr, G, f0, s0,
               dt: gl.constexpr, GS: gl.constexpr, ENC: gl.constexpr, L4: gl.constexpr,
               DOT_A: gl.constexpr, LWV: gl.constexpr, LSV: gl.constexpr,
               SCALES_TMA: gl.constexpr, PACKED: gl.constexpr):  # fmt: skip
        """Step ``i``: wait for its ring slot, decode its weight and start its product (async).
        Returns the accumulator, the product's operand (kept alive till its wait) and, with
        ``SCALES_TMA`` off, step ``i + 1``'s scales and mins, loaded a step ahead of their use
        (``s_i`` / ``m_i``: this step's, loaded by the step before)."""
        STAGES: gl.constexpr = xs.shape[0]
        BLOCK_F: gl.constexpr = cs.shape[1]
        LW: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, L4))
        LR: gl.constexpr = gl.SliceLayout(1, LW)
        slot = i % STAGES
        if not SCALES_TMA:  # the last step loads its own again (in bounds)
            nxt = gl.minimum(i + 1, n_steps - 1)
            s_n, m_n = _scales_global(scales_ptr, mins_ptr, N, G, f0, ((s0 + nxt) * 64) // GS,
                                      BLOCK_F, LR, ENC)  # fmt: skip
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        # the codes as loaded (LWV) are LW's: the same lanes, registers renamed
        words = gl.convert_layout(cs.index(slot).load(LWV), LW)
        if SCALES_TMA:
            s_i, m_i = _scales_ring(ss, ms, slot, LSV, LR, ENC)
            s_n, m_n = s_i, m_i  # (unused)
        a = _decode(words, s_i, m_i, dt, ENC, L4, DOT_A, PACKED)
        acc = warpgroup_mma(a, xs.index(slot).permute([1, 0]), acc, is_async=True)
        return acc, a, s_n, m_n

    @gluon.jit(do_not_specialize=["M"])
    def gemm16_regs_kernel(
        x_desc,
        c_desc,
        s_desc,
        m_desc,
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
        stride_om,
        k_steps,
        ENC: gl.constexpr,
        GS: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_F: gl.constexpr,
        BLOCK_T: gl.constexpr,
        SPLIT_K: gl.constexpr,
        STAGES: gl.constexpr,
        ACC: gl.constexpr,
        DOT_A: gl.constexpr,
        L4: gl.constexpr,
        LWV: gl.constexpr,
        LSV: gl.constexpr,
        X_SL: gl.constexpr,
        C_SL: gl.constexpr,
        S_SL: gl.constexpr,
        PENDING: gl.constexpr = 1,
        SCALES_TMA: gl.constexpr = False,
        PACKED: gl.constexpr = True,
    ):
        """TMA descriptors: ``x_desc`` the activations ``[M, K]`` (block ``[BLOCK_T, 64]``,
        ``X_SL``), ``c_desc`` the codes as int32 words ``[N, K / 8]`` (block ``[BLOCK_F, 8]``,
        ``C_SL``), ``s_desc`` / ``m_desc`` the scales / mins ``[N, G]`` (block ``[BLOCK_F, 8 or
        16]`` groups from the step's own, ``S_SL``; affine only: ``m_desc`` is ``s_desc``
        otherwise; with ``SCALES_TMA`` off, unused: ``c_desc`` again); ``scales_ptr`` /
        ``mins_ptr`` the same tensors, loaded a step ahead into registers with ``SCALES_TMA``
        off (the default: the TMA copies of them fault on the H200); ``ws_ptr`` /
        ``lock_ptr``: the split-K workspace ``[SPLIT_K, M, N]`` and counters
        (unused with ``SPLIT_K`` = 1); grid axis 1 the K slices of ``k_steps`` steps each (at
        least one). K and the group size multiples of 64.

        The steps go in pairs, each with its own operand registers: step ``i + 1`` is decoded
        while step ``i``'s product reads the other set (``PENDING`` = 1; 0: none in flight, a
        check: the same sums in the same order)."""
        dt: gl.constexpr = x_desc.block_type.element_ty
        pid = gl.program_id(0)
        n_t = gl.cdiv(M, BLOCK_T)
        pid_t = pid % n_t
        pid_f = pid // n_t
        t0 = pid_t * BLOCK_T
        pid_k = gl.program_id(1)
        s0 = pid_k * k_steps
        n_steps = gl.minimum(K // 64 - s0, k_steps)

        f0 = pid_f * BLOCK_F
        xs = gl.allocate_shared_memory(dt, [STAGES, BLOCK_T, 64], X_SL)
        st_dt: gl.constexpr = s_desc.block_type.element_ty
        cs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_F, 8], C_SL)
        if SCALES_TMA:
            S_BOX: gl.constexpr = s_desc.block_type.shape[1]
            ss = gl.allocate_shared_memory(st_dt, [STAGES, BLOCK_F, S_BOX], S_SL)
            ms = gl.allocate_shared_memory(st_dt, [STAGES, BLOCK_F, S_BOX], S_SL)  # (affine)
        else:  # (never read: the scales come from global memory)
            ss = cs
            ms = cs
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(bars.index(st), count=1)
        fence_async_shared()
        for st in gl.static_range(STAGES):
            _refill(x_desc, c_desc, s_desc, m_desc, xs, cs, ss, ms, bars, st, n_steps, t0, f0,
                    s0, GS, ENC, SCALES_TMA)  # fmt: skip

        # step 0, peeled: no path may zero the accumulator between products in flight
        LR: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4)))
        if SCALES_TMA:
            s_i = gl.zeros([BLOCK_F], gl.float32, LR)  # (from the ring instead)
            m_i = s_i
        else:
            s_i, m_i = _scales_global(scales_ptr, mins_ptr, N, G, f0, (s0 * 64) // GS, BLOCK_F, LR,
                                      ENC)  # fmt: skip
        acc = gl.zeros([BLOCK_F, BLOCK_T], gl.float32, ACC)
        acc, a_even, s_i, m_i = _issue(acc, 0, s_i, m_i, n_steps, N, xs, cs, ss, ms, bars,
                                       scales_ptr, mins_ptr, G, f0, s0, dt, GS, ENC, L4, DOT_A,
                                       LWV, LSV, SCALES_TMA, PACKED)  # fmt: skip
        # (waits for none: the loop carries the accumulator as the wait's tensor)
        acc, a_even = warpgroup_mma_wait(num_outstanding=1, deps=[acc, a_even])
        for j in range((n_steps - 1) // 2):
            i = 1 + 2 * j
            acc, a_odd, s_i, m_i = _issue(acc, i, s_i, m_i, n_steps, N, xs, cs, ss, ms, bars,
                                          scales_ptr, mins_ptr, G, f0, s0, dt, GS, ENC, L4,
                                          DOT_A, LWV, LSV, SCALES_TMA, PACKED)  # fmt: skip
            acc, a_even = warpgroup_mma_wait(num_outstanding=PENDING, deps=[acc, a_even])
            _cta_barrier()  # every warpgroup's product i - 1 is done: refill its slot
            _refill(x_desc, c_desc, s_desc, m_desc, xs, cs, ss, ms, bars, i - 1 + STAGES,
                    n_steps, t0, f0, s0, GS, ENC, SCALES_TMA)  # fmt: skip
            acc, a_even, s_i, m_i = _issue(acc, i + 1, s_i, m_i, n_steps, N, xs, cs, ss, ms, bars,
                                           scales_ptr, mins_ptr, G, f0, s0, dt, GS, ENC, L4,
                                           DOT_A, LWV, LSV, SCALES_TMA, PACKED)  # fmt: skip
            acc, a_odd = warpgroup_mma_wait(num_outstanding=PENDING, deps=[acc, a_odd])
            _cta_barrier()
            _refill(x_desc, c_desc, s_desc, m_desc, xs, cs, ss, ms, bars, i + STAGES, n_steps,
                    t0, f0, s0, GS, ENC, SCALES_TMA)  # fmt: skip
        if n_steps % 2 == 0:  # the last step, unpaired (its slot is never refilled)
            acc, a_odd, s_i, m_i = _issue(acc, n_steps - 1, s_i, m_i, n_steps, N, xs, cs, ss, ms,
                                          bars, scales_ptr, mins_ptr, G, f0, s0, dt, GS, ENC,
                                          L4, DOT_A, LWV, LSV, SCALES_TMA, PACKED)  # fmt: skip
            acc, a_even, a_odd = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a_even, a_odd])
        else:
            acc, a_even = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a_even])
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(st))
        _store(acc, pid, pid_k, pid_f, pid_t, M, N, out_ptr, stride_om, bias_ptr, ws_ptr,
               lock_ptr, HAS_BIAS, SPLIT_K, BLOCK_F, BLOCK_T, ACC)  # fmt: skip
