"""The cached Triton launcher (kernels/fastlaunch.py): reuse only for arguments that Triton
would specialize the same way, Triton's own path otherwise."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from qtensors.torch.kernels import fastlaunch


class FakeCompiled:
    def __init__(self, log):
        self.log = log
        self.function, self.packed_metadata = "fn", "packed"

    def _init_handles(self):
        pass

    def run(self, *a):
        self.log.append(("direct", a))


class FakeKernel:
    arg_names = ("x", "n", "BLOCK")

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.log.append(("jit", grid, args, meta))
            return FakeCompiled(self.log)

        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(fastlaunch, "_ENABLED", True)
    monkeypatch.setattr(fastlaunch, "_LAUNCHERS", {})
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)


def test_reuses_the_launcher_only_for_the_same_specialization(fast):
    k = FakeKernel()
    buf = torch.zeros(64, dtype=torch.float32)
    meta = {"BLOCK": 32, "num_warps": 4}
    key = tuple(sorted(meta.items()))
    fastlaunch.launch(k, (3, 2), (buf, 48), meta, key, 0)
    fastlaunch.launch(k, (3, 2), (buf, 96), meta, key, 0)  # 96: also a multiple of 16
    assert [e[0] for e in k.log] == ["jit", "direct"]
    grid_stream = k.log[1][1][:4]
    assert grid_stream == (3, 2, 1, 1234)
    # the constexpr is passed after the runtime arguments, as the compiled launcher expects
    assert k.log[1][1][-3:] == (buf, 96, 32)
    fastlaunch.launch(k, (3, 2), (buf, 50), meta, key, 0)  # not a multiple of 16: recompiles
    fastlaunch.launch(k, (3, 2), (buf, 1), meta, key, 0)  # 1: its own specialization
    fastlaunch.launch(k, (3, 2), (buf[1:], 48), meta, key, 0)  # misaligned pointer
    assert [e[0] for e in k.log] == ["jit", "direct", "jit", "jit", "jit"]
    other = {"BLOCK": 64, "num_warps": 4}
    fastlaunch.launch(k, (1,), (buf, 48), other, tuple(sorted(other.items())), 0)
    assert k.log[-1][0] == "jit"


def test_hooks_and_unknown_compiled_kernels_take_tritons_path(fast, monkeypatch):
    k = FakeKernel()
    buf = torch.zeros(16)
    meta = {"BLOCK": 32}
    key = tuple(meta.items())
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: False)
    for _ in range(2):
        fastlaunch.launch(k, (1,), (buf, 16), meta, key, 0)
    assert [e[0] for e in k.log] == ["jit", "jit"]
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: True)
    monkeypatch.setattr(FakeCompiled, "_init_handles", property(lambda self: None))
    fastlaunch.launch(k, (1,), (buf, 16), meta, key, 0)  # not callable: TypeError, disabled
    assert fastlaunch._ENABLED is False
    fastlaunch.launch(k, (1,), (buf, 16), meta, key, 0)
    assert [e[0] for e in k.log] == ["jit"] * 4
