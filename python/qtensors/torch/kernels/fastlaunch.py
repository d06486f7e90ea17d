"""Launching the Triton kernels with little host time.

``kernel[grid](*args, **meta)`` binds and specializes every argument and looks the compiled
kernel up on each call: 39 us of host time per call on the H200 machine's CPU, against 10.6 us
for the compiled kernel's own launcher (`benches/probe_gemv_variants.py`, eager section;
`F.linear` 17 us). A decode step calls a linear ~150 times, so that difference alone is
~4 ms a token in eager mode.

``launch`` keeps, per (kernel, constexprs, argument specialization), the compiled kernel's
launcher from the first call (made through Triton's normal path) and calls it directly after.
The specialization key is at least as fine as Triton's: each tensor's dtype and 16-byte
alignment, each int's ``== 1``, divisibility by 16 and 32-bit range, so a cached launcher is
only reused for arguments Triton would have compiled the same kernel for. Triton's own path
runs instead under the interpreter, when launch hooks are installed (profilers), and for good
if the compiled kernel does not expose the launcher this relies on (another Triton version).

``Replay`` goes one step further for a layer called again and again with the same shapes (an
eager decode step): while ``recording()`` is active, ``launch`` notes each cached launch; the
caller keeps the launches of a call as a ``Replay``, which next time allocates the output and
calls the launchers with the new activations and output in place of the recorded ones, skipping
every check, route and plan the first call went through (``linear.linear_cuda`` keys it by
everything those depended on).

``Refill`` is the same for a launch that writes a fresh output from fixed inputs: a weight's
decode on the decode + cuBLAS path (``linear._decode_then_linear``), whose calls (a prompt's
prefill) come with a new number of rows each time.
"""

from __future__ import annotations

import inspect
import os
import threading
from typing import Any

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no hooks registry to check, so never take the fast path
    _knobs = None

_LAUNCHERS: dict[tuple, tuple] = {}
_ENABLED = _knobs is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# launches noted by ``launch`` while ``recording()`` runs, per thread (``.noted``)
_RECORDING = threading.local()


def _spec(a: Any) -> Any:
    """What Triton specializes a kernel argument on (or finer)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31, 0 <= a < 2**64)
    return type(a)


def _no_hooks() -> bool:
    rt = _knobs.runtime
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and getattr(h, "calls", True):
            return False
    return True


def launch(kernel, grid: tuple, args: tuple, meta: dict, meta_key: tuple, device: int) -> None:
    """``kernel[grid](*args, **meta)``, through the cached launcher when it applies.
    ``meta_key``: a hashable stand-in for ``meta`` (cached with the launch plan); ``device``:
    the CUDA ordinal of the tensors."""
    global _ENABLED
    if not (_ENABLED and _no_hooks()):
        kernel[grid](*args, **meta)
        return
    key = (kernel, meta_key, tuple(map(_spec, args)))
    hit = _LAUNCHERS.get(key)
    if hit is None:
        ck = kernel[grid](*args, **meta)
        try:
            ck._init_handles()
            compiled = (ck.run, ck.function, ck.packed_metadata)
        except (AttributeError, TypeError):
            _ENABLED = False  # not the CompiledKernel this module knows: Triton's path from now
            return
        try:
            _LAUNCHERS[key] = (*compiled, constexpr_tail(kernel, meta, len(args)))
        except (AttributeError, KeyError, TypeError, ValueError):
            pass  # its parameters unreadable: this kernel alone keeps Triton's path
        return
    run, function, packed, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    run(grid[0], g1, g2, stream, function, packed, None, None, None, *args, *tail)
    noted = getattr(_RECORDING, "noted", None)
    if noted is not None:
        noted.append((hit, (grid[0], g1, g2), args, device))


def constexpr_tail(kernel, meta: dict, n_args: int) -> tuple:
    """The values of ``kernel``'s parameters after its ``n_args`` positional ones, as its
    launcher takes them: ``meta``'s, or the parameter's default where ``meta`` leaves it out (as
    Triton's own call binds it). A parameter with neither: TypeError (Triton's own call would
    have failed first). ``kernel.fn`` is the Python function (unwrapped, should a wrapper such
    as an autotuner hold the JIT function there)."""
    fn = kernel.fn
    while hasattr(fn, "fn"):
        fn = fn.fn
    params = inspect.signature(fn).parameters
    tail = []
    for name in kernel.arg_names[n_args:]:
        if name in meta:
            tail.append(meta[name])
        elif params[name].default is not inspect.Parameter.empty:
            tail.append(params[name].default)
        else:
            raise TypeError(f"{fn.__name__}: no value for {name}")
    return tuple(tail)


class recording:
    """``with recording() as launches:`` the cached launches made inside, as ``(launcher, grid,
    args, device)``: the ones a ``Replay`` can repeat (a first launch, through Triton's path,
    is not noted)."""

    def __enter__(self) -> list:
        self.outer = getattr(_RECORDING, "noted", None)
        _RECORDING.noted = []
        return _RECORDING.noted

    def __exit__(self, *exc) -> None:
        _RECORDING.noted = self.outer


def hooks_clear() -> bool:
    """Whether a ``Replay`` may run now (the cached path is on and no launch hooks are set)."""
    return _ENABLED and _no_hooks()


def _same_memory(a: Any, t: torch.Tensor) -> bool:
    """Whether kernel argument ``a`` is ``t``'s memory seen as ``[-1, t.shape[-1]]`` (the view
    the launch paths flatten ``t`` to)."""
    return (
        isinstance(a, torch.Tensor)
        and a.data_ptr() == t.data_ptr()
        and a.numel() == t.numel()
        and a.dim() == 2
        and a.shape[-1] == t.shape[-1]
    )


#: the names Triton 3.6's ``CudaLauncher.__call__`` uses: with no scratch memory it only calls
#: ``self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid,
#: self.launch_pdl, None, None, *args)``, which ``Replay`` then calls itself (one Python frame,
#: a closure and two calls less a launch). Any other implementation (another Triton) keeps its own.
_LAUNCHER_CALL_NAMES = frozenset(
    (
        "global_scratch_size",
        "global_scratch_align",
        "_allocation",
        "_allocator",
        "profile_scratch_size",
        "profile_scratch_align",
        "_profile_allocator",
        "launch",
        "launch_cooperative_grid",
        "launch_pdl",
    )
)
_LAUNCHER_CALL_ARGS = ("self", "gridX", "gridY", "gridZ", "stream", "function")


def direct_launch(run: Any) -> tuple | None:
    """``(launch, cooperative, pdl)`` where ``run`` is the Triton launcher this module knows
    (its ``__call__`` as in Triton 3.6) and needs no scratch memory, else None."""
    cls = type(run)
    code = getattr(cls.__dict__.get("__call__"), "__code__", None)
    if (
        cls.__name__ != "CudaLauncher"
        or code is None
        or frozenset(code.co_names) != _LAUNCHER_CALL_NAMES
        or code.co_varnames[: len(_LAUNCHER_CALL_ARGS)] != _LAUNCHER_CALL_ARGS
    ):
        return None
    try:
        if run.global_scratch_size or run.profile_scratch_size:
            return None
        return (run.launch, run.launch_cooperative_grid, run.launch_pdl)
    except AttributeError:
        return None


#: what Triton 3.6's launcher of a kernel that takes tensor descriptors wraps its C launch in
#: (``driver.wrap_handle_tensordesc``'s ``inner``): the closure's names, and the base arguments
#: before the kernel's (grid, stream, function, cooperative, pdl, two scratch buffers, packed
#: metadata, launch metadata, two hooks)
_TENSORDESC_FREEVARS = frozenset(("launcher", "tensordesc_indices", "tensordesc_meta"))
_TENSORDESC_BASE_ARGS = 13


def tensordesc_launch(run: Any) -> tuple | None:
    """``(C launch, cooperative, pdl, descriptor positions, their metadata, expand)`` where
    ``run`` is the Triton 3.6 launcher this module knows (``direct_launch``) of a kernel taking
    tensor descriptors, whose ``launch`` turns each descriptor into its arguments
    (``expand(descriptor, metadata)``: the CUDA tensor map, shape and strides) before the C
    launch: a caller that keeps a launch can expand a fixed descriptor once. Else None."""
    direct = direct_launch(run)
    inner = direct[0] if direct is not None else None
    code = getattr(inner, "__code__", None)
    if code is None or not _TENSORDESC_FREEVARS <= set(code.co_freevars):
        return None
    cells = dict(zip(code.co_freevars, inner.__closure__ or (), strict=False))
    try:
        launcher = cells["launcher"].cell_contents
        positions = sorted(cells["tensordesc_indices"].cell_contents)
        metas = list(cells["tensordesc_meta"].cell_contents)
    except (KeyError, ValueError, TypeError):
        return None
    glob = getattr(inner, "__globals__", {})
    expand = glob.get("make_tensordesc_arg")
    if (
        glob.get("_BASE_ARGS_FORMAT_LEN") != _TENSORDESC_BASE_ARGS
        or expand is None
        or len(metas) != len(positions)
        or any(m is None for m in metas)
    ):
        return None
    return launcher, direct[1], direct[2], positions, metas, expand


def _prepared(
    noted: tuple | list, x: torch.Tensor | None, out: torch.Tensor
) -> tuple[list, int, tuple]:
    """The noted launches as ``(call, grid, head, kept arguments, x's positions, out's
    positions)``, ``x`` and ``out`` cut out of the kept arguments (no reference to the first
    call's tensors), each launch through Triton's C ``launch`` where ``direct_launch`` allows;
    their device; and the tensor descriptors expanded into CUDA tensor maps (``_expanded``), for
    the caller to keep with the launches: a map holds its tensor's raw address."""
    chain = [noted] if isinstance(noted, tuple) else list(noted)
    launches, device, held = [], -1, []
    for (run, function, packed, tail), grid, args, dev in chain:
        device = dev
        x_at = () if x is None else tuple(i for i, a in enumerate(args) if _same_memory(a, x))
        out_at = tuple(i for i, a in enumerate(args) if _same_memory(a, out))
        kept = list(args)
        for i in x_at + out_at:
            kept[i] = None
        kept.extend(tail)
        expanded = _expanded(run, kept, x_at + out_at)
        direct = direct_launch(run)
        if expanded is not None:  # the C launch itself, the fixed descriptors expanded once
            c_launch, coop, pdl, flat, where = expanded
            held.extend(a for i, a in enumerate(kept) if i not in where)
            kept = flat
            call, head = c_launch, (function, coop, pdl, None, None, packed)
            x_at, out_at = tuple(where[i] for i in x_at), tuple(where[i] for i in out_at)
        elif direct is not None:  # launch(grid, stream, function, coop, pdl, scratch x 2, ...)
            call, head = direct[0], (function, direct[1], direct[2], None, None, packed)
        else:  # run(grid, stream, function, packed, the launch hooks' metadata, ...)
            call, head = run, (function, packed)
        launches.append((call, grid, head, kept, x_at, out_at))
    return launches, device, tuple(held)


def expand_descriptors(run: Any, args: list, per_call: tuple = ()) -> tuple | None:
    """Where ``run`` is Triton 3.6's launcher of a kernel taking tensor descriptors
    (``tensordesc_launch``), whose own launch expands every descriptor on every call: ``(C
    launch, cooperative, pdl, the arguments with each fixed descriptor expanded once (its CUDA
    tensor map, shape and strides), old position -> new of the others, {position: metadata} of
    the descriptors among ``per_call``, expand)``. ``per_call``: positions the caller fills anew
    each call, left as one argument each (a descriptor there is the caller's to expand, with
    its metadata). Else None."""
    td = tensordesc_launch(run)
    if td is None:
        return None
    c_launch, coop, pdl, positions, metas, expand = td
    if any(i >= len(args) for i in positions):
        return None
    meta_of = dict(zip(positions, metas, strict=True))
    flat: list = []
    where: dict[int, int] = {}
    for i, a in enumerate(args):
        if i in meta_of and i not in per_call:
            flat.extend(expand(a, meta_of[i]))
        else:
            where[i] = len(flat)
            flat.append(a)
    later = {i: meta_of[i] for i in per_call if i in meta_of}
    return c_launch, coop, pdl, flat, where, later, expand


def _expanded(run: Any, kept: list, swapped: tuple) -> tuple | None:
    """``expand_descriptors`` for a replay, which swaps in x and the output (``swapped``) as
    they are: None where one of them is a descriptor."""
    got = expand_descriptors(run, kept, swapped)
    if got is None or got[5]:
        return None
    return got[:5]


class Replay:
    """The noted launches of a call ``x -> out`` (one, or a short chain such as the int8
    tensor-core path's pre-pass and matmul), repeated in order with new activations and a fresh
    output: every other argument (the weight's parts, bias, kept workspaces, sizes, strides) as
    recorded. Raises ValueError unless the first launch took ``x``'s memory and the last
    ``out``'s as 2-D views (a copy of ``x`` cannot be replayed, nor a path whose output some
    other operation wrote, as decode + cuBLAS). A replay passes ``x`` and the output themselves
    where the first call passed their 2-D views: a launcher reads only a tensor's address."""

    __slots__ = ("bias", "device", "held", "launches", "shape")

    def __init__(self, noted: tuple | list, x: torch.Tensor, out: torch.Tensor, bias) -> None:
        self.launches, self.device, self.held = _prepared(noted, x, out)
        if not self.launches or not self.launches[0][4] or not self.launches[-1][5]:
            raise ValueError("the noted launches do not take this call's x and output")
        if out.dtype != x.dtype:  # the fused paths write x's dtype: a replay allocates as x
            raise ValueError(f"a replay's output has x's dtype, not {out.dtype} for {x.dtype}")
        self.shape, self.bias = tuple(out.shape), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output for ``x`` (the recorded call's shape; x's dtype and device), or None where the
        fresh output is not 16-byte aligned (Triton would specialize differently: the caller
        takes the full path)."""
        out = x.new_empty(self.shape)
        if out.data_ptr() % 16:
            return None
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        for call, (g0, g1, g2), head, kept, x_at, out_at in self.launches:
            args = kept.copy()
            for i in x_at:
                args[i] = x
            for i in out_at:
                args[i] = out
            call(g0, g1, g2, stream, *head, None, None, None, *args)
        return out


class Refill:
    """The noted launch of a call that writes a fresh output from fixed inputs (a weight's
    decode for decode + cuBLAS), repeated into a new output of the recorded shape and dtype:
    every other argument as recorded. Raises ValueError unless the launch wrote ``out``'s
    memory (as a 2-D view)."""

    __slots__ = ("device", "dtype", "held", "launches", "shape", "where")

    def __init__(self, noted: tuple | list, out: torch.Tensor) -> None:
        self.launches, self.device, self.held = _prepared(noted, None, out)
        if len(self.launches) != 1 or not self.launches[0][5]:
            raise ValueError("the noted launch did not write this output")
        self.shape, self.dtype, self.where = tuple(out.shape), out.dtype, out.device

    def __call__(self) -> torch.Tensor | None:
        """The output, or None where the fresh one is not 16-byte aligned (the caller takes the
        full path)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=self.where)
        if out.data_ptr() % 16:
            return None
        call, (g0, g1, g2), head, kept, _, out_at = self.launches[0]
        args = kept.copy()
        for i in out_at:
            args[i] = out
        call(g0, g1, g2, torch._C._cuda_getCurrentRawStream(self.device), *head, None, None,
             None, *args)  # fmt: skip
        return out
