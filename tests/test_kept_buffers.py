"""Buffers the kernels keep across calls (``kernels/kept.py``): allocated by a thread of their
own, so that a CUDA-graph tree's warm-up (which routes the calling thread's allocations to its
private pool) cannot make them tensors of that pool; the caller's stream waits for the default
stream's queued work; while a graph is captured nothing new is kept. The GPU side
(``torch.compile(mode="reduce-overhead")`` of a quantized model's decode, batch 1 and 8, in a
fresh process) is ``benches/probe_cudagraph_pool.py``."""

from __future__ import annotations

import os
import select
import signal
import threading

import pytest
import torch

from qtensors.torch.kernels import dequant as D
from qtensors.torch.kernels import kept
from qtensors.torch.kernels import launch as L


class _Stream:
    def __init__(self, name: str) -> None:
        self.name, self.waited = name, []

    def wait_stream(self, other) -> None:
        self.waited.append(other.name)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.empty on 'cuda' answered with a CPU tensor, noting the allocating thread; the
    current and default streams as stand-ins; no graph capture unless the test says so."""
    seen = {"threads": [], "capturing": False}
    real_empty = torch.empty

    def empty(shape, *, dtype=None, device=None):
        if torch.device(device).type == "cuda":
            seen["threads"].append(threading.get_ident())
            device = "cpu"
        return real_empty(shape, dtype=dtype, device=device)

    streams = {"current": _Stream("current"), "default": _Stream("default")}
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams["current"])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: streams["default"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: seen["capturing"])
    monkeypatch.setattr(L, "_WORKSPACES", {})
    monkeypatch.setattr(L, "_LOCKS", {})
    monkeypatch.setattr(D, "_LEVELS", {})
    seen["streams"] = streams
    return seen


def test_kept_tensor_is_allocated_on_another_thread(fake_cuda):
    t = kept.kept_empty((3, 4), torch.float16, torch.device("cuda", 0))
    assert t.shape == (3, 4) and t.dtype == torch.float16
    assert fake_cuda["threads"] and threading.get_ident() not in fake_cuda["threads"]
    # the caller's stream waits for work queued on the default stream
    assert fake_cuda["streams"]["current"].waited == ["default"]


def test_no_wait_when_the_caller_is_on_the_default_stream(fake_cuda):
    fake_cuda["streams"]["current"] = fake_cuda["streams"]["default"]
    kept.kept_empty((2,), torch.int32, torch.device("cuda"))
    assert fake_cuda["streams"]["default"].waited == []


def test_cpu_tensors_stay_on_the_calling_thread(fake_cuda):
    t = kept.kept_empty((5,), torch.float32, torch.device("cpu"))
    assert t.shape == (5,) and fake_cuda["threads"] == []


def test_workspaces_counters_and_levels_are_kept_off_the_calling_thread(fake_cuda):
    dev = torch.device("cuda", 0)
    ws = L._workspace(dev, (2, 8, 16))
    assert L._workspace(dev, (2, 8, 16)) is ws  # kept: the same buffer next call
    locks = L._locks(dev)
    assert locks is L._locks(dev) and int(locks.abs().sum()) == 0  # zeroed once
    levels = D._levels(dev)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and levels is D._levels(dev)
    me = threading.get_ident()
    assert len(fake_cuda["threads"]) == 3 and me not in fake_cuda["threads"]


def test_while_capturing_a_missing_workspace_is_for_that_call_only(fake_cuda):
    dev = torch.device("cuda", 0)
    fake_cuda["capturing"] = True
    a = L._workspace(dev, (4, 4))
    b = L._workspace(dev, (4, 4))
    assert a is not b and L._WORKSPACES == {}
    assert L._locks(dev) is None  # no counters made inside a capture
    # allocated in the capture (the graph's pool), on the calling thread, never kept
    assert fake_cuda["threads"] == [threading.get_ident()] * 2


def test_nf4_levels_refuse_a_first_use_inside_a_capture(fake_cuda):
    """The table is copied from the host: inside a capture that copy cannot run, so a first use
    there says what to do instead of failing in CUDA."""
    fake_cuda["capturing"] = True
    with pytest.raises(RuntimeError, match="call the model once before capturing"):
        D._levels(torch.device("cuda", 0))
    fake_cuda["capturing"] = False
    assert D._levels(torch.device("cuda", 0))[0] == -1.0


def test_a_forked_child_makes_its_own_allocator_thread(fake_cuda):
    """After a fork the child's pool is forgotten (its thread stayed in the parent), so an
    allocation there starts a new thread instead of waiting on one that does not exist."""
    kept.kept_empty((2,), torch.float32, torch.device("cuda", 0))
    assert kept._POOL is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: allocate, report, leave without running pytest's exit handlers
        ok = kept._POOL is None
        kept.kept_empty((2,), torch.float32, torch.device("cuda", 0))
        os.write(write, b"1" if ok and kept._POOL is not None else b"0")
        os._exit(0)
    os.close(write)
    # a child stuck on the parent's thread never answers: failed, not hung (a generous bound)
    ready, _, _ = select.select([read], [], [], 60)
    got = os.read(read, 1) if ready else b""
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert got == b"1"
