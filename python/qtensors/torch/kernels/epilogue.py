"""What the fused matmul kernels (``gemv.py``, ``gemm.py``) share.

Both compute ``y = x @ W^T + b`` for a weight ``W [N, K]`` kept quantized, a group at a time:
with ``D = sum(x * code)`` and ``X = sum(x)`` over the k of one group (scale ``s``, min ``m``),

* affine:    ``sum(x * (code * s + m)) = s * D + m * X``
* symmetric: ``sum(x * (code - z) * s) = s * D - z * s * X``   (``z = 2^(bits-1)``)
* nf4:       ``sum(x * level[code] * s) = s * D``  with ``D = sum(x * level[code])``

so the scale and min are applied once per group, not once per weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

ENC_IDS = {"affine": 0, "symmetric": 1, "nf4": 2}


@triton.jit
def code_values(c, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr, FAST_CVT: tl.constexpr):
    """The fp32 values ``D`` sums over, from int32 codes ``c``: the code itself (affine and
    symmetric; the zero point goes into the group term) or its NF4 level.

    FAST_CVT: ``1 + c / 2^BITS`` assembled from bits (exponent of 1.0, the code in the top of
    the mantissa), no int-to-float conversion; exact, and so is its product with an fp16 / bf16
    activation. The caller turns the sum back into ``D = (sum - X) * 2^BITS``."""
    if ENC == 2:
        v = tl.load(levels_ptr + c)
    elif FAST_CVT:
        v = ((c << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        v = c.to(tl.float32)
    return v


@triton.jit
def min_term(s, mins_ptr, idx, mask, ENC: tl.constexpr, BITS: tl.constexpr):
    """What multiplies ``X`` in a group's term: the min (affine) or ``-z * s`` (symmetric)."""
    if ENC == 0:
        t = tl.load(mins_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        t = s * (-(1 << (BITS - 1)))
    return t


@triton.jit
def program_tile(M, BLOCK_M: tl.constexpr):
    """This program's (linear id, K slice, row tile, feature tile) on a ``(tiles, slices)`` grid
    whose consecutive programs share a weight tile and differ in rows, so a weight tile comes
    from HBM about once."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    return pid, tl.program_id(1), pid % n_m, pid // n_m


@triton.jit
def _write(acc, offs_m, offs_n, mask, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ptr = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_result(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    out_ptr,
    stride_om,
    bias_ptr,
    ws_ptr,
    lock_ptr,
    tile,
    pid_k,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Write the fp32 tile ``acc`` [BLOCK_M, BLOCK_N] (+ bias) to ``out`` in its dtype.

    Split-K (``SPLIT_K > 1``, K cut into slices run by separate programs): every slice stores its
    partial sums in the fp32 workspace ``ws [SPLIT_K, M, N]``; the last slice of a tile to
    arrive (a counter per tile in ``lock_ptr``) adds them in slice order (the same result
    whichever arrives last), writes the output and puts the counter back to 0 for the next call.
    One launch, no zeroed buffer per call: CUDA-graph friendly."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        _write(acc, offs_m, offs_n, mask, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
    else:
        wsp = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(wsp + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partials are stored before the counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(wsp, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(wsp + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            _write(total, offs_m, offs_n, mask, M, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)


@triton.jit
def store_rows(acc0, acc1, acc2, acc3, rows, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
               pid_n, pid_k, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):  # fmt: skip
    """``store_result`` for the words kernels: per row of ``x`` (up to 4), an accumulator of
    per-word terms ``[K words, features]``, summed over its words into the row's results."""
    m_ids = tl.arange(0, BLOCK_M)
    part = tl.where(m_ids[:, None] == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
    if BLOCK_M > 1:
        part = tl.where(m_ids[:, None] == 1, tl.sum(acc1, axis=0)[None, :], part)
    if BLOCK_M > 2:
        part = tl.where(m_ids[:, None] == 2, tl.sum(acc2, axis=0)[None, :], part)
        part = tl.where(m_ids[:, None] == 3, tl.sum(acc3, axis=0)[None, :], part)
    store_result(part, m_ids, rows, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr, pid_n,
                 pid_k, HAS_BIAS, SPLIT_K)  # fmt: skip
