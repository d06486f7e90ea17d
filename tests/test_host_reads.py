"""The CPU loaders (`load_model`, `offload`) read as `qtensors.stream` reads to the CPU: the same
read mode ("auto") and several tensors in flight (`stream.read_host_ahead`), compressed
(lossless) files included, with results equal to `load_file`'s."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from torch import nn

import qtensors as qt
import qtensors.torch as qtt
from qtensors import _core
from qtensors.torch.offload import offload

S = importlib.import_module("qtensors.stream")  # the module (`qt.stream` is the function)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)


@pytest.fixture
def lossless(tmp_path):
    path = tmp_path / "m.qtensors"
    qt.save_file(_model().state_dict(), path, lossless=True)
    with qt.safe_open(str(path)) as f:
        assert f.tensor_info("0.weight")["parts"]["data"].get("compression")  # compressed
    return path


class Concurrent:
    """Wraps `stream.read_host`: the first `n` reads wait for each other (a barrier), so that
    reads made one at a time fail (after the barrier's timeout) instead of passing; records the
    read mode of each read."""

    def __init__(self, monkeypatch, n: int = 2) -> None:
        self.barrier = threading.Barrier(n, timeout=60)
        self.lock = threading.Lock()
        self.waiting = n
        self.modes: list[str] = []
        self.names: list[str] = []
        orig = S.read_host

        def read(e, verify, stop=None):
            with self.lock:
                self.modes.append(e.reader.mode)
                self.names.append(e.name)
                wait = self.waiting > 0
                self.waiting -= 1
            if wait:
                self.barrier.wait()
            return orig(e, verify, stop)

        monkeypatch.setattr(S, "read_host", read)


def _auto_mode(path) -> str:
    """What mode "auto" becomes on this file system ("pread" where O_DIRECT is refused)."""
    return _core.StreamReader(str(path), mode="auto", threads=1, chunk_size=1 << 20).mode


def test_load_model_on_the_cpu_reads_like_the_stream(lossless, monkeypatch):
    reads = Concurrent(monkeypatch)
    with qtt.init_empty_weights():
        model = _model()
    res = qtt.load_model(model, lossless, device="cpu")
    assert not res.missing_keys and not res.unexpected_keys
    want = qt.load_file(lossless, framework="pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int16), want[k].view(torch.int16)), k
    assert sorted(reads.names) == sorted(want)  # every tensor once, through read_host
    assert set(reads.modes) == {_auto_mode(lossless)}
    assert res.bytes_read == sum(v.numel() * v.element_size() for v in want.values())


def test_offload_on_the_cpu_reads_a_units_tensors_at_once(lossless, monkeypatch):
    ref = _model()
    ref.load_state_dict(qt.load_file(lossless, framework="pt"))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = ref(x)
    reads = Concurrent(monkeypatch)  # a Linear's weight and bias: read together
    with qtt.init_empty_weights():
        model = _model()
    model = offload(model, lossless, device="cpu")
    for _ in range(2):  # the second pass from the prefetched (concurrent) loads
        assert torch.equal(model(x), want)
    assert set(reads.modes) == {_auto_mode(lossless)}
    assert model.qtensors_offload.stats()["loads"] == 4
    model.qtensors_offload.remove()


def test_read_host_ahead_keeps_order_and_stops_cleanly(lossless):
    entries = list(S.open_entries(lossless, mode="auto").values())
    got = [e.name for e, _ in S.read_host_ahead(entries, verify=True, readers=3)]
    assert got == [e.name for e in entries]
    it = S.read_host_ahead(entries, readers=2)
    next(it)
    it.close()  # waits for the reads in flight; nothing left running
    assert not [t for t in threading.enumerate() if t.name.startswith("qtensors-read")]
