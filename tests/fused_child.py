"""Checks of the fused matmul kernels, run by ``test_torch_fused.py`` in a child process with
``TRITON_INTERPRET=1`` set before Triton is imported (the CPU runs the kernels).

``main(group)`` prints one JSON line: ``{"n": cases run, "failures": [...]}``. Each case builds
random weights, quantizes them (Rust core), and compares the kernel's ``x @ W^T + b`` with the
decode-then-matmul reference in fp32, the output first filled with NaN by nobody (a fresh
``torch.empty``), so an element left unwritten shows as a large error or NaN.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import reference  # noqa: E402  (tests/reference.py: the spec in numpy)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors import quantized as Q  # noqa: E402
from qtensors.encodings import MXFP4, NF4, NVFP4, Affine, Symmetric  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.ops import dequantize  # noqa: E402

# the error allowed, relative to the largest |reference| value, per activation dtype
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
ENCODINGS = {
    "affine4-g32": Affine(bits=4, group_size=32, axis=-1),
    "affine4-g64-ax0": Affine(bits=4, group_size=64, axis=0),
    "symmetric4-g64": Symmetric(bits=4, group_size=64, axis=-1),
    "symmetric8-g16": Symmetric(bits=8, group_size=16, axis=-1),
    "affine8-g32-ax0": Affine(bits=8, group_size=32, axis=0),
    "nf4-g32": NF4(group_size=32, axis=-1),
    "nf4-g16-ax0": NF4(group_size=16, axis=0),
    "symmetric4-g128-ax0": Symmetric(bits=4, group_size=128, axis=0),
    # negative scales (llama.cpp Q4_0's rule)
    "symfull4-g32": Symmetric(bits=4, group_size=32, axis=-1, levels="full"),
}
# the tiled kernels' encodings (groups along the input dim, rows of whole int32 words)
TILED_ENCODINGS = {
    "affine4-g32": Affine(bits=4, group_size=32, axis=-1),
    "affine4-g128": Affine(bits=4, group_size=128, axis=-1),
    "symmetric4-g64": Symmetric(bits=4, group_size=64, axis=-1),
    "symmetric8-g16": Symmetric(bits=8, group_size=16, axis=-1),
    "affine8-g32": Affine(bits=8, group_size=32, axis=-1),
    "nf4-g32": NF4(group_size=32, axis=-1),
    "symfull4-g32": Symmetric(bits=4, group_size=32, axis=-1, levels="full"),
    "mxfp4": MXFP4(),
    "nvfp4": NVFP4(),
}
# the int8 words kernel's (affine / symmetric, groups of at least a 64-bit unit)
INT8_ENCODINGS = (
    "affine4-g32",
    "affine4-g128",
    "symmetric4-g64",
    "affine8-g32",
    "symfull4-g32",
    "nf4-g32",
    "mxfp4",
    "nvfp4",
)
# NF4's levels as the int8 kernel holds them: round(level * 127) / 127 (rounded independently of
# the kernel's tables: from the spec's levels in the reference implementation)
NF4_INT8 = torch.round(torch.tensor(reference.NF4_LEVELS, dtype=torch.float64) * 127) / 127
# the tensor-core kernel's encodings (4-bit, groups along the input dim, whole bytes a row)
MMA_ENCODINGS = {
    "affine4-g32": Affine(bits=4, group_size=32, axis=-1),
    "affine4-g128": Affine(bits=4, group_size=128, axis=-1),
    "symmetric4-g64": Symmetric(bits=4, group_size=64, axis=-1),
    "symfull4-g32": Symmetric(bits=4, group_size=32, axis=-1, levels="full"),
    "mxfp4": MXFP4(),
    "nvfp4": NVFP4(),
}
# the int8 tensor-core kernel's (affine / symmetric 4-bit, groups of at least 64)
INT8_MMA_ENCODINGS = {
    "affine4-g64": Affine(bits=4, group_size=64, axis=-1),
    "affine4-g128": Affine(bits=4, group_size=128, axis=-1),
    "symmetric4-g64": Symmetric(bits=4, group_size=64, axis=-1),
    "symfull4-g64": Symmetric(bits=4, group_size=64, axis=-1, levels="full"),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# weights only some checks build (no group iterates over them)
EXTRA_ENCODINGS = {
    "affine4-g64-bf16": Affine(bits=4, group_size=64, axis=-1, scale_dtype="bfloat16")
}


def weight(N: int, K: int, enc_name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.5 + torch.randn(N, 1, generator=g) * 0.1
    encs = {
        **ENCODINGS,
        **TILED_ENCODINGS,
        **MMA_ENCODINGS,
        **INT8_MMA_ENCODINGS,
        **EXTRA_ENCODINGS,
    }
    q = Q.quantize(w, encs[enc_name], framework="pt")
    e = q.encoding
    parts = q.parts()
    bits = int(e.get("bits", 4))
    args = dict(
        codes=parts[0],
        scales=parts[1].reshape(-1),
        mins=parts[2].reshape(-1) if len(parts) > 2 else None,
        encoding=e["name"],
        bits=bits,
        group_size=int(e["group_size"]),
        axis=int(e["axis"]) % 2,
    )
    dense = dequantize(
        args["codes"],
        args["scales"],
        args["mins"],
        [N, K],
        e["name"],
        bits,
        args["group_size"],
        args["axis"],
        torch.float32,
    )
    return args, dense


def check(label, got, x, dense, bias, failures, ref=None):
    if ref is None:
        ref = F.linear(x.float(), dense, None if bias is None else bias.float())
    if got.shape != ref.shape or got.dtype != x.dtype:
        failures.append(f"{label}: got {tuple(got.shape)} {got.dtype}")
        return
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.float() - ref).abs().max().item() / scale
    if not err <= TOL[x.dtype]:  # NaN fails too
        failures.append(f"{label}: error {err:.3g} > {TOL[x.dtype]:.3g}")


def int8_weight(args, dense):
    """The weight ``words_int8.py`` multiplies by: the decoded one, but for NF4 with its levels
    rounded to int8 (``NF4_INT8``), rebuilt from the codes' nibbles and the group scales."""
    if args["encoding"] != "nf4":
        return dense.double()
    N, K = dense.shape
    g = args["group_size"]
    nib = args["codes"].reshape(-1).to(torch.int64)
    codes = torch.stack([nib & 15, nib >> 4], -1).reshape(-1)[: N * K].reshape(N, K)
    G = -(-K // g)
    s = args["scales"].double().reshape(N, G).repeat_interleave(g, 1)[:, :K]
    return NF4_INT8[codes] * s


def int8_reference(x, args, dense, bias, unit=None):
    """``words_int8.py``'s result computed another way: each unit's activations (16 for 4-bit
    codes, 8 for 8-bit; ``unit`` if given: ``mma_int8.py``'s group) rounded to ``q * d``
    (``d = max(max|x|, 1e-30) / 127``, ties to even), times the weight (``int8_weight``), in
    float64; and ``d`` per activation."""
    bits = args["bits"]
    M, K = x.shape
    pu = unit or 64 // bits
    xf = x.float().reshape(M, K // pu, pu)
    amax = xf.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    d = amax * torch.tensor(1.0 / 127.0)
    xt = (torch.round(xf * (torch.tensor(127.0) / amax)) * d).reshape(M, K)
    y = xt.double() @ int8_weight(args, dense).T
    if bias is not None:
        y += bias.double()
    return y.float(), d.expand(M, K // pu, pu).reshape(M, K), xt


def check_int8(label, got, x, args, dense, bias, failures, unit=None):
    """The int8 kernel against ``int8_reference`` (the tolerance of ``check``), and against the
    exact product within the rounding's bound, ``sum_k |W_nk| d(k) / 2``."""
    ref, d, xt = int8_reference(x, args, dense, bias, unit)
    check(label, got, x, dense, bias, failures, ref=ref)
    exact = F.linear(x.float(), dense, None if bias is None else bias.float())
    # the activations' rounding, and (NF4) the levels'
    moved = (int8_weight(args, dense) - dense.double()).abs()
    bound = (d.double() / 2) @ dense.abs().double().T + xt.double().abs() @ moved.T
    slack = TOL[x.dtype] * max(exact.abs().max().item(), 1e-6)
    over = (got.double() - exact.double()).abs() - bound * (1 + 1e-3) - slack
    if not over.max().item() <= 0:
        failures.append(f"{label}: beyond the int8 rounding bound by {over.max().item():.3g}")


def cases(group: str):
    """(label, N, K, M, encoding, dtype, bias?, config)."""
    out = []
    shapes = [(37, 100), (16, 64), (24, 130)]  # out odd; K not a multiple of any block; ragged
    encs = list(ENCODINGS)
    i = 0
    for ename in encs:
        ax0 = ENCODINGS[ename].to_dict(2)["axis"] % 2 == 0
        g = ENCODINGS[ename].group_size
        bits = getattr(ENCODINGS[ename], "bits", 4)
        pack = 8 // bits
        for N, K in shapes:
            dt = DTYPES[i % 3]
            bias = i % 2 == 0
            i += 1
            bn = min(8, g) if ax0 else 4
            if group == "gemv":
                for M in (1, 3) if N != 16 else (1, 16):
                    out.append((N, K, M, ename, dt, bias, L.GemvConfig(bn, 32 * pack, 1)))
            elif group == "splitk":
                for M in (1, 2):
                    out.append((N, K, M, ename, dt, bias, L.GemvConfig(bn, 16 * pack, 3)))
                gbn = min(16, g) if ax0 else 16
                bk = 16 * pack if ax0 else min(g, 16 * pack)
                out.append((N, K, 5, ename, dt, not bias, L.GemmConfig(16, gbn, bk, 2)))
            elif group == "gemm":
                gbn = min(32, g) if ax0 else 16
                bk = 32 * pack if ax0 else min(g, 32 * pack)
                for M in (16, 33):
                    out.append((N, K, M, ename, dt, bias, L.GemmConfig(16, gbn, bk, 1)))
            elif group == "dispatch":  # the shape-picked configs, through the CUDA entry point
                for M in (1, 3, 16, 33):
                    out.append((N, K, M, ename, DTYPES[(i + M) % 3], bias, None))
    if group.startswith("tiled"):
        out = tiled_cases(group)
    if group == "mma":
        out = mma_cases()
    if group == "mma-int8":
        out = mma_int8_cases()
    return [
        (f"{group} {e} N{N} K{K} M{M} {dt} bias={b} {c}", N, K, M, e, dt, b, c)
        for (
            N,
            K,
            M,
            e,
            dt,
            b,
            c,
        ) in out
    ]


def tiled_cases(group: str):
    """``tiled.py``: K a multiple of a word but of no block, ragged last groups, odd N."""
    out = []
    i = 0
    for ename in TILED_ENCODINGS:
        for N, K in [(37, 200), (16, 64), (24, 136)]:
            dt = DTYPES[i % 3]
            bias = i % 2 == 0
            i += 1
            if group == "tiled-fma":
                for M in (1, 3) if N != 16 else (1, 4):
                    out.append((N, K, M, ename, dt, bias, L.TiledConfig("fma", 0, 8, 64, 1)))
                out.append((N, K, 2, ename, dt, not bias, L.TiledConfig("fma", 0, 16, 32, 3)))
            elif group == "tiled-words":  # batch 1-4, split K, a step past K, ragged groups
                for M in {37: (1, 3), 16: (1, 4), 24: (2, 4)}[N]:
                    out.append((N, K, M, ename, dt, bias, L.TiledConfig("words", 0, 4, 64, 1)))
                out.append((N, K, 3, ename, dt, not bias, L.TiledConfig("words", 0, 8, 32, 3)))
                out.append((N, K, 1, ename, dt, bias, L.TiledConfig("words", 0, 16, 256, 0)))
            elif group == "tiled-int8" and ename in INT8_ENCODINGS:
                # whole 64-bit units a row: K a multiple of 16 codes (8 for 8-bit)
                K = {200: 208, 64: 64, 136: 144}[K]
                half = torch.float16 if i % 2 else torch.bfloat16
                for M in {37: (1, 3), 16: (1, 4), 24: (2, 4)}[N]:
                    out.append((N, K, M, ename, half, bias, L.TiledConfig("words8", 0, 4, 64, 1)))
                out.append((N, K, 3, ename, dt, not bias, L.TiledConfig("words8", 0, 8, 32, 3)))
                out.append((N, K, 1, ename, half, bias, L.TiledConfig("words8", 0, 16, 256, 0)))
                out.append((N, K, 2, ename, half, bias, None))  # picked: int8_applies
            elif group == "tiled-int8-variants" and ename in INT8_ENCODINGS:
                # words_int8.py's PREFETCH, KSPEC, PIPELINE (the interpreter's plain loop) and
                # L2_AHEAD (skipped there) on every encoding, PAIRED on affine: several steps and
                # a ragged last one, split K (a slice of one step), 1-4 rows
                K = {200: 208, 64: 64, 136: 144}[K]
                half = torch.float16 if i % 2 else torch.bfloat16
                pf = L.TiledConfig("words8", 0, 4, 64, 1, prefetch=True)
                ks = L.TiledConfig("words8", 0, 4, 64, 1, kspec=True, pipeline=2, stream=True)
                both = L.TiledConfig("words8", 0, 8, 32, 3, prefetch=True, kspec=True, l2_ahead=1)
                out.append((N, K, {37: 3, 16: 4, 24: 1}[N], ename, half, bias, pf))
                out.append((N, K, {37: 1, 16: 2, 24: 4}[N], ename, half, not bias, ks))
                out.append((N, K, 2, ename, half, not bias, both))
                if ename.startswith("affine"):
                    plain = L.TiledConfig("words8", 0, 4, 64, 1)
                    for M, cfg in ((1, None), (3, plain), (4, both)):
                        out.append((N, K, M, ename, half, bias, ("paired", cfg)))
            elif group == "tiled-dot":
                for M in (16, 33):
                    out.append((N, K, M, ename, dt, bias, L.TiledConfig("dot", 16, 16, 64, 1)))
                out.append((N, K, 5, ename, dt, not bias, L.TiledConfig("dot", 16, 32, 32, 2)))
            elif group == "tiled-dispatch":
                for M in (1, 3, 16, 33):
                    out.append((N, K, M, ename, DTYPES[(i + M) % 3], bias, None))
    return out


def mma_cases():
    """``mma.py``: ragged last groups (K not a multiple of the group) and whole ones, odd N,
    batches below and above a 16-row tile, several groups a step, split K, the configs picked
    from the shape (through the CUDA entry point for fp16 / bf16)."""
    out = []
    i = 0
    for ename in MMA_ENCODINGS:
        for N, K in [(37, 200), (16, 64), (24, 136), (40, 256)]:
            dt = DTYPES[i % 3]
            bias = i % 2 == 0
            i += 1
            out.append((N, K, 3, ename, dt, bias, L.MmaConfig(16, 16, 1, 1, 4, 1)))
            out.append((N, K, 33, ename, dt, not bias, L.MmaConfig(16, 32, 2, 3, 4, 1)))
            out.append((N, K, 17, ename, dt, bias, L.MmaConfig(32, 16, 1, 0, 4, 1)))
            half = torch.bfloat16 if i % 2 else torch.float16
            out.append((N, K, 16, ename, half, bias, None))
    return out


def mma_int8_cases():
    """``mma_int8.py``: odd N (a part of a 64-feature tile), 1-6 groups a row, rows 5 / 16 / 17
    / 33 / 64 (one and several row tiles, padded ones), fp16 and bf16, bias, split K (2 and 3
    slices, one of them short), 64- and 128-feature tiles; "routed": through the op's CUDA
    entry point with ``INT8_MMA_ROWS`` on (a ragged last group: not taken, exact)."""
    out = []
    i = 0
    for ename in INT8_MMA_ENCODINGS:
        for N, K in [(37, 128), (64, 192), (24, 384), (70, 256)]:
            dt = torch.float16 if i % 2 else torch.bfloat16
            bias = i % 2 == 0
            i += 1
            M = (5, 16, 17, 33, 64)[i % 5]
            if K % INT8_MMA_ENCODINGS[ename].group_size:  # a ragged group: refused, routed past
                out.append((N, K, 16, ename, dt, bias, "routed"))
                K += 64
            out.append((N, K, M, ename, dt, bias, L.MmaConfig(16, 64, 1, 1, 4, 1)))
            out.append((N, K, 17, ename, dt, not bias, L.MmaConfig(16, 64, 2, 3, 4, 1)))
            out.append((N, K, 33, ename, dt, bias, L.MmaConfig(64, 128, 4, 2, 4, 1)))
            out.append((N, K, 5, ename, dt, not bias, "routed"))
    return out


def run_case(label, N, K, M, ename, dt, has_bias, cfg, failures):
    args, dense = weight(N, K, ename, seed=N * 1000 + K)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dt)
    bias = torch.randn(N, generator=g).to(dt) if has_bias else None
    if label.startswith("mma-int8"):
        got, took = run_mma_int8(x, args, bias, N, K, cfg)
        if took != L.int8_mma_shape(K, args["encoding"], args["group_size"]):
            failures.append(f"{label}: the int8 mma kernel taken: {took}")
        if took:
            check_int8(label, got, x, args, dense, bias, failures, unit=args["group_size"])
        else:
            check(label, got, x, dense, bias, failures)
        return
    if isinstance(cfg, L.MmaConfig):
        c, s, m = (args[k] for k in ("codes", "scales", "mins"))
        got = L.mma_linear(x, c, s, m, bias, N, K, args["encoding"], args["group_size"], cfg)
    elif isinstance(cfg, tuple):  # ("paired", config): the scales and mins interleaved
        c, s, m = (args[k] for k in ("codes", "scales", "mins"))
        e, b, gs = args["encoding"], args["bits"], args["group_size"]
        pairs = L.paired_scales(s, m)
        # NaN where the kernel must not read: it takes scales and mins from the pairs alone
        s, m = torch.full_like(s, float("nan")), torch.full_like(m, float("nan"))
        got = L.tiled_linear(x, c, s, m, bias, N, K, e, b, gs, config=cfg[1], pairs=pairs)
    elif isinstance(cfg, L.TiledConfig) or (cfg is None and label.startswith("tiled-int8")):
        c, s, m = (args[k] for k in ("codes", "scales", "mins"))
        e, b, gs = args["encoding"], args["bits"], args["group_size"]
        got = L.tiled_linear(x, c, s, m, bias, N, K, e, b, gs, config=cfg)
    elif cfg is None:
        # the op's CUDA implementation on CPU tensors: dispatch, reshape of a 3-D x
        got = lin.linear_cuda(x.reshape(1, M, K), bias=bias, shape=[N, K], **args)[0]
    else:
        got = L.fused_linear(x, bias=bias, N=N, K=K, config=cfg, **args)
    if uses_int8(cfg, x, args, N, K):
        check_int8(label, got, x, args, dense, bias, failures)
    else:
        check(label, got, x, dense, bias, failures)


def run_mma_int8(x, args, bias, N, K, cfg):
    """(result, whether ``mma_int8.py`` ran): with ``cfg``, or (``"routed"``) through
    ``linear_cuda`` with the switch on."""
    c, s, m = (args[k] for k in ("codes", "scales", "mins"))
    e, gs = args["encoding"], args["group_size"]
    if cfg != "routed":
        return L.mma_int8_linear(x, c, s, m, bias, N, K, e, gs, cfg), True
    calls = []
    real = L.mma_int8_linear
    L.mma_int8_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    L.INT8_MMA_ROWS = (5, 64)
    min_elements, L.INT8_MMA_MIN_ELEMENTS = L.INT8_MMA_MIN_ELEMENTS, 0
    L.route.cache_clear()
    try:
        M = x.shape[0]
        got = lin.linear_cuda(x.reshape(1, M, K), bias=bias, shape=[N, K], **args)[0]
    finally:
        L.mma_int8_linear = real
        L.INT8_MMA_ROWS = None
        L.INT8_MMA_MIN_ELEMENTS = min_elements
        L.route.cache_clear()
    return got, bool(calls)


def uses_int8(cfg, x, args, N, K) -> bool:
    """Whether the case ran ``words_int8.py`` (named, or picked from the shape)."""
    if isinstance(cfg, tuple):  # paired: only the int8 kernel reads the pairs
        return True
    if isinstance(cfg, L.TiledConfig):
        return cfg.kernel == "words8"
    if cfg is not None:
        return False
    M = x.shape[0]
    e, b, g, axis = (args[k] for k in ("encoding", "bits", "group_size", "axis"))
    c = args["codes"]
    half = x.dtype != torch.float32
    path = L.route(M, N, K, e, b, g, axis, L.words_aligned(c), half, L.INT8_ACTIVATIONS)
    return path == "tiled" and L.int8_applies(M, K, e, b, g, x.dtype) and L.units_aligned(c)


def check_locks_reset(failures):
    """Split-K: the counters are back to 0 after a call, and a second call gives the same."""
    args, dense = weight(24, 130, "affine4-g32", seed=7)
    x = torch.randn(2, 130)
    cfg = L.GemvConfig(4, 32, 3)
    a = L.fused_linear(x, bias=None, N=24, K=130, config=cfg, **args)
    locks = L._LOCKS[x.device]
    if int(locks.abs().sum()) != 0:
        failures.append("split-K counters not reset")
    ws = L._WORKSPACES.get((x.device, (3, 2, 24), torch.float32, ""))
    b = L.fused_linear(x, bias=None, N=24, K=130, config=cfg, **args)
    if not torch.equal(a, b):
        failures.append("split-K: a second call differs")
    if ws is None or L._WORKSPACES[(x.device, (3, 2, 24), torch.float32, "")] is not ws:
        failures.append("split-K: the workspace was not kept for the next call")
    check("locks", a, x, dense, None, failures)


def check_paired_routed(failures):
    """``launch.PAIRED_SCALES``, ``INT8_PREFETCH`` and ``INT8_KSPEC`` on, through the op's CUDA
    entry point: the plan holds the pairs, the int8 kernel's result, and an in-place change of
    the mins (as ``load_state_dict`` makes) is seen by the next call, not read from a stale
    copy."""
    N, K = 24, 144
    args, dense = weight(N, K, "affine4-g32", seed=11)
    x = torch.randn(1, 1, K, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    saved = L.PAIRED_SCALES, L.INT8_PREFETCH, L.INT8_KSPEC
    L.PAIRED_SCALES = L.INT8_PREFETCH = L.INT8_KSPEC = True
    L.int8_config.cache_clear()
    try:
        for step in ("first", "mins changed in place"):
            got = lin.linear_cuda(x, bias=None, shape=[N, K], **args)[0]
            plan = args["codes"]._qt_cuda_plan
            if plan.pairs is None:
                failures.append(f"paired routed ({step}): the plan holds no pairs")
            check_int8(f"paired routed ({step})", got, x[0], args, dense, None, failures)
            args["mins"].add_(0.25)  # in place: the plan's pairs must follow
            c, s, m = (args[k] for k in ("codes", "scales", "mins"))
            dense = dequantize(c, s, m, [N, K], "affine", 4, 32, 1, torch.float32)
    finally:
        L.PAIRED_SCALES, L.INT8_PREFETCH, L.INT8_KSPEC = saved
        L.int8_config.cache_clear()


def check_fallback(failures):
    """A 3-bit weight is not fused: decoded, then F.linear, through the same entry point."""
    w = torch.randn(10, 24)
    q = Q.quantize(w, Affine(bits=3, group_size=8, axis=-1), framework="pt")
    c, s, m = q.parts()
    if lin._launch.supported([10, 24], "affine", 3, 8, 1):
        failures.append("3-bit reported as supported")
    x = torch.randn(2, 24, dtype=torch.bfloat16)
    got = lin.linear_cuda(x, c, s, m, None, [10, 24], "affine", 3, 8, 1)
    dense = dequantize(c, s, m, [10, 24], "affine", 3, 8, 1, torch.float32)
    check("fallback 3-bit", got, x, dense, None, failures)


def main(group: str) -> None:
    failures: list[str] = []
    n = 0
    for case in cases(group):
        try:
            run_case(*case, failures)
        except Exception as exc:  # report every failing case, not just the first
            failures.append(f"{case[0]}: {type(exc).__name__}: {exc}"[:400])
        n += 1
    if group == "tiled-int8-variants":
        check_paired_routed(failures)
        # bfloat16 scales and mins: the pairs' halves read as bfloat16
        both = L.TiledConfig("words8", 0, 8, 64, 2, prefetch=True, kspec=True)
        for M, cfg in ((1, None), (3, both)):
            case = ("tiled-int8-variants bf16 scales", 37, 320, M, "affine4-g64-bf16")
            run_case(*case, torch.bfloat16, M == 1, ("paired", cfg), failures)
        n += 3
    if group == "dispatch":
        check_locks_reset(failures)
        check_fallback(failures)
        n += 2
    print(json.dumps({"n": n, "failures": failures}))


if __name__ == "__main__":
    main(sys.argv[1])
