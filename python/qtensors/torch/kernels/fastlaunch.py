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
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # older Triton: no hooks registry to check, so never take the fast path
    _knobs = None

_LAUNCHERS: dict[tuple, tuple] = {}
_ENABLED = _knobs is not None and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


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
            tail = tuple(meta[n] for n in kernel.arg_names[len(args) :])
            _LAUNCHERS[key] = (ck.run, ck.function, ck.packed_metadata, tail)
        except (AttributeError, KeyError, TypeError):
            _ENABLED = False  # not the CompiledKernel this module knows: Triton's path from now
        return
    run, function, packed, tail = hit
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = torch._C._cuda_getCurrentRawStream(device)
    run(grid[0], g1, g2, stream, function, packed, None, None, None, *args, *tail)
