"""Triton kernels that decode group-quantized tensors (spec sections 4.1-4.7) on the GPU.

Two kernels cover every encoding (affine, symmetric, nf4), every bit width 1..8 and every group
axis. Both see the tensor as a matrix:

* axis last (``Q == 1``): the matrix is ``(P, L)``; a group is a run of ``group_size`` columns and
  the scale of element ``(r, c)`` is ``scales[r * G + c // g]``;
* any other axis: the matrix is ``(P * L, Q)``; row ``r`` is ``(p, l) = divmod(r, L)`` and the scale
  of element ``(r, c)`` is ``scales[(p * G + l // g) * Q + c]`` (a contiguous row of scales, so
  those loads are as wide as the output stores). With ``P == 1`` (axis 0, the FlexGen layout) the
  division by ``L`` disappears.

``_grouped_kernel`` (power-of-two group size, axis last or ``P == 1``: every preset) walks 3-D
tiles whose middle axis runs over whole groups, so each scale / min is loaded once per group and
broadcast in registers; ``_dequant_kernel`` (any group size and axis) indexes every element.

Codes come from the packed LSB-first bit stream (element ``e`` starts at stream bit ``e * b``):

* 4 bits (``PAIRED``): the tile's bytes are loaded contiguously and split into their two
  nibbles;
* other widths but 8 (``OCTETS``): 8 consecutive codes fill exactly ``b`` bytes, read as one word
  and split with shifts;
* nf4 looks each code up in its 16 fp32 levels (``_nf4_level``).
* otherwise per element: byte ``e`` for 8 bits, one byte for 1 / 2 / 4 bits, two bytes where a
  3-, 5-, 6- or 7-bit code may straddle them.

Each program walks tiles ``pid, pid + nprog, ...`` so the same kernel runs one tile per program
or as a persistent grid. Arithmetic is fp32, each operation rounded once (floating-point fusion is
off by default, so the affine ``code * s + m`` is not an FMA and results match the spec and the
CPU decoder bit for bit, as checked on an H100 and on the H200,
benches/results/gpu_check_h200.txt); the result is rounded once to the output dtype.
Indices are int32 unless the tensor reaches 2^31 elements. Measured on the H200 for 4096^2 to
16384^2 tensors with fp16 output: 80-96% of the device's copy bandwidth, 90-96% at 16384^2 but
for affine g128 (89.5%) (benches/probe_dequant.py, benches/results/gpu_dequant_probe_h200.txt).

Importing this module needs Triton; it works on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._layout import NF4_LEVELS, group_layout
from .fastlaunch import launch
from .kept import kept_empty
from .scales import SCALE_FORMATS, group_scale
from .tiled import _e2m1

#: kernel encoding ids: NF4 indexes its codebook; the FP4 formats' E2M1 values are built from the
#: code's bits (``tiled._e2m1``: a few integer operations beat a table gather per byte)
ENC_IDS = {"affine": 0, "symmetric": 1, "nf4": 2, "mxfp4": 3, "nvfp4": 3}
#: the levels each codebook encoding indexes


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
def _octets(codes_ptr, start, omask, BITS: tl.constexpr):
    """The 8 codes of each octet whose BITS bytes start at byte ``start`` (a 3-D tensor), read
    as one word and split with 8 shifts. Returns ``start``'s shape + [8].

    1, 2 and 4 bits: the octet's bytes are one load. 3, 5, 6, 7: one load per byte, each of
    ``start``'s shape, so the word is assembled inside the thread; a 4-D byte tile masked to
    BITS bytes and summed over its last axis made Triton add the bytes across lanes with
    shuffles (3-bit 4096^2 on the H200: 71% of copy bandwidth against 81%,
    benches/results/gpu_dequant_probe_h200.txt)."""
    if BITS == 1 or BITS == 2 or BITS == 4:
        k = tl.arange(0, BITS)[None, None, None, :]
        raw = tl.load(codes_ptr + start[:, :, :, None] + k, mask=omask[:, :, :, None], other=0)
        word = tl.sum(raw.to(tl.int32) << (8 * k), axis=3)
    else:
        WORD: tl.constexpr = tl.int32 if BITS <= 4 else tl.int64  # 3 bytes fit 32 bits
        word = tl.load(codes_ptr + start, mask=omask, other=0).to(WORD)
        for k in tl.static_range(1, BITS):
            byte = tl.load(codes_ptr + start + k, mask=omask, other=0).to(WORD)
            word = word | (byte << (8 * k))
    j = tl.arange(0, 8)[None, None, None, :]
    return ((word[:, :, :, None] >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _nf4_level(levels_ptr, code, ASM: tl.constexpr):
    """NF4's fp32 level of each code from the 16-entry table (64 bytes: one cache line, so a
    warp's lookups are served in one pass). With ``ASM`` the load is inline PTX, which keeps
    ``code``'s register layout: a ``tl.load`` through a gathered pointer makes Triton move the
    pointers to its own load layout and the values back through shared memory."""
    if ASM:
        base = tl.full(code.shape, 0, tl.int64) + levels_ptr.to(tl.int64)
        return tl.inline_asm_elementwise(
            "{ .reg .u64 a; mad.wide.u32 a, $2, 4, $1; ld.global.nc.f32 $0, [a]; }",
            "=r,l,r",
            [base, code],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    return tl.load(levels_ptr + code)


@triton.jit
def _values(code, s, m, levels_ptr, ENC: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr):
    """fp32 values of the codes: affine ``code * s + m``, symmetric ``(code - 2^(b-1)) * s``,
    nf4 ``level[code] * s``, FP4 ``e2m1(code) * s``."""
    if ENC == 3:
        val = _e2m1(code) * s
    elif ENC == 0:
        val = code.to(tl.float32) * s + m
    elif ENC == 1:
        val = (code - (1 << (BITS - 1))).to(tl.float32) * s
    else:
        val = _nf4_level(levels_ptr, code, ASM) * s  # masked codes read as 0: in the table
    return val


@triton.jit
def _to_out(val, out_ptr, BF16_BITS: tl.constexpr):
    """fp32 -> the output dtype, rounded to nearest even. ``BF16_BITS``: round to bfloat16 with
    integer operations (Triton's interpreter truncates in its own conversion; GPUs round)."""
    if BF16_BITS:
        b = val.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return val.to(out_ptr.dtype.element_ty)


# Only the arguments whose divisibility decides vector widths (C, Q) are specialized on: fewer
# variants to compile or fetch from Triton's cache in a fresh process.
_NO_SPEC = ["R", "L", "G", "nbytes", "n_tiles", "n_ctiles"]


@triton.jit(do_not_specialize=_NO_SPEC)
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
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    LASTAXIS: tl.constexpr,
    ONE_P: tl.constexpr,
    PAIRED: tl.constexpr,
    ASM: tl.constexpr,
    IDX64: tl.constexpr,
    BF16_BITS: tl.constexpr,
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
        s = group_scale(scales_ptr, sidx, mask, mins_ptr, SFMT)
        if ENC == 0:
            m = tl.load(mins_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        else:
            m = s
        val = _values(code, s, m, levels_ptr, ENC, BITS, ASM)
        tl.store(out_ptr + e, _to_out(val, out_ptr, BF16_BITS), mask=mask)


@triton.jit(do_not_specialize=[n for n in _NO_SPEC if n != "L"])
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
    SFMT: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    LASTAXIS: tl.constexpr,
    PAIRED: tl.constexpr,
    OCTETS: tl.constexpr,
    ASM: tl.constexpr,
    IDX64: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The same decoding with 3-D tiles whose middle axis runs over whole groups (``GS`` a power
    of two), so each scale / min is loaded once and broadcast over its group in registers.

    LASTAXIS: tile [BLOCK_R, NG, GB] = rows x (groups of GB columns). Otherwise (axis 0, ``P ==
    1``): tile [NG, GB, BLOCK_C] = (groups of GB rows) x columns. ``GB = min(GS, block)``.

    OCTETS (any bit width, rows of a multiple of 8 elements): 8 consecutive codes fill exactly
    BITS bytes, so each run of 8 is read as one BITS-byte word and split with shifts."""
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
            elif OCTETS:
                o3 = (gstart // 8)[None, :, None] + tl.arange(0, GB // 8)[None, None, :]
                omask = (r3 < R) & (o3 < (C >> 3))
                code = _octets(codes_ptr, r3 * ((C >> 3) * BITS) + o3 * BITS, omask, BITS)
                code = code.reshape(BLOCK_R, NG, GB)
            else:
                code = _codes_at(codes_ptr, e, nbytes, mask, BITS)
            s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)[:, :, None]
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
            elif OCTETS:
                o3 = (tc * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8))[None, None, :]
                omask = (r3 < R) & (o3 < (C >> 3))
                code = _octets(codes_ptr, r3 * ((C >> 3) * BITS) + o3 * BITS, omask, BITS)
                code = code.reshape(NG, GB, BLOCK_C)
            else:
                code = _codes_at(codes_ptr, e, nbytes, mask, BITS)
            s = group_scale(scales_ptr, sidx, smask, mins_ptr, SFMT)[:, None, :]
            if ENC == 0:
                m = tl.load(mins_ptr + sidx, mask=smask, other=0.0).to(tl.float32)[:, None, :]
            else:
                m = s
        val = _values(code, s, m, levels_ptr, ENC, BITS, ASM)
        tl.store(out_ptr + e, _to_out(val, out_ptr, BF16_BITS), mask=mask)


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
    octets: bool = True
    fp_fusion: bool = False


def _pow2_at_most(n: int, cap: int) -> int:
    v = 1
    while v < n and v < cap:
        v *= 2
    return v


def default_config(R: int, C: int, bits: int, lastaxis: bool, encoding: str = "affine") -> Config:
    """The launch parameters used when none are given: tiles of 4096 (axis last: one row of up
    to 4096 columns, 4 warps: the best of the H200 sweep for int3/int4/MXFP4 along the last axis,
    ``bench_gpu.py --sections sweep``, benches/results/gpu_kernels_h200.txt) or 8192 (axis 0:
    8 x 1024, from the H100 sweep) elements, the columns (the contiguous axis) as wide as the
    tensor allows."""
    if lastaxis:
        block_c = max(_pow2_at_most(C, 4096), 16)
        tile, warps = 4096, 4
    else:
        block_c = max(_pow2_at_most(C, 1024), 16)
        tile, warps = 8192, 4
    block_r = max(1, min(_pow2_at_most(R, 64), tile // block_c))
    return Config(block_r, block_c, num_warps=warps)


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_LEVELS: dict[torch.device, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    """NF4's 16 fp32 levels on ``device`` (64 bytes: one cache line), kept outside any CUDA
    graph's memory pool (``kept.py``)."""
    t = _LEVELS.get(device)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "NF4's level table is made on a device's first NF4 call, which cannot run inside"
                " a CUDA graph capture: call the model once before capturing it"
            )
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        t = _LEVELS[device] = kept_empty((16,), torch.float32, device).copy_(levels)
    return t


@functools.lru_cache(maxsize=4096)
def _plan(
    shape: tuple[int, ...],
    axis: int,
    group_size: int,
    bits: int,
    encoding: str,
    out_dtype: torch.dtype,
    config: Config | None,
    idx64: bool | None,
    cuda_index: int | None,
) -> tuple[bool, int, tuple[int, ...], dict]:
    """Everything about a launch that depends only on the arguments' metadata (computed once per
    layer shape): (grouped kernel?, grid size, runtime scalars, constexprs and options)."""
    P, L, Q, G = group_layout(shape, axis, group_size)
    lastaxis = Q == 1
    R, C = (P, L) if lastaxis else (P * L, Q)
    cfg = config or default_config(R, C, bits, lastaxis, encoding)
    grouped = cfg.grouped and is_pow2(group_size) and (lastaxis or P == 1)
    paired = cfg.paired and bits == 4 and C % 2 == 0 and (not grouped or group_size >= 2)
    # octets: 8 codes per BITS-byte word; rows (and group slots) must hold whole octets
    slot = min(group_size, cfg.block_c) if lastaxis else cfg.block_c
    octets = cfg.octets and grouped and not paired and bits != 8 and C % 8 == 0 and slot % 8 == 0
    n_ct = -(-C // cfg.block_c)
    n_tiles = -(-R // cfg.block_r) * n_ct
    if idx64 is None:
        # int32 indices while every element and scale index fits (tiles may overhang a block)
        idx64 = (R + cfg.block_r) * (C + cfg.block_c) >= 2**31 - 1
    grid_n = n_tiles
    if cfg.persistent and cuda_index is not None:
        grid_n = min(n_tiles, cfg.persistent * _sm_count(cuda_index))
    nbytes = (P * L * Q * bits + 7) // 8
    meta: dict = dict(
        ENC=ENC_IDS[encoding],
        SFMT=SCALE_FORMATS.get(encoding, 0),
        BITS=bits,
        GS=group_size,
        LASTAXIS=lastaxis,
        PAIRED=paired,
        ASM=cuda_index is not None,
        IDX64=idx64,
        BF16_BITS=out_dtype == torch.bfloat16 and _interpreting(),
        BLOCK_R=cfg.block_r,
        BLOCK_C=cfg.block_c,
    )
    if cuda_index is not None:
        meta.update(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=cfg.fp_fusion
        )
    if grouped:
        meta["OCTETS"] = octets
        scalars: tuple[int, ...] = (R, C, G, Q, nbytes, n_tiles, n_ct)
    else:
        meta["ONE_P"] = P == 1
        scalars = (R, C, L, G, Q, nbytes, n_tiles, n_ct)
    return grouped, grid_n, scalars, meta


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
    idx64: bool | None = None,
) -> torch.Tensor:
    """Decode with the Triton kernel. Arguments as ``torch.ops.qtensors.dequantize`` (already
    validated); ``config`` overrides the launch parameters; ``out`` receives the result;
    ``idx64`` forces 64-bit (True) indexing, by default used only past 2^31 elements. MXFP4 /
    NVFP4 scales are given as stored (E8M0 bytes; E4M3 with the tensor scale in ``mins``) and
    decoded in the kernel."""
    shape = tuple(int(d) for d in shape)
    dev = codes.device
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=dev)
    if out.numel() == 0:
        return out
    cuda_index = dev.index if dev.type == "cuda" else None
    if cuda_index is None and dev.type == "cuda":
        cuda_index = torch.cuda.current_device()
    grouped, grid_n, scalars, meta = _plan(
        shape, axis, group_size, bits, encoding, out_dtype, config, idx64, cuda_index
    )
    levels = _levels(dev) if encoding == "nf4" else scales
    if scales.dtype == torch.float8_e4m3fn:  # decoded from its bits (kernels/scales.py)
        scales = scales.view(torch.uint8)
    m = mins if mins is not None else scales
    kernel = _grouped_kernel if grouped else _dequant_kernel
    if cuda_index is not None and cuda_index != torch.cuda.current_device():
        with torch.cuda.device(cuda_index):
            kernel[(grid_n,)](codes, scales, m, levels, out, *scalars, **meta)
    elif cuda_index is None:
        kernel[(grid_n,)](codes, scales, m, levels, out, *scalars, **meta)
    else:
        args = (codes, scales, m, levels, out, *scalars)
        launch(kernel, (grid_n,), args, meta, tuple(sorted(meta.items())), cuda_index)
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
