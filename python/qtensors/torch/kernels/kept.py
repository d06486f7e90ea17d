"""Memory the kernels keep across calls (split-K workspaces and counters, the int8 activations'
buffers, NF4's level table), allocated where no CUDA-graph memory pool can claim it.

Why: ``torch.compile(mode="reduce-overhead")`` (CUDA-graph trees) runs each compiled function
once eagerly before recording it ("warm-up"), with every allocation of the calling thread routed
to the graphs' private memory pool, and then refuses to record if a tensor of that pool is still
alive without being one of the function's outputs ("Detected N tensor(s) in the cudagraph pool
not tracked as outputs"). A buffer first allocated during that warm-up and kept in a module cache
is such a tensor: the compiled decode of a quantized model failed so at batch 8 on the H200
(``benches/probe_cudagraph_pool.py``). The routing is per thread (a graph capture's is per
stream), so a buffer allocated by a thread of our own, on its default stream, never lands in the
pool; where none is routed, it is the same ``torch.empty``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _allocator_thread() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="qtensors-kept")
        return _POOL


def _forget_after_fork() -> None:
    """A forked child has no copy of the parent's thread: it makes its own when it needs one
    (a pool whose thread is gone would never run the allocation)."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def kept_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape, dtype, device)`` for a tensor kept across calls: on a CUDA device,
    allocated by a thread of this module. Fill it on the caller's stream (``zero_``,
    ``copy_``). Not while the caller's stream is being captured into a CUDA graph (the stream
    wait below would join the capture)."""
    if device.type != "cuda":
        return torch.empty(shape, dtype=dtype, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t = _allocator_thread().submit(torch.empty, shape, dtype=dtype, device=device).result()
    # the allocator may hand out a block freed on the default stream by work still queued
    # there: the caller's stream waits for it before using the buffer
    here, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    if here != default:
        here.wait_stream(default)
    return t
