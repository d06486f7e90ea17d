"""``gemm16_kernel``: ``y = x @ W^T + b`` for many rows of ``x`` (a prompt's prefill, large
batches), every 4- and 8-bit encoding with groups along the input dim.

Past a few dozen rows the product is bound by the tensor cores, not by the weight's bytes, and
the way the small-batch kernels save bytes (scaling each group's partial sum: an FMA per output
element and group, ``mma.py``) costs more than it saves. Here each K step decodes a ``[BLOCK_N
features, BLOCK_K]`` tile of the weight in registers into the activations' 16-bit dtype and
accumulates ``W_tile @ x_tile^T`` on the tensor cores: the decode's work is per weight and
shared by all ``BLOCK_M`` rows of the tile. The tile's values are the dequantize kernel's
(``dequant._values``: fp32 arithmetic, each operation rounded once, then rounded to the dtype),
so the product is decode + cuBLAS's, up to the order of the fp32 sums, without the weight-sized
temporary and its round trip through HBM (what that route costs: writing and reading back 2
bytes a weight, ~45 us for 8192 x 8192 on the H200, as long as cuBLAS's product at 256 rows).

The weight is the dot's left operand ("swap AB", as in ``mma.py``): a program computes a
``[BLOCK_N, BLOCK_M]`` tile of ``y^T``, the decoded weight stays in registers (on sm_90 the
left operand of ``wgmma`` may) and the activations, which the tensor cores read from shared
memory, are the operand Triton's pipeliner copies there ahead of use. K is split over grid
axis 1 when the output tiles alone would not fill the GPU; ``epilogue.store_result`` finishes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dequant import _to_out, _values
from .epilogue import program_tile, store_result
from .scales import group_scale

#: encoding ids of this kernel (``dequant._values``'): NF4 looks its levels up, FP4 builds them
GEMM16_ENC = {"affine": 0, "symmetric": 1, "nf4": 2, "mxfp4": 3, "nvfp4": 3}


@triton.jit(do_not_specialize=["M", "k_split"])
def gemm16_kernel(
    x_ptr,
    codes_ptr,
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
    row_bytes,
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
    ASM: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN: tl.constexpr,
    SWAP: tl.constexpr = True,
):
    pid, pid_k, pid_m, pid_n = program_tile(M, BLOCK_M)
    # a step's columns as group slots: NG slots of GB columns (GB = the group, or the step
    # when a group spans several steps), so each scale is loaded once and broadcast
    GB: tl.constexpr = GS if GS < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GB
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    kk = tl.arange(0, BLOCK_K)
    slot = tl.arange(0, NG) * GB
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k_step in range(k_lo, k_hi, BLOCK_K):
        k0 = tl.multiple_of(k_step, BLOCK_K)
        if EVEN:  # whole steps: one in-range test, so the loads stay vectors
            kin = tl.full((1, BLOCK_K), 0, tl.int32) + k0 < k_hi
        else:
            kin = (k0 + kk < k_hi)[None, :]
        if BITS == 4:
            jb = tl.arange(0, BLOCK_K // 2)
            if EVEN:
                bin_ = tl.full((1, BLOCK_K // 2), 0, tl.int32) + k0 < k_hi
            else:
                bin_ = (k0 + 2 * jb < k_hi)[None, :]
            b = tl.load(
                codes_ptr + rows[:, None] * row_bytes + (k0 // 2 + jb)[None, :],
                mask=rmask[:, None] & bin_,
                other=0,
            ).to(tl.int32)
            # k = 2j + t: the low nibble is the even column
            code = tl.join(b & 15, b >> 4).reshape(BLOCK_N, NG, GB)
        else:
            code = tl.load(
                codes_ptr + rows[:, None] * row_bytes + (k0 + kk)[None, :],
                mask=rmask[:, None] & kin,
                other=0,
            ).to(tl.int32)
            code = code.reshape(BLOCK_N, NG, GB)
        g = (k0 + slot) // GS
        sidx = rows[:, None] * G + g[None, :]
        smask = rmask[:, None] & (g < G)[None, :]
        s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)[:, :, None]
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
        else:
            m = s
        if ASM and ENC <= 1:
            # the code as fp32 from its bits (2^23 + c, less 2^23: exact), not a conversion
            # (I2F issues at a quarter of the FP32 rate on sm_90)
            cf = (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            if ENC == 0:
                v = cf * s + m
            else:
                v = (cf - (1 << (BITS - 1))) * s
            v = v.reshape(BLOCK_N, BLOCK_K)
        else:
            v = _values(code, s, m, levels_ptr, ENC, BITS, ASM).reshape(BLOCK_N, BLOCK_K)
        w = _to_out(v, x_ptr, BF16_BITS)  # the decode's rounding to the activations' dtype
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + kk)[None, :],
            mask=mmask[:, None] & kin,
            other=0.0,
        )
        if IEEE and SWAP:  # fp32 activations, and the interpreter (whose tl.dot misreads bf16)
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if SWAP:
        res = tl.trans(acc)
    else:
        res = acc
    store_result(
        res,
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
