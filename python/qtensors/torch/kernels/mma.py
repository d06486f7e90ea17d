"""``mma_kernel``: ``y = x @ W^T + b`` on the tensor cores for a few to a few dozen rows of ``x``,
4-bit codes with groups along the input dim (affine, symmetric, MXFP4, NVFP4).

Two choices make it cheap per weight, where the old ``tl.dot`` kernel (``tiled.dot_kernel``)
spent ~10 instructions a weight building fp32 values and converting them:

* **Codes become 16-bit floats by bits.** ``0x4300 | c`` is the bfloat16 ``128 + c`` and
  ``0x6400 | c`` the float16 ``1024 + c`` (the code in the low mantissa bits of a power of two:
  exact), so a code costs a mask and an or; the dot sums ``x * (B + c)`` and the group term takes
  ``B * X`` back out (``X = sum x``, ``B`` the power of two). E2M1 (MXFP4 / NVFP4) values are
  assembled the same way from their exponent and mantissa bits. The group's scale and min apply
  to the fp32 partial sum of the group, once per (row, feature, group), not per weight:

  * affine:    ``s * d + (min - B * s) * X``
  * symmetric: ``s * d - (B + 8) * s * X``        (codes ``c - 8``)
  * MXFP4:     ``s * d``                           (E2M1 values, no offset)
  * NVFP4:      ``g * d``, the E4M3 block scales already in the weights: an E2M1 value (2
    significant bits) times an E4M3 scale (4) is exact in float16 and bfloat16, so each chunk
    of ``GS = NVFP4_CHUNK`` codes (4 blocks) is one dot; ``g`` the fp32 tensor scale, at the end

* **The weight is the MMA's left operand** ("swap AB"): a program computes a ``[BLOCK_N,
  BLOCK_M]`` tile of ``y^T`` as ``W_tile @ x_tile^T``, so the feature dim (>= 64) fills the
  MMA's M dim and a batch of 16 rows its N dim, instead of padding the batch to 64.

A step of the K loop covers ``GROUPS`` groups; each group's codes are loaded as bytes
``[BLOCK_N, GS / 2]`` (contiguous along K), split into the low / high nibble (columns ``2j`` /
``2j + 1``), joined back into K order and multiplied by ``x [BLOCK_M, GS]``. K is split over grid
axis 1 when the output tiles alone would not fill the GPU; ``epilogue.store_result`` finishes
(in-kernel split-K reduction, CUDA-graph safe).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import program_tile, store_result
from .scales import e4m3, group_scale

#: encoding ids of this kernel
MMA_ENC = {"affine": 0, "symmetric": 1, "mxfp4": 3, "nvfp4": 4}
#: NVFP4's blocks (16 codes: one MMA k-step) are too narrow to scale each block's partial sum;
#: its E4M3 block scales are folded into the 16-bit weights instead, over chunks of this width
NVFP4_CHUNK = 64


@triton.jit
def _half_values(c, F16: tl.constexpr, ENC: tl.constexpr):
    """int16 codes (0..15) as the 16-bit floats the dot multiplies: ``B + c`` (affine /
    symmetric; B = 1024 in float16, 128 in bfloat16) or the E2M1 value (FP4)."""
    if ENC >= 3:
        m = c & 7
        # 2^((m >> 1) - 1) * (1 + (m & 1) / 2) for m >= 2: exponent and top mantissa bit from m
        if F16:
            mag = tl.where(m >= 2, (m << 9) + 0x3800, tl.where(m == 1, 0x3800, 0))
        else:
            mag = tl.where(m >= 2, (m << 6) + 0x3F00, tl.where(m == 1, 0x3F00, 0))
        bits = (mag | ((c & 8) << 12)).to(tl.int16)
    elif F16:
        bits = c | 0x6400
    else:
        bits = c | 0x4300
    return bits.to(tl.float16 if F16 else tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["M"])
def mma_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
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
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid, pid_k, pid_m, pid_n = program_tile(M, BLOCK_M)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    F16: tl.constexpr = dt == tl.float16
    BASE: tl.constexpr = 1024.0 if F16 else 128.0
    HB: tl.constexpr = GS // 2  # bytes of one row of one group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    rmask = rows < N
    jb = tl.arange(0, HB)
    kx = tl.arange(0, GS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, GS * GROUPS):
        for gi in tl.static_range(GROUPS):
            kg = tl.multiple_of(k0 + gi * GS, GS)
            # whole groups (EVEN): one in-range test per group, so loads stay 16-byte vectors
            if EVEN:
                inside = tl.full((1, 1), 0, tl.int32) + kg < k_hi  # a splat: constant along K
                bmask = rmask[:, None] & inside
                kmask = inside
            else:
                bmask = rmask[:, None] & (kg + 2 * jb < k_hi)[None, :]
                kmask = (kg + kx < k_hi)[None, :]
            b = tl.load(
                codes_ptr + rows[:, None] * row_bytes + (tl.multiple_of(kg // 2, HB) + jb)[None, :],
                mask=bmask,
                other=0,
            ).to(tl.int16)
            lo = _half_values(b & 15, F16, ENC)
            hi = _half_values((b >> 4) & 15, F16, ENC)
            # k = 2j + t, back in K order: Triton lays the pair out as the MMA operand's
            # register pair, so the join costs no data movement
            w = tl.join(lo, hi).reshape(BLOCK_N, GS)
            if ENC == 4:  # NVFP4: each block's E4M3 scale into its 16 weights (exact)
                NB: tl.constexpr = GS // 16
                blk = kg // 16 + tl.arange(0, NB)
                sb = tl.load(
                    scales_ptr + rows[:, None] * G + blk[None, :],
                    mask=rmask[:, None] & (blk < G)[None, :],
                    other=0,
                ).to(tl.int32)
                s16 = tl.broadcast_to(e4m3(sb)[:, :, None], (BLOCK_N, NB, 16))
                s16 = s16.reshape(BLOCK_N, GS)
                if IEEE:  # (the interpreter has no bfloat16 arithmetic)
                    w = w.to(tl.float32) * s16
                else:
                    w = w * s16.to(dt)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (kg + kx)[None, :],
                mask=mmask[:, None] & kmask,
                other=0.0,
            )
            if IEEE:
                d = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
            else:
                d = tl.dot(w, tl.trans(x.to(dt)))
            if ENC == 4:
                acc += d
            else:
                gidx = kg // GS
                smask = rmask & (rows * 0 + gidx < G)  # a tensor: the interpreter's G is an int
                s = group_scale(scales_ptr, rows * G + gidx, smask, mins_ptr, SFMT)
                if ENC == 3:
                    acc += d * s[:, None]
                else:
                    X = tl.sum(x.to(tl.float32), axis=1)
                    if ENC == 0:
                        mn = tl.load(mins_ptr + rows * G + gidx, mask=smask, other=0.0)
                        off = mn.to(tl.float32) - BASE * s
                    else:
                        off = -(BASE + 8.0) * s
                    acc += d * s[:, None] + off[:, None] * X[None, :]
    if ENC == 4:
        acc = acc * tl.load(mins_ptr)  # NVFP4's fp32 tensor scale
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
