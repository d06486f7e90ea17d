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

    @staticmethod
    def fn(x, n, BLOCK):  # the jitted function, as JITFunction.fn: its signature
        pass

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


class DefaultedKernel(FakeKernel):
    arg_names = ("x", "n", "BLOCK", "FLAG")

    @staticmethod
    def fn(x, n, BLOCK, FLAG=False):
        pass


def test_a_constexpr_left_to_its_default_keeps_the_fast_path(fast):
    """A constexpr the caller leaves out of ``meta`` (its default applies, as in Triton's own
    call) is passed as its default: the launcher is kept and the module stays on. (A KeyError
    here used to turn the fast path and every replay off for the process.)"""
    k = DefaultedKernel()
    buf = torch.zeros(16)
    meta = {"BLOCK": 32}
    key = tuple(meta.items())
    fastlaunch.launch(k, (1,), (buf, 16), meta, key, 0)
    fastlaunch.launch(k, (1,), (buf, 16), meta, key, 0)
    assert [e[0] for e in k.log] == ["jit", "direct"] and fastlaunch._ENABLED
    assert k.log[1][1][-4:] == (buf, 16, 32, False)


def test_constexpr_tail_of_the_int8_prepass():
    """The W4A8 pre-pass's plans leave ``DUP`` / ``BLOCKED`` out where they are off: the tail
    takes their defaults, in the kernel's order."""
    from qtensors.torch.kernels import launch as L
    from qtensors.torch.kernels.mma_int8 import quantize_kernel

    for enc, g in (("affine", 64), ("nf4", 64), ("mxfp4", 32), ("nvfp4", 16)):
        quant = L._mma_int8_plan.__wrapped__(16, 256, 256, enc, g, False, -1, None, True, True)[1]
        meta = quant[1]
        tail = fastlaunch.constexpr_tail(quantize_kernel, meta, 8)
        names = quantize_kernel.arg_names[8:]
        assert len(tail) == len(names)
        want = {"DUP": False, "BLOCKED": False, **meta}
        assert tail == tuple(want[n] for n in names)
    with pytest.raises(TypeError, match="GS"):
        fastlaunch.constexpr_tail(quantize_kernel, {}, 8)


def test_a_kernel_whose_parameters_cannot_be_read_keeps_only_itself_off(fast):
    """A kernel whose signature does not name a parameter ``meta`` leaves out takes Triton's
    path on every call; the module stays on for the others."""

    class Opaque(DefaultedKernel):  # FLAG: not in meta, and no default to read
        @staticmethod
        def fn(*args, **kwargs):
            pass

    k, ok = Opaque(), FakeKernel()
    buf = torch.zeros(16)
    meta = {"BLOCK": 32}
    key = tuple(meta.items())
    for kern in (k, k, ok, ok):
        fastlaunch.launch(kern, (1,), (buf, 16), meta, key, 0)
    assert [e[0] for e in k.log] == ["jit", "jit"]
    assert [e[0] for e in ok.log] == ["jit", "direct"] and fastlaunch._ENABLED
