"""The Triton kernel of the quantized KV cache (``qtensors.torch.kv_cache``): one launch per
layer and per K or V does the whole ``update``.

The cache of one layer holds, per (batch, head), the tokens ``[0, TQ)`` quantized (affine,
groups of ``GS`` along the head dimension: spec 4.5 with ``axis`` = the last one) in a store
of ``CAPQ`` token rows, and the tokens ``[TQ, T)`` exact in a residual buffer. An update with
new tokens ``[T_OLD, T)``:

* writes the attention input ``out`` = [B, H, T, D] (contiguous): rows ``< TQ_OLD`` decoded from
  the store, the others copied exactly from the residual buffer or the new tokens;
* quantizes the rows ``[TQ_OLD, TQ_NEW)`` (those leaving the residual window) into the store;
* writes the rows ``[TQ_NEW, T)`` into the *other* residual buffer (double buffering: no
  program reads a row another one writes).

A program covers ``ROWS`` token rows of one (batch, head); programs wholly inside the quantized
prefix (all of them but one or two during decoding) only decode. Within a row the elements are
laid out as [group, byte of the group, code of the byte], so a group's statistics are a
reduction over the last two axes and packing a byte is a sum over the last one.

The arithmetic is the spec's, bit for bit: fp32, each operation rounded once (``enable_fp_fusion``
off: no multiply-add), correctly rounded divisions (``div_rn``), round-half-even by adding and
subtracting 1.5 * 2^23 (exact for the clamped range), scales and mins rounded to their dtype.

Importing this module needs Triton; it runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dequant import _to_out

SCALE_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
# 1.5 * 2^23: t + _RINT - _RINT rounds |t| < 2^22 to the nearest even integer
_RINT = tl.constexpr(12582912.0)


@triton.jit
def _round_scale(v, SCALE_KIND: tl.constexpr):
    """``st(v)``: fp32 rounded to the scale dtype (nearest even; for bfloat16 with integer
    operations, as the interpreter truncates) and back to fp32."""
    if SCALE_KIND == 0:
        r = v.to(tl.float16).to(tl.float32)
    elif SCALE_KIND == 1:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        r = b.to(tl.float32, bitcast=True)
    else:
        r = v
    return r


@triton.jit(do_not_specialize=["H", "T", "T_OLD", "TQ_OLD", "TQ_NEW", "CAPQ", "CAPR"])
def _kv_update_kernel(
    out_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    res_in_ptr,
    res_out_ptr,
    new_ptr,
    new_sb,
    new_sh,
    new_st,
    new_sd,
    H,
    T,
    T_OLD,
    TQ_OLD,
    TQ_NEW,
    CAPQ,
    CAPR,
    D: tl.constexpr,
    G: tl.constexpr,
    GS: tl.constexpr,
    BITS: tl.constexpr,
    SCALE_KIND: tl.constexpr,
    ROWS: tl.constexpr,
    GP: tl.constexpr,
    BP: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS  # codes per byte
    BPG: tl.constexpr = GS // PER  # bytes per (whole) group
    RB: tl.constexpr = D // PER  # bytes per row
    QMAX: tl.constexpr = (1 << BITS) - 1
    bh = tl.program_id(0)
    t0 = tl.program_id(1) * ROWS
    b = bh // H
    h = bh % H

    t = t0 + tl.arange(0, ROWS)
    t4 = t[:, None, None, None]
    gi3 = tl.arange(0, GP)[None, :, None]
    by3 = gi3 * BPG + tl.arange(0, BP)[None, None, :]  # byte of the row
    bmask3 = (gi3 < G) & (tl.arange(0, BP)[None, None, :] < BPG) & (by3 < RB)
    k4 = tl.arange(0, PER)[None, None, None, :]
    d4 = by3[:, :, :, None] * PER + k4  # element of the row
    emask4 = bmask3[:, :, :, None]
    g2 = tl.arange(0, GP)[None, :]

    qrow = (bh * CAPQ + t).to(tl.int64)  # row of the quantized store
    orow = (bh * T + t).to(tl.int64)  # row of the output
    out_off4 = orow[:, None, None, None] * D + d4

    # decoded prefix: codes -> values
    dq = t < TQ_OLD
    dq3 = dq[:, None, None] & bmask3
    byte = tl.load(codes_ptr + qrow[:, None, None] * RB + by3, mask=dq3, other=0).to(tl.int32)
    smask = dq[:, None] & (g2 < G)
    s_st = tl.load(scales_ptr + qrow[:, None] * G + g2, mask=smask, other=0.0).to(tl.float32)
    m_st = tl.load(mins_ptr + qrow[:, None] * G + g2, mask=smask, other=0.0).to(tl.float32)
    code = (byte[:, :, :, None] >> (k4 * BITS)) & QMAX
    val = code.to(tl.float32) * s_st[:, :, None, None] + m_st[:, :, None, None]
    val = _to_out(val, out_ptr, BF16_BITS)

    if t0 + ROWS <= TQ_OLD:
        tl.store(out_ptr + out_off4, val, mask=emask4)
    else:
        # exact rows: the old residual window, then the new tokens
        from_res = (t4 >= TQ_OLD) & (t4 < T_OLD) & emask4
        from_new = (t4 >= T_OLD) & (t4 < T) & emask4
        rrow = (bh * CAPR + (t4 - TQ_OLD)).to(tl.int64)
        x_res = tl.load(res_in_ptr + rrow * D + d4, mask=from_res, other=0.0)
        new_off = b.to(tl.int64) * new_sb + h.to(tl.int64) * new_sh
        new_off += (t4 - T_OLD).to(tl.int64) * new_st + d4 * new_sd
        x_new = tl.load(new_ptr + new_off, mask=from_new, other=0.0)
        x = tl.where(from_res, x_res, x_new)
        tl.store(out_ptr + out_off4, tl.where(t4 < TQ_OLD, val, x), mask=(t4 < T) & emask4)

        # rows leaving the window: quantize (spec 4.5) into the store
        xf = x.to(tl.float32)
        lo = tl.min(tl.min(tl.where(emask4, xf, float("inf")), axis=3), axis=2)
        hi = tl.max(tl.max(tl.where(emask4, xf, float("-inf")), axis=3), axis=2)
        quant = (t >= TQ_OLD) & (t < TQ_NEW)
        lo = tl.where(quant[:, None] & (g2 < G), lo, 0.0)
        hi = tl.where(quant[:, None] & (g2 < G), hi, 0.0)
        m = _round_scale(lo, SCALE_KIND) + 0.0  # "+ 0": -0.0 becomes +0.0
        s = _round_scale(tl.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32)), SCALE_KIND) + 0.0
        inv = tl.where(s == 0.0, 0.0, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s))
        q = (xf - m[:, :, None, None]) * inv[:, :, None, None]
        q = tl.minimum(tl.maximum(q, -1.0), QMAX + 1.0)
        q = (q + _RINT) - _RINT
        q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
        packed = tl.sum(q << (k4 * BITS), axis=3)
        qmask3 = quant[:, None, None] & bmask3
        tl.store(codes_ptr + qrow[:, None, None] * RB + by3, packed.to(tl.uint8), mask=qmask3)
        # s and m are representable in the scale dtype: these conversions are exact
        qsmask = quant[:, None] & (g2 < G)
        srow = qrow[:, None] * G + g2
        tl.store(scales_ptr + srow, s.to(scales_ptr.dtype.element_ty), mask=qsmask)
        tl.store(mins_ptr + srow, m.to(mins_ptr.dtype.element_ty), mask=qsmask)

        # rows staying in the window: the other residual buffer
        keep = (t4 >= TQ_NEW) & (t4 < T) & emask4
        wrow = (bh * CAPR + (t4 - TQ_NEW)).to(tl.int64)
        tl.store(res_out_ptr + wrow * D + d4, x, mask=keep)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def kv_update_triton(
    out: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    res_in: torch.Tensor,
    res_out: torch.Tensor,
    new: torch.Tensor,
    t_old: int,
    tq_old: int,
    tq_new: int,
    bits: int,
    group_size: int,
) -> None:
    """One update of one K or V store (see the module docstring). ``out`` [B, H, T, D]
    contiguous; ``codes`` [B, H, CAPQ, D * bits / 8] uint8, ``scales`` / ``mins``
    [B, H, CAPQ, G]; ``res_in`` / ``res_out`` [B, H, CAPR, D]; ``new`` [B, H, N, D] (any
    strides). Shapes are checked by the caller (``kv_cache``)."""
    B, H, T, D = out.shape
    if out.numel() == 0:
        return
    G = scales.shape[-1]
    per = 8 // bits
    gp = _pow2(G)
    bp = _pow2(group_size // per)
    width = gp * bp * per
    rows = max(1, min(64, 4096 // width)) if not _interpreting() else max(1, min(8, 256 // width))
    rows = min(rows, _pow2(T))
    grid = (B * H, triton.cdiv(T, rows))
    meta: dict = dict(
        D=D,
        G=G,
        GS=group_size,
        BITS=bits,
        SCALE_KIND=SCALE_KINDS[scales.dtype],
        ROWS=rows,
        GP=gp,
        BP=bp,
        BF16_BITS=out.dtype == torch.bfloat16 and _interpreting(),
    )
    if out.device.type == "cuda":
        meta.update(num_warps=4, enable_fp_fusion=False)
    sb, sh, st, sd = new.stride()
    _kv_update_kernel[grid](
        out,
        codes,
        scales,
        mins,
        res_in,
        res_out,
        new,
        sb,
        sh,
        st,
        sd,
        H,
        T,
        t_old,
        tq_old,
        tq_new,
        codes.shape[2],
        res_in.shape[2],
        **meta,
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
