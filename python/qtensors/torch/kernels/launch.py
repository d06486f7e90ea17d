"""Launch configuration of the fused matmul kernels (from shapes only) and the launches.

``fused_linear(x2, codes, scales, mins, bias, ...)`` computes ``x2 @ W^T + bias`` for a 2-D
activation ``x2 [M, K]``: up to ``GEMV_MAX_M`` rows with ``gemv.gemv_kernel`` (CUDA cores),
more with ``gemm.gemm_kernel`` (``tl.dot``). Everything about a launch but the tensors is
computed once per (shape, dtype, encoding) and cached; a call allocates only the output (and,
with split-K, an fp32 workspace through torch's allocator), never syncs with the host, and so
can be captured in a CUDA graph. The split-K counters live in one zeroed int32 buffer per device,
allocated on the first eager call and put back to 0 by the kernels themselves.

Supported (``supported()``): affine / symmetric 4- and 8-bit and NF4, a power-of-two group size
of at least 16 weights per byte-plane (32 for 4-bit, 16 for 8-bit), groups along either dim of
the ``[out, in]`` weight, rows starting on a byte (``in * bits % 8 == 0``). Anything else is
decoded and multiplied by the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from . import fastlaunch, gemm16_gluon, gemm16_regs_gluon, mma_int8_gluon
from .dequant import _levels
from .epilogue import ENC_IDS
from .fastlaunch import launch
from .gemm import gemm_kernel
from .gemv import gemv_kernel
from .kept import kept_empty
from .mma import MMA_ENC, NVFP4_CHUNK, mma_kernel
from .mma_int8 import MMA_INT8_ENC, MMA_INT8_MIN_GROUP, mma_int8_kernel, quantize_kernel
from .scales import SCALE_FORMATS
from .tiled import TILED_ENC, dot_kernel, fma_kernel
from .words import words_kernel
from .words_int8 import words_int8_kernel

#: rows of ``x`` up to which the byte-tile GEMV (``gemv.py``) runs for weights the tiled
#: kernels do not take (groups along the output dim, K not a multiple of a word)
GEMV_MAX_M = 4
#: tiled kernels (``tiled.py``): rows of ``x`` up to which ``fma_kernel`` runs; up to
#: ``TILED_MAX_M`` ``dot_kernel``; beyond, the caller decodes and calls cuBLAS. Set from
#: ``benches/bench_gpu_gemv_sweep.py`` (its "routing" lines). Run 1 on the H200
#: (benches/results/gpu_gemv_sweep_h200_run1.txt): the dot kernel loses to decode + cuBLAS at
#: every batch from 4 up (NF4 by 4x). Run 2 (gpu_gemv_sweep_h200_run2.txt, set with
#: benches/apply_dispatch.py): the words kernel wins batch 1, fma batch 2-4, dot only at batch 8
#: of 4096 x 14336; the table sends the rest of batch 8 to decode + cuBLAS.
FMA_MAX_M = 4
TILED_MAX_M = 4
#: ``mma.py`` (tensor cores) for fp16 / bf16 activations: the fewest rows it is routed for, per
#: encoding, up to ``MMA_MAX_M``. From ``benches/probe_mma.py`` on the H200
#: (benches/results/gpu_mma_probe_h200.txt): int4 affine / symmetric 1.0-1.16x cuBLAS bf16 from 2
#: to 16 rows (2-2.4x the decode + cuBLAS it replaces from 8 rows), 0.75-0.95x at 32, 0.5-0.6x at
#: 64 (still ahead of decode + cuBLAS); MXFP4 0.52-0.66x from 4 rows (the words kernel is faster
#: below). NVFP4's 16-weight groups cost a scale step per MMA k-step: no faster than decode +
#: cuBLAS, so not routed. Affine / symmetric from 3 rows since the words kernel's rewrite: at 2 rows
#: it takes 7.8-32.2 us against mma's 10.2-36.0 on every probe shape, at 3 rows 10.2-43.8 against
#: ~10.2-36 (gpu_words_probe_h200.txt, run 2).
MMA_ROUTED = {"affine": 3, "symmetric": 3, "mxfp4": 4}
MMA_MAX_M = 64
#: from 33 rows on, only weights of at least this many elements take it (run 1, 64 rows: 1.21-1.34x
#: decode + cuBLAS on the 32M+ weights, 0.81-0.99x on the 4096^2 and 2048 x 5632 ones)
MMA_WIDE_M, MMA_WIDE_MIN_ELEMENTS = 32, 1 << 25
#: the CUDA-core kernel of ``tiled_default`` up to ``FMA_MAX_M`` rows: "fma" (``tiled.py``) or
#: "words" (``words.py``); the sweep's "routing" lines say which measured faster
SMALL_M_KERNEL = "words"
#: 1-4 rows of fp16 / bf16 activations against affine / symmetric 4- and 8-bit codes, NF4 and
#: MXFP4 / NVFP4 (``INT8_ENCODINGS``): rounded to int8 per 16 (8) activations and multiplied as
#: integers (``words_int8.py``, as llama.cpp's GPU matrix-vector kernels do); False (or
#: ``QTENSORS_INT8_ACTIVATIONS=0``): ``words.py``, exact to fp32 accumulation. fp32 activations
#: always take the exact kernel.
INT8_ACTIVATIONS = os.environ.get("QTENSORS_INT8_ACTIVATIONS", "1") != "0"
#: the rows ``(lo, hi)`` for which ``mma_linear`` runs ``mma_int8.py`` (fp16 / bf16 activations
#: rounded to int8 per row and group, int8 tensor cores) instead of ``mma.py``, for the weights
#: ``int8_mma_shape`` takes of at least ``INT8_MMA_MIN_ELEMENTS``; only with
#: ``INT8_ACTIVATIONS``; None: never. Measured (benches/results/gpu_mma_int8_probe_h200.txt):
#: int4 affine g64 at 5-64 rows 1.03-1.42x ``mma.py`` on the weights of 32M+ elements, 0.86-1.25x
#: on 4096 x 4096, 0.87-1.06x on 5632 x 2048 and 2048 x 5632; against cuBLAS bf16 1.15-1.31x at
#: 5-16 rows on the 32M+ weights (symmetric 1.29-1.51x, affine g128 1.27-1.72x), below 1 from 32
#: rows (where ``mma.py``, routed there now, is further below). Quality: SmolLM2-135M int4-g64
#: perplexity 19.878 with every linear input rounded per 64 against 19.610 exact (+1.4%; per 16,
#: the 1-4-row kernel: +0.3%; benches/results/cpu_int8_quality.txt). Up to
#: ``INT8_MMA_GLUON_MAX_M`` rows the same product runs in ``mma_int8_gluon.py`` (faster; below).
INT8_MMA_ROWS: tuple[int, int] | None = (5, 64)
INT8_MMA_MIN_ELEMENTS = 1 << 25
#: up to this many rows, weights of at least this many elements take it too (where the Gluon
#: kernel is importable). H200, its TMA kernel against ``mma.py`` in the same run
#: (benches/results/gpu_gluon_mxfp4_h200.txt, --ab): 5-16 rows 1.09-1.18x on 4096^2,
#: 1.33-1.37x on 11264 x 2048 (the 1.1B's joined gate / up); 0.84-1.06x on the 11.5M and
#: smaller weights; at 32 rows 0.85x on 4096^2
INT8_MMA_NARROW_M, INT8_MMA_NARROW_MIN_ELEMENTS = 16, 1 << 24
#: fp16 / bf16 activations of ``GEMM16_ROWS`` rows (inclusive) run ``gemm16_gluon.py`` (each
#: weight tile decoded into 16 bits in shared memory, asynchronous ``wgmma``) on the weights of
#: ``GEMM16_TABLE`` (where the kernel was measured faster than decode + cuBLAS), and
#: ``gemm16_regs_gluon.py`` on ``GEMM16_REGS_TABLE``'s, instead of decode + cuBLAS; an sm_90
#: device only (the tables are the H200's; ``gemm16_applies``). None: never
#: (``use_gemm16(False)``). On by default since stop 41: on the H200 Llama-3-8B's decoding of
#: 256 / 128 sequences ran 1.13x / 1.11x the tokens/s of decode + cuBLAS compiled, 1.14x eager,
#: with less peak memory; its host-bound batch-1 prefill 0.98-1.05x (README, "Stops 40-41").
#: The tables hold 4096-wide and larger weights only: smaller models never take it.
GEMM16_ROWS_ON = (MMA_MAX_M + 1, 256)
GEMM16_ROWS: tuple[int, int] | None = GEMM16_ROWS_ON
#: split-K counters per device: tiles of one launch that may split K
LOCK_SLOTS = 1 << 15
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """``gemv_kernel``: output features per program, columns per step, K-slices (0: as many as
    fill the GPU, see ``_pick_split``), warps, software-pipelining stages, bit-built code
    values (``fast_cvt``)."""

    block_n: int = 8
    block_k: int = 512
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 1
    fast_cvt: bool = True


@dataclass(frozen=True)
class GemmConfig:
    """``gemm_kernel``: output tile, columns per step, K-slices (0: as many as fill the GPU),
    warps, software-pipelining stages."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class TiledConfig:
    """``tiled.py``: ``kernel`` "fma" (CUDA cores) or "dot" (``tl.dot``), "words" (``words.py``:
    CUDA cores, per-word accumulator, 1-4 rows; ``block_k`` counts weights), "words8"
    (``words_int8.py``: the same with int8 activations; ``block_k`` a multiple of 64 bits of
    codes), or "decode" (a table
    entry sending this shape to decode + cuBLAS, where that measured faster); rows of ``x`` per
    program (``block_m``, 0: the batch rounded up to a power of two; "dot" needs >= 16),
    output features and columns per step, K-slices (0: as many as fill the GPU), warps,
    software-pipelining stages, registers a thread at most (0: the compiler's choice);
    ``prefetch`` ("words8" only): the next step's codes and scales are loaded before this
    step's are multiplied (``words_int8.py``'s ``PREFETCH``); ``kspec`` ("words8" only): the
    kernel compiled for this K (``KSPEC``: immediate-offset loads); ``l2_ahead`` ("words8"
    only): the codes this many steps on prefetched into L2 (``L2_AHEAD``); ``pipeline``
    ("words8" only, 2 or 3; not with ``prefetch``): Triton's pipeliner on the K loop
    (``PIPELINE``: cp.async into shared memory); ``stream`` ("words8" only): the codes read
    past L1 (``STREAM``)."""

    kernel: str = "fma"
    block_m: int = 0
    block_n: int = 16
    block_k: int = 256
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int = 0
    prefetch: bool = False
    kspec: bool = False
    l2_ahead: int = 0
    pipeline: int = 0
    stream: bool = False


@dataclass(frozen=True)
class Gemm16Config:
    """``gemm16_gluon.py``: rows of ``x`` per program, output features per program (8-256), the
    warps issuing the ``wgmma`` (whole warpgroups, 16 rows a warp), the depth of the activations'
    and codes' rings (``stages``) and of the weight tiles' (``w_ring``), the decoder warps of a
    group, their registers a thread and the groups (1, or 2 taking turns: rings even), K slices
    per tile (``split_k``), and whether the decode's multiply and add are one FMA (``fuse``:
    values within an ulp of the dequantize kernel's instead of equal to them)."""

    block_m: int = 256
    block_n: int = 64
    num_warps: int = 8
    stages: int = 4
    w_ring: int = 4
    decode_warps: int = 4
    decode_regs: int = 80
    decode_groups: int = 2
    split_k: int = 1
    fuse: bool = True


@dataclass(frozen=True)
class MmaConfig:  # (also ``mma_int8.py``'s: groups 1, 2 or 4)
    """``mma.py``: rows of ``x`` per program (>= 16: the MMA's N dim; 0: the batch rounded up to
    a power of two, at least 16), output features per program (>= 16; 64 and up fill an MMA),
    groups per K step, K-slices (0: as many as fill the GPU), warps, software-pipelining
    stages."""

    block_m: int = 0
    block_n: int = 64
    groups: int = 2
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3


#: ``words_kernel``'s configuration where ``SMALL_M_KERNEL`` is "words" and the table has none: 8
#: features x 2048 codes a step with 4 warps (256 words a row: two per lane), the best or within
#: 5% of it on every shape of ``benches/probe_words.py --configs`` (H200,
#: ``benches/results/gpu_words_probe_h200.txt``)
WORDS_DEFAULT = TiledConfig(
    kernel="words", block_m=0, block_n=8, block_k=2048, split_k=0, num_warps=4, num_stages=2
)

#: ``words_int8_kernel``'s (``int8_applies``): 8 features x 2048 codes a step with 4 warps (one
#: 64-bit unit of codes a lane and feature: fewer codes would leave lanes idle); 4 features at
#: one row where 8 would give fewer than 4 programs per SM. H200, ``benches/probe_words.py
#: --int8-configs`` (``benches/results/gpu_words_int8_probe_h200.txt``): 8 features the best or
#: within 6% of it at 1-4 rows on every probe shape but 2048 x 5632 at one row (4 features: 4.7
#: against 5.1 us); 16 features 12.9 against 15.2 us on 8192 x 8192 at one row.
WORDS_INT8_DEFAULT = TiledConfig(
    kernel="words8", block_m=0, block_n=8, block_k=2048, split_k=0, num_warps=4, num_stages=2
)
WORDS_INT8_NARROW = TiledConfig(
    kernel="words8", block_m=0, block_n=4, block_k=2048, split_k=0, num_warps=4, num_stages=2
)


#: the routed int8 configurations load the next step's codes and scales while this step's are
#: multiplied (``TiledConfig.prefetch``): more bytes in flight per thread at the same occupancy
#: (sm_90 SASS: in the step's second half, not at its top; ``benches/probe_words.py
#: --int8-variants`` times it). After changing it, call ``int8_config.cache_clear()``. Off:
#: 0.97-1.20x the time on the H200 (gpu_words_int8_variants_h200.txt).
INT8_PREFETCH = False
#: the routed int8 configurations compile the kernel per row length K (``TiledConfig.kspec``,
#: ``words_int8.py``'s ``KSPEC``): every feature's codes and scales an immediate offset from
#: one address: sm_90 SASS, 6-14% fewer instructions a step (affine 334 -> 300 at 8 features,
#: symmetric 307 -> 264; 278 with paired scales), one compile per distinct K of a model. On
#: the H200 (benches/results/gpu_words_int8_variants_h200.txt, batch 1, CUDA graph) 0.92-0.97x
#: the time on the long-K / tall shapes (affine 4096x14336 12.5 -> 11.5 us, 14336x4096 11.7 ->
#: 11.3; symmetric 4096x14336 11.6 -> 10.9), within 1-3% elsewhere. After changing it, call
#: ``int8_config.cache_clear()``.
INT8_KSPEC = True
#: the routed int8 configurations' K loop through Triton's pipeliner with this many stages
#: (``TiledConfig.pipeline``, 2 or 3; 0: the plain loop): the next steps' loads copied into
#: shared memory (cp.async) during a step, no registers waiting for them; ``INT8_PREFETCH``
#: yields to it. After changing it, call ``int8_config.cache_clear()``. Off: 3-6x slower on the
#: H200 (gpu_words_int8_variants_h200.txt).
INT8_PIPELINE = 0
#: affine weights keep their scales and mins interleaved (``[scale, min]`` a group, one 32-bit
#: load a feature in ``words_int8.py``: ``PAIRED``) in their CUDA plan (``linear._CudaPlan``),
#: a copy beside the module's own: + the size of scales and mins (int4 g64 with fp16 scales: 4
#: bytes a 64-weight group, +11% of the packed weight). sm_90 SASS at 8 features: 323 against
#: 334 instructions a step, 56 registers against 64. On the H200 with ``INT8_KSPEC`` it saved
#: 1-5% more on the large shapes (8192^2 12.8 -> 12.2 us, gpu_words_int8_variants_h200.txt): off,
#: not worth 11% more memory as a copy (a zero-copy layout, the module's scales and mins strided
#: views of one interleaved buffer, is not built).
PAIRED_SCALES = False


#: the int8 kernel's configuration per (batch bucket, N, K) where ``benches/probe_words.py
#: --int8-variants`` found one faster than the routed default (used as is: the switches above
#: do not apply to it). After changing it, call ``int8_config.cache_clear()``.
INT8_TABLE: dict[tuple[int, int, int], TiledConfig] = {}


@functools.lru_cache(maxsize=4096)
def int8_config(M: int, N: int, K: int, cuda_index: int = -1, bits: int = 4) -> TiledConfig:
    """The int8 kernel's launch configuration for ``M`` rows of ``bits``-bit codes on device
    ``cuda_index``: ``INT8_TABLE``'s, else the default with the switches applied."""
    bucket = next((b for b in BATCH_BUCKETS if M <= b), BATCH_BUCKETS[-1])
    if (bucket, N, K) in INT8_TABLE:
        return INT8_TABLE[bucket, N, K]
    if M == 1 and -(-N // 8) < 4 * _sm_count(cuda_index):
        cfg = WORDS_INT8_NARROW
    else:
        cfg = WORDS_INT8_DEFAULT
    # 8-bit codes are two units a lane and feature: prefetched, 148 registers (sm_90)
    prefetch = INT8_PREFETCH and bits == 4 and not INT8_PIPELINE
    return dataclasses.replace(cfg, prefetch=prefetch, kspec=INT8_KSPEC, pipeline=INT8_PIPELINE)


def paired_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Affine scales and mins interleaved, ``[scale_0, min_0, scale_1, min_1, ...]`` (flat), as
    ``words_int8.py`` reads them with ``PAIRED`` (a 32-bit word a group: fp16 / bf16 only)."""
    two_bytes = scales.dtype in (torch.float16, torch.bfloat16)
    if scales.shape != mins.shape or scales.dtype != mins.dtype or not two_bytes:
        raise ValueError(
            f"fp16 / bf16 scales and mins of one shape and dtype to pair: {scales.shape}"
            f" {scales.dtype}, {mins.shape} {mins.dtype}"
        )
    return torch.stack((scales.reshape(-1), mins.reshape(-1)), dim=1).reshape(-1)


#: the batch buckets of ``TILED_TABLE`` (a batch uses the first bucket >= it)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 64, 256)
#: the launch configuration per (batch bucket, N, K) where a sweep found one better than
#: ``tiled_default``; filled from ``benches/bench_gpu_gemv_sweep.py`` ("table" lines), "decode"
#: meaning decode + cuBLAS measured faster. Empty since the words kernel's rewrite: its default
#: beat the previous entries (words at 8 features x 2048 codes with 8 warps, and decode at batch
#: 4 on 5632 x 2048: 14.7 us against the words kernel's 11.0) on the probe's shapes.
TILED_TABLE: dict[tuple[int, int, int], TiledConfig] = {}


#: ``mma_kernel``'s configuration where ``MMA_TABLE`` has none
MMA_DEFAULT = MmaConfig(block_m=0, block_n=64, groups=1, split_k=0, num_warps=4, num_stages=3)
#: per (batch bucket, N, K), as ``TILED_TABLE``: where ``benches/probe_mma.py`` found a config
#: more than 3% faster than the default (128 features a program on the widest outputs)
MMA_TABLE: dict[tuple[int, int, int], MmaConfig] = {
    (b, n, k): MmaConfig(block_m=0, block_n=128, groups=1, split_k=0, num_warps=4, num_stages=3)
    for b in (2, 4, 8, 16, 64)
    for n, k in ((8192, 8192), (14336, 4096))
}


def tiled_default(M: int, bits: int, g: int) -> TiledConfig:
    """Shape-independent starting points: 8 features x 1024 codes a step (4 KB of 4-bit codes
    per program and step) on the CUDA cores; ``tl.dot`` tiles of 16 rows x 64 features, of 64 /
    128 rows x 128 features from 17 rows."""
    if M <= FMA_MAX_M and SMALL_M_KERNEL == "words":
        return WORDS_DEFAULT
    if M <= FMA_MAX_M:
        # 8 activations (16 bytes) per thread and step: the layout the decoded words share with x;
        # 4 features from 2 rows (run 1: 73.6 against 94.9 us at batch 4 on 8192 x 8192)
        return TiledConfig("fma", 0, 8 if M == 1 else 4, 1024, num_warps=4, num_stages=2)
    if M <= 16:
        return TiledConfig("dot", 16, 64, 128, num_warps=4, num_stages=3)
    return TiledConfig("dot", 64 if M <= 64 else 128, 128, 64, num_warps=4, num_stages=3)


def int8_applies(M: int, K: int, encoding: str, bits: int, g: int, dtype: torch.dtype) -> bool:
    """Whether ``words_int8_kernel`` takes these rows (``INT8_ACTIVATIONS``; the codes must
    also start on an 8-byte boundary, see ``units_aligned``): 1-4 rows of fp16 / bf16, codes of
    ``INT8_ENCODINGS`` (4-bit; affine / symmetric 8-bit too), rows of whole 64-bit units inside
    groups."""
    half = dtype in (torch.float16, torch.bfloat16)
    return INT8_ACTIVATIONS and half and int8_shape(M, K, encoding, bits, g)


#: the encodings ``words_int8_kernel`` takes
INT8_ENCODINGS = ("affine", "symmetric", "nf4", "mxfp4", "nvfp4")


def int8_shape(M: int, K: int, encoding: str, bits: int, g: int) -> bool:
    """``int8_applies`` without the switch and the dtype."""
    return (
        M <= 4
        and encoding in INT8_ENCODINGS
        and bits in ((4, 8) if encoding in ("affine", "symmetric") else (4,))
        and (K * bits) % 64 == 0
        and g * bits >= 64
    )


def units_aligned(codes: torch.Tensor) -> bool:
    """Whether the packed codes (bytes or a wider view) can be read as int64 units: an 8-byte
    aligned start and whole units."""
    size = codes.element_size()
    return (
        codes.data_ptr() % 8 == 0
        and codes.storage_offset() * size % 8 == 0
        and codes.numel() * size % 8 == 0
    )


def tiled_config(M: int, N: int, K: int, bits: int, g: int) -> TiledConfig:
    bucket = next((b for b in BATCH_BUCKETS if M <= b), BATCH_BUCKETS[-1])
    return TILED_TABLE.get((bucket, N, K)) or tiled_default(M, bits, g)


@functools.lru_cache(maxsize=4096)
def route(
    M: int,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    g: int,
    axis: int,
    aligned: bool,
    half: bool = False,
    int8: bool = False,
) -> str:
    """Which path runs ``M`` rows against this weight: "mma" (``mma_linear``, fp16 / bf16
    activations: ``half``), "int8mma" (``mma_int8_linear`` on the Gluon kernel: NF4, 8-bit, where
    ``gluon_applies``; else decode + cuBLAS), "tiled" (``tiled_linear``; with ``int8``,
    ``INT8_ACTIVATIONS`` as the caller read it, the int8 kernel's rows first), "gemv"
    (``fused_linear``) or "decode" (decode, then cuBLAS) or "gemm16" (``gemm16_regs_linear``
    where ``GEMM16_REGS_TABLE`` has the weight and ``gemm16_regs_applies``, else
    ``gemm16_linear`` where ``gemm16_applies`` to the tensors; else decode + cuBLAS). Shapes
    only, so cached (and so are the plans): after changing the settings above, call
    ``route.cache_clear()``, ``_tiled_plan.cache_clear()`` and ``_mma_plan.cache_clear()``."""
    shape = (N, K)
    # the int8 kernel beats mma.py at 1-4 rows on every probe shape (gpu_words_int8_probe_h200)
    if int8 and half and aligned and int8_shape(M, K, encoding, bits, g):
        if tiled_supported(shape, encoding, bits, g, axis):
            return "tiled"
    if half and GEMM16_ROWS is not None and GEMM16_ROWS[0] <= M <= GEMM16_ROWS[1]:
        tabled = gemm16_config(M, N, K) or gemm16_regs_config(M, N, K)
        if tabled is not None and gemm16_shape(N, K, encoding, bits, g, axis):
            return "gemm16"
    lo = MMA_ROUTED.get(encoding)
    wide_enough = M <= MMA_WIDE_M or N * K >= MMA_WIDE_MIN_ELEMENTS
    if half and lo is not None and lo <= M <= MMA_MAX_M and wide_enough:
        if mma_supported(shape, encoding, bits, g, axis):
            return "mma"
    if M <= TILED_MAX_M and aligned and tiled_supported(shape, encoding, bits, g, axis):
        cfg = tiled_config(M, N, K, bits, g)
        # NF4's table lookup in the dot kernel's layout ran 4x slower than decode + cuBLAS
        if (
            cfg.kernel == "fma"
            or (cfg.kernel == "words" and M <= 4)
            or (cfg.kernel == "dot" and encoding != "nf4")
        ):
            return "tiled"
        return "decode"
    # NF4, NVFP4 and 8-bit codes past the int8 kernel's rows: the Gluon W4A8 kernel, where its rows
    # and the tensors allow (``linear`` checks ``gluon_applies``), else decode + cuBLAS (mma.py
    # takes neither)
    if int8 and half and INT8_MMA_ROWS is not None:
        if INT8_MMA_ROWS[0] <= M <= INT8_MMA_GLUON_MAX_M and gluon_rows_pay(M, N, K):
            enc = gluon_only_shape(N, K, encoding, bits, g, axis)
            nvfp4_ok = M <= NVFP4_GLUON_MAX_M and N * K >= NVFP4_GLUON_MIN_ELEMENTS
            if enc is not None and (enc != "nvfp4" or nvfp4_ok):
                return "int8mma"
    if M <= GEMV_MAX_M and supported(shape, encoding, bits, g, axis):
        return "gemv"
    return "decode"


def int8_mma_shape(K: int, encoding: str, g: int, gluon: bool = False) -> bool:
    """Whether ``mma_int8.py`` (``gluon``: ``mma_int8_gluon.py``, which also takes NF4, 8-bit
    symmetric codes seen as 4-bit pairs, "symmetric8", MXFP4 and NVFP4) takes a weight of 4-bit
    codes with groups along the input dim: its encoding, groups of at least 64 (one IMMA k-step
    a nibble half), whole groups a row; MXFP4's blocks of 32 and NVFP4's of 16 in whole 64-code
    chunks."""
    block = mma_int8_gluon.FP4_BLOCKS.get(encoding)
    if block is not None:
        return gluon and g == block and K % mma_int8_gluon.CHUNK == 0
    encodings = mma_int8_gluon.GLUON_ENC if gluon else MMA_INT8_ENC
    return encoding in encodings and g >= MMA_INT8_MIN_GROUP and K % g == 0


#: past this many rows, only weights of at least this many elements take route's "int8mma":
#: H200, 32 rows, 2048 x 5632 (11.5M): 8-bit 0.84x decode + cuBLAS, NF4 1.06x; 4096^2 (16.8M)
#: 1.21x / 1.36x (benches/results/gpu_gluon_int8mma_h200.txt)
GLUON_ONLY_WIDE_M, GLUON_ONLY_WIDE_MIN_ELEMENTS = 16, 1 << 24


def gluon_rows_pay(M: int, N: int, K: int) -> bool:
    """Whether ``M`` rows of an ``[N, K]`` weight pay for the Gluon kernel among the encodings
    only it takes on the int8 tensor cores (NF4, 8-bit, MXFP4, NVFP4): up to
    ``GLUON_ONLY_WIDE_M`` rows, or weights of ``GLUON_ONLY_WIDE_MIN_ELEMENTS``."""
    return M <= GLUON_ONLY_WIDE_M or N * K >= GLUON_ONLY_WIDE_MIN_ELEMENTS


#: NVFP4 takes "int8mma" only up to this many rows, on weights of at least this many elements:
#: its blocks of 16 cost two MMAs and two scalings a k-step. H200 against decode + cuBLAS
#: (benches/results/gpu_gluon_nvfp4_h200.txt): 5-16 rows 1.16-1.30x on the 32M+ weights,
#: 1.01-1.05x on 4096^2, 0.72-0.99x on the 11.5M ones; 32 rows 0.61-0.72x (stop 36; since the
#: scales are read as words, ``GLUON_SCALE_WORDS``, 1.22-1.30x faster at 16 rows on the 32M+)
NVFP4_GLUON_MAX_M, NVFP4_GLUON_MIN_ELEMENTS = 16, 1 << 24


def gluon_only_shape(N: int, K: int, encoding: str, bits: int, g: int, axis: int) -> str | None:
    """The encoding ``mma_int8_gluon.py`` runs this weight as, where only it takes the weight
    among the tensor-core kernels (``route``'s "int8mma"): NF4 (as "nf4"), NVFP4 ("nvfp4"),
    8-bit symmetric codes in groups of 32-128 (as "symmetric8": 4-bit pairs over ``2 K``,
    groups ``2 g``); groups along the input dim, rows of whole 32-bit words. Else None. Whether
    it runs also depends on the tensors (``gluon_applies``)."""
    if axis not in (1, -1) or K % 8:
        return None
    if encoding in ("nf4", "nvfp4") and bits == 4 and int8_mma_shape(K, encoding, g, True):
        return encoding
    if encoding == "symmetric" and bits == 8 and g <= 128:
        if int8_mma_shape(2 * K, "symmetric8", 2 * g, True):
            return "symmetric8"
    return None


def gluon_only_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` for a weight route's "int8mma" takes (``gluon_only_shape``: NF4,
    8-bit symmetric, no mins; NVFP4, whose ``mins`` is its tensor scale), on ``mma_int8_gluon.py``:
    8-bit codes run as 4-bit pairs over twice K, in groups twice as long (the pre-pass reads
    each activation twice)."""
    enc = gluon_only_shape(N, K, encoding, bits, group_size, 1)
    if enc is None:
        raise ValueError(f"no Gluon-only route for {encoding} {bits}-bit, groups of {group_size}")
    k, g = (2 * K, 2 * group_size) if enc == "symmetric8" else (K, group_size)
    return mma_int8_linear(x2, codes, scales, mins, bias, N, k, enc, g, gluon=True)


def int8_mma_applies(M: int, N: int, K: int, encoding: str, g: int, dtype: torch.dtype) -> bool:
    """Whether ``mma_linear`` runs ``mma_int8.py`` for these rows (``INT8_MMA_ROWS``,
    ``INT8_ACTIVATIONS``, ``INT8_MMA_MIN_ELEMENTS``, fp16 / bf16 activations,
    ``int8_mma_shape``; ``INT8_MMA_NARROW_*`` where its Gluon kernel may run); MXFP4 its Gluon
    kernel, up to ``INT8_MMA_GLUON_MAX_M`` rows, past ``GLUON_ONLY_WIDE_M`` rows only on weights
    of ``GLUON_ONLY_WIDE_MIN_ELEMENTS`` (``mma_linear`` also asks ``gluon_applies``). H200
    (benches/results/gpu_gluon_mxfp4_h200.txt): MXFP4 1.21-2.14x ``mma.py`` at 5-16 rows on
    the issue's shapes (1.01-1.17x cuBLAS bf16 on the 32M+ ones), 1.08-1.59x at 32 rows but
    0.89x on 2048 x 5632."""
    rows = INT8_MMA_ROWS
    if rows is None or not INT8_ACTIVATIONS or dtype not in (torch.float16, torch.bfloat16):
        return False
    if encoding == "mxfp4":
        return (
            rows[0] <= M <= min(rows[1], INT8_MMA_GLUON_MAX_M)
            and gluon_rows_pay(M, N, K)
            and int8_mma_shape(K, encoding, g, gluon=True)
        )
    narrow = (
        M <= INT8_MMA_NARROW_M
        and N * K >= INT8_MMA_NARROW_MIN_ELEMENTS
        and INT8_MMA_GLUON
        and mma_int8_gluon.HAVE_GLUON
    )
    wide = N * K >= INT8_MMA_MIN_ELEMENTS or narrow
    return rows[0] <= M <= rows[1] and wide and int8_mma_shape(K, encoding, g)


def mma_supported(shape, encoding: str, bits: int, group_size: int, axis: int) -> bool:
    """Whether ``mma.py`` takes this weight: 4-bit affine / symmetric / FP4 codes with groups
    along the input dim (a power of two of at least 16 codes: one MMA step), rows of whole
    bytes."""
    if len(shape) != 2 or encoding not in MMA_ENC or bits != 4:
        return False
    g = group_size
    return axis in (1, -1) and g & (g - 1) == 0 and g >= 16 and int(shape[1]) % 2 == 0


def tiled_supported(shape, encoding: str, bits: int, group_size: int, axis: int) -> bool:
    """Whether ``tiled.py`` takes this weight: groups along the input dim (a power of two of at
    least one int32 word of codes), 4- or 8-bit codes, rows of whole words."""
    if len(shape) != 2 or encoding not in TILED_ENC or bits not in (4, 8):
        return False
    pw = 32 // bits
    g = group_size
    return axis in (1, -1) and g & (g - 1) == 0 and g >= pw and int(shape[1]) % pw == 0


def supported(shape, encoding: str, bits: int, group_size: int, axis: int) -> bool:
    """Whether the fused kernels handle this weight (else: decode, then ``F.linear``)."""
    if len(shape) != 2 or encoding not in ENC_IDS or bits not in (4, 8):
        return False
    pack = 8 // bits
    g = group_size
    return (
        axis in (0, 1, -1, -2)
        and g & (g - 1) == 0
        and g >= 16 * pack
        and (int(shape[1]) * bits) % 8 == 0
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sm_count(index: int) -> int:
    if index < 0:
        return 4  # the interpreter: a few "SMs", so that small test shapes split K
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pick_split(n_tiles: int, k_steps: int, sms: int, waves: int) -> int:
    """Split K until the grid covers ``waves`` programs per SM, each slice keeping >= 2 steps."""
    split = 1
    while n_tiles * split < waves * sms and split * 4 <= k_steps and split < 16:
        split *= 2
    return split


def _k_slices(
    fixed: int,
    n_tiles: int,
    M: int,
    N: int,
    K: int,
    step: int,
    cuda_index: int,
    waves: int,
    allow_split: bool,
) -> tuple[int, int]:
    """(K-slices, columns per slice) of a launch whose program steps ``step`` columns: ``fixed``
    slices if set, else ``_pick_split``'s; one where the split-K counters or workspace do not
    allow more (no counters yet, too many tiles, a workspace past int32 indexing)."""
    k_steps = -(-K // step)
    split = fixed or _pick_split(n_tiles, k_steps, _sm_count(cuda_index), waves)
    if not allow_split or n_tiles > LOCK_SLOTS or split * M * N >= 2**31:
        split = 1
    k_split = -(-k_steps // split) * step
    return (-(-K // k_split) if K else 1), k_split


def gemv_config(M: int, N: int, K: int, bits: int, g: int, axis0: bool) -> GemvConfig:
    """Batch 1-4: 8 features x 256 bytes of codes per step (16 bytes a thread with 4 warps),
    and enough programs (splitting K) for some 4 per SM to hide the memory latency."""
    block_n = min(8, g) if axis0 else 8
    block_k = 256 if bits == 4 else 128
    # the best of the sweep on the H200 for every shape of benches/results/gpu_linear_h200.txt
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=2)


def gemm_config(M: int, N: int, K: int, bits: int, g: int, axis0: bool) -> GemmConfig:
    """Tiles grow with M (16 rows for batch <= 16, 128 from 128 rows); ``BLOCK_K`` divides the
    group (one scale per feature and step) unless the groups run along the features."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if M <= 64 else 128
    if axis0:
        block_n = min(block_n, g)
        block_k = 128 if bits == 4 else 64
    else:
        block_k = min(g, 128 if bits == 4 else 64)
    warps = 4 if block_m * block_n <= 64 * 64 else 8
    return GemmConfig(block_m, block_n, block_k, num_warps=warps, num_stages=3)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _output(
    x2: torch.Tensor, N: int, K: int, bias: torch.Tensor | None
) -> tuple[torch.Tensor, bool]:
    """The ``[M, N]`` result, and whether it is already final (an empty product: no launch)."""
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0 or N == 0:
        return out, True
    if K == 0:
        return (out.zero_() if bias is None else out.copy_(bias.expand(M, N))), True
    return out, False


def _device_index(dev: torch.device) -> int:
    """The CUDA ordinal of ``dev`` (-1 off CUDA): part of the cached launch plans' keys."""
    if dev.type != "cuda":
        return -1
    return dev.index if dev.index is not None else torch.cuda.current_device()


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def _workspace(
    device: torch.device, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, use: str = ""
) -> torch.Tensor:
    """The split-K partial sums (or, by ``use``, another scratch buffer of a launch): one buffer
    per device, use, dtype and size, kept (allocating it costs ~4 us of host time a call). Reuse
    is safe where the counters' is: the launches of a device run in stream order, and the
    kernels finish with a buffer before the next launch starts. While a CUDA graph is being
    captured a missing buffer is allocated for that call only; a kept one outside any graph
    pool (``kept.py``)."""
    key = (device, shape, dtype, use)
    t = _WORKSPACES.get(key)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.empty(shape, dtype=dtype, device=device)
        t = _WORKSPACES[key] = kept_empty(shape, dtype, device)
    return t


def _locks(device: torch.device) -> torch.Tensor | None:
    """The split-K counters of ``device`` (None while a CUDA graph is being captured and they
    do not exist yet: allocating them then would leave them unzeroed outside the graph)."""
    t = _LOCKS.get(device)
    if t is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        t = _LOCKS[device] = kept_empty((LOCK_SLOTS,), torch.int32, device).zero_()
    return t


def _begin(x2: torch.Tensor, N: int, K: int, bias: torch.Tensor | None):
    """A fused call's start: the output, whether it is already final (nothing to launch), the
    CUDA ordinal and the split-K counters of the activations' device."""
    out, done = _output(x2, N, K, bias)
    if done:
        return out, True, -1, None
    return out, False, _device_index(x2.device), _locks(x2.device)


def _finish(kernel, grid, split, k_split, meta, meta_key, cuda_index, locks, x2, out, weight,
            bias, K, row) -> torch.Tensor:  # fmt: skip
    """Launch ``kernel`` with the arguments every fused kernel takes, in their order: x, the
    weight's parts (``weight``: codes, scales, mins or a stand-in, [levels]), the bias (or a
    stand-in), out, the split-K workspace and counters, M, N, K, the per-row counts ``row``, the
    strides and the K-slice length."""
    M, N = out.shape
    ws = _workspace(x2.device, (split, M, N)) if split > 1 else out
    stand_in = weight[1]
    args = (
        x2,
        *weight,
        stand_in if bias is None else bias,
        out,
        ws,
        out if locks is None else locks,
        M,
        N,
        K,
        *row,
        x2.stride(0),
        out.stride(0),
        k_split,
    )
    launch(kernel, grid, args, meta, meta_key, cuda_index)
    return out


@functools.lru_cache(maxsize=4096)
def _plan(
    M: int,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    g: int,
    axis: int,
    x_dtype: torch.dtype,
    has_bias: bool,
    cuda_index: int,
    config: GemvConfig | GemmConfig | None,
    allow_split: bool,
):
    """(kernel, grid, split, scalars, k_split, constexprs and options, their hashable key) of
    one launch."""
    axis0 = axis in (0, -2)
    use_gemv = isinstance(config, GemvConfig) or (config is None and M <= GEMV_MAX_M)
    if config is None:
        pick = gemv_config if use_gemv else gemm_config
        config = pick(M, N, K, bits, g, axis0)
    if use_gemv:
        assert isinstance(config, GemvConfig)
        bn, bk = config.block_n, config.block_k
        block_m = max(1, 1 << (M - 1).bit_length())
        n_tiles = -(-N // bn)
    else:
        assert isinstance(config, GemmConfig)
        bn, bk = config.block_n, config.block_k
        block_m = config.block_m
        n_tiles = -(-M // block_m) * -(-N // bn)
    if axis0 and g % bn:
        raise ValueError(f"block_n {bn} must divide the group size {g} (groups along out)")
    if not axis0 and not use_gemv and g % bk:
        raise ValueError(f"block_k {bk} must divide the group size {g}")
    waves = 4 if use_gemv else 2
    split, k_split = _k_slices(config.split_k, n_tiles, M, N, K, bk, cuda_index, waves, allow_split)
    G = -(-K // g)
    meta: dict = dict(
        ENC=ENC_IDS[encoding],
        BITS=bits,
        GS=g,
        AXIS0=axis0,
        HAS_BIAS=has_bias,
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        SPLIT_K=split,
    )
    if use_gemv:
        meta["FAST_CVT"] = config.fast_cvt and encoding != "nf4"
    else:
        meta["IEEE"] = x_dtype == torch.float32 or (cuda_index < 0 and x_dtype == torch.bfloat16)
    if cuda_index >= 0:
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel = gemv_kernel if use_gemv else gemm_kernel
    grid = (n_tiles, split)
    return kernel, grid, split, (M, N, K, G), k_split, meta, tuple(sorted(meta.items()))


@functools.lru_cache(maxsize=4096)
def _tiled_plan(
    M: int,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    g: int,
    x_dtype: torch.dtype,
    has_bias: bool,
    cuda_index: int,
    config: TiledConfig | None,
    allow_split: bool,
    paired: bool = False,
):
    """(kernel, grid, split, k_split, constexprs and options, their hashable key) of one tiled
    launch; ``paired``: the int8 kernel reads interleaved affine scales and mins."""
    cfg = config or tiled_config(M, N, K, bits, g)
    if cfg.kernel not in ("fma", "dot", "words", "words8"):
        raise ValueError(f"{cfg.kernel!r} is not a tiled kernel (see route())")
    fma = cfg.kernel != "dot"  # "words" too: CUDA cores, one program per feature tile
    block_m = cfg.block_m or max(1, 1 << (M - 1).bit_length())
    if not fma and block_m < 16:
        raise ValueError(f"the dot kernel needs block_m >= 16, not {block_m}")
    if cfg.kernel == "words" and (M > 4 or cfg.block_k % (64 // bits)):
        raise ValueError(
            f"the words kernel takes 1-4 rows and steps of whole word pairs, not {M}, {cfg}"
        )
    if cfg.kernel == "words8" and not (
        M <= 4 and cfg.block_k % (64 // bits) == 0 and encoding in INT8_ENCODINGS
    ):
        raise ValueError(
            f"the int8 words kernel takes 1-4 rows of {INT8_ENCODINGS} codes in steps of whole"
            f" 64-bit units, not {M}, {encoding}, {cfg}"
        )
    bn, bk = cfg.block_n, cfg.block_k
    n_tiles = -(-N // bn) * (1 if fma else -(-M // block_m))
    waves = 4 if fma else 2
    split, k_split = _k_slices(cfg.split_k, n_tiles, M, N, K, bk, cuda_index, waves, allow_split)
    meta: dict = dict(
        ENC=TILED_ENC[encoding],
        SFMT=SCALE_FORMATS.get(encoding, 0),
        BITS=bits,
        GS=g,
        HAS_BIAS=has_bias,
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        SPLIT_K=split,
    )
    if not fma:
        meta["IEEE"] = x_dtype == torch.float32 or (cuda_index < 0 and x_dtype == torch.bfloat16)
    options = (cfg.prefetch, cfg.kspec, cfg.l2_ahead, cfg.pipeline, cfg.stream)
    if any(options) and cfg.kernel != "words8":
        raise ValueError(f"prefetch / kspec / l2_ahead / pipeline / stream are the int8 words"
                         f" kernel's, not {cfg}")  # fmt: skip
    if cfg.pipeline and (cfg.prefetch or cfg.pipeline not in (2, 3)):
        raise ValueError(f"pipeline is 2 or 3 stages, without prefetch: {cfg}")
    if paired and (cfg.kernel != "words8" or encoding != "affine"):
        raise ValueError(f"paired scales are the int8 words kernel's, for affine codes: {cfg}")
    if cfg.kernel == "words8":
        meta["EMULATE"] = cuda_index < 0  # the interpreter runs no inline assembly
        meta["PAIRED"] = paired
        meta["PREFETCH"] = cfg.prefetch
        meta["KSPEC"] = K if cfg.kspec else 0
        meta["L2_AHEAD"] = cfg.l2_ahead
        meta["PIPELINE"] = cfg.pipeline
        meta["STREAM"] = cfg.stream
    if cuda_index >= 0:
        # FMAs explicitly: the decode's ``f * s2 + off`` and the accumulation are one each
        # (Triton's default for fusion is changing)
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
        if cfg.maxnreg:
            meta["maxnreg"] = cfg.maxnreg
    kernels = {"fma": fma_kernel, "dot": dot_kernel, "words": words_kernel}
    kernel = kernels.get(cfg.kernel, words_int8_kernel)
    return kernel, (n_tiles, split), split, k_split, meta, tuple(sorted(meta.items()))


def tiled_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    group_size: int,
    config: TiledConfig | None = None,
    pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` with ``tiled.py`` for a weight ``tiled_supported()`` (arguments as
    ``fused_linear``; ``codes``: bytes starting on a 4-byte boundary, see ``words_aligned``, or
    their int32 / int64 view). MXFP4 / NVFP4 scales are passed as stored (NVFP4's tensor scale
    in ``mins``). Without a ``config``, rows ``int8_applies`` takes run ``words_int8.py`` where
    the codes start on an 8-byte boundary. ``pairs``: an affine weight's ``paired_scales``,
    which ``words_int8.py`` reads instead of ``scales`` and ``mins`` (the other kernels ignore
    it)."""
    M = x2.shape[0]
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    if (
        config is None
        and int8_applies(M, K, encoding, bits, group_size, x2.dtype)
        and (codes.dtype == torch.int64 or units_aligned(codes))
    ):
        config = int8_config(M, N, K, cuda_index, bits)
    paired = (
        pairs is not None
        and encoding == "affine"
        and (config or tiled_config(M, N, K, bits, group_size)).kernel == "words8"
    )
    kernel, grid, split, k_split, meta, meta_key = _tiled_plan(
        M,
        N,
        K,
        encoding,
        bits,
        group_size,
        x2.dtype,
        bias is not None,
        cuda_index,
        config,
        locks is not None,
        paired,
    )
    if paired:
        if pairs.numel() != 2 * scales.numel() or pairs.dtype != scales.dtype:
            raise ValueError(f"pairs are not these scales' ({pairs.numel()}, {pairs.dtype})")
        scales = pairs
    levels = _levels(x2.device) if encoding == "nf4" else scales
    if scales.dtype == torch.float8_e4m3fn:
        scales = scales.view(torch.uint8)
    unit = torch.int64 if kernel is words_int8_kernel else torch.int32
    words = codes if codes.dtype == unit else codes.view(unit)
    weight = (words, scales, scales if mins is None else mins, levels)
    # int32 words (int64 units) per row, groups per row
    row = (K * bits // (64 if unit is torch.int64 else 32), -(-K // group_size))
    return _finish(kernel, grid, split, k_split, meta, meta_key, cuda_index, locks, x2, out,
                   weight, bias, K, row)  # fmt: skip


def mma_config(M: int, N: int, K: int, g: int) -> MmaConfig:
    """The launch configuration of ``mma_kernel`` for ``M`` rows (the table, else the default)."""
    bucket = next((b for b in BATCH_BUCKETS if M <= b), BATCH_BUCKETS[-1])
    return MMA_TABLE.get((bucket, N, K)) or MMA_DEFAULT


@functools.lru_cache(maxsize=4096)
def _mma_plan(
    M: int,
    N: int,
    K: int,
    encoding: str,
    g: int,
    x_dtype: torch.dtype,
    has_bias: bool,
    cuda_index: int,
    config: MmaConfig | None,
    allow_split: bool,
):
    """(grid, split, k_split, constexprs and options, their hashable key) of one mma launch."""
    cfg = config or mma_config(M, N, K, g)
    block_m = cfg.block_m or max(16, 1 << (M - 1).bit_length())
    if block_m < 16 or cfg.block_n < 16:
        raise ValueError(f"the mma kernel needs block_m and block_n >= 16, not {cfg}")
    if encoding == "nvfp4":  # the kernel's K step: chunks of blocks (see mma.py)
        g = NVFP4_CHUNK
    step = g * cfg.groups
    n_tiles = -(-N // cfg.block_n) * -(-M // block_m)
    split, k_split = _k_slices(cfg.split_k, n_tiles, M, N, K, step, cuda_index, 2, allow_split)
    meta: dict = dict(
        ENC=MMA_ENC[encoding],
        SFMT=SCALE_FORMATS.get(encoding, 0),
        GS=g,
        HAS_BIAS=has_bias,
        # fp32 activations: exact fp32 products; the interpreter's tl.dot misreads bf16
        IEEE=x_dtype == torch.float32 or (cuda_index < 0 and x_dtype == torch.bfloat16),
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        GROUPS=cfg.groups,
        SPLIT_K=split,
        EVEN=K % g == 0,  # whole groups: every group of a K-slice is in range or out
    )
    if cuda_index >= 0:
        meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (n_tiles, split), split, k_split, meta, tuple(sorted(meta.items()))


def mma_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    group_size: int,
    config: MmaConfig | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` with ``mma.py`` for a weight ``mma_supported()`` (arguments as
    ``tiled_linear``; ``codes`` the packed bytes). Without a ``config``, rows
    ``int8_mma_applies`` takes run ``mma_int8.py``."""
    M = x2.shape[0]
    if config is None and int8_mma_applies(M, N, K, encoding, group_size, x2.dtype):
        if encoding != "mxfp4":
            return mma_int8_linear(x2, codes, scales, mins, bias, N, K, encoding, group_size)
        if gluon_applies(codes, scales, _device_index(x2.device), M):  # its only int8 kernel
            return mma_int8_linear(x2, codes, scales, mins, bias, N, K, encoding, group_size,
                                   gluon=True)  # fmt: skip
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    grid, split, k_split, meta, meta_key = _mma_plan(
        M,
        N,
        K,
        encoding,
        group_size,
        x2.dtype,
        bias is not None,
        cuda_index,
        config,
        locks is not None,
    )
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    if scales.dtype == torch.float8_e4m3fn:
        scales = scales.view(torch.uint8)
    weight = (codes, scales, scales if mins is None else mins)
    row = (K // 2, -(-K // group_size))  # bytes per row, groups per row
    return _finish(mma_kernel, grid, split, k_split, meta, meta_key, cuda_index, locks, x2, out,
                   weight, bias, K, row)  # fmt: skip


_G16 = Gemm16Config
#: per (rows bucket: 128 or 256, N, K): the configuration ``benches/probe_gemm16.py`` found
#: fastest where it beat decode + cuBLAS by 1.2x or more (H200, bf16, int4-g64 affine,
#: ``benches/results/gpu_gemm16_ws_h200.txt``); the route takes gemm16 for these weights only
GEMM16_TABLE: dict[tuple[int, int, int], Gemm16Config] = {
    (128, 8192, 8192): _G16(128, 128, 4, decode_regs=104, split_k=2),
    (256, 8192, 8192): _G16(),
    (256, 4096, 14336): _G16(split_k=2),
    (128, 14336, 4096): _G16(128, 128, 4, decode_regs=104),
    (256, 14336, 4096): _G16(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1),
    # Llama-3-8B's gate and up projections joined (siblings.py): 104.9 against 147.9 us at 128
    # rows, 136.4 against 170.5 at 256 (gpu_gemm16_joined_h200.txt); its joined q/k/v (6144 x
    # 4096) measured 0.92-1.02x, not routed
    (128, 28672, 4096): _G16(128, 128, 4, decode_regs=104),
    (256, 28672, 4096): _G16(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1),
    # Llama-3's LM head (vocab 128256): 544.5 against 765.6 us at 256 rows
    # (gpu_gemm16_head_h200.txt; 128 rows not measured)
    (256, 128256, 4096): _G16(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1),
}


def use_gemm16(on: bool = True) -> None:
    """Route ``gemm16_gluon.py`` and, on ``GEMM16_REGS_TABLE``'s weights, ``gemm16_regs_gluon.py``
    (``GEMM16_ROWS_ON``, the default) or not (decode + cuBLAS past ``MMA_MAX_M`` rows), and drop
    the cached routes that the setting changes."""
    global GEMM16_ROWS
    GEMM16_ROWS = GEMM16_ROWS_ON if on else None
    route.cache_clear()


def gemm16_tabled(N: int, K: int) -> bool:
    """Whether either gemm16 table has this weight shape, at any row bucket (the warm-up runs
    the route's rows only for such weights)."""
    return any((b, N, K) in t for b in (128, 256) for t in (GEMM16_TABLE, GEMM16_REGS_TABLE))


def gemm16_config(M: int, N: int, K: int) -> Gemm16Config | None:
    """``gemm16_kernel``'s launch configuration for ``M`` rows (65-128: bucket 128, 129-256:
    256), None where ``GEMM16_TABLE`` has none."""
    return GEMM16_TABLE.get((128 if M <= 128 else 256, N, K))


def gemm16_rows(M: int) -> int:
    """The rows a gemm16 launch of ``M`` rows is planned for (its table bucket, 128 or 256; a
    multiple of 128 past them): every row count of a bucket gets the same split and one split-K
    workspace, so a prompt of a new length reuses both (and ``Gemm16Kept``)."""
    return max(128, -(-M // 128) * 128)


def gemm16_shape(N: int, K: int, encoding: str, bits: int, g: int, axis: int) -> bool:
    """Whether ``gemm16_gluon.py`` takes this weight's layout: 4-bit affine / symmetric codes,
    groups along the input dim of a multiple of 64 (a step of K each), whole groups."""
    return (
        encoding in gemm16_gluon.GEMM16_ENC
        and bits == 4
        and axis in (1, -1)
        and g % 64 == 0
        and K % g == 0
        and N > 0
    )


def gemm16_applies(x2: torch.Tensor, codes: torch.Tensor, cuda_index: int) -> bool:
    """Whether these tensors can run ``gemm16_gluon.py`` (on top of the route's shape test):
    Gluon importable, an sm_90 device (Hopper's ``wgmma``, which later architectures do not
    have; the tables were measured there), fp16 / bf16 activations whose rows and codes start
    16-byte aligned (the TMA engine's rule)."""
    return (
        gemm16_gluon.HAVE_GEMM16
        and x2.dtype in (torch.float16, torch.bfloat16)
        and _hopper_device(cuda_index)
        and x2.data_ptr() % 16 == 0
        and x2.stride(0) % 8 == 0
        and x2.stride(1) == 1
        and codes.data_ptr() % 16 == 0
    )


@functools.lru_cache(maxsize=4096)
def _gemm16_plan(M: int, N: int, K: int, encoding: str, g: int, has_bias: bool,
                 cfg: Gemm16Config):  # fmt: skip
    """(grid, constexprs and options, their hashable key) of one gemm16 launch."""
    meta = dict(
        ENC=gemm16_gluon.GEMM16_ENC[encoding],
        GS=g,
        HAS_BIAS=has_bias,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SPLIT_K=cfg.split_k,
        X_RING=cfg.stages,
        C_RING=cfg.stages,
        W_RING=cfg.w_ring,
        DECODE_WARPS=cfg.decode_warps,
        DECODE_REGS=cfg.decode_regs,
        DECODE_GROUPS=cfg.decode_groups,
        **gemm16_gluon.layouts(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.decode_warps),
        num_warps=cfg.num_warps,
        # unfused, the decode's operations are each rounded once: the dequantize kernel's values
        enable_fp_fusion=cfg.fuse,
    )
    grid = (-(-M // cfg.block_m) * -(-N // cfg.block_n), cfg.split_k)
    return grid, meta, tuple(sorted((k, str(v)) for k, v in meta.items()))


def gemm16_split(K: int, split: int) -> tuple[int, int]:
    """(K slices, steps of 64 a slice) for ``split`` slices asked: as many as each get a step at
    least (a slice with none would leave its program's partitions waiting for ever)."""
    steps = K // 64
    if steps == 0:
        return 1, 0
    per = -(-steps // max(1, min(split, steps)))
    return -(-steps // per), per


def gemm16_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    group_size: int,
    config: Gemm16Config | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` with ``gemm16_gluon.py`` for a weight ``gemm16_shape()`` takes and
    tensors ``gemm16_applies()`` to (arguments as ``mma_linear``; ``config``: else the table's,
    else the default): decode + cuBLAS's product without the decoded weight in HBM."""
    M = x2.shape[0]
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    cfg = config or gemm16_config(M, N, K) or Gemm16Config()
    # one slice where there are no counters yet (in a graph capture) or too few for the tiles
    # (of the bucket's rows: the same split for every row count of a bucket)
    rows = gemm16_rows(M)
    tiles = -(-rows // cfg.block_m) * -(-N // cfg.block_n)
    counted = locks is not None and tiles <= LOCK_SLOTS
    split, k_steps = gemm16_split(K, cfg.split_k if counted else 1)
    if split != cfg.split_k:
        cfg = dataclasses.replace(cfg, split_k=split)
    grid, meta, meta_key = _gemm16_plan(M, N, K, encoding, group_size, bias is not None, cfg)
    TD = gemm16_gluon.TensorDescriptor
    x_desc = TD(x2, [M, K], [x2.stride(0), 1], [cfg.block_m, 64], meta["X_SL"])
    c_desc = _words_descriptor(codes, N, K, [cfg.block_n, 8], meta["C_SL"])
    # the kernel reads slice k's partial sums at k * M * N: a bucket's buffer holds any M of it
    ws = _workspace(x2.device, (split, rows, N)) if split > 1 else out
    args = (x_desc, c_desc, scales, scales if mins is None else mins,
            scales if bias is None else bias, out, ws, out if locks is None else locks, M, N, K,
            K // group_size, out.stride(0), k_steps)  # fmt: skip
    launch(gemm16_gluon.gemm16_kernel, grid, args, meta, meta_key, cuda_index)
    return out


@dataclass(frozen=True)
class Gemm16RegsConfig:
    """``gemm16_regs_gluon.py``: output features per program (64 a warpgroup), the activations'
    ring depth and ``pending`` (1: a step's product in flight while the next is decoded; 0:
    none, a check), ``scales_tma`` (the scales and mins by TMA in the ring, ``scale_box`` groups
    a copy: faults on the H200 under Triton 3.6, cause not found; off, the default: loaded from
    global memory into registers a step ahead) and ``packed`` (the weight decoded in pairs of
    16-bit values, ~3 instructions a weight; off: through fp32 as the dequantize kernel, ~5.5).
    ``split_k``: K slices a tile (1, the default; 0: as many as fill the GPU once; split K,
    which summed wrong at stop 37, is right since the race was fixed:
    ``benches/results/gpu_gemm16_regs_split_h200.txt``)."""

    block_f: int = 128
    stages: int = 4
    pending: int = 1
    scales_tma: bool = False
    scale_box: int = 8
    packed: bool = True
    split_k: int = 1


_G16R = Gemm16RegsConfig
#: per (rows bucket: 128 or 256, N, K): the ``gemm16_regs_kernel`` configuration the
#: gemm16 route (``GEMM16_ROWS``) runs for that weight, where it was measured faster than
#: ``gemm16_kernel`` and decode + cuBLAS (H200, int4-g64 affine, bf16, us in a CUDA graph:
#: ``benches/results/gpu_gemm16_regs_packed_h200.txt`` and ``gpu_gemm16_regs_split_h200.txt``;
#: this kernel / gemm16 / decode + cuBLAS)
GEMM16_REGS_TABLE: dict[tuple[int, int, int], Gemm16RegsConfig] = {
    (128, 14336, 4096): _G16R(64, 3),  # 44.7 / 53.7 / 77.0
    (256, 14336, 4096): _G16R(64, 3),  # 53.5 / 68.1 / 85.0
    (128, 8192, 8192): _G16R(64, 4, split_k=2),  # 48.7 / 61.2 / 86.1
    (256, 8192, 8192): _G16R(64, 4),  # 62.4 / 74.9 / 93.9
    (128, 4096, 14336): _G16R(64, 4, split_k=2),  # 55.4 / 150.8 / 81.4
    (256, 4096, 14336): _G16R(64, 4, split_k=2),  # 62.8 / 72.8 / 90.7
    (128, 4096, 4096): _G16R(64, 4, split_k=2),  # 20.1 / 37.9 / 25.8 (at 256 rows: 28.8 / 27.7)
    # Llama-3-8B's q, k and v joined (siblings.py; gpu_gemm16_regs_qkv_h200.txt, cuBLAS
    # 17.5 / 22.5)
    (128, 6144, 4096): _G16R(64, 4),  # 27.5 / 55.3 / 34.0
    (256, 6144, 4096): _G16R(64, 4),  # 32.8 / 40.7 / 40.8
    # Llama-3-8B's gate and up projections joined (siblings.py)
    (128, 28672, 4096): _G16R(64, 3),  # 88.5 / 104.0 / 148.5
    (256, 28672, 4096): _G16R(64, 3),  # 109.1 / 137.9 / 171.6
    # Llama-3's LM head (gpu_gemm16_regs_head_h200.txt; cuBLAS 274.7 / 370.6)
    (128, 128256, 4096): _G16R(64, 3),  # 323.5 / 1149.9 / 629.6
    (256, 128256, 4096): _G16R(128, 4),  # 449.9 / 543.3 / 714.4
}


def gemm16_regs_config(M: int, N: int, K: int) -> Gemm16RegsConfig | None:
    """``gemm16_regs_kernel``'s configuration for ``M`` rows of this weight on the gemm16 route
    (65-128 rows: bucket 128, 129-256: 256), None where ``GEMM16_REGS_TABLE`` has none."""
    return GEMM16_REGS_TABLE.get((128 if M <= 128 else 256, N, K))


def gemm16_regs_applies(x2: torch.Tensor, codes: torch.Tensor, cuda_index: int) -> bool:
    """Whether these tensors can run ``gemm16_regs_gluon.py``: as ``gemm16_applies`` (sm_90)."""
    return gemm16_regs_gluon.HAVE_GEMM16_REGS and gemm16_applies(x2, codes, cuda_index)


def gemm16_regs_rows(M: int) -> int:
    """Rows of x a ``gemm16_regs_kernel`` program takes: a power of two, 64-256."""
    return min(256, max(64, 1 << (M - 1).bit_length()))


@functools.lru_cache(maxsize=4096)
def _gemm16_regs_plan(M: int, N: int, K: int, encoding: str, g: int, has_bias: bool,
                      cfg: Gemm16RegsConfig, split: int = 1):  # fmt: skip
    """(grid, constexprs and options, their hashable key) of one ``gemm16_regs_kernel``
    launch."""
    block_t = gemm16_regs_rows(M)
    meta = dict(
        ENC=gemm16_regs_gluon.GEMM16_REGS_ENC[encoding],
        GS=g,
        HAS_BIAS=has_bias,
        BLOCK_F=cfg.block_f,
        BLOCK_T=block_t,
        SPLIT_K=split,
        STAGES=cfg.stages,
        PENDING=cfg.pending,
        SCALES_TMA=cfg.scales_tma,
        PACKED=cfg.packed,
        **gemm16_regs_gluon.layouts(cfg.block_f, block_t),
    )
    grid = (-(-M // block_t) * -(-N // cfg.block_f), split)
    return grid, meta, tuple(sorted((k, str(v)) for k, v in meta.items()))


def gemm16_regs_split(M: int, N: int, K: int, cfg: Gemm16RegsConfig, device: torch.device,
                      counted: bool = True) -> tuple[int, int]:  # fmt: skip
    """(K slices, steps of 64 a slice) of a ``gemm16_regs_kernel`` launch: ``cfg.split_k``, or
    (0) as many as fill the GPU once; one where there are no counters (``counted``) or too few
    for the tiles. Slice k's partial sums sit at ``k * M * N`` of the workspace."""
    tiles = -(-M // gemm16_regs_rows(M)) * -(-N // cfg.block_f)
    want = cfg.split_k or max(1, torch.cuda.get_device_properties(device).multi_processor_count
                              // tiles)  # fmt: skip
    return gemm16_split(K, want if counted and tiles <= LOCK_SLOTS else 1)


def gemm16_regs_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    group_size: int,
    config: Gemm16RegsConfig | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` with ``gemm16_regs_gluon.py`` (the weight decoded in registers into
    the ``wgmma``'s left operand) for a weight ``gemm16_shape()`` takes and tensors
    ``gemm16_applies()`` to (arguments as ``gemm16_linear``; with ``scales_tma``, the scales'
    rows also 16-byte multiples). The gemm16 route (``GEMM16_ROWS``) runs it on
    ``GEMM16_REGS_TABLE``'s weights: on the H200 at 256 rows 0.79-0.87x cuBLAS there, 1.5-1.6x
    decode + cuBLAS and 1.15-1.27x ``gemm16_linear``
    (``benches/results/gpu_gemm16_regs_packed_h200.txt``, ``gpu_gemm16_regs_split_h200.txt``);
    ``scales_tma`` faults there under Triton 3.6 (``gpu_gemm16_regs_bisect_h200.txt``)."""
    M = x2.shape[0]
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    cfg = config or Gemm16RegsConfig()
    split, k_steps = gemm16_regs_split(M, N, K, cfg, x2.device, counted=locks is not None)
    grid, meta, meta_key = _gemm16_regs_plan(M, N, K, encoding, group_size, bias is not None,
                                             cfg, split)  # fmt: skip
    # slice k's partial sums at k * M * N: one buffer per row bucket holds any M of it
    ws = _workspace(x2.device, (split, gemm16_rows(M), N)) if split > 1 else out
    TD = gemm16_regs_gluon.TensorDescriptor
    x_desc = TD(x2, [M, K], [x2.stride(0), 1], [meta["BLOCK_T"], 64], meta["X_SL"])
    c_desc = _words_descriptor(codes, N, K, [cfg.block_f, 8], meta["C_SL"])
    G = K // group_size
    s_desc = m_desc = c_desc  # (unused: the kernel loads the scales itself)
    if cfg.scales_tma:  # (their rows 16-byte multiples)
        box = [cfg.block_f, cfg.scale_box]
        s_desc = TD(scales, [N, G], [G, 1], box, meta["S_SL"])
        m_desc = s_desc if mins is None else TD(mins, [N, G], [G, 1], box, meta["S_SL"])
    args = (x_desc, c_desc, s_desc, m_desc, scales, scales if mins is None else mins,
            scales if bias is None else bias, out, ws, out if locks is None else locks, M, N, K, G,
            out.stride(0), k_steps)  # fmt: skip
    launch(gemm16_regs_gluon.gemm16_regs_kernel, grid, args, meta, meta_key, cuda_index)
    return out


@dataclass
class _Desc:
    """What a tensor descriptor's expansion reads (``fastlaunch.tensordesc_launch``): the
    tensor, shape, strides, padding; checked by ``gemm16_applies`` instead of the descriptor's
    own checks."""

    base: torch.Tensor
    shape: list
    strides: list
    padding: str = "zero"


class Gemm16Kept:
    """One weight's ``gemm16_linear`` launch (``Gemm16RegsKept``: ``gemm16_regs_linear``'s) for
    an activations' dtype, row bucket
    (``gemm16_rows``) and bias, kept from a call made under ``fastlaunch.recording()``: a later
    call with any row count of the bucket makes the activations' descriptor, the output and the
    grid, and calls the kept launcher with the first call's other arguments (the codes'
    descriptor, scales, mins, bias, workspace, counters, sizes). The route, the table, the
    split, the plan and the launch key are not worked out again: a prompt's prefill comes with
    new rows each time, so no ``fastlaunch.Replay`` would be kept for it (the idea of
    ``fastlaunch.Refill`` for the decode + cuBLAS path). Raises ValueError unless the noted
    launch is this call's one gemm16 launch."""

    __slots__ = ("K", "N", "args", "bias", "block", "block_m", "col_tiles", "device", "direct",
                 "function", "layout", "out_at", "packed", "run", "split", "tail")  # fmt: skip

    # positions in gemm16_kernel's arguments: x's descriptor, the rows
    _X, _M = 0, 8

    def __init__(self, noted: list, x2: torch.Tensor, out: torch.Tensor, bias) -> None:
        if len(noted) != 1:
            raise ValueError(f"{len(noted)} launches noted, not one")
        (run, function, packed, tail), grid, args, device = noted[0]
        x_desc = args[self._X]
        TD = getattr(gemm16_gluon, "TensorDescriptor", None)
        if TD is None or not isinstance(x_desc, TD) or x_desc.base is not x2:
            raise ValueError("the noted launch did not read this call's activations")
        self.out_at = tuple(i for i, a in enumerate(args) if a is out)
        if not self.out_at or args[self._M] != x2.shape[0]:
            raise ValueError("the noted launch did not write this call's output")
        self.run, self.function, self.packed, self.tail = run, function, packed, tail
        self.args = list(args)
        self.args[self._X] = None  # no reference to the first call's tensors
        for i in self.out_at:
            self.args[i] = None
        self.block, self.layout = list(x_desc.block_shape), x_desc.layout
        self.block_m = self.block[0]
        self.col_tiles = grid[0] // -(-x2.shape[0] // self.block_m)
        self.split, self.device, self.bias = grid[1], device, bias
        self.N, self.K = out.shape[1], x2.shape[1]
        # Triton 3.6's C launch, with the codes' descriptor expanded once (the launcher's own
        # wrapper expands every descriptor each call), x's per call; else the launcher's call
        self.direct = None
        got = fastlaunch.expand_descriptors(run, [*args, *tail], (self._X,))
        if got is not None and list(got[5]) == [self._X]:
            c_launch, coop, pdl, flat, where, later, expand = got
            at = (where[self._X], where[self._M], tuple(where[i] for i in self.out_at))
            # nor here: a call's x and output may sit in a CUDA-graph pool (torch.compile's
            # warm-up), which refuses to record while a tensor of it is alive elsewhere
            for i in (at[0], *at[2]):
                flat[i] = None
            self.direct = (c_launch, coop, pdl, flat, at, later[self._X], expand)

    def __call__(self, x2: torch.Tensor) -> torch.Tensor | None:
        """``x2 @ W^T + bias`` (x2 ``[M, K]`` of the bucket's rows, rows 16-byte aligned as
        ``gemm16_applies`` checks), or None where the fresh output is not 16-byte aligned (the
        caller takes the full path)."""
        M = x2.shape[0]
        out = x2.new_empty((M, self.N))
        if out.data_ptr() % 16:
            return None
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        g0 = -(-M // self.block_m) * self.col_tiles
        if self.direct is not None:
            c_launch, coop, pdl, flat, (x_at, m_at, out_at), x_meta, expand = self.direct
            args = flat.copy()
            for i in out_at:
                args[i] = out
            args[m_at] = M
            args[x_at : x_at + 1] = expand(_Desc(x2, [M, self.K], [x2.stride(0), 1]), x_meta)
            c_launch(g0, self.split, 1, stream, self.function, coop, pdl, None, None,
                     self.packed, None, None, None, *args)  # fmt: skip
            return out
        args = self.args.copy()
        TD = gemm16_gluon.TensorDescriptor
        args[self._X] = TD(x2, [M, self.K], [x2.stride(0), 1], self.block, self.layout)
        args[self._M] = M
        for i in self.out_at:
            args[i] = out
        self.run(g0, self.split, 1, stream, self.function, self.packed, None, None, None, *args,
                 *self.tail)  # fmt: skip
        return out


class Gemm16RegsKept(Gemm16Kept):
    """``Gemm16Kept`` for a ``gemm16_regs_linear`` launch: the same kept call (its programs'
    row tiles, ``BLOCK_T``, are its bucket's for every row count of it), at
    ``gemm16_regs_kernel``'s argument positions (``_M``: the rows; the scales' two descriptors,
    the codes' again unless ``scales_tma``, are expanded once with it)."""

    __slots__ = ()

    _M = 10


#: ``mma_int8_kernel``'s configuration where ``MMA_INT8_TABLE`` has none: 128 features and 2
#: groups a step, the probe's best or within 3% of it on every shape with 2^24+ elements at 5-16
#: rows (H200, 8192 x 8192 at 16 rows: 29.7 us; ``benches/probe_mma_int8.py`` sweeps the others)
MMA_INT8_DEFAULT = MmaConfig(block_m=0, block_n=128, groups=2, split_k=0, num_warps=4, num_stages=3)
#: per (batch bucket, N, K), as ``MMA_TABLE``: where ``benches/probe_mma_int8.py`` found a config
#: more than 3% faster than the default at the bucket's rows (gpu_mma_int8_probe_h200.txt)
_C = MmaConfig
MMA_INT8_TABLE: dict[tuple[int, int, int], MmaConfig] = {
    (8, 4096, 4096): _C(0, 64, 4, 0, 4, 2),  # 13.4 us against the default's 14.5
    (16, 4096, 4096): _C(0, 128, 4, 0, 4, 3),  # 14.2 against 15.5
    (64, 2048, 5632): _C(0, 64, 4, 0, 4, 2),  # 20.3 against 24.4
    (64, 4096, 4096): _C(0, 128, 2, 4, 4, 3),  # 21.2 against 33.6
    (64, 5632, 2048): _C(0, 64, 4, 0, 4, 2),  # 18.0 against 24.1
    (64, 8192, 8192): _C(0, 128, 2, 4, 4, 3),  # 50.7 against 54.7
    (64, 14336, 4096): _C(0, 128, 2, 2, 4, 3),  # 45.1 against 51.2
}
#: groups a ``quantize_kernel`` program rounds
QUANT_GROUPS = 8
#: run ``mma_int8_gluon.py`` (the same product with hand-set layouts: no shared memory) instead
#: of ``mma_int8.py`` where it applies (``gluon_applies``): Gluon importable, a CUDA device of
#: compute capability 8.0+ (``mma.sync`` on int8), codes 4-byte aligned, up to
#: ``INT8_MMA_GLUON_MAX_M`` rows, fp16 / bf16 scales. H200 (benches/results/
#: gpu_mma_gluon_probe5_h200.txt, CUDA graph, the pre-pass included, the routed 32M+ weights,
#: affine g64): 1.18-1.21x the ``tl.dot`` kernel at 5-16 rows (1.37-1.56x cuBLAS bf16),
#: 1.17-1.36x at 32 rows (1.03-1.12x cuBLAS); symmetric g64 1.07-1.11x, affine g128 0.97-1.28x
INT8_MMA_GLUON = True
#: ``mma_int8_gluon_kernel``'s configuration: features a program (16 x warps x repeats), groups
#: a K step (groups x 64-code chunks a step: 1, 2 or 4), K-slices (0: as many as fill the GPU),
#: warps (``block_m``: 16 up to 16 rows, else 32; ``num_stages`` unused: the kernel keeps two
#: steps in flight)
MMA_INT8_GLUON_DEFAULT = MmaConfig(block_m=0, block_n=64, groups=2, split_k=0, num_warps=2)
#: the TMA kernel's configuration for weights of at most ``GLUON_NARROW_N`` outputs: 32 features
#: a program (twice the programs, on weights whose 64-feature tiles leave SMs idle). H200, int4
#: affine g64, mode-1 activations, 8 / 16 / 32 rows, µs against the default's (benches/results/
#: gpu_gluon_narrow_configs_h200.txt): 4096^2 10.2 / 11.5 / 14.4 against 10.7 / 12.5 / 16.3,
#: 2048 x 5632 9.5 / 11.0 / 13.2 against 11.0 / 13.1 / 19.5, 2560 x 2048 0.97-0.86x the time;
#: 2048^2 0.93-1.04x; slower on 6144 x 4096 (1.05-1.09x) and 14336 x 4096, so not past 4096
MMA_INT8_GLUON_NARROW = MmaConfig(block_m=0, block_n=32, groups=2, split_k=0, num_warps=2)
GLUON_NARROW_N = 4096
#: compile the Gluon kernel per K (up to 16 rows): a step's loads become immediate offsets from
#: one address (sm_90 SASS of the routed config: 234 -> 230 instructions a step,
#: benches/results/sass_gluon_loop_h200.txt; on the H200 within the runs' noise either way,
#: gpu_mma_gluon_probe5_h200.txt)
GLUON_KSPEC = True
INT8_MMA_GLUON_MAX_M = 32
#: up to this many rows the Gluon kernels take tiles of 8 rows (one MMA n-tile: half the MMAs
#: and half the per-group scaling of a 16-row tile, whose rows past M are zeros); 0: never.
#: H200, TMA kernel at 5 and 8 rows, same run (benches/results/gpu_gluon_narrow_h200.txt):
#: int4 affine 1.05-1.15x the 16-row tiles on the 32M+ weights (0.99-1.02x on 5632 x 2048),
#: NF4 1.03-1.08x, MXFP4 1.11-1.17x, NVFP4 1.14-1.33x
GLUON_TILE8_MAX_M = 8
#: steps of codes the Gluon kernel keeps in flight through the TMA engine (a ring in shared
#: memory: ``mma_int8_gluon_tma_kernel``) on sm_90+; 0: its register loads (two steps ahead).
#: H200 (benches/results/gpu_gluon_tma_h200.txt, CUDA graph, pre-pass included, affine g64, the
#: routed 64 features / 2 warps, 3 the best depth of 2-4): 1.01-1.14x the register kernel at
#: 5-32 rows on the routed 32M+ weights (8192^2 at 16 rows 21.4 against 24.3 us: 1.69x cuBLAS),
#: outputs bit-identical; symmetric g64 1.06-1.12x, affine g128 0.94-1.19x at 16 rows
GLUON_TMA_STAGES = 3
#: ``mma_int8_gluon.py``'s TMA kernel reads a step's scales as 32-bit words (``SWORDS``) and
#: carries them so across its loop, where a weight's scales allow it (4-byte aligned, a row's
#: groups of a step whole words). False: as 16-bit values (or bytes), which ptxas repacked
#: right after each load, so the warp waited for the load there, at the end of the iteration
#: that issued it
#: (``benches/results/gpu_gluon_tma_src_h200.txt``). H200, 16 rows, the 32M+ weights
#: (``probe_gluon_scale_words.py``, ``gpu_gluon_scale_words_h200.txt``; outputs bit-identical):
#: NVFP4 1.22-1.30x, MXFP4 1.08-1.10x, NF4 1.05x, int4 affine / symmetric 0.98-1.06x
GLUON_SCALE_WORDS = True
#: ``mma_int8_gluon.py``'s TMA kernel also brings each step's int8 activations (1), and their
#: per-group factors (2), by TMA into its ring slot (``XTMA``), where a step's activations are
#: rows of up to 128 bytes (``act_tma``); 0: both loaded into registers two steps ahead. H200,
#: CUDA graph, outputs bit-identical (``benches/results/gpu_gluon_act_tma_h200.txt``): 1 gives
#: int4 affine g64 1.04-1.08x at 32 rows over the six shapes and 0.99-1.03x at 5-16, NF4
#: 1.02-1.05x, MXFP4 0.97-0.98x (so the blocked FP4 codes keep 0); 2: 0.94-1.10x
GLUON_ACT_TMA = 1


def act_tma(mode: int, per_step: int, groups: int, block_m: int, blocked: bool) -> int:
    """The TMA kernel's ``XTMA`` for ``GLUON_ACT_TMA`` = ``mode``: 0 for the blocked FP4 codes
    (measured slower) and where a step's rows of int8 activations are over 128 bytes (the widest
    swizzle of a copy); at most 1 where a step's factors (``groups x block_m`` fp32) are not a
    multiple of 128 bytes, which each ring slot of a TMA copy must start on (H200: "misaligned
    address" at 8 rows, 2 groups)."""
    if blocked or per_step > 2:
        return 0
    return min(mode, 1) if (groups * block_m * 4) % 128 else mode


def _scale_words(encoding: str, groups: int, G: int) -> int:
    """32-bit words of a row's scales in a K step of ``groups`` groups (1 or 2; 0 where they
    are not whole words, or a row of ``G`` groups is not)."""
    size = 1 if encoding in SCALE_FORMATS else 2  # E8M0 / E4M3 bytes, else fp16 / bf16
    words, rest = divmod(groups * size, 4)
    return words if rest == 0 and words in (1, 2) and (G * size) % 4 == 0 else 0


@functools.lru_cache(maxsize=4096)
def _mma_int8_plan(
    M: int,
    N: int,
    K: int,
    encoding: str,
    g: int,
    has_bias: bool,
    cuda_index: int,
    config: MmaConfig | None,
    allow_split: bool,
    gluon: bool = False,
    kspec: bool = False,
    tma_stages: int = 0,
    scale_words: bool = False,
    act_tma_mode: int = 0,
):
    """(rows padded to whole row tiles, the pre-pass's grid and constexprs, the matmul's grid,
    split, k_split, constexprs and options, their hashable key) of one ``mma_int8`` call
    (``gluon``: of ``mma_int8_gluon_kernel``; ``kspec``: ``GLUON_KSPEC`` at the call, an argument
    so that the cache sees it; ``tma_stages``: the TMA kernel's ring, 0 for the register one;
    ``scale_words``: the scales allow words (``GLUON_SCALE_WORDS`` on, 4-byte aligned), which the
    TMA kernel then reads where ``_scale_words`` finds them whole; the register kernel was not
    timed with them, and its registers move with them (168 -> 174 in one configuration: one
    program an SM fewer; ``benches/results/sass_gluon_swords_triton36.txt``);
    ``act_tma_mode``: ``GLUON_ACT_TMA`` at the call, the TMA kernel's ``XTMA`` where
    ``act_tma`` allows it)."""
    bucket = next((b for b in BATCH_BUCKETS if M <= b), BATCH_BUCKETS[-1])
    if gluon:
        narrow = tma_stages and N <= GLUON_NARROW_N
        cfg = config or (MMA_INT8_GLUON_NARROW if narrow else MMA_INT8_GLUON_DEFAULT)
        block_m = 8 if M <= GLUON_TILE8_MAX_M else 16 if M <= 16 else 32
    else:
        cfg = config or MMA_INT8_TABLE.get((bucket, N, K)) or MMA_INT8_DEFAULT
        block_m = cfg.block_m or max(16, 1 << (M - 1).bit_length())
    fewest_n = 16 * cfg.num_warps if gluon else 64  # Gluon: 16 features a warp, at least
    fewest_m = 8 if gluon else 16  # Gluon: one MMA n-tile, at least
    if block_m < fewest_m or cfg.block_n < fewest_n or cfg.groups not in (1, 2, 4):
        raise ValueError(
            f"the int8 mma kernel needs block_m >= {fewest_m}, block_n >= {fewest_n}, groups 1,"
            f" 2 or 4: {cfg}"
        )
    if not int8_mma_shape(K, encoding, g, gluon):
        encodings = mma_int8_gluon.GLUON_ENC if gluon else MMA_INT8_ENC
        raise ValueError(
            f"the int8 mma kernel takes {tuple(encodings)} codes in groups of at least"
            f" {MMA_INT8_MIN_GROUP} dividing K, not {encoding}, g={g}, K={K}"
        )
    G = K // g
    groups = cfg.groups
    while G % groups:  # a step covers whole groups of the row: fewer where they do not divide G
        groups //= 2
    n_m = -(-M // block_m)
    n_tiles = -(-N // cfg.block_n) * n_m
    step = g * groups
    quant_grid = (n_m * block_m, -(-G // QUANT_GROUPS))
    quant_meta: dict = dict(GS=g, GROUPS=QUANT_GROUPS, FRAGMENT=gluon)
    if encoding == "symmetric8":  # K and g count each activation twice (GLUON_ENC)
        quant_meta.update(DUP=True)
    blocked = gluon and g in mma_int8_gluon.BLOCK_SIZES
    if blocked:  # groups under a chunk; a step of 64 x cfg.groups codes, as for groups of 64
        quant_meta.update(BLOCKED=True)
        groups = min(256, 64 * cfg.groups) // g
        while G % groups:
            groups //= 2
    meta: dict = dict(
        ENC=(mma_int8_gluon.GLUON_ENC if gluon else MMA_INT8_ENC)[encoding],
        GS=g,
        HAS_BIAS=has_bias,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        GROUPS=groups,
    )
    if gluon:
        chunks = g // mma_int8_gluon.CHUNK
        while groups * chunks > 4 and groups > 1:
            groups //= 2
        if groups * chunks > 4:
            raise ValueError(f"the Gluon int8 kernel takes groups of up to 256 codes, not {g}")
        swords = _scale_words(encoding, groups, G) if scale_words and tma_stages else 0
        layouts = dict(
            mma_int8_gluon.layouts(
                cfg.block_n, block_m, cfg.num_warps, groups, chunks, g if blocked else 0, swords
            )
        )
        if tma_stages:
            per_step = groups * g // mma_int8_gluon.CHUNK
            xtma = act_tma(act_tma_mode, per_step, groups, block_m, blocked)
            layouts.update(STAGES=tma_stages, XTMA=xtma)
        else:  # the register kernel takes no ring
            for name in mma_int8_gluon.TMA_LAYOUTS:
                del layouts[name]
        one_tile = n_m == 1 and block_m <= 16
        meta.update(GROUPS=groups, KSPEC=K if kspec and one_tile else 0, **layouts)
        step = g * groups
    else:
        meta.update(EMULATE=cuda_index < 0)  # the interpreter runs no inline assembly
    split, k_split = _k_slices(cfg.split_k, n_tiles, M, N, K, step, cuda_index, 2, allow_split)
    if cuda_index >= 0:
        meta.update(num_warps=cfg.num_warps, num_stages=1 if gluon else cfg.num_stages)
        quant_meta.update(num_warps=1)
    meta.update(SPLIT_K=split)
    quant = (quant_grid, quant_meta, tuple(sorted(quant_meta.items())))
    return n_m * block_m, quant, (n_tiles, split), split, k_split, meta, tuple(sorted(meta.items()))


def mma_int8_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    group_size: int,
    config: MmaConfig | None = None,
    gluon: bool | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` with ``mma_int8.py`` (activations rounded to int8 per row and group:
    see there) for fp16 / bf16 ``x2`` and a weight ``mma_supported()`` and ``int8_mma_shape()``
    take (arguments as ``mma_linear``). Two launches: ``quantize_kernel`` into kept workspaces,
    then the matmul. ``gluon``: run ``mma_int8_gluon.py`` (None: where ``gluon_applies``)."""
    M = x2.shape[0]
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    if gluon is None:
        gluon = gluon_applies(codes, scales, cuda_index, M)
    tma_stages = GLUON_TMA_STAGES if gluon and tma_applies(codes, K, cuda_index) else 0
    scale_words = GLUON_SCALE_WORDS and scales.data_ptr() % 4 == 0
    MP, (qgrid, qmeta, qkey), grid, split, k_split, meta, meta_key = _mma_int8_plan(
        M,
        N,
        K,
        encoding,
        group_size,
        bias is not None,
        cuda_index,
        config,
        locks is not None,
        gluon,
        GLUON_KSPEC,
        tma_stages,
        scale_words,
        GLUON_ACT_TMA,
    )
    G = K // group_size
    dev = x2.device
    xq = _workspace(dev, (MP, K), torch.int8, _XQ_USE)
    xs = _workspace(dev, (2, G, MP), torch.float32, _XS_USE)
    launch(quantize_kernel, qgrid, (x2, xq, xs, M, MP, K, G, x2.stride(0)), qmeta, qkey, cuda_index)
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8)
    if scales.dtype == torch.float8_e4m3fn:  # NVFP4's, decoded in the kernel from bits
        scales = scales.view(torch.uint8)
    kernel = mma_int8_gluon.mma_int8_gluon_kernel if gluon else mma_int8_kernel
    if tma_stages:
        kernel = mma_int8_gluon.mma_int8_gluon_tma_kernel
        desc = _codes_descriptor(codes, N, K, meta)
        codes = (desc, *_acts_descriptors(xq, xs, meta, desc))
    else:
        codes = (codes,)
    weight = (*codes, scales, scales if mins is None else mins, xs)
    row = (K // 2, G, MP)  # bytes per row, groups per row, rows of xq / xs
    return _finish(kernel, grid, split, k_split, meta, meta_key, cuda_index, locks, xq,
                   out, weight, bias, K, row)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _gluon_device(cuda_index: int) -> bool:
    """Whether ``mma_int8_gluon.py`` runs on this CUDA device (int8 ``mma.sync``: 8.0+)."""
    return cuda_index >= 0 and torch.cuda.get_device_capability(cuda_index) >= (8, 0)


def gluon_applies(codes: torch.Tensor, scales: torch.Tensor, cuda_index: int, M: int) -> bool:
    """Whether ``mma_int8_linear`` runs the Gluon kernel by default (``INT8_MMA_GLUON``, Gluon
    importable, the device, up to ``INT8_MMA_GLUON_MAX_M`` rows, codes read as 32-bit words,
    fp16 / bf16 scales: its min terms take them as tf32, exactly; or the FP4 formats' bytes:
    MXFP4's E8M0, NVFP4's E4M3)."""
    return (
        INT8_MMA_GLUON
        and mma_int8_gluon.HAVE_GLUON
        and M <= INT8_MMA_GLUON_MAX_M
        and scales.dtype in (torch.float16, torch.bfloat16, torch.uint8, torch.float8_e4m3fn)
        and _gluon_device(cuda_index)
        and words_aligned(codes)
    )


@functools.lru_cache(maxsize=64)
def _tma_device(cuda_index: int) -> bool:
    """Whether this CUDA device has the TMA engine (9.0+) and Triton its Gluon kernel."""
    return (
        mma_int8_gluon.HAVE_TMA
        and cuda_index >= 0
        and torch.cuda.get_device_capability(cuda_index) >= (9, 0)
    )


@functools.lru_cache(maxsize=64)
def _hopper_device(cuda_index: int) -> bool:
    """``_tma_device`` and sm_90 exactly: Hopper's ``wgmma``, which later architectures lack."""
    return _tma_device(cuda_index) and torch.cuda.get_device_capability(cuda_index) == (9, 0)


def tma_applies(codes: torch.Tensor, K: int, cuda_index: int) -> bool:
    """Whether the TMA engine can copy these codes (``_tma_device``, a 16-byte aligned start and
    rows of a multiple of 16 bytes)."""
    return _tma_device(cuda_index) and codes.data_ptr() % 16 == 0 and (K // 2) % 16 == 0


def _codes_descriptor(codes: torch.Tensor, N: int, K: int, meta: dict):
    """A TMA descriptor of the codes as int32 words ``[N, K / 8]``, one step's tile a copy."""
    step_words = meta["GS"] * meta["GROUPS"] // 8
    return _words_descriptor(codes, N, K, [meta["BLOCK_N"], step_words], meta["CODES_SL"])


#: the workspaces of ``mma_int8_linear``'s pre-pass: the int8 activations and their factors
_XQ_USE, _XS_USE = "int8 activations", "int8 activation scales"
#: ``_acts_descriptors`` of the kept workspaces, by (their ids, the tile): each is made once,
#: not on every call that is not a replay (as the codes' descriptor still is)
_ACT_DESCRIPTORS: dict[tuple, tuple] = {}


def _acts_descriptors(xq: torch.Tensor, xs: torch.Tensor, meta: dict, stand_in) -> tuple:
    """The TMA kernel's descriptors of the int8 activations ``xq [MP, K]`` (as int32 words, one
    step's ``[BLOCK_M, STEP / 4]`` a copy) and of their factors ``xs[0] [G, MP]`` (``[GROUPS,
    BLOCK_M]`` a copy), as ``XTMA`` takes them; ``stand_in`` for each it does not (unused).
    Kept for kept workspaces (not for the buffers of a CUDA-graph capture)."""
    mode = meta["XTMA"]
    if not mode:
        return stand_in, stand_in
    step = meta["GS"] * meta["GROUPS"]
    key = (id(xq), id(xs), meta["BLOCK_M"], step, meta["GROUPS"], mode)
    hit = _ACT_DESCRIPTORS.get(key)
    if hit is None or hit[0] is not xq or hit[1] is not xs:
        TD = mma_int8_gluon.TensorDescriptor
        MP, K = xq.shape
        q = TD(xq.view(torch.int32), [MP, K // 4], [K // 4, 1], [meta["BLOCK_M"], step // 4],
               meta["Q_SL"])  # fmt: skip
        d = None
        if mode > 1:
            G = xs.shape[1]
            d = TD(xs[0], [G, MP], [MP, 1], [meta["GROUPS"], meta["BLOCK_M"]], meta["D_SL"])
        hit = (xq, xs, q, d)
        if _kept(xq, _XQ_USE) and _kept(xs, _XS_USE):
            _ACT_DESCRIPTORS[key] = hit
    return hit[2], stand_in if hit[3] is None else hit[3]


def _kept(t: torch.Tensor, use: str) -> bool:
    """Whether ``t`` is ``_workspace``'s kept buffer for ``use``."""
    return _WORKSPACES.get((t.device, tuple(t.shape), t.dtype, use)) is t


def _words_descriptor(codes: torch.Tensor, N: int, K: int, block: list, layout):
    """A TMA descriptor of 4-bit codes ``[N, K]`` (packed bytes) as int32 words ``[N, K / 8]``,
    ``block`` a copy (the Gluon kernels')."""
    words = codes.view(torch.int32).view(N, K // 8)
    return mma_int8_gluon.TensorDescriptor(words, [N, K // 8], [K // 8, 1], block, layout)


def words_aligned(codes: torch.Tensor) -> bool:
    """Whether the packed codes can be read as int32 words (a 4-byte aligned start)."""
    return codes.data_ptr() % 4 == 0 and codes.storage_offset() % 4 == 0


def fused_linear(
    x2: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    N: int,
    K: int,
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
    config: GemvConfig | GemmConfig | None = None,
) -> torch.Tensor:
    """``x2 @ W^T + bias`` for ``x2 [M, K]`` (unit stride along K) and the parts of ``W [N, K]``
    (already validated, ``supported()``); ``config`` overrides the launch parameters (a
    GemvConfig or GemmConfig also picks the kernel)."""
    M = x2.shape[0]
    out, done, cuda_index, locks = _begin(x2, N, K, bias)
    if done:
        return out
    kernel, grid, split, (M, N, K, G), k_split, meta, meta_key = _plan(
        M,
        N,
        K,
        encoding,
        bits,
        group_size,
        axis,
        x2.dtype,
        bias is not None,
        cuda_index,
        config,
        locks is not None,
    )
    levels = _levels(x2.device) if encoding == "nf4" else scales
    weight = (codes, scales, scales if mins is None else mins, levels)
    return _finish(kernel, grid, split, k_split, meta, meta_key, cuda_index, locks, x2, out,
                   weight, bias, K, (G,))  # fmt: skip
