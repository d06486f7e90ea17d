"""``gemm16_kernel`` (Gluon, sm_90+): ``y = x @ W^T + b`` for many rows of ``x`` (a prompt's
prefill, large batches), int4 affine / symmetric codes in groups of 64+ along the input dim.

Past a few dozen rows the product is bound by the tensor cores. Each K step of 64 decodes a
``[BLOCK_N, 64]`` tile of the weight into the activations' 16-bit dtype (the dequantize kernel's
values: fp32 ``code * s + min``, each operation rounded once, then rounded to the dtype) and
stores it in shared memory, where an asynchronous ``wgmma`` multiplies it with the activations'
tile while the warps decode the next step: the weight tiles alternate between two buffers, and
``warpgroup_mma_wait(1)`` lets one product run behind the decoding. The activations' and codes'
tiles come in by the TMA engine, ``STAGES`` steps ahead. So the product is decode + cuBLAS's,
up to the order of the fp32 sums, without the weight-sized temporary and its round trip through
HBM.

STATUS (stop 32, not merged; main keeps decode + cuBLAS past 64 rows). Correct against decode +
``F.linear`` on the H200 (relative error 2.9e-3 in bf16), but 0.34-0.60x cuBLAS bf16 and
0.54-0.91x decode + cuBLAS at 256 and 1024 rows (main's ``benches/results/gpu_gemm16_gluon*``).
Products 1-3 deep in flight (``DEPTH``), 16-warp CTAs, codes as words, a fused multiply-add and
scale loads after the fence changed it by a few percent. Nsight Compute (1024 rows of 8192^2,
``gpu_gemm16_ncu*_h200.txt``): 0.34 instructions issued per scheduler-cycle with 2 warps each,
stalls mostly at the CTA barriers, issuing and fixed-latency / L1 waits, the tensor cores' own
stall under 1%: the decode (~8 instructions a weight) and the product share the warps, and at
128 rows a tile one weight's decode costs on the CUDA cores what its multiply-adds cost on the
tensor cores. Next: warp-specialized partitions (``gl.warp_specialize``: a TMA warp, decode
warps writing the weight ring, ``wgmma`` warpgroups consuming it, mbarriers instead of CTA
barriers), 256-row tiles, and a cheaper decode (bf16x2 arithmetic).

A Triton (``tl.dot``) version of the same product (this branch's history, commits 6362342 and
f267871) ran 0.14-0.44x cuBLAS bf16: with the weight in registers each ``wgmma`` waited for
the previous one, and with the weight in shared memory each step waited for its product before
decoding the next.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 (launch)

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # a CTA-wide barrier: ``barrier`` from Triton 3.7, ``thread_barrier`` before
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GEMM16 = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GEMM16 = False

#: columns of K a step: one 128-byte swizzled row of 16-bit activations / weights
BK = 64
#: encoding ids
GEMM16_ENC = {"affine": 0, "symmetric": 1}


def layouts(block_m: int, block_n: int, warps: int) -> dict:
    """The kernel's constexpr layouts: the accumulator (``wgmma``'s, warps along the rows: 16
    rows a warp), the codes' tile as int32 words ``[BLOCK_N, 8]`` (a word = 8 codes a thread)
    and its 8 codes along a last dim in the same thread (``L3``), and the shared layouts of the
    activations', codes' and weight's tiles."""
    # warps along the rows (16 each, in fours: a warpgroup), the rest along the features
    wm = min(warps, block_m // 16)
    wn = warps // max(wm, 1)
    if wm % 4 or block_m % (16 * wm) or wm * wn != warps or block_n % (8 * wn) or block_n > 256:
        raise ValueError(f"gemm16: no wgmma layout for {block_m} x {block_n} on {warps} warps")
    return dict(
        ACC=gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[wm, wn], instr_shape=[16, block_n // wn, 16]
        ),
        L3=gl.BlockedLayout([1, 1, 8], [4, 8, 1], [warps, 1, 1], [2, 1, 0]),
        X_SL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        W_SL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        C_SL=gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2),
    )


if HAVE_GEMM16:

    @gluon.jit
    def _refill(x_desc, c_desc, xs, cs, bars, i, n_steps, m0, n0, STAGES: gl.constexpr):
        """Start copying step ``i``'s activations and codes (if the K range has it) into its
        ring slot."""
        slot = i % STAGES
        pred = i < n_steps
        NBYTES: gl.constexpr = x_desc.block_type.nbytes + c_desc.block_type.nbytes
        mbarrier.expect(bars.index(slot), NBYTES, pred=pred)
        _tma_load(x_desc, [m0, i * 64], bars.index(slot), xs.index(slot), pred=pred)
        _tma_load(c_desc, [n0, i * 8], bars.index(slot), cs.index(slot), pred=pred)

    @gluon.jit
    def _group(scales_ptr, mins_ptr, rows, rmask, G, i, GS: gl.constexpr, ENC: gl.constexpr):
        """Step ``i``'s scale and min (affine) or offset (symmetric: ``-8 s``) of each row, fp32."""
        g = (i * 64) // GS
        s = gl.load(scales_ptr + rows * G + g, mask=rmask, other=0.0).to(gl.float32)
        if ENC == 0:
            m = gl.load(mins_ptr + rows * G + g, mask=rmask, other=0.0).to(gl.float32)
        else:
            m = s
        return s, m

    @gluon.jit
    def _values(words, s, m, ENC: gl.constexpr, L3: gl.constexpr):
        """fp32 values ``[BLOCK_N, 8, 8]`` of int32 words of 8 codes (``[BLOCK_N, 8]``): code
        ``k`` of a word is its nibble ``k`` (the stream is LSB first), made a float from its bits
        (``2^23 + c`` less ``2^23``, exact; not a conversion, which issues at a quarter of the
        FP32 rate), then the decode's ``c * s + min`` or ``(c - 8) * s``."""
        shift = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))) * 4
        u = words.to(gl.uint32, bitcast=True)  # a logical shift: no sign extension to mask off
        c = (u[:, :, None] >> shift[None, None, :]) & 15
        cf = (c | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0
        if ENC == 0:
            v = cf * s[:, None, None] + m[:, None, None]
        else:
            v = (cf - 8.0) * s[:, None, None]
        return v

    @gluon.jit
    def _step(x_desc, c_desc, xs, cs, ws, bars, acc, s_i, m_i, scales_ptr, mins_ptr, rows, rmask,
              G, i, n_steps, m0, n0, ENC: gl.constexpr, GS: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, L3: gl.constexpr, DEPTH: gl.constexpr):  # fmt: skip
        """One K step: decode step ``i``'s weight tile into its buffer, start its product
        behind the previous one's, refill the slot the previous product read. Returns the
        accumulator and the next step's scales and mins (loaded a step ahead)."""
        dt: gl.constexpr = x_desc.block_type.element_ty
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        words = cs.index(slot).load(gl.SliceLayout(2, L3))
        w = _values(words, s_i, m_i, ENC, L3).to(dt).reshape([BLOCK_N, 64])  # k = 8j + nibble
        wbuf = ws.index(i % (DEPTH + 1))
        wbuf.store(w)
        fence_async_shared()
        _cta_barrier()  # every warp's part of the tile is stored before the product
        # the next step's scales, loaded after the fence: the fence waits for this thread's
        # loads in flight, so loaded before it they would stall every step
        s_next, m_next = _group(scales_ptr, mins_ptr, rows, rmask, G,
                                gl.minimum(i + 1, n_steps - 1), GS, ENC)  # fmt: skip
        acc = warpgroup_mma(xs.index(slot), wbuf.permute([1, 0]), acc, is_async=True)
        # the product DEPTH steps back is done: the slot it read may be refilled
        acc = warpgroup_mma_wait(num_outstanding=DEPTH, deps=[acc])
        _cta_barrier()
        if i >= DEPTH:
            _refill(x_desc, c_desc, xs, cs, bars, i - DEPTH + STAGES, n_steps, m0, n0, STAGES)
        return acc, s_next, m_next

    @gluon.jit(do_not_specialize=["M"])
    def gemm16_kernel(
        x_desc,
        c_desc,
        scales_ptr,
        mins_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        G,
        stride_om,
        ENC: gl.constexpr,
        GS: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        DEPTH: gl.constexpr,
        ACC: gl.constexpr,
        L3: gl.constexpr,
        X_SL: gl.constexpr,
        W_SL: gl.constexpr,
        C_SL: gl.constexpr,
    ):
        """``x_desc``: the activations ``[M, K]`` (block ``[BLOCK_M, 64]``, ``X_SL``);
        ``c_desc``: the codes as int32 words ``[N, K / 8]`` (block ``[BLOCK_N, 8]``, ``C_SL``);
        K a multiple of 64, the group size a multiple of 64."""
        dt: gl.constexpr = x_desc.block_type.element_ty
        pid = gl.program_id(0)
        n_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % n_m
        pid_n = pid // n_m
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        n_steps = K // 64
        xs = gl.allocate_shared_memory(dt, [STAGES, BLOCK_M, 64], X_SL)
        cs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 8], C_SL)
        ws = gl.allocate_shared_memory(dt, [DEPTH + 1, BLOCK_N, 64], W_SL)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()
        for s in gl.static_range(STAGES):
            _refill(x_desc, c_desc, xs, cs, bars, s, n_steps, m0, n0, STAGES)

        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        rmask = rows < N
        s_i, m_i = _group(scales_ptr, mins_ptr, rows, rmask, G, 0, GS, ENC)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC)
        # step 0 before the loop: every path to the last wait passes a product, so ptxas keeps
        # the products in flight across steps (a path that only zeroes the accumulator and
        # reaches the wait makes it wait after each one: "wgmma serialized", C7515)
        acc, s_i, m_i = _step(x_desc, c_desc, xs, cs, ws, bars, acc, s_i, m_i, scales_ptr,
                              mins_ptr, rows, rmask, G, 0, n_steps, m0, n0, ENC, GS, BLOCK_N,
                              STAGES, L3, DEPTH)  # fmt: skip
        for i in range(1, n_steps):
            acc, s_i, m_i = _step(x_desc, c_desc, xs, cs, ws, bars, acc, s_i, m_i, scales_ptr,
                                  mins_ptr, rows, rmask, G, i, n_steps, m0, n0, ENC, GS,
                                  BLOCK_N, STAGES, L3, DEPTH)  # fmt: skip
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC))
        nmask = offs_n < N
        if HAS_BIAS:
            acc += gl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(gl.float32)[None, :]
        mask = (offs_m < M)[:, None] & nmask[None, :]
        ptr = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        gl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=mask)


def ws_layouts(block_m: int, block_n: int, mma_warps: int, decode_warps: int) -> dict:
    """``gemm16_ws_kernel``'s layouts: the accumulator over the ``wgmma`` warpgroups (16 rows a
    warp, ``mma_warps`` of them along the rows), the decoders' word tile over ``decode_warps``,
    and the shared tiles (as ``layouts``)."""
    if mma_warps % 4 or block_m % (16 * mma_warps):
        raise ValueError(f"gemm16_ws: {block_m} rows do not split over {mma_warps} warps")
    if block_n % 8 or block_n > 256 or block_n % (4 * decode_warps):
        raise ValueError(f"gemm16_ws: no layout for {block_n} features, {decode_warps} warps")
    lay = layouts(block_m, block_n, mma_warps)
    lay["ACC"] = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[mma_warps, 1], instr_shape=[16, block_n, 16]
    )
    lay["L3"] = gl.BlockedLayout([1, 1, 8], [4, 8, 1], [decode_warps, 1, 1], [2, 1, 0])
    return lay


if HAVE_GEMM16:

    @gluon.jit
    def _ws_load_x(x_desc, xs, x_ready, x_empty, n_steps, m0, k0):
        """Loader warp: the activations' tiles into their ring, each slot as soon as the product
        that read it is done."""
        RING: gl.constexpr = xs.shape[0]
        for i in range(n_steps):
            slot = i % RING
            mbarrier.wait(x_empty.index(slot), ((i // RING) & 1) ^ 1)  # fresh: passes
            mbarrier.expect(x_ready.index(slot), x_desc.block_type.nbytes)
            _tma_load(x_desc, [m0, (k0 + i) * 64], x_ready.index(slot), xs.index(slot))

    @gluon.jit
    def _ws_load_codes(c_desc, cs, c_ready, c_empty, n_steps, n0, k0):
        """Loader warp: the codes' tiles into their ring, each slot as soon as the decoders have
        read it."""
        RING: gl.constexpr = cs.shape[0]
        for i in range(n_steps):
            slot = i % RING
            mbarrier.wait(c_empty.index(slot), ((i // RING) & 1) ^ 1)
            mbarrier.expect(c_ready.index(slot), c_desc.block_type.nbytes)
            _tma_load(c_desc, [n0, (k0 + i) * 8], c_ready.index(slot), cs.index(slot))

    @gluon.jit
    def _ws_decode(cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready, s_empty, n_steps,
                   first, ENC: gl.constexpr, L3: gl.constexpr, DIAG: gl.constexpr,
                   GROUPS: gl.constexpr):  # fmt: skip
        """Decoder warps: each step's codes into the weight tile (the dequantize kernel's
        values, as ``gemm16_kernel``), stored into the weight ring for the ``wgmma`` warps. The
        scales come from their loader warp through a ring in shared memory. ``DIAG``
        (timing only, wrong results): 2 no decode (zeros stored). With ``GROUPS`` = 2 decoder
        groups, this one takes every other step from ``first``: one group decodes while the
        other waits at its fence (which waits for its stores)."""
        C_RING: gl.constexpr = cs.shape[0]
        W_RING: gl.constexpr = ws.shape[0]
        S_RING: gl.constexpr = ss.shape[0]
        BLOCK_N: gl.constexpr = ws.shape[1]
        LR: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
        for i in range(first, n_steps, GROUPS):
            slot = i % C_RING
            sslot = i % S_RING
            mbarrier.wait(c_ready.index(slot), (i // C_RING) & 1)
            words = cs.index(slot).load(gl.SliceLayout(2, L3))
            mbarrier.wait(s_ready.index(sslot), (i // S_RING) & 1)
            s = ss.index(sslot).load(LR)
            if ENC == 0:
                m = ms.index(sslot).load(LR)
            else:
                m = s
            if DIAG == 2:
                w = gl.zeros([BLOCK_N, 8, 8], ws.dtype, L3).reshape([BLOCK_N, 64])
            else:
                w = _values(words, s, m, ENC, L3).to(ws.dtype).reshape([BLOCK_N, 64])
            buf = i % W_RING
            mbarrier.wait(w_empty.index(buf), ((i // W_RING) & 1) ^ 1)
            ws.index(buf).store(w)
            fence_async_shared()  # the generic-proxy stores, before the wgmma reads them
            _cta_barrier()  # every decoder warp's part is stored (the arrives are one thread's)
            mbarrier.arrive(w_ready.index(buf))
            # the codes and scales were read (the stored values depend on them)
            mbarrier.arrive(c_empty.index(slot))
            mbarrier.arrive(s_empty.index(sslot))

    @gluon.jit
    def _ws_load_scales(scales_ptr, mins_ptr, ss, ms, s_ready, s_empty, n_steps, n0, k0, N, G,
                        GS: gl.constexpr, ENC: gl.constexpr):  # fmt: skip
        """Loader warp: each step's scales (and mins) of the tile's rows, fp32, into the scales'
        ring for the decoders. A gather (one value a row) whose latency is about a step's, so
        loaded ``AHEAD`` = 2 steps before it is stored (loaded by the decoders themselves, the
        loads would be in flight at their fence every step, which waits for them)."""
        S_RING: gl.constexpr = ss.shape[0]
        BLOCK_N: gl.constexpr = ss.shape[1]
        LS: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        rows = n0 + gl.arange(0, BLOCK_N, layout=LS)
        rmask = rows < N
        s0, m0 = _group(scales_ptr, mins_ptr, rows, rmask, G, k0, GS, ENC)
        s1, m1 = _group(scales_ptr, mins_ptr, rows, rmask, G, k0 + gl.minimum(1, n_steps - 1),
                        GS, ENC)  # fmt: skip
        for j in range(n_steps):
            slot = j % S_RING
            mbarrier.wait(s_empty.index(slot), ((j // S_RING) & 1) ^ 1)
            ss.index(slot).store(s0)
            if ENC == 0:
                ms.index(slot).store(m0)
            _cta_barrier()  # every lane's rows are stored (the arrive is one thread's)
            mbarrier.arrive(s_ready.index(slot))
            s0 = s1
            m0 = m1
            s1, m1 = _group(scales_ptr, mins_ptr, rows, rmask, G,
                            k0 + gl.minimum(j + 2, n_steps - 1), GS, ENC)  # fmt: skip

    @gluon.jit
    def _ws_mma(xs, ws, x_ready, x_empty, w_ready, w_empty, n_steps, BLOCK_M: gl.constexpr,
                ACC: gl.constexpr):  # fmt: skip
        """The default partition (``wgmma`` warpgroups): one asynchronous product a step, one
        behind in flight; each finished product frees its activations' slot and weight
        buffer."""
        X_RING: gl.constexpr = xs.shape[0]
        W_RING: gl.constexpr = ws.shape[0]
        BLOCK_N: gl.constexpr = ws.shape[1]
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, ACC)
        # step 0 peeled (see gemm16_kernel: no path may reach a wait with a zeroed accumulator)
        mbarrier.wait(x_ready.index(0), 0)
        mbarrier.wait(w_ready.index(0), 0)
        acc = warpgroup_mma(xs.index(0), ws.index(0).permute([1, 0]), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])  # (waits for nothing)
        for i in range(1, n_steps):
            xslot = i % X_RING
            buf = i % W_RING
            mbarrier.wait(x_ready.index(xslot), (i // X_RING) & 1)
            mbarrier.wait(w_ready.index(buf), (i // W_RING) & 1)
            acc = warpgroup_mma(xs.index(xslot), ws.index(buf).permute([1, 0]), acc,
                                is_async=True)  # fmt: skip
            acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
            _cta_barrier()  # every warpgroup's product i - 1 is done
            mbarrier.arrive(x_empty.index((i - 1) % X_RING))
            mbarrier.arrive(w_empty.index((i - 1) % W_RING))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        return (acc,)  # warp_specialize takes the default partition's results as a tuple

    @gluon.jit(do_not_specialize=["M"])
    def gemm16_ws_kernel(
        x_desc,
        c_desc,
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
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        SPLIT_K: gl.constexpr,
        X_RING: gl.constexpr,
        C_RING: gl.constexpr,
        W_RING: gl.constexpr,
        DECODE_WARPS: gl.constexpr,
        DECODE_REGS: gl.constexpr,
        DECODE_GROUPS: gl.constexpr,
        DIAG: gl.constexpr,
        ACC: gl.constexpr,
        L3: gl.constexpr,
        X_SL: gl.constexpr,
        W_SL: gl.constexpr,
        C_SL: gl.constexpr,
    ):
        """``gemm16_kernel``'s product, warp-specialized: a loader warp for the activations, one
        for the codes, ``DECODE_WARPS`` decoder warps filling a ring of ``W_RING`` weight tiles,
        and the kernel's own warps (the default partition) issuing the ``wgmma``; the partitions
        hand tiles over through mbarriers, so decoding runs ahead of the products instead of
        taking turns with them at CTA barriers. Arguments as ``gemm16_kernel``."""
        dt: gl.constexpr = x_desc.block_type.element_ty
        pid = gl.program_id(0)
        n_m = gl.cdiv(M, BLOCK_M)
        m0 = (pid % n_m) * BLOCK_M
        n0 = (pid // n_m) * BLOCK_N
        # split K: grid axis 1 takes ``k_steps`` steps of 64 each (the last what is left)
        pid_k = gl.program_id(1)
        k0 = pid_k * k_steps
        n_steps = gl.minimum(K // 64 - k0, k_steps)
        xs = gl.allocate_shared_memory(dt, [X_RING, BLOCK_M, 64], X_SL)
        cs = gl.allocate_shared_memory(gl.int32, [C_RING, BLOCK_N, 8], C_SL)
        ws = gl.allocate_shared_memory(dt, [W_RING, BLOCK_N, 64], W_SL)
        S_RING: gl.constexpr = C_RING
        SS_L: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        ss = gl.allocate_shared_memory(gl.float32, [S_RING, BLOCK_N], SS_L)
        ms = gl.allocate_shared_memory(gl.float32, [S_RING, BLOCK_N], SS_L)
        BL: gl.constexpr = mbarrier.MBarrierLayout()
        x_ready = gl.allocate_shared_memory(gl.int64, [X_RING, 1], BL)
        x_empty = gl.allocate_shared_memory(gl.int64, [X_RING, 1], BL)
        c_ready = gl.allocate_shared_memory(gl.int64, [C_RING, 1], BL)
        c_empty = gl.allocate_shared_memory(gl.int64, [C_RING, 1], BL)
        w_ready = gl.allocate_shared_memory(gl.int64, [W_RING, 1], BL)
        w_empty = gl.allocate_shared_memory(gl.int64, [W_RING, 1], BL)
        for s in gl.static_range(X_RING):
            mbarrier.init(x_ready.index(s), count=1)
            mbarrier.init(x_empty.index(s), count=1)
        for s in gl.static_range(C_RING):
            mbarrier.init(c_ready.index(s), count=1)
            mbarrier.init(c_empty.index(s), count=1)
        for s in gl.static_range(W_RING):
            mbarrier.init(w_ready.index(s), count=1)
            mbarrier.init(w_empty.index(s), count=1)
        s_ready = gl.allocate_shared_memory(gl.int64, [S_RING, 1], BL)
        s_empty = gl.allocate_shared_memory(gl.int64, [S_RING, 1], BL)
        for s in gl.static_range(S_RING):
            mbarrier.init(s_ready.index(s), count=1)
            mbarrier.init(s_empty.index(s), count=1)
        fence_async_shared()

        if DECODE_GROUPS == 1:
            results = gl.warp_specialize(
                [
                    (_ws_mma, (xs, ws, x_ready, x_empty, w_ready, w_empty, n_steps, BLOCK_M, ACC)),
                    (_ws_load_x, (x_desc, xs, x_ready, x_empty, n_steps, m0, k0)),
                    (_ws_load_codes, (c_desc, cs, c_ready, c_empty, n_steps, n0, k0)),
                    (
                        _ws_load_scales,
                        (
                            scales_ptr,
                            mins_ptr,
                            ss,
                            ms,
                            s_ready,
                            s_empty,
                            n_steps,
                            n0,
                            k0,
                            N,
                            G,
                            GS,
                            ENC,
                        ),
                    ),
                    (
                        _ws_decode,
                        (
                            cs,
                            ws,
                            ss,
                            ms,
                            c_ready,
                            c_empty,
                            w_ready,
                            w_empty,
                            s_ready,
                            s_empty,
                            n_steps,
                            0,
                            ENC,
                            L3,
                            DIAG,
                            1,
                        ),
                    ),
                ],
                [1, 1, 1, DECODE_WARPS],
                [24, 24, 48, DECODE_REGS],
            )
        else:
            results = gl.warp_specialize(
                [
                    (_ws_mma, (xs, ws, x_ready, x_empty, w_ready, w_empty, n_steps, BLOCK_M, ACC)),
                    (_ws_load_x, (x_desc, xs, x_ready, x_empty, n_steps, m0, k0)),
                    (_ws_load_codes, (c_desc, cs, c_ready, c_empty, n_steps, n0, k0)),
                    (_ws_load_scales, (scales_ptr, mins_ptr, ss, ms, s_ready, s_empty, n_steps,
                                       n0, k0, N, G, GS, ENC)),
                    (_ws_decode, (cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready,
                                  s_empty, n_steps, 0, ENC, L3, DIAG, 2)),
                    (_ws_decode, (cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready,
                                  s_empty, n_steps, 1, ENC, L3, DIAG, 2)),
                ],
                [1, 1, 1, DECODE_WARPS, DECODE_WARPS],
                [24, 24, 48, DECODE_REGS, DECODE_REGS],
            )  # fmt: skip
        acc = results[0]

        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC))
        nmask = offs_n < N
        mask = (offs_m < M)[:, None] & nmask[None, :]
        if SPLIT_K > 1:  # as epilogue.store_result: the last slice to arrive adds them in order
            wsp = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            gl.store(wsp + pid_k * M * N, acc, mask=mask)
            _cta_barrier()  # every thread's partials are stored before the counter moves
            arrived = gl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                acc = gl.load(wsp, mask=mask, other=0.0, cache_modifier=".cg")
                for sk in gl.static_range(1, SPLIT_K):
                    acc += gl.load(wsp + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                _ws_write(acc, offs_m, offs_n, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
                gl.atomic_xchg(lock_ptr + pid, 0)
        else:
            _ws_write(acc, offs_m, offs_n, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)

    @gluon.jit
    def _ws_write(acc, offs_m, offs_n, mask, N, out_ptr, stride_om, bias_ptr,
                  HAS_BIAS: gl.constexpr):  # fmt: skip
        """``out = acc (+ bias)`` in out's dtype."""
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(gl.float32)[None, :]
        ptr = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        gl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=mask)
