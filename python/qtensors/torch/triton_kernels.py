"""Triton kernels that decode group-quantized tensors (spec sections 4.1-4.7) on the GPU.

One kernel covers every encoding (affine, symmetric, nf4), every bit width 1..8 and every group
axis. It sees the tensor as a matrix and walks it in 2-D tiles:

* axis last (``Q == 1``): the matrix is ``(P, L)``; a group is a run of ``group_size`` columns and
  the scale of element ``(r, c)`` is ``scales[r * G + c // g]``;
* any other axis: the matrix is ``(P * L, Q)``; row ``r`` is ``(p, l) = divmod(r, L)`` and the scale
  of element ``(r, c)`` is ``scales[(p * G + l // g) * Q + c]`` (a contiguous row of scales, so
  those loads are as wide as the output stores). With ``P == 1`` (axis 0, the FlexGen layout) the
  division by ``L`` disappears.

Codes are read from the packed LSB-first bit stream: element ``e`` starts at stream bit ``e * b``.
For 8 bits that is byte ``e``; for 1, 2 and 4 bits one byte holds ``8 / b`` codes; for 3, 5, 6
and 7 bits a code may straddle two bytes, so two bytes are read. The 4-bit path can instead load
the tile's bytes contiguously and split each into its two nibbles (``PAIRED``).

Each program walks tiles ``pid, pid + nprog, ...`` so the same kernel runs one tile per program
or as a persistent grid. Arithmetic is fp32, each operation rounded once (floating-point fusion is
off by default, so the affine ``code * s + m`` is not an FMA and results match the spec and the
CPU decoder bit for bit); the result is rounded once to the output dtype.

Importing this module needs Triton; it works on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._layout import NF4_LEVELS, group_layout

ENC_IDS = {"affine": 0, "symmetric": 1, "nf4": 2}


@triton.jit
def _codes_at(codes_ptr, e, nbytes, mask, BITS: tl.constexpr):
    """The ``BITS``-bit codes of elements ``e`` (int32) out of the packed bit stream."""
    if BITS == 8:
        c = tl.load(codes_ptr + e, mask=mask, other=0).to(tl.int32)
    elif BITS == 4:
        byte = tl.load(codes_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
        c = (byte >> ((e & 1) * 4).to(tl.int32)) & 15
    elif BITS == 2:
        byte = tl.load(codes_ptr + (e >> 2), mask=mask, other=0).to(tl.int32)
        c = (byte >> ((e & 3) * 2).to(tl.int32)) & 3
    elif BITS == 1:
        byte = tl.load(codes_ptr + (e >> 3), mask=mask, other=0).to(tl.int32)
        c = (byte >> (e & 7).to(tl.int32)) & 1
    else:
        # 8 codes fill exactly BITS bytes; (e >> 3) * BITS cannot overflow where e * BITS could.
        e8 = e & 7
        byte_idx = (e >> 3) * BITS + ((e8 * BITS) >> 3)
        shift = ((e8 * BITS) & 7).to(tl.int32)
        lo = tl.load(codes_ptr + byte_idx, mask=mask, other=0).to(tl.int32)
        hi_mask = mask & (byte_idx + 1 < nbytes)
        hi = tl.load(codes_ptr + byte_idx + 1, mask=hi_mask, other=0).to(tl.int32)
        c = ((lo | (hi << 8)) >> shift) & ((1 << BITS) - 1)
    return c


@triton.jit
def _values(code, s, m, levels_ptr, mask, ENC: tl.constexpr, BITS: tl.constexpr):
    """fp32 values of the codes: affine ``code * s + m``, symmetric ``(code - 2^(b-1)) * s``,
    nf4 ``level[code] * s``."""
    if ENC == 0:
        val = code.to(tl.float32) * s + m
    elif ENC == 1:
        val = (code - (1 << (BITS - 1))).to(tl.float32) * s
    else:
        val = tl.load(levels_ptr + code, mask=mask, other=0.0) * s
    return val


@triton.jit
def _dequant_kernel(
    codes_ptr,
    scales_ptr,
    mins_ptr,
    levels_ptr,
    out_ptr,
    R,
    C,
    L,
    G,
    Q,
    nbytes,
    n_tiles,
    n_ctiles,
    ENC: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    LASTAXIS: tl.constexpr,
    ONE_P: tl.constexpr,
    PAIRED: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for tile in range(pid, n_tiles, nprog):
        tr = tile // n_ctiles
        tc = tile - tr * n_ctiles
        rows = tr * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tc * BLOCK_C + tl.arange(0, BLOCK_C)
        if IDX64:
            rows = rows.to(tl.int64)
        rmask = rows < R
        mask = rmask[:, None] & (cols < C)[None, :]
        e = rows[:, None] * C + cols[None, :]

        if PAIRED:
            # 4 bits and C even: row r's codes are bytes [r*C/2, (r+1)*C/2); load them contiguously
            # and split each byte into (low nibble, high nibble) = (element 2i, element 2i+1).
            half = tc * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)
            bmask = rmask[:, None] & (half < (C >> 1))[None, :]
            bptr = codes_ptr + rows[:, None] * (C >> 1) + half[None, :]
            b = tl.load(bptr, mask=bmask, other=0).to(tl.int32)
            code = tl.join(b & 15, b >> 4).reshape(BLOCK_R, BLOCK_C)
        else:
            code = _codes_at(codes_ptr, e, nbytes, mask, BITS)

        if LASTAXIS:
            sidx = rows[:, None] * G + (cols // GS)[None, :]
        else:
            if ONE_P:
                srow = (rows // GS) * Q
            else:
                p = rows // L
                srow = (p * G + (rows - p * L) // GS) * Q
            sidx = srow[:, None] + cols[None, :]
        s = tl.load(scales_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        else:
            m = s
        val = _values(code, s, m, levels_ptr, mask, ENC, BITS)
        tl.store(out_ptr + e, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_kernel(
    codes_ptr,
    scales_ptr,
    mins_ptr,
    levels_ptr,
    out_ptr,
    R,
    C,
    G,
    Q,
    nbytes,
    n_tiles,
    n_ctiles,
    ENC: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    LASTAXIS: tl.constexpr,
    PAIRED: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The same decoding with 3-D tiles whose middle axis runs over whole groups (``GS`` a power
    of two), so each scale / min is loaded once and broadcast over its group in registers.

    LASTAXIS: tile [BLOCK_R, NG, GB] = rows x (groups of GB columns). Otherwise (axis 0, ``P ==
    1``): tile [NG, GB, BLOCK_C] = (groups of GB rows) x columns. ``GB = min(GS, block)``."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if LASTAXIS:
        GB: tl.constexpr = GS if GS < BLOCK_C else BLOCK_C
        NG: tl.constexpr = BLOCK_C // GB
    else:
        GB: tl.constexpr = GS if GS < BLOCK_R else BLOCK_R
        NG: tl.constexpr = BLOCK_R // GB
    for tile in range(pid, n_tiles, nprog):
        tr = tile // n_ctiles
        tc = tile - tr * n_ctiles
        if LASTAXIS:
            r = tr * BLOCK_R + tl.arange(0, BLOCK_R)
            if IDX64:
                r = r.to(tl.int64)
            gstart = tc * BLOCK_C + tl.arange(0, NG) * GB  # first column of each group slot
            r3 = r[:, None, None]
            c3 = gstart[None, :, None] + tl.arange(0, GB)[None, None, :]
            mask = (r3 < R) & (c3 < C)
            e = r3 * C + c3
            g = gstart // GS
            sidx = r[:, None] * G + g[None, :]
            smask = (r < R)[:, None] & (g < G)[None, :]
            if PAIRED:
                h3 = (gstart // 2)[None, :, None] + tl.arange(0, GB // 2)[None, None, :]
                bmask = (r3 < R) & (h3 < (C >> 1))
                b = tl.load(codes_ptr + r3 * (C >> 1) + h3, mask=bmask, other=0).to(tl.int32)
                code = tl.join(b & 15, b >> 4).reshape(BLOCK_R, NG, GB)
            else:
                code = _codes_at(codes_ptr, e, nbytes, mask, BITS)
            s = tl.load(scales_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
            if ENC == 0:
                m = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, :, None]
            else:
                m = s
        else:
            gstart = tr * BLOCK_R + tl.arange(0, NG) * GB  # first row of each group slot
            if IDX64:
                gstart = gstart.to(tl.int64)
            c = tc * BLOCK_C + tl.arange(0, BLOCK_C)
            r3 = gstart[:, None, None] + tl.arange(0, GB)[None, :, None]
            c3 = c[None, None, :]
            mask = (r3 < R) & (c3 < C)
            e = r3 * C + c3
            g = gstart // GS
            sidx = g[:, None] * Q + c[None, :]
            smask = (g < G)[:, None] & (c < C)[None, :]
            if PAIRED:
                h3 = (tc * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2))[None, None, :]
                bmask = (r3 < R) & (h3 < (C >> 1))
                b = tl.load(codes_ptr + r3 * (C >> 1) + h3, mask=bmask, other=0).to(tl.int32)
                code = tl.join(b & 15, b >> 4).reshape(NG, GB, BLOCK_C)
            else:
                code = _codes_at(codes_ptr, e, nbytes, mask, BITS)
            s = tl.load(scales_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, None, :]
            if ENC == 0:
                m = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, None, :]
            else:
                m = s
        val = _values(code, s, m, levels_ptr, mask, ENC, BITS)
        tl.store(out_ptr + e, val.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    """Launch parameters: tile shape, warps, pipelining, persistent-grid factor (0 = one tile per
    program, k = k programs per SM looping over tiles), whether 4-bit codes are loaded as whole
    bytes (``paired``), whether the 3-D group-broadcast kernel is used (``grouped``; it needs a
    power-of-two group size and the group axis last or first) and whether the compiler may fuse
    multiply-adds (``fp_fusion``; off keeps results bit-exact)."""

    block_r: int
    block_c: int
    num_warps: int = 4
    num_stages: int = 1
    persistent: int = 0
    paired: bool = True
    grouped: bool = True
    fp_fusion: bool = False


def _pow2_at_most(n: int, cap: int) -> int:
    v = 1
    while v < n and v < cap:
        v *= 2
    return v


def default_config(R: int, C: int, bits: int, lastaxis: bool) -> Config:
    """The launch parameters used when none are given (chosen on an H100: benches/results/)."""
    tile = 4096
    block_c = max(_pow2_at_most(C, 1024 if lastaxis else 512), 16)
    block_r = max(1, min(_pow2_at_most(R, 64), tile // block_c))
    return Config(block_r, block_c, num_warps=4)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_LEVELS: dict[torch.device, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    t = _LEVELS.get(device)
    if t is None:
        t = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
        _LEVELS[device] = t
    return t


def dequantize_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    shape: list[int] | tuple[int, ...],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    out_dtype: torch.dtype,
    config: Config | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode with the Triton kernel. Arguments as ``torch.ops.qtensors.dequantize`` (already
    validated); ``config`` overrides the launch parameters; ``out`` receives the result."""
    shape = [int(d) for d in shape]
    P, L, Q, G = group_layout(shape, axis, group_size)
    n = P * L * Q
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=codes.device)
    if n == 0:
        return out
    lastaxis = Q == 1
    R, C = (P, L) if lastaxis else (P * L, Q)
    cfg = config or default_config(R, C, bits, lastaxis)
    grouped = cfg.grouped and is_pow2(group_size) and (lastaxis or P == 1)
    paired = cfg.paired and bits == 4 and C % 2 == 0 and (not grouped or group_size >= 2)
    n_rt = triton.cdiv(R, cfg.block_r)
    n_ct = triton.cdiv(C, cfg.block_c)
    n_tiles = n_rt * n_ct
    # int32 indices while every element and scale index fits (tiles may overhang by a block)
    reach = (R + cfg.block_r) * (C + cfg.block_c)
    idx64 = reach >= 2**31 - 1
    grid_n = n_tiles
    if cfg.persistent and codes.device.type == "cuda":
        grid_n = min(n_tiles, cfg.persistent * _sm_count(codes.device.index or 0))
    levels = _levels(codes.device) if encoding == "nf4" else scales
    m = mins if mins is not None else scales
    common = dict(
        ENC=ENC_IDS[encoding],
        BITS=bits,
        GS=group_size,
        LASTAXIS=lastaxis,
        PAIRED=paired,
        IDX64=idx64,
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
    )
    if codes.device.type == "cuda":
        common.update(
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            enable_fp_fusion=cfg.fp_fusion,
        )
    nbytes = codes.numel()
    with torch.cuda.device(codes.device) if codes.device.type == "cuda" else _nullctx():
        if grouped:
            _grouped_kernel[(grid_n,)](
                codes, scales, m, levels, out, R, C, G, Q, nbytes, n_tiles, n_ct, **common
            )
        else:
            _dequant_kernel[(grid_n,)](
                codes,
                scales,
                m,
                levels,
                out,
                R,
                C,
                L,
                G,
                Q,
                nbytes,
                n_tiles,
                n_ct,
                ONE_P=P == 1,
                **common,
            )
    return out


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
