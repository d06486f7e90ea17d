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

A Triton (``tl.dot``) version of the same product (branch ``gemm16``: the weight as either
operand) ran 0.15-0.35x cuBLAS bf16 on the H200 (``benches/results/gpu_gemm16_probe*_h200.txt``):
with the weight in registers each ``wgmma`` waited for the previous one, and with the weight in
shared memory each step waited for its product before decoding the next.
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
    if block_m % (16 * warps) or block_n % 8 or not 8 <= block_n <= 256:
        raise ValueError(f"gemm16: block_m {block_m} not a multiple of 16 x {warps} warps, or"
                         f" block_n {block_n} not a multiple of 8 up to 256")  # fmt: skip
    return dict(
        ACC=gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_n, 16]
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
              STAGES: gl.constexpr, L3: gl.constexpr):  # fmt: skip
        """One K step: decode step ``i``'s weight tile into its buffer, start its product
        behind the previous one's, refill the slot the previous product read. Returns the
        accumulator and the next step's scales and mins (loaded a step ahead)."""
        dt: gl.constexpr = x_desc.block_type.element_ty
        slot = i % STAGES
        s_next, m_next = _group(scales_ptr, mins_ptr, rows, rmask, G,
                                gl.minimum(i + 1, n_steps - 1), GS, ENC)  # fmt: skip
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        words = cs.index(slot).load(gl.SliceLayout(2, L3))
        w = _values(words, s_i, m_i, ENC, L3).to(dt).reshape([BLOCK_N, 64])  # k = 8j + nibble
        wbuf = ws.index(i % 2)
        wbuf.store(w)
        fence_async_shared()
        _cta_barrier()  # every warp's part of the tile is stored before the product
        acc = warpgroup_mma(xs.index(slot), wbuf.permute([1, 0]), acc, is_async=True)
        # the previous step's product is done: the slot it read may be refilled
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        _cta_barrier()
        if i > 0:
            _refill(x_desc, c_desc, xs, cs, bars, i - 1 + STAGES, n_steps, m0, n0, STAGES)
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
        ws = gl.allocate_shared_memory(dt, [2, BLOCK_N, 64], W_SL)
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
                              STAGES, L3)  # fmt: skip
        for i in range(1, n_steps):
            acc, s_i, m_i = _step(x_desc, c_desc, xs, cs, ws, bars, acc, s_i, m_i, scales_ptr,
                                  mins_ptr, rows, rmask, G, i, n_steps, m0, n0, ENC, GS,
                                  BLOCK_N, STAGES, L3)  # fmt: skip
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
