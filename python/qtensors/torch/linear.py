"""``torch.ops.qtensors.linear``: ``y = x @ W^T + bias`` with ``W [out, in]`` kept quantized.

    y = torch.ops.qtensors.linear(x, codes, scales, mins, bias, [out, in], "affine", 4, 64, 1)

* CUDA: the fused Triton kernels (``kernels/``), which read the packed codes and scales and never
  build the weight: ``kernels/tiled.py`` for groups along the input dim (a CUDA-core kernel up
  to ``launch.FMA_MAX_M`` rows of ``x``, a ``tl.dot`` kernel up to ``launch.TILED_MAX_M``), the
  byte-tile GEMV (``gemv.py``) for up to ``launch.GEMV_MAX_M`` rows of other layouts; all split
  K when the output alone would not fill the GPU. Capturable in a CUDA graph (no host sync;
  only the output and a split-K workspace are allocated, through torch). Other weights and
  larger batches are decoded, then ``F.linear`` (cuBLAS).
* CPU (``linear_cpu``): the Rust core's matmul on the packed codes (``rust/core/src/matmul``:
  4- and 8-bit integer codes, NF4 and FP4 through int8 tables of their levels, times
  int8-quantized activations unless ``CPU_INT8_ACTIVATIONS`` is False, else fp32 kernels, or
  bf16 tiles for bf16 batches), or decode and ``F.linear`` (float64, FP4 outside the int8
  kernel, large half-precision batches); ``_route`` picks by shapes. Its threads
  are torch's OpenMP team where torch has one, else rayon's (``cpu_pool.py``).
* meta / FakeTensor: shape and dtype only, so the op traces under ``torch.compile``.

Arguments: ``x [..., in]`` (float16, bfloat16, float32 or float64; the result has its dtype),
the weight's parts as for ``torch.ops.qtensors.dequantize`` with ``shape = [out, in]``,
``bias [out]`` or None (any floating dtype).

``linear`` (below) is the same with the dispatcher skipped in eager mode (modules use it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _core
from . import cpu_pool
from .ops import (
    HAVE_TRITON,
    OUT_DTYPES,
    SCALE_DTYPES,
    _byte_view,
    check_args,
    dequantize,
    dequantize_op,
    encoding_dict,
)

# Rows of x up to which the Rust core's packed GEMV runs (rust/core/src/matmul/packed.rs).
CPU_PACKED_MAX_ROWS = 8
# The Rust core multiplies 4- and 8-bit integer codes, and NF4 / FP4 codes through an int8 table
# of their levels, by activations quantized to int8 per block of 32 (AVX-512 VNNI; ~0.5% RMS
# relative error from the activations' rounding; NF4's table moves each weight by at most 0.4% of
# its group's scale; see rust/core/src/matmul/int8.rs). False: fp32 activations, results equal to
# decode-then-matmul up to the order of fp32 additions (FP4 weights: decoded, then F.linear).
CPU_INT8_ACTIVATIONS = True
# bf16 rows up to which large weights stay in the int8 kernel without AVX-512 BF16 (_route).
CPU_INT8_HALF_MAX_ROWS = 64
# bf16 rows up to which the core's bf16 tiles run (AVX-512 BF16; see _route).
CPU_BF16_TILES_MAX_ROWS = 64
_INT8_CPU = _core.linear_int8_available()
# The core's parallel work runs on torch's OpenMP team where it has one (cpu_pool.py).
cpu_pool.configure_from_env()
_BF16_CPU = _core.linear_bf16_available()
# The stored scale formats of the FP4 encodings, by the dtype names of the core.
FP4_SCALE_NAMES = {"mxfp4": "uint8", "nvfp4": "float8_e4m3fn"}
# Activations the Rust CPU matmul takes, by the dtype names of the core.
RUST_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
# Their numpy dtypes for the output buffer (bfloat16: its bits, viewed back by torch).
_NUMPY_DTYPES = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}

SCHEMA = (
    "(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? bias, int[] shape, "
    "str encoding, int bits, int group_size, int axis) -> Tensor"
)

try:  # Triton is optional: without it CUDA decodes, then multiplies
    from .kernels import fastlaunch
    from .kernels import launch as _launch
except Exception:
    _launch = None  # type: ignore[assignment]
    fastlaunch = None  # type: ignore[assignment]


@functools.lru_cache(maxsize=4096)
def _check_meta(
    in_features: int,
    x_dtype: torch.dtype,
    devices: tuple[torch.device, ...],
    codes: tuple[int, torch.dtype],
    scales: tuple[int, torch.dtype],
    mins: tuple[int, torch.dtype] | None,
    bias: tuple[tuple[int, ...], torch.dtype] | None,
    shape: tuple[int, ...],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
) -> int:
    """The checks of ``check_linear_args`` on the arguments' metadata (cached: a layer pays
    them once); returns the axis normalized."""
    if len(shape) != 2:
        raise ValueError(f"a linear weight is 2-D, not {list(shape)}")
    if x_dtype not in OUT_DTYPES:
        raise ValueError(f"x must be a floating tensor ({list(OUT_DTYPES)}), not {x_dtype}")
    if in_features != shape[1]:
        raise ValueError(f"x has {in_features} features, the weight {list(shape)} takes {shape[1]}")
    if len(set(devices)) != 1:
        raise ValueError(f"x, the weight's parts and bias are on several devices: {devices}")
    if bias is not None:
        if bias[0] != (shape[0],):
            raise ValueError(f"bias has shape {list(bias[0])}, [{shape[0]}] expected")
        if not bias[1].is_floating_point:
            raise ValueError(f"bias must be floating, not {bias[1]}")

    def meta(info):
        return None if info is None else torch.empty(info[0], dtype=info[1], device="meta")

    return check_args(
        meta(codes),
        meta(scales),
        meta(mins),
        shape,
        encoding,
        bits,
        group_size,
        axis,
        x_dtype,
    )


def check_linear_args(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis) -> int:
    """Validate the arguments (ValueError naming the problem); returns the axis normalized."""
    devices = tuple(t.device for t in (x, codes, scales, mins, bias) if t is not None)
    return _check_meta(
        int(x.shape[-1]) if x.dim() else -1,
        x.dtype,
        devices,
        # int(): sizes made symbolic by torch.compile(dynamic=True) are specialized (guarded)
        (int(codes.numel()), codes.dtype),
        (int(scales.numel()), scales.dtype),
        None if mins is None else (int(mins.numel()), mins.dtype),
        None if bias is None else (tuple(int(d) for d in bias.shape), bias.dtype),
        tuple(int(d) for d in shape),
        encoding,
        bits,
        group_size,
        axis,
    )


def linear_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` as one 2-D product over x's rows. torch 2.11's matmul folds a 3-D
    x into rows only where its leading dims view as one or the weight needs gradients; a decoded
    weight needs none, so a strided x (``hidden[:, -1:]``, the last position of each sequence a
    batch's prefill keeps for the LM head) became a batched product with the weight expanded per
    sequence: Llama-3-8B's 128256 x 4096 head at 256 sequences took 60 ms instead of 0.36 on the
    H200 (``benches/probe_slow_matmul.py``)."""
    if x.dim() <= 2 or rows_fold(x):  # folded by torch itself (no reshapes to pay for)
        return F.linear(x, w, bias)
    return F.linear(x.reshape(-1, x.shape[-1]), w, bias).reshape(*x.shape[:-1], w.shape[0])


def rows_fold(x: torch.Tensor) -> bool:
    """Whether torch 2.11's matmul folds ``x``'s leading dims into rows itself: each dim's stride
    is the next one's times its size. Not ``x.is_contiguous()``, which skips a size-1 dim's
    stride where matmul's check does not: Llama-3-8B's compiled decode step hands o_proj
    ``(256, 1, 4096)`` with strides ``(4096, 128, 1)``, contiguous by torch's rule, and torch 2.11
    multiplied it as a batched product with the weight expanded per sequence: 900 us against 15
    folded in a CUDA graph on the H200, half the int4 model's decoding speed lost
    (``benches/probe_compiled_strides.py``, ``benches/results/gpu_compiled_strides_h200.txt``)."""
    size, stride = x.shape, x.stride()
    return all(stride[i] == stride[i + 1] * size[i + 1] for i in range(x.dim() - 2))


def linear_dequantize(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis):
    """Decode the weight in ``x``'s dtype, then ``F.linear`` (arguments already validated)."""
    w = dequantize(codes, scales, mins, list(shape), encoding, bits, group_size, axis, x.dtype)
    return linear_rows(x, w, None if bias is None else bias.to(x.dtype))


def _no_plan() -> None:
    return None


class _Plan:
    """A weight's per-process plan, kept on its codes tensor: a copy or a pickle of the tensor
    (``copy.deepcopy(model)``, ``torch.save``) carries none, since a plan holds views of the
    original's parts and launches (CUDA tensor maps cannot be pickled), and the copy builds its
    own at its first call."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (_no_plan, ())


class _CpuPlan(_Plan):
    """What ``linear_cpu`` reuses across the calls of one weight (kept on its codes tensor): the
    arguments it was checked with, and the weight's arguments of ``_core.linear`` (byte views of
    its parts, shape, encoding JSON). Checking and building them costs more than a small layer's
    matmul (SmolLM2-135M's 576-wide layers). Reused while the call passes the same scales, mins
    and bias objects (whose memory the views keep alive) and the same scalars."""

    __slots__ = (
        "args",
        "axis",
        "bias",
        "checked",
        "enc",
        "fp4",
        "int8",
        "mins",
        "parts",
        "scales",
        "shape",
    )

    def __init__(self, codes, scales, mins, bias, shape, encoding, bits, group_size, axis, a):
        self.scales, self.mins, self.bias = scales, mins, bias
        self.args = (tuple(shape), encoding, bits, group_size, axis)
        self.axis = a
        self.shape = [int(d) for d in shape]
        self.checked: set = set()  # (in_features, dtype) of activations already checked
        self.parts = self.enc = None  # None: the Rust core does not take these scales
        self.int8 = _int8_applies(encoding, bits, group_size, a, shape)
        # FP4 weights go to the core for its int8 kernel only (linear_cpu)
        self.fp4 = encoding in FP4_SCALE_NAMES
        if scales.dtype in SCALE_DTYPES or (self.fp4 and self.int8):
            scale_dtype = FP4_SCALE_NAMES.get(encoding) or SCALE_DTYPES[scales.dtype]
            self.enc = json.dumps(encoding_dict(encoding, bits, group_size, a, scale_dtype))
            parts = [codes, scales] if mins is None else [codes, scales, mins]
            self.parts = [_byte_view(t) for t in parts]


def _int8_applies(encoding: str, bits: int, group_size: int, axis: int, shape) -> bool:
    """Whether the core's integer kernel takes this weight (``rust/core/src/matmul/int8.rs``,
    ``Plan::new``): an AVX-512 VNNI CPU; 4- or 8-bit affine or symmetric codes, or NF4, MXFP4 or
    NVFP4 codes, in groups of whole blocks of 32 along the inputs (NVFP4: its blocks of 16); the
    inputs in whole chunks of 64; 16 blocks a span either a multiple of the group's blocks or
    inside one group."""
    n_in = int(shape[1])
    kinds = ("affine", "symmetric", "nf4", "mxfp4", "nvfp4")
    if not _INT8_CPU or encoding not in kinds or bits not in (4, 8) or axis != 1:
        return False
    if encoding == "nvfp4":
        return n_in > 0 and n_in % 64 == 0
    g = min(group_size, n_in)
    blocks = g // 32
    return n_in > 0 and n_in % 64 == 0 and g % 32 == 0 and (16 % blocks == 0 or blocks % 16 == 0)


def _cpu_plan(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis) -> _CpuPlan:
    """The weight's plan, with the arguments checked (ValueError naming the problem)."""
    p = getattr(codes, "_qt_cpu_plan", None)
    if not (
        p is not None
        and scales is p.scales
        and mins is p.mins
        and bias is p.bias
        and p.args == (tuple(shape), encoding, bits, group_size, axis)
    ):
        a = check_linear_args(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
        p = _CpuPlan(codes, scales, mins, bias, shape, encoding, bits, group_size, axis, a)
        codes._qt_cpu_plan = p
    key = (x.shape[-1] if x.dim() else -1, x.dtype)
    if key not in p.checked:
        check_linear_args(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
        p.checked.add(key)
    return p


def _cpu_route(
    int8: bool, n_out: int, n_in: int, dtype: torch.dtype, rows: int, fp4: bool = False
) -> str:
    """Where ``linear_cpu`` multiplies, by shapes alone: "int8" (the core's integer kernel, for
    the weights it takes), "exact" (the core's float kernels: packed GEMV, bf16 or fp32 tiles)
    or "decode" (decode in ``x``'s dtype, then torch's GEMM); ``fp4``: MXFP4 / NVFP4 weights,
    which the core takes in its integer kernel only. The module's switches are read on each call
    (tests flip them); the rest is cached."""
    limits = (CPU_PACKED_MAX_ROWS, CPU_INT8_HALF_MAX_ROWS, CPU_BF16_TILES_MAX_ROWS)
    return _route(int8 and CPU_INT8_ACTIVATIONS, n_out, n_in, dtype, rows, limits, fp4)


@functools.lru_cache(maxsize=4096)
def _route(int8: bool, n_out: int, n_in: int, dtype, rows: int, limits: tuple, fp4: bool) -> str:
    route = _shape_route(int8, n_out, n_in, dtype, rows, limits)
    if fp4 and route == "exact":
        # FP4 has no float kernel in the core, and decoding it to bf16 costs more than the int8
        # kernel's matmul up to tens of rows (4096x4096 at 32 rows: 12.7 ms against ~1.7)
        bf16_ok = dtype != torch.bfloat16 or rows <= limits[2]
        return "int8" if int8 and bf16_ok else "decode"
    if fp4 and route != "int8":
        return "decode"
    return route


def _shape_route(int8: bool, n_out: int, n_in: int, dtype, rows: int, limits: tuple) -> str:
    packed_max, int8_half_max, bf16_max = limits
    if dtype not in RUST_DTYPES:
        return "decode"  # float64
    if dtype != torch.bfloat16 or rows <= packed_max:
        # fp32 stays in the core at every batch (its int8 kernel is faster than fp32 F.linear
        # up to ~128 rows and on par at ~450); so does fp16, whose torch GEMM on this class of
        # CPU (no AVX-512 FP16) runs 5x slower than the core's fp32 tiles at 32-480 rows; so do
        # the GEMV batches
        return "int8" if int8 else "exact"
    # bf16 batches (benches/bench_cpu_routes.py: benches/results/cpu_routes_*.txt).
    if _BF16_CPU:
        # the int8 kernel up to 16 rows on weights of 2^22+ elements; bf16 tiles up to
        # CPU_BF16_TILES_MAX_ROWS (faster than the int8 kernel from ~32 rows, and than decode +
        # GEMM), and beyond on weights whose bf16 copy (>= 32 MiB) the allocator maps afresh
        # each call; torch's GEMM above
        if int8 and rows <= 16 and n_out * n_in >= 1 << 22:
            return "int8"
        return "exact" if rows <= bf16_max or n_out * n_in >= 1 << 24 else "decode"
    # bf16 without AVX-512 BF16 (where the core would widen to fp32): torch's bf16 GEMM on the
    # decoded weight wins (2-4x faster than the fp32 kernels at 16-448 rows), except on large
    # weights at up to CPU_INT8_HALF_MAX_ROWS rows, where decoding them costs more than the
    # int8 kernel's whole matmul (4096x4096 at 32 rows: 5 ms against 21)
    if int8 and rows <= int8_half_max and n_out * n_in >= 1 << 22:
        return "int8"
    return "decode"


def linear_cpu(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis):
    """The CPU implementation: the Rust core multiplies by the packed codes (float16, bfloat16
    and float32 activations; the weight is never decoded to memory); float64 decodes first."""
    p = _cpu_plan(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
    n_out, n_in = p.shape
    rows = x.numel() // n_in if n_in else 0
    if p.parts is None:
        route = "decode"
    else:
        route = _cpu_route(p.int8, n_out, n_in, x.dtype, rows, p.fp4)
    if route == "decode":
        return linear_dequantize(
            x, codes, scales, mins, bias, shape, encoding, bits, group_size, p.axis
        )
    # Output and input as numpy arrays: a third of the cost of torch.empty plus byte views.
    npo = np.empty((*x.shape[:-1], n_out), _NUMPY_DTYPES[x.dtype])
    out = torch.from_numpy(npo)
    if x.dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    if npo.size == 0:
        return out
    if not x.is_contiguous():
        xb = _byte_view(x)
    else:
        xd = x.detach() if x.requires_grad else x
        xb = (xd.view(torch.int16) if x.dtype == torch.bfloat16 else xd).numpy().view(np.uint8)
    b = None if bias is None else _byte_view(bias.detach().to(x.dtype))
    exact = route == "exact"
    # Sets this thread's OpenMP team size to torch's (torch does so lazily, per thread, at its
    # first parallel op; a fresh Python thread would otherwise get OpenMP's default): the core
    # runs on that team (cpu_pool.py). 20 ns.
    torch.get_num_threads()
    _core.linear(p.parts, p.shape, p.enc, xb, RUST_DTYPES[x.dtype], npo.view(np.uint8), b, exact)
    return out


class _CudaPlan(_Plan):
    """What ``linear_cuda`` reuses across the calls of one weight (kept on its codes tensor, as
    ``_CpuPlan``, and reused on the same terms): the checked metadata of its parts, whether its
    codes read as int32 words, and the flat parts the kernels take. Rebuilding them costs a few
    us of host time a call, which an eager decode step pays ~150 times."""

    __slots__ = (
        "aligned",
        "args",
        "codes",
        "gemm16s",
        "meta",
        "mins",
        "pairs",
        "refills",
        "replays",
        "scales",
        "shape",
        "sources",
        "versions",
        "words",
    )

    def __init__(self, codes, scales, mins, shape, encoding, bits, group_size, axis):
        self.sources = (scales, mins)
        devices = tuple(t.device for t in (codes, scales, mins) if t is not None)
        if len(set(devices)) != 1:
            raise ValueError(f"the weight's parts are on several devices: {devices}")
        self.args = (tuple(shape), encoding, bits, group_size, axis)
        self.shape = tuple(int(d) for d in shape)
        self.meta = (
            (codes.numel(), codes.dtype),
            (scales.numel(), scales.dtype),
            None if mins is None else (mins.numel(), mins.dtype),
        )
        self.replays: dict[tuple, fastlaunch.Replay | int] = {}  # see linear_cuda
        self.refills: dict[torch.dtype, fastlaunch.Refill] = {}  # see _decode_then_linear
        self.gemm16s: dict[tuple, object] = {}  # launch.Gemm16Kept, see _gemm16
        self.codes = codes.reshape(-1)
        self.scales = scales.reshape(-1)
        self.mins = None if mins is None else mins.reshape(-1)
        c = self.codes
        self.aligned = _launch is not None and _launch.words_aligned(c) and c.numel() % 4 == 0
        # the tiled kernels read int32 words, the int8 one int64 units: the view made once
        if self.aligned and c.dtype == torch.uint8:
            wide = _launch.units_aligned(c)
            self.words = c.view(torch.int64 if wide else torch.int32)
        else:
            self.words = c
        # launch.PAIRED_SCALES: an affine weight's scales and mins interleaved, a copy (rebuilt
        # when either changes in place: their versions are checked on every call)
        self.pairs = self.versions = None
        pair = _launch is not None and _launch.PAIRED_SCALES and encoding == "affine"
        if pair and mins is not None and scales.dtype in (torch.float16, torch.bfloat16):
            # inference tensors keep no version: not paired (a change would go unseen)
            tracked = not (scales.is_inference() or mins.is_inference())
            if tracked and mins.dtype == scales.dtype and scales.numel() == mins.numel():
                self.pairs = _launch.paired_scales(self.scales, self.mins)
                self.versions = (scales._version, mins._version)


def _cuda_weight(codes, scales, mins, shape, encoding, bits, group_size, axis) -> _CudaPlan:
    """The weight's plan, reused while the call passes the same scales and mins objects (whose
    flat views the plan holds) and the same scalars."""
    p = getattr(codes, "_qt_cuda_plan", None)
    args = (tuple(shape), encoding, bits, group_size, axis)
    if (
        p is None
        or p.args != args
        or p.sources[0] is not scales
        or p.sources[1] is not mins
        or (p.versions is not None and p.versions != (scales._version, mins._version))
    ):
        p = _CudaPlan(codes, scales, mins, shape, encoding, bits, group_size, axis)
        codes._qt_cuda_plan = p
    return p


# Calls of one weight with up to this many rows are kept as replays (see linear_cuda), at most
# REPLAYS_PER_WEIGHT shapes each: a decode step's few shapes, not every prompt length.
REPLAY_MAX_ROWS = 64
REPLAYS_PER_WEIGHT = 8
REPLAY_TRIES = 3  # calls of a shape that may note its launch (the first compiles)
REPLAY_MAX_LAUNCHES = 2  # a chain of launches a replay repeats (mma_int8: pre-pass + matmul)
# False: every call takes the full path (benches/probe_gemv_variants.py --overhead compares)
REPLAYS = True


def linear_cuda(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis):
    """The CUDA implementation: the fused kernels where they apply (by weight layout and batch,
    ``kernels/launch.py``), else decode and ``F.linear``. The hot path of a model's decode step:
    one cached check, one cached route, no copy or reshape of what already has its shape; and
    from the third call of a shape on (the first compiles, the second notes its launch), a
    replay of that launch (``fastlaunch.Replay``),
    keyed by what the check, route and plan depend on: the weight (its plan), x's shape, dtype,
    device and 16-byte alignment, the bias object and ``launch.INT8_ACTIVATIONS``."""
    p = _cuda_weight(codes, scales, mins, shape, encoding, bits, group_size, axis)
    # past REPLAY_MAX_ROWS (a prompt's prefill) no replay is kept: no key to make and look up
    if _replayable(x) and x.numel() <= REPLAY_MAX_ROWS * p.shape[1]:
        key = (x.shape, x.dtype, x.device, x.data_ptr() % 16 == 0, _launch.INT8_ACTIVATIONS)
        entry = p.replays.get(key)  # a Replay, or how many calls noted none
        if isinstance(entry, fastlaunch.Replay) and entry.bias is bias:
            out = entry(x)
            if out is not None:
                return out
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        tries = entry if isinstance(entry, int) else 0
        new_key = entry is not None or len(p.replays) < REPLAYS_PER_WEIGHT
        if rows <= REPLAY_MAX_ROWS and tries < REPLAY_TRIES and new_key:
            if not torch.cuda.is_current_stream_capturing():
                with fastlaunch.recording() as noted:
                    out = _linear_cuda(p, x, codes, scales, mins, bias, shape, encoding, bits,
                                       group_size, axis)  # fmt: skip
                # a first call compiles (nothing noted, or part of a chain); decode + cuBLAS
                # is not replayable: after REPLAY_TRIES calls, not tried again
                p.replays[key] = tries + 1
                if 1 <= len(noted) <= REPLAY_MAX_LAUNCHES and out.is_contiguous():
                    try:
                        p.replays[key] = fastlaunch.Replay(noted, x, out, bias)
                    except ValueError:
                        pass  # the launch did not take x and out themselves
                return out
    return _linear_cuda(p, x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)


def _decode_then_linear(p, x, codes, scales, mins, bias, shape, encoding, bits, group_size, a):
    """``linear_dequantize`` with the decode's launch kept per weight and dtype
    (``fastlaunch.Refill``): a prompt's prefill runs every linear at a length no replay was kept
    for, and the decode's checks, plan and launch key cost more host time than its kernel on a
    small model. From a weight's second decode in a dtype on, the decode allocates its output
    and launches (the 1.1B Llama-shaped model's prefill on the H200, 128-2048 tokens: 16.1-17.0
    ms a forward against 19.8-20.4 through the full path; benches/bench_gpu_prefill.py)."""
    refill = p.refills.get(x.dtype)
    fast = _keeps_launches()
    w = refill() if refill is not None and fast else None
    if w is None:
        with fastlaunch.recording() as noted:
            w = dequantize(codes, scales, mins, list(shape), encoding, bits, group_size, a,
                           x.dtype)  # fmt: skip
        # the parts as given (a copy made for a non-contiguous one would be kept, and go stale)
        own = all(t is None or t.is_contiguous() for t in (codes, scales, mins))
        if refill is None and fast and own and len(noted) == 1:
            try:
                p.refills[x.dtype] = fastlaunch.Refill(noted, w)
            except ValueError:
                pass  # the launch did not write w itself
    return linear_rows(x, w, None if bias is None else bias.to(x.dtype))


def _gemm16(p, x2, bias, N, K, encoding, group_size, regs=None):
    """``launch.gemm16_linear`` (``regs``: ``gemm16_regs_linear`` with that configuration) with
    its launch kept per activations' dtype and row bucket (``launch.Gemm16Kept``,
    ``Gemm16RegsKept``): from a weight's second call in a bucket on, a call makes the
    activations' descriptor and the output and launches, whatever its rows (a prompt's prefill
    comes with new rows each time)."""
    L = _launch
    fast = _keeps_launches()
    key = (x2.dtype, L.gemm16_rows(x2.shape[0]), regs)
    kept = p.gemm16s.get(key) if fast else None
    if kept is not None and kept.bias is bias:
        out = kept(x2)
        if out is not None:
            return out
    with fastlaunch.recording() as noted:
        if regs is None:
            out = L.gemm16_linear(x2, p.codes, p.scales, p.mins, bias, N, K, encoding, group_size)
        else:
            out = L.gemm16_regs_linear(x2, p.codes, p.scales, p.mins, bias, N, K, encoding,
                                       group_size, regs)  # fmt: skip
    if fast and noted:
        try:
            kind = L.Gemm16Kept if regs is None else L.Gemm16RegsKept
            p.gemm16s[key] = kind(noted, x2, out, bias)
        except ValueError:
            pass  # not one launch of this call's x and output
    return out


def _keeps_launches() -> bool:
    """Whether a call may take or keep a launch (``Refill``, ``Gemm16Kept``): replays on, no
    launch hooks (profilers), no CUDA graph being captured."""
    return REPLAYS and fastlaunch.hooks_clear() and not torch.cuda.is_current_stream_capturing()


def _replayable(x: torch.Tensor) -> bool:
    """Whether this call may take or note a replay: CUDA activations, contiguous, and the cached
    launch path on (no profiler hooks)."""
    return (
        REPLAYS
        and fastlaunch is not None
        and x.is_cuda
        and x.is_contiguous()
        and fastlaunch.hooks_clear()
    )


def _linear_cuda(p, x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis):
    """``linear_cuda`` past its replays."""
    devices = (x.device, codes.device) if bias is None else (x.device, codes.device, bias.device)
    a = _check_meta(
        int(x.shape[-1]) if x.dim() else -1,
        x.dtype,
        devices,
        *p.meta,
        None if bias is None else (tuple(bias.shape), bias.dtype),
        p.shape,
        encoding,
        bits,
        group_size,
        axis,
    )
    N, K = p.shape
    L = _launch
    if L is None or x.dtype not in L.ACT_DTYPES:
        return linear_dequantize(x, codes, scales, mins, bias, shape, encoding, bits, group_size, a)
    flat = x.dim() == 2
    rows = x.shape[0] if flat else (x.numel() // K if K else 0)
    # the kernel per batch and weight (kernels/launch.py, from benches/bench_gpu_gemv_sweep.py
    # and benches/probe_mma.py); beyond their batches, decoding and cuBLAS win
    half = x.dtype is not torch.float32
    path = L.route(rows, N, K, encoding, bits, group_size, a, p.aligned, half, L.INT8_ACTIVATIONS)
    if path == "decode":
        return _decode_then_linear(p, x, codes, scales, mins, bias, shape, encoding, bits,
                                   group_size, a)  # fmt: skip
    x2 = x if flat else x.reshape(-1, K)
    if K and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if path == "gemm16":
        cuda_index = L._device_index(x2.device)
        regs = L.gemm16_regs_config(rows, N, K)
        if regs is not None and L.gemm16_regs_applies(x2, p.codes, cuda_index):
            out = _gemm16(p, x2, bias, N, K, encoding, group_size, regs)
        elif L.gemm16_config(rows, N, K) is None or not L.gemm16_applies(x2, p.codes, cuda_index):
            # (a weight of the register-operand kernel's table alone: gemm16_gluon.py was
            # measured slower there than decode + cuBLAS)
            return _decode_then_linear(p, x, codes, scales, mins, bias, shape, encoding, bits,
                                       group_size, a)  # fmt: skip
        else:
            out = _gemm16(p, x2, bias, N, K, encoding, group_size)
    elif path == "int8mma":
        if not L.gluon_applies(p.codes, p.scales, L._device_index(x2.device), rows):
            return _decode_then_linear(p, x, codes, scales, mins, bias, shape, encoding, bits,
                                       group_size, a)  # fmt: skip
        out = L.gluon_only_linear(x2, p.codes, p.scales, p.mins, bias, N, K, encoding, bits,
                                  group_size)  # fmt: skip
    elif path == "mma":
        out = L.mma_linear(x2, p.codes, p.scales, p.mins, bias, N, K, encoding, group_size)
    elif path == "tiled":
        out = L.tiled_linear(x2, p.words, p.scales, p.mins, bias, N, K, encoding, bits, group_size,
                             pairs=p.pairs)  # fmt: skip
    else:
        out = L.fused_linear(
            x2, p.codes, p.scales, p.mins, bias, N, K, encoding, bits, group_size, a
        )
    return out if flat else out.reshape(*x.shape[:-1], N)


@torch.library.custom_op("qtensors::linear", mutates_args=(), schema=SCHEMA)
def linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
) -> torch.Tensor:
    a = check_linear_args(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
    return linear_dequantize(x, codes, scales, mins, bias, shape, encoding, bits, group_size, a)


linear_op.register_kernel("cpu")(linear_cpu)
linear_op.register_kernel("cuda")(linear_cuda)


@linear_op.register_fake
def _linear_fake(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis):
    check_linear_args(x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
    return x.new_empty((*x.shape[:-1], int(shape[0])))


def _setup_context(ctx, inputs, output) -> None:
    _x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis = inputs
    ctx.save_for_backward(codes, scales, mins)
    ctx.weight = (list(shape), encoding, bits, group_size, axis)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    """Gradients for ``x`` and ``bias`` (the quantized weight is frozen)."""
    codes, scales, mins = ctx.saved_tensors
    shape, encoding, bits, group_size, axis = ctx.weight
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_op(codes, scales, mins, shape, encoding, bits, group_size, axis, grad.dtype)
        gx = (grad.reshape(-1, grad.shape[-1]) @ w).reshape(*grad.shape[:-1], w.shape[1])
    if ctx.needs_input_grad[4]:
        gb = grad.reshape(-1, shape[0]).sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, gb, None, None, None, None, None


linear_op.register_autograd(_backward, setup_context=_setup_context)


def linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    shape: Sequence[int],
    encoding: str,
    bits: int,
    group_size: int,
    axis: int,
) -> torch.Tensor:
    """``torch.ops.qtensors.linear``, calling the CPU / CUDA implementation directly in eager
    mode on plain tensors (the dispatcher's cost is a large share of a small layer's); under
    ``torch.compile``, fake or wrapped tensors it goes through the op."""
    args = (x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    # Gradients come from the op's autograd formula, so only gradient-free calls skip it.
    if type(x) is torch.Tensor and not torch.compiler.is_compiling() and not needs_grad:
        if x.is_cuda:  # (not x.device.type: a device object made each call)
            return linear_cuda(*args)
        if x.is_cpu:
            return linear_cpu(*args)
    return linear_op(*args)


__all__ = ["HAVE_TRITON", "check_linear_args", "linear", "linear_cpu", "linear_cuda", "linear_op"]
