"""``mma_int8_gluon_kernel``: ``mma_int8.py``'s W4A8 product (same numerics, same pre-pass) in
Gluon, with every register layout chosen by hand so that nothing passes through shared memory.

Why: ``mma_int8.py`` (Triton's ``tl.dot``) reaches ~30% of the bytes' bound at 16 rows. Triton
picks the layouts: the codes are stored to shared memory for the tensor cores, and each feature's
scale reaches the accumulator's layout through shared memory and barriers. Gluon
(``triton.experimental.gluon``) states the layouts, so here:

* the MMA is ``mma.sync.m16n8k32.s8`` (``mma_v2``), whose operands are registers;
* each thread loads, for each of its two rows of a 16-feature tile, the 8 bytes (16 codes) of a
  64-code chunk that its A fragment needs, as two 32-bit words in one 8-byte load (``LP``);
* ``and`` / ``shift`` on four bytes at a time give the low and high nibbles, and reshapes /
  permutes (register renames, no instructions) make them the A operand;
* which MMA column ``k`` each code becomes is fixed by that choice, so the activations are
  permuted instead: ``quantize_kernel(FRAGMENT=True)`` writes each chunk's int8 activations in the
  order each thread's B fragment reads (16 contiguous bytes a thread and row: one 16-byte load);
* the scales and the activations' per-group factors are loaded straight into the accumulator's
  row / column layouts; the min terms are a tf32 matmul after the loop (``_min_terms``).

The mapping, per 64-code chunk of a row: the byte ``j`` (0..31) holds codes ``2j`` (low nibble)
and ``2j + 1`` (high). Write ``j = 8a + 4b + c`` (a 0..3 the lane in the quad, b 0..1, c 0..3)
and ``h`` the nibble: the code ``2j + h`` is MMA column ``k = 32h + 16b + 4a + c``. The B side
stores column ``k`` at ``s = 16a + 8h + 4b + c``. ``fragment_order()`` gives both, for the
pre-pass and the tests.

Checked where it can be: ``tests/test_torch_mma_gluon.py`` compiles it for sm_90 on the CPU (the
layout conversions must be no-ops, and it must use no shared memory beyond the split-K
epilogue's) and checks the permutation against the reference product in numpy; the result itself
is checked on the GPU (``benches/probe_mma_gluon.py``, ``benches/check_gluon_route.py``), since
Triton's interpreter does not run Gluon.

Measured (H200, README): 1.18-1.21x the ``tl.dot`` kernel on affine g64 at 5-16 rows (1.37-1.56x
cuBLAS bf16), still ~35% of the bytes' bound.

``mma_int8_gluon_tma_kernel`` (routed on sm_90+, ``launch.GLUON_TMA_STAGES``) is the same loop
with the codes brought in by the TMA engine instead of each thread's 8-byte loads (each of which
touched 8 cache lines of the L1, its busiest unit): a ring of ``STAGES`` steps' tiles in shared
memory, swizzled by the copy so that the same fragment loads read it free of bank conflicts, each
slot refilled as soon as every warp has read it. The arithmetic is the register kernel's, in the
same order: outputs are bit-identical (``benches/probe_gluon_tma.py``), 1.01-1.14x faster on the
routed weights. With ``XTMA`` (``launch.GLUON_ACT_TMA``) each ring slot also receives its step's
int8 activations (and, mode 2, their factors), read from there at the step instead of loaded
two steps ahead: bit-identical, 168 -> 127 registers (``benches/sass_loop_count.py
--gluon-tma``), 1.04-1.08x at 32 rows and 0.99-1.03x at 5-16 (``probe_gluon_act_tma.py``).

Both kernels also take the encodings no other tensor-core kernel here does (``GLUON_ENC``):
NF4, its codes turned into int8 levels by ``prmt`` (``_nf4_asm``), and 8-bit symmetric codes,
each byte read as two 4-bit codes over twice K. H200 (``benches/probe_gluon_int8mma.py``):
1.06-3.28x decode + cuBLAS, their route before, at 5-32 rows. And MXFP4, in blocks of 32
(``BLOCKED``: quad lane ``a`` takes words ``a`` and ``4 + a`` of a chunk, so that each MMA
k-step holds one block, which takes its own E8M0 scale; ``fragment_order(blocked=True)``):
1.21-2.14x ``mma.py``, its route before, at 5-16 rows (``gpu_gluon_mxfp4_h200.txt``).
"""

from __future__ import annotations

import functools

import numpy as np

from .._layout import E2M1_LEVELS
from .words_int8 import nf4_int8_tables

try:  # Gluon: Triton 3.5+; absent, the tl.dot kernel runs
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    HAVE_GLUON = True
    # a CTA-wide barrier: ``barrier`` from Triton 3.7, ``thread_barrier`` before
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

try:  # the TMA kernel: Gluon's Hopper modules; absent, the register kernel runs
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401 (launch.py)

    # a TMA copy into shared memory: ``async_load`` from Triton 3.7 (the old name then raises)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_TMA = HAVE_GLUON
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_TMA = False

#: codes per MMA chunk: two m16n8k32 k-steps (one a nibble half)
CHUNK = 64
#: encodings of the Gluon kernels (``ENC``): the ``tl.dot`` kernel's; NF4, whose codes
#: become their levels as int8, ``round(level * 127)`` (as ``words_int8.py`` and the CPU
#: kernel hold them: each weight moves by at most 0.4% of its group's absmax), multiplied
#: signed by signed, no min terms, the sums scaled by ``1 / 127`` once at the end; 8-bit
#: symmetric codes ``c`` (weight ``s (c - 128)``) read as 4-bit pairs: a byte's low nibble
#: ``c & 15`` and its high one as ``(c & 0xF0) - 128`` (signed), which add up to ``c - 128``,
#: each meeting the byte's activation (the pre-pass's ``DUP``: K and the groups doubled), no
#: min terms; and MXFP4 / NVFP4, their E2M1 codes as twice their value (integers: 0, 1, 2, 3,
#: 4, 6, 8, 12 and their negatives, so exact) by ``prmt`` as NF4's, each block's sum apart
#: (``BLOCK_SIZES``, below) scaled by its E8M0 scale (MXFP4) or its E4M3 scale times the
#: tensor scale (NVFP4, as the decoder's product), the sums halved once at the end
GLUON_ENC = {"affine": 0, "symmetric": 1, "nf4": 2, "symmetric8": 3, "mxfp4": 4, "nvfp4": 5}
#: ``layouts()`` entries only the TMA kernel takes (its rings' shared and loading layouts)
TMA_LAYOUTS = ("LT", "CODES_SL", "LQT", "Q_SL", "LDT", "D_SL")
#: group sizes under a 64-code chunk, taken in blocks: in the blocked order each MMA k-step
#: holds one block of 32 (MXFP4), or two blocks of 16 (NVFP4), one on quad lanes 0-1 and one
#: on 2-3, each summed by its own MMA with the other's activations zeroed
FP4_BLOCKS = {"mxfp4": 32, "nvfp4": 16}
BLOCK_SIZES = tuple(sorted(FP4_BLOCKS.values()))


#: an 8-bit symmetric code's high nibble, signed: ``(c & 0xF0) - 128`` a byte (``c ^ 0x80``
#: keeps the low nibble: the and and the xor are one LOP3)
SYM8_HIGH_ASM = "{ .reg .b32 t; and.b32 t, $1, 0xF0F0F0F0; xor.b32 $0, t, 0x80808080; }"


def fp4_int8_tables() -> tuple[int, int, int, int]:
    """E2M1's values doubled, as int8 (exact: integers), four to an int32 (little-endian,
    signed), as ``nf4_int8_tables``: codes 0-3, 4-7, 8-11, 12-15."""
    b = bytes((round(2 * v) & 0xFF) for v in E2M1_LEVELS)
    return tuple(int.from_bytes(b[i : i + 4], "little", signed=True) for i in range(0, 16, 4))


def _lookup_asm(tables: tuple[int, int, int, int], odd: bool) -> str:
    """PTX turning a 32-bit word of 8 4-bit codes (byte ``j``: codes ``2j``, ``2j + 1``) into
    the int8 levels (``tables``: 16 bytes, by code) of its even (``odd`` False) or odd codes,
    one byte each in code order: each half-word's four codes look their levels up in two
    8-entry tables with ``prmt`` (levels 0-7 and 8-15, by the code's low 3 bits), a third
    ``prmt`` picks per byte by the code's bit 3, and a last one gathers the even or odd codes'
    bytes of the two halves."""
    t = [v & 0xFFFFFFFF for v in tables]
    return (
        "{ .reg .b32 m, n, t0, t1, t2, t3, la, lb, ha, hb, sa, sb, a, b;"
        f" mov.b32 t0, {t[0]:#x}; mov.b32 t1, {t[1]:#x};"
        f" mov.b32 t2, {t[2]:#x}; mov.b32 t3, {t[3]:#x};"
        " and.b32 m, $1, 0x77777777; shr.u32 n, m, 16;"
        " prmt.b32 la, t0, t1, m; prmt.b32 ha, t2, t3, m;"
        " prmt.b32 lb, t0, t1, n; prmt.b32 hb, t2, t3, n;"
        " shr.u32 sa, $1, 1; and.b32 sa, sa, 0x4444; or.b32 sa, sa, 0x3210;"
        " shr.u32 sb, $1, 17; and.b32 sb, sb, 0x4444; or.b32 sb, sb, 0x3210;"
        " prmt.b32 a, la, ha, sa; prmt.b32 b, lb, hb, sb;"
        f" prmt.b32 $0, a, b, {0x7531 if odd else 0x6420:#x}; }}"
    )


def _nf4_asm(odd: bool) -> str:
    """``_lookup_asm`` of NF4's int8 levels."""
    return _lookup_asm(nf4_int8_tables(), odd)


def _fp4_asm(odd: bool) -> str:
    """``_lookup_asm`` of E2M1's doubled values."""
    return _lookup_asm(fp4_int8_tables(), odd)


def fragment_order(blocked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(``code_of_k[k]``, ``slot_of_k[k]``) for one 64-code chunk: the code (0..63, as stored:
    byte ``code // 2``, nibble ``code % 2``) that MMA column ``k`` multiplies, and where the
    pre-pass stores that column's activation. ``blocked`` (groups in ``BLOCK_SIZES``): column
    ``k = 32B + 16h + 4a + c`` is code ``32B + 8a + 2c + h``, so each k-step (``B``) holds one
    32-code block (quad lanes 0-1 its first 16 codes); the slots are the same either way."""
    k = np.arange(CHUNK)
    h, b, a, c = k >> 5, (k >> 4) & 1, (k >> 2) & 3, k & 3
    slot = 16 * a + 8 * h + 4 * b + c
    if blocked:  # the k-step (h here) is the block, and b the nibble
        return 32 * h + 8 * a + 2 * c + b, slot
    return 16 * a + 8 * b + 2 * c + h, slot


def _log2(v: int) -> int:
    assert v > 0 and v & (v - 1) == 0, v
    return v.bit_length() - 1


def _linear(reg, lane, warp, shape):
    return gl.DistributedLinearLayout(
        reg_bases=reg, lane_bases=lane, warp_bases=warp, block_bases=[], shape=shape
    )


@functools.lru_cache(maxsize=64)
def layouts(
    block_n: int,
    block_m: int,
    warps: int,
    groups: int,
    chunks: int,
    block: int = 0,
    swords: int = 0,
) -> dict:
    """The kernel's constexpr layouts for ``block_n`` features (16 a warp, then repeated),
    ``block_m`` rows (8, 16 or 32), ``warps`` warps along the features, ``groups`` groups of
    ``chunks`` 64-code chunks a K step (``groups * chunks`` 1, 2 or 4); ``block``: groups of
    that many codes in ``BLOCK_SIZES`` (``chunks`` unused), 1, 2 or 4 chunks a step. Rows and
    columns as the MMA's (``to_linear_layout`` of its operands: lanes hold rows 1, 2, 4 and a
    register row 8, warps the next 16s, registers the repeats). ``swords`` (1 or 2; 0: off): a
    row's scales of a step read as that many 32-bit words (``SWORDS``, layout ``LSW``)."""
    if swords not in (0, 1, 2):
        raise ValueError(f"a step's scales in 1 or 2 words a row, not {swords}")
    reps = block_n // (16 * warps)
    blocked = block in BLOCK_SIZES
    per_step = groups * block // CHUNK if blocked else groups * chunks
    if block and (not blocked or groups * block % CHUNK or groups > 8):
        raise ValueError(f"groups of {block} codes go {BLOCK_SIZES} in whole chunks, <= 8 a step")
    if reps < 1 or block_m not in (8, 16, 32) or per_step not in (1, 2, 4):
        raise ValueError(
            f"block_n {block_n} < 16 x {warps} warps, block_m {block_m} not 8 / 16 / 32, or"
            f" {groups} x {chunks} chunks a step not 1, 2 or 4"
        )
    warps2 = [[16 << i, 0] for i in range(_log2(warps))]
    reps2 = [[(16 * warps) << i, 0] for i in range(_log2(reps))]
    lanes2 = [[1, 0], [2, 0], [4, 0]]
    none2 = [[0, 0]] * _log2(warps)
    m16 = [[0, 8]] if block_m >= 16 else []  # rows 8-15: a second MMA n-tile
    m32 = [[0, 16]] if block_m == 32 else []

    def with_last(bases, extra):  # 2-D bases as 3-D ones (0 along the last dim) + ``extra``
        return [[*b, 0] for b in bases] + [[0, 0, 1 << i] for i in range(_log2(extra))]

    # one chunk's [block_n, 8] 32-bit words of codes: 2 contiguous words (8 bytes) a thread and
    # row; as bytes [block_n, 8, 4], a word's 4 bytes in 4 registers (one, after the nibble ops).
    # Blocked: quad lane a takes words a and 4 + a, one from each 32-code block
    p_reg = [[0, 4] if blocked else [0, 1], [8, 0]]
    p_lane = [[0, 1], [0, 2], *lanes2] if blocked else [[0, 2], [0, 4], *lanes2]
    # one chunk's [16, block_m] 32-bit words of int8 activations as stored: 4 contiguous words
    # (16 bytes) a thread and row; as bytes [16, block_m, 4], then [64, block_m]
    q_reg = [[1, 0], [2, 0], *m16, *m32]
    q_lane = [[4, 0], [8, 0], [0, 1], [0, 2], [0, 4]]
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])
    return dict(
        MMA=mma,
        DOT_A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4),
        DOT_B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4),
        LP1=_linear(p_reg + reps2, p_lane, warps2, [block_n, 8]),
        LB=_linear(
            [[0, 0, 1], [0, 0, 2], *with_last(p_reg + reps2, 1)],
            with_last(p_lane, 1),
            with_last(warps2, 1),
            [block_n, 8, 4],
        ),
        # a step's chunks along a last dim, in registers
        LP=_linear(
            with_last(p_reg, per_step) + with_last(reps2, 1),
            with_last(p_lane, 1),
            with_last(warps2, 1),
            [block_n, 8, per_step],
        ),
        # a step's [block_n, 8 * per_step] words of codes as TMA left them in shared memory,
        # loaded in LP's registers (``_codes_tma`` reshapes / permutes it into LP)
        LT=_linear(
            p_reg + [[0, 8 << i] for i in range(_log2(per_step))] + reps2,
            p_lane,
            warps2,
            [block_n, 8 * per_step],
        ),
        # the TMA tile's shared layout: rows of 32 / 64 / 128 bytes, swizzled as wide
        CODES_SL=gl.NVMMASharedLayout(
            swizzle_byte_width=32 * per_step, element_bitwidth=32, rank=2
        ),
        LQ1=_linear(q_reg, q_lane, none2, [16, block_m]),
        LQB=_linear(
            [[0, 0, 1], [0, 0, 2], *with_last(q_reg, 1)],
            with_last(q_lane, 1),
            with_last(none2, 1),
            [16, block_m, 4],
        ),
        LQ=_linear(
            with_last(q_reg, per_step),
            with_last(q_lane, 1),
            with_last(none2, 1),
            [16, block_m, per_step],
        ),
        # [block_n, groups] scales (or mins): a row's groups contiguous in one thread (up to 8)
        LS=_linear(
            [[0, 1 << i] for i in range(_log2(groups))] + [[8, 0]] + reps2,
            [[0, 0], [0, 0], *lanes2],
            warps2,
            [block_n, groups],
        ),
        # the same scales as [block_n, swords] 32-bit words (``SWORDS``; 1 when off, unused)
        SWORDS=swords,
        LSW=_linear(
            [[0, 1 << i] for i in range(_log2(max(swords, 1)))] + [[8, 0]] + reps2,
            [[0, 0], [0, 0], *lanes2],
            warps2,
            [block_n, max(swords, 1)],
        ),
        # a step's [block_m, 16 * per_step] words of int8 activations as the TMA engine left
        # them in shared memory (``XTMA``), loaded in LQ's registers (``_acts_tma`` reshapes /
        # permutes it into LQ): 16 contiguous bytes a thread and row, rows swizzled apart
        LQT=_linear(
            [[0, 1], [0, 2]]
            + [[8, 0]] * (block_m >= 16)
            + [[16, 0]] * (block_m == 32)
            + [[0, 16 << i] for i in range(_log2(per_step))],
            [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
            none2,
            [block_m, 16 * per_step],
        ),
        Q_SL=gl.NVMMASharedLayout(
            swizzle_byte_width=min(128, 64 * per_step), element_bitwidth=32, rank=2
        ),
        # the factors' ``[groups, block_m]`` tile of ``xs[0]`` (``XTMA``), loaded in LD's
        # registers transposed
        LDT=_linear(
            [[0, 1]]
            + [[0, 8]] * (block_m >= 16)
            + [[0, 16]] * (block_m == 32)
            + [[1 << i, 0] for i in range(_log2(groups))],
            [[0, 2], [0, 4], [0, 0], [0, 0], [0, 0]],
            none2,
            [groups, block_m],
        ),
        D_SL=gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2),
        # [block_m, groups] the activations' per-group factors, rows as the accumulator's columns
        LD=_linear(
            [[1, 0]]
            + [[8, 0]] * (block_m >= 16)
            + [[16, 0]] * (block_m == 32)
            + [[0, 1 << i] for i in range(_log2(groups))],
            [[2, 0], [4, 0], [0, 0], [0, 0], [0, 0]],
            none2,
            [block_m, groups],
        ),
    )


if HAVE_GLUON:

    @gluon.jit
    def _as_bytes(w, LB: gl.constexpr, ASM: gl.constexpr):
        """32-bit words ``w [R, C]`` as int8 ``[R, C, 4]`` (layout ``LB``: a word's 4 bytes in
        4 registers, packed as one): ``ASM`` on each word, which is broadcast over its 4 bytes (4
        copies of one register) of which the asm reads the first. Why not a plain bitcast:
        Triton has none that splits elements, and int8 tensors carried across loop iterations
        are kept one byte a register (a byte permute each)."""
        w3 = gl.expand_dims(gl.convert_layout(w, gl.SliceLayout(2, LB), assert_trivial=True), 2)
        w4 = w3 + gl.zeros([w.shape[0], w.shape[1], 4], gl.int32, LB)  # (folded away)
        return gl.inline_asm_elementwise(ASM, "=r,r,r,r,r", [w4], dtype=gl.int8, is_pure=True,
                                         pack=4)  # fmt: skip

    SYM8_HIGH = gl.constexpr(SYM8_HIGH_ASM)
    NF4_EVEN = gl.constexpr(_nf4_asm(False))
    NF4_ODD = gl.constexpr(_nf4_asm(True))
    FP4_EVEN = gl.constexpr(_fp4_asm(False))
    FP4_ODD = gl.constexpr(_fp4_asm(True))

    @gluon.jit
    def _nibbles(w, LB: gl.constexpr, ENC: gl.constexpr):
        """32-bit words of codes ``w [BLOCK_N, 8]`` as their bytes' low and high nibbles (int8
        ``[BLOCK_N, 8, 4]``), one instruction (two) a word; NF4 (``ENC`` 2): the nibbles'
        levels as int8 (``_nf4_asm``); 8-bit symmetric (``ENC`` 3): the low nibble and the high
        one less 128, signed (``SYM8_HIGH_ASM``); MXFP4 / NVFP4 (``ENC`` 4, 5): twice the E2M1
        values (``_fp4_asm``)."""
        if ENC == 2:
            lo = _as_bytes(w, LB, NF4_EVEN)
            hi = _as_bytes(w, LB, NF4_ODD)
        elif ENC >= 4:
            lo = _as_bytes(w, LB, FP4_EVEN)
            hi = _as_bytes(w, LB, FP4_ODD)
        elif ENC == 3:  # 8-bit symmetric: c & 15 and (c & 0xF0) - 128 a byte
            lo = _as_bytes(w, LB, "and.b32 $0, $1, 0x0F0F0F0F;")
            hi = _as_bytes(w, LB, SYM8_HIGH)
        else:
            lo = _as_bytes(w, LB, "and.b32 $0, $1, 0x0F0F0F0F;")
            hi = _as_bytes(w, LB, "{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }")
        return lo, hi

    @gluon.jit
    def _a_operand(w, BLOCK_N: gl.constexpr, LB: gl.constexpr, DOT_A: gl.constexpr,
                   ENC: gl.constexpr):  # fmt: skip
        """One chunk's words ``[BLOCK_N, 8]`` (layout LP1) as the MMA's A ``[BLOCK_N, 64]``:
        byte ``j = 8a + 4b + c`` (word ``2a + b``, byte ``c`` of it), nibble ``h`` -> column
        ``32h + 16b + 4a + c``."""
        lo, hi = _nibbles(w, LB, ENC)
        lo = lo.reshape([BLOCK_N, 4, 2, 4])
        hi = hi.reshape([BLOCK_N, 4, 2, 4])
        a = gl.join(lo, hi).permute([0, 4, 2, 1, 3]).reshape([BLOCK_N, 64])
        return gl.convert_layout(a, DOT_A, assert_trivial=True)

    @gluon.jit
    def _a_blocks(w, BLOCK_N: gl.constexpr, LB: gl.constexpr, DOT_A: gl.constexpr,
                  ENC: gl.constexpr):  # fmt: skip
        """One chunk's words ``[BLOCK_N, 8]`` (blocked LP1: quad lane ``a`` holds words ``a``
        and ``4 + a``) as the A operands ``[BLOCK_N, 32]`` of its two 32-code blocks: word
        ``4B + a``, byte ``c``, nibble ``h`` -> block ``B``'s column ``16h + 4a + c``."""
        lo, hi = _nibbles(w, LB, ENC)
        lo0, lo1 = gl.split(lo.reshape([BLOCK_N, 2, 4, 4]).permute([0, 2, 3, 1]))
        hi0, hi1 = gl.split(hi.reshape([BLOCK_N, 2, 4, 4]).permute([0, 2, 3, 1]))
        a0 = gl.join(lo0, hi0).permute([0, 3, 1, 2]).reshape([BLOCK_N, 32])
        a1 = gl.join(lo1, hi1).permute([0, 3, 1, 2]).reshape([BLOCK_N, 32])
        return (gl.convert_layout(a0, DOT_A, assert_trivial=True),
                gl.convert_layout(a1, DOT_A, assert_trivial=True))  # fmt: skip

    @gluon.jit
    def _b_blocks(w, BLOCK_M: gl.constexpr, LQ1: gl.constexpr, LQB: gl.constexpr,
                  DOT_B: gl.constexpr, HALF: gl.constexpr):  # fmt: skip
        """``_b_operand`` as the B operands ``[32, BLOCK_M]`` of its two k-steps (the blocks of
        32). ``HALF`` 0 / 1: only the activations of each k-step's first / second 16 codes
        (quad lanes 0-1 / 2-3: stored word ``4a + 2B + h``), the others zero, so that an MMA
        sums one block of 16; -1: all."""
        if HALF >= 0:
            word = gl.arange(0, 16, layout=gl.SliceLayout(1, LQ1))
            keep = gl.expand_dims((word >> 3) == HALF, 1)
            w = gl.where(keep, w, gl.zeros_like(w))
        b = _b_operand(w, BLOCK_M, LQB, DOT_B)
        b0, b1 = gl.split(b.reshape([2, 32, BLOCK_M]).permute([1, 2, 0]))
        return (gl.convert_layout(b0, DOT_B, assert_trivial=True),
                gl.convert_layout(b1, DOT_B, assert_trivial=True))  # fmt: skip

    @gluon.jit
    def _b_operand(w, BLOCK_M: gl.constexpr, LQB: gl.constexpr, DOT_B: gl.constexpr):
        """One chunk's stored activations, 32-bit words ``[16, BLOCK_M]`` (layout LQ1; byte
        slot ``s = 16a + 8h + 4b + c``), as the MMA's B ``[64, BLOCK_M]`` (column
        ``32h + 16b + 4a + c``)."""
        q = _as_bytes(w, LQB, "mov.b32 $0, $1;").permute([0, 2, 1]).reshape([64, BLOCK_M])
        b = q.reshape([4, 2, 2, 4, BLOCK_M]).permute([1, 2, 0, 3, 4]).reshape([64, BLOCK_M])
        return gl.convert_layout(b, DOT_B, assert_trivial=True)

    @gluon.jit
    def _pick(t, i: gl.constexpr, N: gl.constexpr, OUT: gl.constexpr):
        """``t[..., i]`` of a tensor whose last dim (``N`` = 1, 2 or 4) is in registers, as
        layout ``OUT`` (splits: no data movement)."""
        if N == 1:
            r = t.reshape(t.shape[:-1])
        elif N == 2:
            lo, hi = gl.split(t)
            r = lo if i == 0 else hi
        elif N == 8:  # columns i % 2 == 0 or 1, then as N == 4
            even, odd = gl.split(t.reshape(t.shape[:-1] + [4, 2]))  # noqa: RUF005
            r = _pick(even if i % 2 == 0 else odd, i // 2, 4, OUT)
        else:
            # columns 0, 2 and 1, 3 (a list sum: Triton's frontend takes no starred lists)
            even, odd = gl.split(t.reshape(t.shape[:-1] + [2, 2]))  # noqa: RUF005
            half = even if i % 2 == 0 else odd
            lo, hi = gl.split(half)
            r = lo if i < 2 else hi
        return gl.convert_layout(r, OUT, assert_trivial=True)

    @gluon.jit
    def _codes(words_ptr, p_off, p_mask, k0):
        """A step's codes from column ``k0``: ``[BLOCK_N, 8, chunks]`` 32-bit words."""
        return gl.load(words_ptr + p_off + gl.multiple_of(k0 // 8, 8), mask=p_mask, other=0)

    @gluon.jit
    def _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP,
                 GS: gl.constexpr, GROUPS: gl.constexpr, SWORDS: gl.constexpr):  # fmt: skip
        """A step's activations, scales and the activations' per-group ``d``, from column
        ``k0``. ``SWORDS``: the scales as 32-bit words (``[BLOCK_N, SWORDS]``, their bits as
        stored), so that the loop carries the loaded registers as they are: carried as 16-bit
        values, ptxas packs each pair into a register right after the load, and the warp waits
        for the load there, at the end of the step that issued it (``gpu_gluon_tma_src_h200.txt``:
        a third of the stall samples on two such ``PRMT``)."""
        q = gl.load(xw_ptr + q_off + gl.multiple_of(k0 // 4, 16))
        st, dd = _scales_factors(scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP, GS, GROUPS,
                                 SWORDS)  # fmt: skip
        return q, st, dd

    @gluon.jit
    def _scales_factors(scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP, GS: gl.constexpr,
                        GROUPS: gl.constexpr, SWORDS: gl.constexpr):  # fmt: skip
        """A step's scales and the activations' factors from column ``k0`` (``_factors``
        without the activations)."""
        st = _scales_at(scales_ptr, s_off, s_mask, k0, GS, GROUPS, SWORDS)
        g0 = gl.multiple_of(k0 // GS, GROUPS)
        return st, gl.load(xs_ptr + d_off + g0 * MP)

    @gluon.jit
    def _scales_at(scales_ptr, s_off, s_mask, k0, GS: gl.constexpr, GROUPS: gl.constexpr,
                   SWORDS: gl.constexpr):  # fmt: skip
        """A step's scales from column ``k0`` (``_factors``' third)."""
        g0 = gl.multiple_of(k0 // GS, GROUPS)
        if SWORDS > 0:
            sw = scales_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
            w0 = gl.multiple_of(g0 * SWORDS // GROUPS, SWORDS)  # (SWORDS-word loads)
            return gl.load(sw + s_off + w0, mask=s_mask, other=0)
        else:
            return gl.load(scales_ptr + s_off + g0, mask=s_mask, other=0.0)

    @gluon.jit
    def _e8m0(b):
        """E8M0 scale bytes as fp32 ``2^(b - 127)`` (as ``scales.group_scale``): 0 the
        subnormal ``2^-127``, 255 NaN."""
        e = b.to(gl.int32)
        s = (e << 23).to(gl.float32, bitcast=True)
        s = gl.where(e == 0, 2.0**-127, s)
        return gl.where(e == 255, float("nan"), s)

    @gluon.jit
    def _tensor_scale(mins_ptr, ENC: gl.constexpr):
        """NVFP4's fp32 tensor scale (held where the mins go); 1 for the other encodings."""
        if ENC == 5:
            return gl.load(mins_ptr).to(gl.float32)
        else:
            return 1.0

    @gluon.jit
    def _e4m3(b):
        """FP8 E4M3 bytes as fp32, exact, NaN for 0x7F / 0xFF (as ``scales.e4m3``, which is
        Triton's, not Gluon's)."""
        v = b.to(gl.int32)
        e = (v >> 3) & 15
        m = v & 7
        normal = (((e + 120) << 23) | (m << 20)).to(gl.float32, bitcast=True)
        mag = gl.where(e == 0, m.to(gl.float32) * 2.0**-9, normal)  # subnormals: m * 2^-9
        mag = gl.where((v & 0x7F) == 0x7F, float("nan"), mag)
        return gl.where((v & 0x80) != 0, -mag, mag)

    @gluon.jit
    def _scale_of(st, g: gl.constexpr, GROUPS: gl.constexpr, SWORDS: gl.constexpr,
                  SDT: gl.constexpr, OUT: gl.constexpr):  # fmt: skip
        """Group ``g``'s scales of a step, as stored (``SDT``: their type), in layout ``OUT``:
        a column of ``st``, or with ``SWORDS`` its bits out of the row's words (little-endian:
        group ``g`` at byte ``g * size`` of the row's step)."""
        if SWORDS > 0:
            SB: gl.constexpr = SDT.primitive_bitwidth // 8
            w = _pick(st, (g * SB) // 4, SWORDS, OUT)
            b = (w >> (((g * SB) % 4) * 8)) & ((1 << (8 * SB)) - 1)
            if SB == 1:
                return b
            elif SDT == gl.bfloat16:
                return (b << 16).to(gl.float32, bitcast=True)
            else:
                return b.to(gl.int16).to(gl.float16, bitcast=True)
        else:
            return _pick(st, g, GROUPS, OUT)

    @gluon.jit
    def _scaled(acc, i, st, dd, ts, g: gl.constexpr, GROUPS: gl.constexpr, MMA: gl.constexpr,
                ENC: gl.constexpr, SWORDS: gl.constexpr, SDT: gl.constexpr):  # fmt: skip
        """``acc + (s * d) * I``: group ``g`` of the step's int32 sums ``I``, its scales ``s``
        (MXFP4's E8M0 bytes decoded here; NVFP4's E4M3 ones times the tensor scale ``ts``, the
        decoder's one rounding) and the activations' factors ``d``."""
        s = _scale_of(st, g, GROUPS, SWORDS, SDT, gl.SliceLayout(1, MMA))
        if ENC == 4:
            s = _e8m0(s)
        elif ENC == 5:
            s = _e4m3(s) * ts
        else:
            s = s.to(gl.float32)
        d = _pick(dd, g, GROUPS, gl.SliceLayout(0, MMA))
        return gl.fma(gl.expand_dims(s, 1) * gl.expand_dims(d, 0), i.to(gl.float32), acc)

    @gluon.jit
    def _step(acc, p, q, st, dd, ts, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
              GROUPS: gl.constexpr, GS: gl.constexpr, MMA: gl.constexpr, DOT_A: gl.constexpr,
              DOT_B: gl.constexpr, LP1: gl.constexpr, LB: gl.constexpr, LQ1: gl.constexpr,
              LQB: gl.constexpr, ENC: gl.constexpr, SWORDS: gl.constexpr,
              SDT: gl.constexpr):  # fmt: skip
        """``acc`` plus one K step's scale terms: per group, the int32 sums ``I`` of its chunks'
        MMAs, then ``(s * d) * I`` (the min terms: ``_min_terms``). Groups of 32: each chunk's
        two blocks an MMA k-step each (``_a_blocks``); of 16: each k-step's two blocks an MMA
        each, on the activations of one (``_b_blocks``'s ``HALF``). ``ts``: NVFP4's tensor
        scale."""
        PER_STEP: gl.constexpr = (GROUPS * GS) // 64
        if GS == 32:
            for ci in gl.static_range(PER_STEP):
                a0, a1 = _a_blocks(_pick(p, ci, PER_STEP, LP1), BLOCK_N, LB, DOT_A, ENC)
                b0, b1 = _b_blocks(_pick(q, ci, PER_STEP, LQ1), BLOCK_M, LQ1, LQB, DOT_B, -1)
                zero = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, MMA)
                acc = _scaled(acc, mma_v2(a0, b0, zero), st, dd, ts, 2 * ci, GROUPS, MMA, ENC,
                              SWORDS, SDT)  # fmt: skip
                acc = _scaled(acc, mma_v2(a1, b1, zero), st, dd, ts, 2 * ci + 1, GROUPS, MMA,
                              ENC, SWORDS, SDT)  # fmt: skip
        elif GS == 16:
            for ci in gl.static_range(PER_STEP):
                a0, a1 = _a_blocks(_pick(p, ci, PER_STEP, LP1), BLOCK_N, LB, DOT_A, ENC)
                qc = _pick(q, ci, PER_STEP, LQ1)
                b00, b10 = _b_blocks(qc, BLOCK_M, LQ1, LQB, DOT_B, 0)  # [k-step][half]
                b01, b11 = _b_blocks(qc, BLOCK_M, LQ1, LQB, DOT_B, 1)
                zero = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, MMA)
                g = 4 * ci  # block 2B + half
                acc = _scaled(acc, mma_v2(a0, b00, zero), st, dd, ts, g, GROUPS, MMA, ENC,
                              SWORDS, SDT)  # fmt: skip
                acc = _scaled(acc, mma_v2(a0, b01, zero), st, dd, ts, g + 1, GROUPS, MMA, ENC,
                              SWORDS, SDT)  # fmt: skip
                acc = _scaled(acc, mma_v2(a1, b10, zero), st, dd, ts, g + 2, GROUPS, MMA, ENC,
                              SWORDS, SDT)  # fmt: skip
                acc = _scaled(acc, mma_v2(a1, b11, zero), st, dd, ts, g + 3, GROUPS, MMA, ENC,
                              SWORDS, SDT)  # fmt: skip
        else:
            CHUNKS: gl.constexpr = GS // 64
            for gi in gl.static_range(GROUPS):
                i = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, MMA)
                for ci in gl.static_range(CHUNKS):
                    c = gi * CHUNKS + ci
                    a_op = _a_operand(_pick(p, c, PER_STEP, LP1), BLOCK_N, LB, DOT_A, ENC)
                    b_op = _b_operand(_pick(q, c, PER_STEP, LQ1), BLOCK_M, LQB, DOT_B)
                    i = mma_v2(a_op, b_op, i)
                acc = _scaled(acc, i, st, dd, ts, gi, GROUPS, MMA, ENC, SWORDS, SDT)
        return acc

    @gluon.jit
    def _min_terms(acc, scales_ptr, mins_ptr, xs_ptr, rows0, cols0, N, G, MP, g_lo, g_hi,
                   ENC: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                   MMA: gl.constexpr):  # fmt: skip
        """``acc`` plus ``sum_g t[n, g] X[g, m]`` over groups ``g_lo .. g_hi - 1`` (``t``: the
        min, or ``-8 s``; ``X``: the group's sum of rounded activations) as a matmul on the
        tensor cores, 16 groups an MMA: tf32 takes an fp16 / bf16 ``t`` exactly, and ``X`` goes
        in as two parts (its top 11 bits, then the rest: ~21 bits in all), each product summed
        in fp32. Per group and element this saves an FMA of the step's epilogue."""
        T_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=1)
        X_B: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=1)
        t_rows = rows0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, T_A))
        t_cols = gl.arange(0, 16, layout=gl.SliceLayout(0, T_A))
        t_off = gl.expand_dims(t_rows, 1) * G + gl.expand_dims(t_cols, 0)
        t_rmask = gl.expand_dims(t_rows < N, 1)
        x_grp = gl.arange(0, 16, layout=gl.SliceLayout(1, X_B))
        x_cols = cols0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, X_B))
        x_off = gl.expand_dims(x_grp, 1) * MP + gl.expand_dims(x_cols, 0)
        for g0 in range(g_lo, g_hi, 16):
            t_mask = t_rmask & gl.expand_dims(g0 + t_cols < g_hi, 0)
            if ENC == 0:
                t = gl.load(mins_ptr + t_off + g0, mask=t_mask, other=0.0).to(gl.float32)
            else:
                t = gl.load(scales_ptr + t_off + g0, mask=t_mask, other=0.0).to(gl.float32)
                t = t * -8.0
            x_mask = gl.expand_dims(g0 + x_grp < g_hi, 1)
            X = gl.load(xs_ptr + (G + g0) * MP + x_off, mask=x_mask, other=0.0)
            hi = (X.to(gl.int32, bitcast=True) & -8192).to(gl.float32, bitcast=True)
            acc = mma_v2(t, hi, acc, input_precision="tf32")
            acc = mma_v2(t, X - hi, acc, input_precision="tf32")
        return acc

    @gluon.jit
    def _encoding_terms(acc, scales_ptr, mins_ptr, xs_ptr, rows0, cols0, N, G, MP, g_lo, g_hi,
                        ENC: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                        MMA: gl.constexpr):  # fmt: skip
        """``acc`` after the loop, finished per encoding: affine / symmetric 4-bit plus their min
        terms (``_min_terms``); NF4 scaled by ``1 / 127`` (its levels held as ``round(level *
        127)``); MXFP4 / NVFP4 halved (their values held doubled); 8-bit symmetric as it is
        (signed as multiplied, no min terms)."""
        if ENC == 2:
            acc = acc * (1.0 / 127.0)
        elif ENC >= 4:
            acc = acc * 0.5
        elif ENC < 2:
            acc = _min_terms(acc, scales_ptr, mins_ptr, xs_ptr, rows0, cols0, N, G, MP, g_lo,
                             g_hi, ENC, BLOCK_N, BLOCK_M, MMA)  # fmt: skip
        return acc

    @gluon.jit
    def _factor_offsets(pid_m, pid_n, N, G, MP, stride_xm, BLOCK_M: gl.constexpr,
                        BLOCK_N: gl.constexpr, PER_STEP: gl.constexpr, GROUPS: gl.constexpr,
                        LQ: gl.constexpr, LS: gl.constexpr, LD: gl.constexpr,
                        SWORDS: gl.constexpr, LSW: gl.constexpr):  # fmt: skip
        """A tile's offsets of its activations (``[16, BLOCK_M, PER_STEP]`` int32 words of xq,
        chunk ``c`` at word ``16 c`` of a step), of its scales / mins (``[BLOCK_N, GROUPS]``,
        with the mask of rows past N) and of the activations' per-group factors
        (``[BLOCK_M, GROUPS]`` of ``xs [2, G, MP]``), from a step's first column. ``SWORDS``:
        the scales' as words (``[BLOCK_N, SWORDS]``, layout ``LSW``)."""
        q_slots = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, LQ)))
        q_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, LQ)))
        q_rows = pid_m * BLOCK_M + q_rows
        q_chunk = gl.arange(0, PER_STEP, layout=gl.SliceLayout(0, gl.SliceLayout(1, LQ)))
        q_off = gl.expand_dims(q_rows, 0) * (stride_xm // 4) + gl.expand_dims(q_slots, 1)
        q_off = gl.expand_dims(q_off, 2) + gl.expand_dims(gl.expand_dims(q_chunk, 0), 1) * 16
        if SWORDS > 0:  # a row's scales as words: G groups are G * SWORDS / GROUPS words
            s_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LSW))
            s_cols = gl.arange(0, SWORDS, layout=gl.SliceLayout(0, LSW))
            s_off = gl.expand_dims(s_rows, 1) * (G * SWORDS // GROUPS) + gl.expand_dims(s_cols, 0)
        else:
            s_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
            s_cols = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, LS))
            s_off = gl.expand_dims(s_rows, 1) * G + gl.expand_dims(s_cols, 0)
        s_mask = gl.expand_dims(s_rows < N, 1)
        d_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LD))
        d_cols = gl.arange(0, GROUPS, layout=gl.SliceLayout(0, LD))
        d_off = gl.expand_dims(d_rows, 1) + gl.expand_dims(d_cols, 0) * MP
        return q_off, s_off, s_mask, d_off

    @gluon.jit
    def _store(acc, pid, pid_k, pid_n, pid_m, M, N, out_ptr, stride_om, bias_ptr, ws_ptr,
               lock_ptr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr,
               BLOCK_M: gl.constexpr, MMA: gl.constexpr):  # fmt: skip
        """The tile's result to ``out`` (``_write``); split K, as ``epilogue.store_result``:
        partials to ``ws [SPLIT_K, M, N]``, and the last slice of the tile to arrive adds them
        in slice order, writes, and puts the counter back to 0."""
        rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        m_cols = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        mask = gl.expand_dims(rows < N, 1) & gl.expand_dims(m_cols < M, 0)
        if SPLIT_K == 1:
            _write(acc, rows, m_cols, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)
        else:
            wsp = ws_ptr + gl.expand_dims(m_cols, 0) * N + gl.expand_dims(rows, 1)
            last, total = split_k_sum(acc, wsp, mask, lock_ptr + pid, pid_k, M * N, SPLIT_K)
            if last:
                _write(total, rows, m_cols, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS)

    @gluon.jit
    def split_k_sum(acc, wsp, mask, lock, pid_k, slice_stride, SPLIT_K: gl.constexpr):
        """Split K, as ``epilogue.store_result``: this slice's partial sums to ``wsp + pid_k *
        slice_stride``; the last slice of the tile to arrive (``lock``: its counter) gets
        ``(True, the slices' sum in slice order)`` and puts the counter back to 0 for the next
        launch, the others ``(False, acc)``. (Also ``gemm16_gluon.py``'s.)"""
        gl.store(wsp + pid_k * slice_stride, acc, mask=mask)
        _cta_barrier()  # every thread's partials are stored before the counter moves
        arrived = gl.atomic_add(lock, 1, sem="acq_rel")
        last = arrived == SPLIT_K - 1
        total = acc
        if last:
            total = gl.load(wsp, mask=mask, other=0.0, cache_modifier=".cg")
            for sk in gl.static_range(1, SPLIT_K):
                part = wsp + sk * slice_stride
                total += gl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(lock, 0)
        return last, total

    @gluon.jit
    def _write(acc, rows, cols, mask, N, out_ptr, stride_om, bias_ptr, HAS_BIAS: gl.constexpr):
        """``out[m, n] = acc[n, m] (+ bias[n])`` in out's dtype."""
        if HAS_BIAS:
            bias = gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
            acc = acc + gl.expand_dims(bias, 1)
        ptr = out_ptr + gl.expand_dims(cols, 0) * stride_om + gl.expand_dims(rows, 1)
        gl.store(ptr, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit(do_not_specialize=["M"])
    def mma_int8_gluon_kernel(
        xq_ptr,
        codes_ptr,
        scales_ptr,
        mins_ptr,
        xs_ptr,
        bias_ptr,
        out_ptr,
        ws_ptr,
        lock_ptr,
        M,
        N,
        K,
        row_bytes,
        G,
        MP,
        stride_xm,
        stride_om,
        k_split,
        ENC: gl.constexpr,
        GS: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        SPLIT_K: gl.constexpr,
        GROUPS: gl.constexpr,
        KSPEC: gl.constexpr,
        MMA: gl.constexpr,
        DOT_A: gl.constexpr,
        DOT_B: gl.constexpr,
        LP: gl.constexpr,
        LP1: gl.constexpr,
        LB: gl.constexpr,
        LQ: gl.constexpr,
        LQ1: gl.constexpr,
        LQB: gl.constexpr,
        LS: gl.constexpr,
        LD: gl.constexpr,
        SWORDS: gl.constexpr,
        LSW: gl.constexpr,
    ):
        """One ``[BLOCK_N, BLOCK_M]`` tile of ``y^T`` from ``quantize_kernel(FRAGMENT=True)``'s
        ``xq`` / ``xs`` (arguments as ``mma_int8_kernel``'s). A K step is ``GROUPS`` groups;
        two steps' operands are in flight (two buffers, the loop unrolled by two); the min
        terms follow the loop (``_min_terms``); ``KSPEC``: compiled for that K."""
        PER_STEP: gl.constexpr = (GROUPS * GS) // 64  # 64-code MMA chunks a step
        STEP: gl.constexpr = GS * GROUPS
        SDT: gl.constexpr = scales_ptr.dtype.element_ty  # the scales' type, as stored
        if KSPEC > 0:
            # compiled for this K (and one tile of rows): every row's and group's offset is a
            # constant, so a step's loads are immediate offsets from one address
            K = KSPEC
            row_bytes = KSPEC // 2
            G = KSPEC // GS
            MP = BLOCK_M
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        n_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % n_m
        pid_n = pid // n_m
        # codes: [BLOCK_N, 8, PER_STEP] words, chunk c at word 8 c of the step
        words_ptr = codes_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        row_words = row_bytes // 4
        p_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LP)))
        p_rows = pid_n * BLOCK_N + p_rows
        p_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, LP)))
        p_chunk = gl.arange(0, PER_STEP, layout=gl.SliceLayout(0, gl.SliceLayout(1, LP)))
        p_off = gl.expand_dims(gl.expand_dims(p_rows, 1) * row_words + gl.expand_dims(p_cols, 0), 2)
        p_off = p_off + gl.expand_dims(gl.expand_dims(p_chunk, 0), 1) * 8
        p_mask = gl.expand_dims(gl.expand_dims(p_rows < N, 1), 2)
        xw_ptr = xq_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        q_off, s_off, s_mask, d_off = _factor_offsets(
            pid_m, pid_n, N, G, MP, stride_xm, BLOCK_M, BLOCK_N, PER_STEP, GROUPS, LQ, LS, LD,
            SWORDS, LSW,
        )  # fmt: skip

        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        ts = _tensor_scale(mins_ptr, ENC)
        k_lo = pid_k * k_split
        k_hi = gl.minimum(K, k_lo + k_split)
        k_last = k_hi - STEP  # steps past the slice load the last one again (unused)
        # two buffers of a step's operands, the loop unrolled by two: each buffer is refilled
        # (two steps ahead) as soon as its step is done, with no register copies (a rotation
        # of one buffer costs ~70 moves a step)
        pa = _codes(words_ptr, p_off, p_mask, k_lo)
        qa, sa, da = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k_lo, MP,
                              GS, GROUPS, SWORDS)  # fmt: skip
        k1 = gl.minimum(k_lo + STEP, k_last)
        pb = _codes(words_ptr, p_off, p_mask, k1)
        qb, sb, db = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k1, MP,
                              GS, GROUPS, SWORDS)  # fmt: skip
        for k0 in range(k_lo, k_hi, 2 * STEP):
            acc = _step(acc, pa, qa, sa, da, ts, BLOCK_N, BLOCK_M, GROUPS, GS, MMA, DOT_A, DOT_B,
                        LP1, LB, LQ1, LQB, ENC, SWORDS, SDT)  # fmt: skip
            k2 = gl.minimum(k0 + 2 * STEP, k_last)
            pa = _codes(words_ptr, p_off, p_mask, k2)
            qa, sa, da = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k2,
                                  MP, GS, GROUPS, SWORDS)  # fmt: skip
            if k0 + STEP < k_hi:  # an odd number of steps: the last iteration has one
                acc = _step(acc, pb, qb, sb, db, ts, BLOCK_N, BLOCK_M, GROUPS, GS, MMA, DOT_A,
                            DOT_B, LP1, LB, LQ1, LQB, ENC, SWORDS, SDT)  # fmt: skip
            k3 = gl.minimum(k0 + 3 * STEP, k_last)
            pb = _codes(words_ptr, p_off, p_mask, k3)
            qb, sb, db = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k3,
                                  MP, GS, GROUPS, SWORDS)  # fmt: skip
        acc = _encoding_terms(acc, scales_ptr, mins_ptr, xs_ptr, pid_n * BLOCK_N,
                              pid_m * BLOCK_M, N, G, MP, k_lo // GS, k_hi // GS, ENC, BLOCK_N,
                              BLOCK_M, MMA)  # fmt: skip
        _store(acc, pid, pid_k, pid_n, pid_m, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
               HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, MMA)  # fmt: skip


if HAVE_TMA:

    @gluon.jit
    def _tma_refill(codes_desc, ring, bars, i, n_steps, row0, k_lo, STEP: gl.constexpr,
                    STAGES: gl.constexpr, xq_desc, xs_desc, q_ring, d_ring, m0,
                    GS: gl.constexpr, XTMA: gl.constexpr):  # fmt: skip
        """Start copying step ``i``'s codes (if the slice has it) into its ring slot; with
        ``XTMA`` its int8 activations too, and (2) their per-group factors, on the same
        barrier."""
        slot = i % STAGES
        pred = i < n_steps
        k = k_lo + i * STEP
        nbytes: gl.constexpr = (
            codes_desc.block_type.nbytes
            + (xq_desc.block_type.nbytes if XTMA > 0 else 0)
            + (xs_desc.block_type.nbytes if XTMA > 1 else 0)
        )
        mbarrier.expect(bars.index(slot), nbytes, pred=pred)
        _tma_load(codes_desc, [row0, k // 8], bars.index(slot), ring.index(slot), pred=pred)
        if XTMA > 0:
            _tma_load(xq_desc, [m0, k // 4], bars.index(slot), q_ring.index(slot), pred=pred)
        if XTMA > 1:
            _tma_load(xs_desc, [k // GS, m0], bars.index(slot), d_ring.index(slot), pred=pred)

    @gluon.jit
    def _ahead(q, dd, xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP,
               GS: gl.constexpr, GROUPS: gl.constexpr, SWORDS: gl.constexpr,
               XTMA: gl.constexpr):  # fmt: skip
        """The operands of the step from column ``k0`` that the loop loads two steps ahead: the
        scales, and the activations ``q`` and factors ``dd`` unless ``XTMA`` brings them with the
        step's codes (then passed through as given)."""
        if XTMA > 1:
            st = _scales_at(scales_ptr, s_off, s_mask, k0, GS, GROUPS, SWORDS)
        elif XTMA > 0:
            st, dd = _scales_factors(scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP, GS, GROUPS,
                                     SWORDS)  # fmt: skip
        else:
            q, st, dd = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k0, MP,
                                 GS, GROUPS, SWORDS)  # fmt: skip
        return q, st, dd

    @gluon.jit
    def _acts_tma(q_ring, d_ring, dd, i, BLOCK_M: gl.constexpr, PER_STEP: gl.constexpr,
                  STAGES: gl.constexpr, LQT: gl.constexpr, LQ: gl.constexpr,
                  LDT: gl.constexpr, LD: gl.constexpr, XTMA: gl.constexpr):  # fmt: skip
        """Step ``i``'s activations (LQ's ``[16, BLOCK_M, PER_STEP]`` words) from its ring slot
        (``XTMA``; its barrier already waited on), and its factors (LD's ``[BLOCK_M,
        GROUPS]``): from the slot too with ``XTMA`` 2, else ``dd`` (loaded ahead)."""
        slot = i % STAGES
        t = q_ring.index(slot).load(LQT)
        q = t.reshape([BLOCK_M, PER_STEP, 16]).permute([2, 0, 1])
        q = gl.convert_layout(q, LQ, assert_trivial=True)
        if XTMA > 1:
            d = d_ring.index(slot).load(LDT).permute([1, 0])
            dd = gl.convert_layout(d, LD, assert_trivial=True)
        return q, dd

    @gluon.jit
    def _codes_tma(ring, bars, i, BLOCK_N: gl.constexpr, PER_STEP: gl.constexpr,
                   STAGES: gl.constexpr, LT: gl.constexpr, LP: gl.constexpr):  # fmt: skip
        """Step ``i``'s codes from its ring slot once its copy has landed, as LP's
        ``[BLOCK_N, 8, PER_STEP]`` words."""
        slot = i % STAGES
        mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
        t = ring.index(slot).load(LT)
        p = t.reshape([BLOCK_N, PER_STEP, 8]).permute([0, 2, 1])
        return gl.convert_layout(p, LP, assert_trivial=True)

    @gluon.jit(do_not_specialize=["M"])
    def mma_int8_gluon_tma_kernel(
        xq_ptr,
        codes_desc,
        xq_desc,
        xs_desc,
        scales_ptr,
        mins_ptr,
        xs_ptr,
        bias_ptr,
        out_ptr,
        ws_ptr,
        lock_ptr,
        M,
        N,
        K,
        row_bytes,
        G,
        MP,
        stride_xm,
        stride_om,
        k_split,
        ENC: gl.constexpr,
        GS: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr,
        SPLIT_K: gl.constexpr,
        GROUPS: gl.constexpr,
        KSPEC: gl.constexpr,
        STAGES: gl.constexpr,
        MMA: gl.constexpr,
        DOT_A: gl.constexpr,
        DOT_B: gl.constexpr,
        LP: gl.constexpr,
        LP1: gl.constexpr,
        LT: gl.constexpr,
        CODES_SL: gl.constexpr,
        LB: gl.constexpr,
        LQ: gl.constexpr,
        LQ1: gl.constexpr,
        LQB: gl.constexpr,
        LS: gl.constexpr,
        LD: gl.constexpr,
        SWORDS: gl.constexpr,
        LSW: gl.constexpr,
        LQT: gl.constexpr,
        Q_SL: gl.constexpr,
        LDT: gl.constexpr,
        D_SL: gl.constexpr,
        XTMA: gl.constexpr = 0,
    ):
        """``mma_int8_gluon_kernel`` with the codes brought in by the TMA engine: a ring of
        ``STAGES`` steps' ``[BLOCK_N, STEP / 2 bytes]`` tiles in shared memory (swizzled, so
        that the fragment loads from it are free of bank conflicts), each refilled as soon as
        its step is read. ``codes_desc``: a TensorDescriptor of the codes as int32 words
        ``[N, K / 8]``, block ``[BLOCK_N, STEP / 8]``, layout ``CODES_SL``. ``XTMA`` 1: each step's
        int8 activations come in the same ring slot (``xq_desc``: xq as int32 words ``[MP, K /
        4]``, block ``[BLOCK_M, STEP / 4]``, ``Q_SL``), read from there at the step instead of
        loaded into registers two steps ahead; 2: their per-group factors too (``xs_desc``:
        ``xs[0]`` ``[G, MP]``, block ``[GROUPS, BLOCK_M]``, ``D_SL``); 0: neither, and unused
        descriptors are stand-ins."""
        PER_STEP: gl.constexpr = (GROUPS * GS) // 64  # 64-code MMA chunks a step
        STEP: gl.constexpr = GS * GROUPS
        SDT: gl.constexpr = scales_ptr.dtype.element_ty  # the scales' type, as stored
        if KSPEC > 0:
            K = KSPEC
            G = KSPEC // GS
            MP = BLOCK_M
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        n_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % n_m
        pid_n = pid // n_m
        row0 = pid_n * BLOCK_N
        xw_ptr = xq_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        q_off, s_off, s_mask, d_off = _factor_offsets(
            pid_m, pid_n, N, G, MP, stride_xm, BLOCK_M, BLOCK_N, PER_STEP, GROUPS, LQ, LS, LD,
            SWORDS, LSW,
        )  # fmt: skip

        k_lo = pid_k * k_split
        k_hi = gl.minimum(K, k_lo + k_split)
        k_last = k_hi - STEP
        n_steps = (k_hi - k_lo) // STEP
        ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, STEP // 8], CODES_SL)
        q_ring = ring  # (stand-ins, never read)
        d_ring = ring
        if XTMA > 0:
            q_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_M, STEP // 4], Q_SL)
        if XTMA > 1:
            d_ring = gl.allocate_shared_memory(gl.float32, [STAGES, GROUPS, BLOCK_M], D_SL)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()
        m0 = pid_m * BLOCK_M
        for s in gl.static_range(STAGES):
            _tma_refill(codes_desc, ring, bars, s, n_steps, row0, k_lo, STEP, STAGES, xq_desc,
                        xs_desc, q_ring, d_ring, m0, GS, XTMA)  # fmt: skip

        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        ts = _tensor_scale(mins_ptr, ENC)
        # with XTMA the activations' loads here go unused (2: the factors' too)
        qa, sa, da = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k_lo, MP,
                              GS, GROUPS, SWORDS)  # fmt: skip
        k1 = gl.minimum(k_lo + STEP, k_last)
        qb, sb, db = _factors(xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off, k1, MP,
                              GS, GROUPS, SWORDS)  # fmt: skip
        i = 0
        for k0 in range(k_lo, k_hi, 2 * STEP):
            pa = _codes_tma(ring, bars, i, BLOCK_N, PER_STEP, STAGES, LT, LP)
            if XTMA > 0:
                qx, dx = _acts_tma(q_ring, d_ring, da, i, BLOCK_M, PER_STEP, STAGES, LQT, LQ, LDT,
                                   LD, XTMA)  # fmt: skip
            else:
                qx = qa
                dx = da
            _cta_barrier()  # every warp has read the slot: refill it
            _tma_refill(codes_desc, ring, bars, i + STAGES, n_steps, row0, k_lo, STEP, STAGES,
                        xq_desc, xs_desc, q_ring, d_ring, m0, GS, XTMA)  # fmt: skip
            acc = _step(acc, pa, qx, sa, dx, ts, BLOCK_N, BLOCK_M, GROUPS, GS, MMA, DOT_A, DOT_B,
                        LP1, LB, LQ1, LQB, ENC, SWORDS, SDT)  # fmt: skip
            k2 = gl.minimum(k0 + 2 * STEP, k_last)
            qa, sa, da = _ahead(qa, da, xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off,
                                k2, MP, GS, GROUPS, SWORDS, XTMA)  # fmt: skip
            if k0 + STEP < k_hi:
                pb = _codes_tma(ring, bars, i + 1, BLOCK_N, PER_STEP, STAGES, LT, LP)
                if XTMA > 0:
                    qy, dy = _acts_tma(q_ring, d_ring, db, i + 1, BLOCK_M, PER_STEP, STAGES, LQT,
                                       LQ, LDT, LD, XTMA)  # fmt: skip
                else:
                    qy = qb
                    dy = db
                _cta_barrier()
                _tma_refill(codes_desc, ring, bars, i + 1 + STAGES, n_steps, row0, k_lo, STEP,
                            STAGES, xq_desc, xs_desc, q_ring, d_ring, m0, GS, XTMA)  # fmt: skip
                acc = _step(acc, pb, qy, sb, dy, ts, BLOCK_N, BLOCK_M, GROUPS, GS, MMA, DOT_A,
                            DOT_B, LP1, LB, LQ1, LQB, ENC, SWORDS, SDT)  # fmt: skip
            k3 = gl.minimum(k0 + 3 * STEP, k_last)
            qb, sb, db = _ahead(qb, db, xw_ptr, q_off, scales_ptr, s_off, s_mask, xs_ptr, d_off,
                                k3, MP, GS, GROUPS, SWORDS, XTMA)  # fmt: skip
            i += 2
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))
        acc = _encoding_terms(acc, scales_ptr, mins_ptr, xs_ptr, pid_n * BLOCK_N,
                              pid_m * BLOCK_M, N, G, MP, k_lo // GS, k_hi // GS, ENC, BLOCK_N,
                              BLOCK_M, MMA)  # fmt: skip
        _store(acc, pid, pid_k, pid_n, pid_m, M, N, out_ptr, stride_om, bias_ptr, ws_ptr, lock_ptr,
               HAS_BIAS, SPLIT_K, BLOCK_N, BLOCK_M, MMA)  # fmt: skip
