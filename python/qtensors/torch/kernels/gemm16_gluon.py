"""``gemm16_kernel`` (Gluon, sm_90+): ``y = x @ W^T + b`` for a prompt's worth of rows of ``x``
(65-256), int4 affine / symmetric codes in groups of 64+ along the input dim, without the
decoded weight in HBM.

Warp-specialized: the partitions of a CTA hand tiles over through mbarrier rings.

* a loader warp brings the activations' ``[BLOCK_M, 64]`` tiles in by TMA, ``stages`` ahead;
* a loader warp brings the codes' ``[BLOCK_N, 64]`` tiles (as int32 words) in by TMA;
* a loader warp gathers each step's scales (and mins) two steps ahead into a shared ring: loaded
  by the decoders, they would be in flight at the decoders' fence, which waits for them (every
  step, measured: the fence before a ``wgmma`` reads shared memory is ``MEMBAR`` + proxy fence);
* ``decode_warps`` decoder warps (one group, or two taking every other step, so one decodes
  while the other waits at its fence) turn the codes into the activations' 16-bit dtype (the
  dequantize kernel's values: fp32 ``code * s + min``, then rounded; with ``fuse`` the multiply
  and add are one FMA, within an ulp) and store them into a ring of ``w_ring`` weight tiles;
* the kernel's own warps (whole warpgroups) issue one asynchronous ``wgmma`` a step, one
  product behind in flight, and free each activations' slot and weight tile when its product
  is done; then they write the tile, or with ``split_k`` its fp32 partial sums (the last slice
  of a tile to arrive adds them in slice order, as ``epilogue.store_result``).

Measured (H200, bf16, us in a CUDA graph; ``benches/probe_gemm16.py``,
``benches/results/gpu_gemm16_ws_h200.txt``): 1.12-1.46x faster than decode + cuBLAS (the route
without it) at 100-256 rows on the large Llama-8B-class weights (8192^2, 14336 x 4096, 4096 x
14336), but 0.55-0.69x cuBLAS on the bf16 weight; slower than decode + cuBLAS on 4096^2 and
smaller weights and from 512 rows. So ``launch.GEMM16_TABLE`` holds the weights where it won,
and the route takes it only there (on by default since stop 41, ``launch.GEMM16_ROWS``; where
``GEMM16_REGS_TABLE`` also has the weight, ``gemm16_regs_gluon.py`` runs instead). Without
the decode (zeros stored; a diagnostic build) the pipeline itself ran 68 us against cuBLAS's 49
on 8192^2 at 256 rows: the activations are re-read from L2 by every one of the ``N / BLOCK_N``
column tiles.

The version before this one (stop 32, branch ``gemm16``) decoded and multiplied on the same
warps, with CTA barriers between them: 0.34-0.60x cuBLAS, slower than decode + cuBLAS.
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

    from .mma_int8_gluon import split_k_sum

    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # a CTA-wide barrier: ``barrier`` from Triton 3.7, ``thread_barrier`` before
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GEMM16 = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GEMM16 = False

#: encoding ids
GEMM16_ENC = {"affine": 0, "symmetric": 1}


def layouts(block_m: int, block_n: int, mma_warps: int, decode_warps: int) -> dict:
    """The kernel's constexpr layouts: the accumulator (``wgmma``'s: ``mma_warps`` along the
    rows, 16 rows a warp), the decoders' tile of int32 code words ``[BLOCK_N, 8]`` with each
    word's 8 codes along a last dim in one thread (``L3``, over ``decode_warps``), and the shared
    layouts of the activations', codes' and weight's tiles."""
    if mma_warps % 4 or block_m % (16 * mma_warps):
        raise ValueError(f"gemm16: {block_m} rows do not split over {mma_warps} wgmma warps")
    if block_n % 8 or block_n > 256 or block_n % (4 * decode_warps):
        raise ValueError(f"gemm16: no layout for {block_n} features on {decode_warps} warps")
    return dict(
        ACC=gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[mma_warps, 1], instr_shape=[16, block_n, 16]
        ),
        L3=gl.BlockedLayout([1, 1, 8], [4, 8, 1], [decode_warps, 1, 1], [2, 1, 0]),
        X_SL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        W_SL=gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2),
        C_SL=gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=32, rank=2),
    )


if HAVE_GEMM16:

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
    def _ws_load_scales(scales_ptr, mins_ptr, ss, ms, s_ready, s_empty, n_steps, n0, k0, N, G,
                        GS: gl.constexpr, ENC: gl.constexpr):  # fmt: skip
        """Loader warp: each step's scales (and mins) of the tile's rows, fp32, into the scales'
        ring for the decoders. A gather (one value a row) whose latency is about a step's, so
        loaded two steps before it is stored (loaded by the decoders themselves, the loads would
        be in flight at their fence every step, which waits for them)."""
        S_RING: gl.constexpr = ss.shape[0]
        BLOCK_N: gl.constexpr = ss.shape[1]
        LS: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        rows = n0 + gl.arange(0, BLOCK_N, layout=LS)
        rmask = rows < N
        # this step's (s_j, m_j) and the next one's (s_n, m_n), in registers
        s_j, m_j = _group(scales_ptr, mins_ptr, rows, rmask, G, k0, GS, ENC)
        s_n, m_n = _group(scales_ptr, mins_ptr, rows, rmask, G, k0 + gl.minimum(1, n_steps - 1),
                          GS, ENC)  # fmt: skip
        for j in range(n_steps):
            slot = j % S_RING
            mbarrier.wait(s_empty.index(slot), ((j // S_RING) & 1) ^ 1)
            ss.index(slot).store(s_j)
            if ENC == 0:
                ms.index(slot).store(m_j)
            _cta_barrier()  # every lane's rows are stored (the arrive is one thread's)
            mbarrier.arrive(s_ready.index(slot))
            s_j = s_n
            m_j = m_n
            s_n, m_n = _group(scales_ptr, mins_ptr, rows, rmask, G,
                              k0 + gl.minimum(j + 2, n_steps - 1), GS, ENC)  # fmt: skip

    @gluon.jit
    def _ws_decode(cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready, s_empty, n_steps,
                   first, ENC: gl.constexpr, L3: gl.constexpr, GROUPS: gl.constexpr):  # fmt: skip
        """Decoder warps: each step's codes into the weight tile (``_values``), stored into the
        weight ring for the ``wgmma`` warps; the scales from their loader warp's ring. With
        ``GROUPS`` = 2 decoder groups, this one takes every other step from ``first``: one group
        decodes while the other waits at its fence (which waits for its stores)."""
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
    def gemm16_kernel(
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
        ACC: gl.constexpr,
        L3: gl.constexpr,
        X_SL: gl.constexpr,
        W_SL: gl.constexpr,
        C_SL: gl.constexpr,
    ):
        """``x_desc``: the activations ``[M, K]`` (block ``[BLOCK_M, 64]``, ``X_SL``);
        ``c_desc``: the codes as int32 words ``[N, K / 8]`` (block ``[BLOCK_N, 8]``, ``C_SL``);
        scales and mins ``[N, G]``; ``ws_ptr`` / ``lock_ptr``: the split-K workspace
        ``[SPLIT_K, M, N]`` and counters (unused with ``SPLIT_K`` = 1); grid axis 1 the K
        slices of ``k_steps`` steps each. K and the group size multiples of 64. The partitions
        are the module docstring's."""
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

        # (the arguments written out in each call: Gluon's JIT takes no starred tuples, and a
        # tuple of constexprs cannot be a variable)
        if DECODE_GROUPS == 1:
            results = gl.warp_specialize(
                [(_ws_mma, (xs, ws, x_ready, x_empty, w_ready, w_empty, n_steps, BLOCK_M, ACC)),
                 (_ws_load_x, (x_desc, xs, x_ready, x_empty, n_steps, m0, k0)),
                 (_ws_load_codes, (c_desc, cs, c_ready, c_empty, n_steps, n0, k0)),
                 (_ws_load_scales, (scales_ptr, mins_ptr, ss, ms, s_ready, s_empty, n_steps, n0,
                                    k0, N, G, GS, ENC)),
                 (_ws_decode, (cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready,
                               s_empty, n_steps, 0, ENC, L3, 1))],
                [1, 1, 1, DECODE_WARPS],
                [24, 24, 48, DECODE_REGS],
            )  # fmt: skip
        else:  # two decoder groups, every other step each
            results = gl.warp_specialize(
                [(_ws_mma, (xs, ws, x_ready, x_empty, w_ready, w_empty, n_steps, BLOCK_M, ACC)),
                 (_ws_load_x, (x_desc, xs, x_ready, x_empty, n_steps, m0, k0)),
                 (_ws_load_codes, (c_desc, cs, c_ready, c_empty, n_steps, n0, k0)),
                 (_ws_load_scales, (scales_ptr, mins_ptr, ss, ms, s_ready, s_empty, n_steps, n0,
                                    k0, N, G, GS, ENC)),
                 (_ws_decode, (cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready,
                               s_empty, n_steps, 0, ENC, L3, 2)),
                 (_ws_decode, (cs, ws, ss, ms, c_ready, c_empty, w_ready, w_empty, s_ready,
                               s_empty, n_steps, 1, ENC, L3, 2))],
                [1, 1, 1, DECODE_WARPS, DECODE_WARPS],
                [24, 24, 48, DECODE_REGS, DECODE_REGS],
            )  # fmt: skip
        acc = results[0]

        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC))
        nmask = offs_n < N
        mask = (offs_m < M)[:, None] & nmask[None, :]
        if SPLIT_K > 1:  # the last slice of the tile to arrive adds them in order
            wsp = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            last, total = split_k_sum(acc, wsp, mask, lock_ptr + pid, pid_k, M * N, SPLIT_K)
            if last:
                _ws_write(total, offs_m, offs_n, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
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
