"""Compile the kernels a model's quantized layers need during the load, not at its first forward.

Triton compiles a kernel the first time it runs with a new specialisation (dtype, constexpr
configuration, shapes' divisibility): 1-2 s for a 1.1B Llama on the H200 (issue 11), paid by the
user's first forward unless done before. ``warmup(model)`` runs each distinct quantized layer of
the model once per path its forward can take, on zeros, so that the compiled kernels are in
Triton's in-process cache (and its on-disk cache, which makes a later process's compile a load):

* ``QuantizedLinear``: 1, 2 and ``FMA_MAX_M`` rows (the CUDA-core kernels' specialisations),
  ``FMA_MAX_M + 1`` rows where the ``tl.dot`` kernel runs (``TILED_MAX_M > FMA_MAX_M``),
  ``TILED_MAX_M + 1`` rows, ``GLUON_TILE8_MAX_M + 1``, 17 and 33 rows (the tensor-core kernels'
  8-, 16-, 32- and 64-row tiles, fp16 / bf16 activations: a batch's decoding, a short prompt's
  prefill) and ``MMA_MAX_M + 1`` rows (decode the
  weight, then cuBLAS: longer prefills), in the layer's dtype (``kernels/launch.py`` routes by
  these batch sizes); with the gemm16 route on (``launch.GEMM16_ROWS``, the default), also 129
  rows (its 256-row bucket's kernels) and one past its last (decode + cuBLAS again), for the
  weights its tables have (``gemm16_rows_due``);
* ``QuantizedEmbedding``: a lookup of one row (the row-decoding kernel).

Layers that share shape, encoding, dtype and device share kernels and configuration, so the
number of runs depends on the distinct layer kinds (about 4-6 for a Llama), not on the depth.
Members of a sibling group (``siblings.py``) warm the group's joined shape and their own.

Signatures an earlier warm-up ran in the same environment are skipped (their kernels are in
Triton's on-disk cache, where a first forward loads the few it needs faster than the warm-up
loads every path's; ``kernels/warm_record.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import linear
from .modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from .siblings import group_of

try:
    from .kernels import launch as _launch
    from .kernels.launch import FMA_MAX_M, GLUON_TILE8_MAX_M, MMA_MAX_M, TILED_MAX_M
except Exception:  # no Triton: the CUDA path decodes, nothing to compile
    FMA_MAX_M, TILED_MAX_M, MMA_MAX_M, GLUON_TILE8_MAX_M = 4, 4, 0, 0
    _launch = None


def _route_rows() -> set[int]:
    """The batch sizes that reach each kernel specialisation but the gemm16 route's."""
    rows = {1, 2, FMA_MAX_M, TILED_MAX_M + 1, MMA_MAX_M + 1}
    # the Gluon kernels' 8-row tiles end at GLUON_TILE8_MAX_M: past it, their 16-row ones
    rows |= {m for m in (GLUON_TILE8_MAX_M + 1, 17, 33) if m <= MMA_MAX_M}
    if TILED_MAX_M > FMA_MAX_M:
        rows.add(FMA_MAX_M + 1)
    return rows


def gemm16_only_rows() -> frozenset[int]:
    """The rows the gemm16 route adds when it is on: its row buckets' first row counts, then
    one past its last (decode + cuBLAS again). Other weights take decode + cuBLAS at each, as
    at ``MMA_MAX_M + 1`` rows, so running them there compiles nothing."""
    gemm16 = getattr(_launch, "GEMM16_ROWS", None)
    if gemm16 is None:
        return frozenset()
    lo, hi = gemm16
    rows = {m for m in (lo, _launch.gemm16_rows(lo) + 1) if m <= hi} | {hi + 1}
    return frozenset(rows - _route_rows())


def default_rows() -> tuple[int, ...]:
    """The batch sizes that reach each kernel specialisation (see the module's docstring); the
    gemm16 route's when it is on at the time of the call."""
    return tuple(sorted(_route_rows() | gemm16_only_rows()))


def gemm16_rows_due(rows: int, w: QuantizedWeight, shape: tuple[int, ...]) -> bool:
    """Whether the default warm-up runs ``rows`` rows against ``w`` (or its sibling group's
    joined ``shape``): every row count of ``default_rows()``, but the gemm16 route's own only in
    fp16 / bf16 on an sm_90 device (its kernels' only one) and for the weights its tables have."""
    if rows not in gemm16_only_rows():
        return True
    if w.dtype not in (torch.float16, torch.bfloat16):
        return False
    if w.device.type != "cuda" or torch.cuda.get_device_capability(w.device) != (9, 0):
        return False
    return _launch.gemm16_tabled(int(shape[0]), int(shape[1]))


def _signature(kind: str, w: QuantizedWeight, rows: int) -> tuple[Any, ...]:
    e = w.encoding
    enc = (e["name"], w.bits, int(e["group_size"]), int(e["axis"]), e["scale_dtype"])
    has_mins = w.mins is not None
    return (kind, tuple(w.shape), enc, has_mins, w.dtype, str(w.device), rows)


class _Record:
    """The signatures already warmed in this environment (``kernels/warm_record.py``), per CUDA
    device; CPU signatures are never recorded (nothing compiles there)."""

    def __init__(self, remember: bool) -> None:
        self.remember = remember
        self.keys: dict[str, str | None] = {}  # per device (``str(device)``, a signature's [5])
        self.known: dict[str, set[str]] = {}

    def _key(self, device: torch.device) -> str | None:
        dev = str(device)
        if dev not in self.keys:
            try:
                from .kernels import warm_record
            except ImportError:  # no Triton: nothing compiles, nothing to record
                self.keys[dev] = None
            else:
                self.keys[dev] = warm_record.environment_key(device)
                self.known[dev] = warm_record.recorded(self.keys[dev])
        return self.keys[dev]

    def skip(self, sig: tuple[Any, ...], device: torch.device) -> bool:
        """Whether ``sig`` was warmed before (its kernels are in Triton's cache)."""
        if not self.remember or device.type != "cuda" or self._key(device) is None:
            return False
        return repr(sig) in self.known[str(device)]

    def save(self, ran: list[tuple[Any, ...]]) -> None:
        """Record the CUDA signatures of ``ran`` under their device's key."""
        per_device: dict[str, set[str]] = {}
        for sig in ran:
            if sig[5].startswith("cuda") and self.keys.get(sig[5]) is not None:
                per_device.setdefault(sig[5], set()).add(repr(sig))
        if not self.remember or not per_device:  # (and maybe no Triton to import)
            return
        from .kernels import warm_record

        for dev, sigs in per_device.items():
            warm_record.record(self.keys[dev], sigs)


@torch.inference_mode()
def warmup(
    model: nn.Module, rows: tuple[int, ...] | None = None, remember: bool = True
) -> list[tuple[Any, ...]]:
    """Run every distinct quantized layer of ``model`` once per forward path (see the module's
    docstring; ``rows``: the batch sizes for linears, default ``default_rows()``). Returns the
    signatures run: (kind, shape, encoding, has mins, dtype, device, rows).

    ``remember``: skip the CUDA signatures an earlier warm-up ran in this environment (their
    kernels are in Triton's on-disk cache, so a first forward loads them instead of compiling;
    ``kernels/warm_record.py``), and record those run now."""
    # rows given: each runs for every layer; by default the gemm16 route's only where it applies
    due_rows = (lambda m, w, shape: True) if rows else gemm16_rows_due
    rows = rows or default_rows()
    seen: set[tuple[Any, ...]] = set()
    ran: list[tuple[Any, ...]] = []
    rec = _Record(remember)

    def due(key: tuple[Any, ...], w: QuantizedWeight) -> bool:
        """Whether to run ``key`` now: not yet seen, and not warmed by an earlier load."""
        if key in seen:
            return False
        seen.add(key)
        if rec.skip(key, w.device):
            return False
        ran.append(key)
        return True

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            w = module.weight
            if w.codes.is_meta:
                continue
            group = group_of(module)
            grouped = group is not None and group.valid()
            for m in rows:
                key = _signature("linear", w, m)
                # a group's multiply, and the member's own (taken when it runs alone)
                joined_shape = tuple(group.op_args[0]) if grouped else ()
                joined = (
                    grouped
                    and due_rows(m, w, joined_shape)
                    and due((*key[:1], joined_shape, *key[2:]), w)
                )
                own = due_rows(m, w, key[1]) and due(key, w)
                if not (joined or own):
                    continue
                x = torch.zeros(m, int(w.shape[1]), dtype=w.dtype, device=w.device)
                if joined:
                    group.multiply(x)
                if own and grouped:
                    # calling the member would leave kept slices that no sibling asks for
                    linear(x, w.codes, w.scales, w.mins, module.bias, *w.op_args)
                elif own:
                    module(x)
        elif isinstance(module, QuantizedEmbedding):
            w = module.weight
            if not w.codes.is_meta and due(_signature("embedding", w, 1), w):
                module(torch.zeros(1, 1, dtype=torch.long, device=w.device))
    if any(k[5].startswith("cuda") for k in ran):
        torch.cuda.synchronize()
    rec.save(ran)
    return ran
