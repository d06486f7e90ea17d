"""Replays of a layer's launch (``fastlaunch.Replay``, kept by ``linear.linear_cuda``): the same
launcher called with the new activations and a fresh output, everything else as recorded; only
for calls whose one launch took x and the output themselves, and keyed by what the first call's
checks and routing depended on. The kernels are fakes: CUDA is not needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from qtensors.torch import linear as lin
from qtensors.torch.kernels import fastlaunch
from qtensors.torch.kernels import launch as L


class Launcher:
    """A compiled kernel's launcher: notes its arguments."""

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(fastlaunch, "_ENABLED", True)
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 77, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_replay_swaps_in_the_new_x_and_a_fresh_output(fast):
    k = Launcher()
    x = torch.randn(2, 3, 8)
    out = torch.empty(2, 3, 5)
    w = torch.zeros(40)
    args = (x.view(-1, 8), w, out.view(-1, 5), out.view(-1, 5), 6, 5, 8)
    rp = fastlaunch.Replay(((k.run, "fn", "meta", (16,)), (4, 2, 1), args, 0), x, out, None)
    x_new = torch.randn(2, 3, 8)
    got = rp(x_new)
    assert got.shape == (2, 3, 5) and got.dtype == out.dtype
    (call,) = k.calls
    assert call[:7] == (4, 2, 1, 77, "fn", "meta", None)
    passed = call[9:]
    # x and the output themselves where the first call passed their 2-D views: a launcher reads
    # only the address
    assert passed[0] is x_new
    assert passed[1] is w
    assert passed[2] is got and passed[3] is got
    assert passed[2].data_ptr() != out.data_ptr()  # fresh, not the recorded output
    assert passed[4:] == (6, 5, 8, 16)  # sizes as recorded, then the constexprs
    with pytest.raises(ValueError, match="x and output"):  # a launch on a copy of x
        fastlaunch.Replay(((k.run, "fn", "meta", ()), (1, 1, 1), (x.clone(), out), 0), x, out, None)
    wide = torch.empty(2, 3, 5, dtype=torch.float64)  # a replay allocates its output as x
    with pytest.raises(ValueError, match="x's dtype"):
        fastlaunch.Replay(((k.run, "fn", "meta", ()), (1, 1, 1), (x.view(-1, 8), wide.view(-1, 5)),
                           0), x, wide, None)  # fmt: skip


class FakeKernel:
    arg_names = ("x", "w", "out", "M", "BLOCK")

    @staticmethod
    def fn(x, w, out, M, BLOCK):  # the jitted function, as JITFunction.fn: its signature
        pass

    def __init__(self, launcher):
        self.launcher = launcher
        self.jit = 0

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit += 1
            fake = type("CK", (), {})()
            fake._init_handles = lambda: None
            fake.run, fake.function, fake.packed_metadata = self.launcher.run, "fn", "meta"
            return fake

        return call


def test_linear_cuda_keeps_one_replay_per_shape_and_setting(fast, monkeypatch):
    """Through linear_cuda on CPU tensors (the CUDA test faked): the first call of a shape
    compiles, the second notes its launch, the third and later replay it; another bias object,
    shape or INT8_ACTIVATIONS setting takes the full path again."""
    replayable = lambda x: x.is_contiguous() and fastlaunch.hooks_clear()  # noqa: E731
    monkeypatch.setattr(lin, "_replayable", replayable)
    monkeypatch.setattr(fastlaunch, "_LAUNCHERS", {})
    launcher = Launcher()
    kernel = FakeKernel(launcher)
    full = []

    def fake_tiled(x2, codes, scales, mins, bias, N, K, *rest, **kw):
        full.append(x2.shape)
        out = torch.empty(x2.shape[0], N, dtype=x2.dtype)
        fastlaunch.launch(kernel, (N, 1), (x2, codes, out, x2.shape[0]), {"BLOCK": 8}, (8,), 0)
        return out

    monkeypatch.setattr(L, "tiled_linear", fake_tiled)
    monkeypatch.setattr(L, "route", lambda *a: "tiled")
    codes = torch.zeros(16 * 64 // 2, dtype=torch.uint8)
    scales = torch.ones(16, dtype=torch.float16)
    mins = torch.zeros(16, dtype=torch.float16)
    weight = (codes, scales, mins)

    def call(x, bias=None):
        return lin.linear_cuda(x, *weight, bias, [16, 64], "affine", 4, 64, 1)

    xs = [torch.randn(1, 1, 64, dtype=torch.bfloat16) for _ in range(5)]
    for x in xs:
        assert call(x).shape == (1, 1, 16)
    assert kernel.jit == 1 and len(full) == 2  # compile, note; then three replays
    assert len(launcher.calls) == 4
    assert launcher.calls[-1][9].data_ptr() == xs[-1].data_ptr()
    call(torch.randn(2, 64, dtype=torch.bfloat16))  # another shape: the full path
    assert len(full) == 3 and kernel.jit == 2  # M = 2: its own specialization
    bias = torch.zeros(16, dtype=torch.bfloat16)
    call(xs[0], bias)
    assert len(full) == 4  # a bias the replay was not recorded with
    monkeypatch.setattr(L, "INT8_ACTIVATIONS", not L.INT8_ACTIVATIONS)
    call(xs[0])
    assert len(full) == 5
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: False)  # a profiler: Triton's path
    call(xs[0])
    assert len(full) == 6 and kernel.jit == 3


def test_a_call_without_its_own_launch_is_not_replayed(fast, monkeypatch):
    """Decode + F.linear launches a kernel that takes neither x nor the output: no replay."""
    monkeypatch.setattr(lin, "_replayable", lambda x: True)
    monkeypatch.setattr(fastlaunch, "_LAUNCHERS", {})
    launcher = Launcher()
    kernel = FakeKernel(launcher)
    full = []

    def fake_decode_path(x2, codes, *rest, **kw):
        full.append(1)
        fastlaunch.launch(kernel, (1,), (codes, codes, codes, 1), {"BLOCK": 8}, (8,), 0)
        return torch.zeros(x2.shape[0], 16, dtype=x2.dtype)

    monkeypatch.setattr(L, "tiled_linear", fake_decode_path)
    monkeypatch.setattr(L, "route", lambda *a: "tiled")
    codes = torch.zeros(16 * 64 // 2, dtype=torch.uint8)
    weight = (codes, torch.ones(16, dtype=torch.float16), torch.zeros(16, dtype=torch.float16))
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    for _ in range(lin.REPLAY_TRIES + 2):
        lin.linear_cuda(x, *weight, None, [16, 64], "affine", 4, 64, 1)
    assert len(full) == lin.REPLAY_TRIES + 2
    # how many calls noted no replayable launch: after REPLAY_TRIES, the shape is not tried again
    assert list(codes._qt_cuda_plan.replays.values()) == [lin.REPLAY_TRIES]


def test_a_chain_of_launches_replays_in_order(fast):
    """The int8 tensor-core path's two launches (x -> kept workspace, workspace -> out) replay
    as a chain, each with its own arguments swapped; a chain whose first launch does not read x
    or whose last does not write the output is refused."""
    pre, main = Launcher(), Launcher()
    x = torch.randn(3, 8)
    out = torch.empty(3, 5)
    ws = torch.zeros(3, 8, dtype=torch.int8)
    w = torch.zeros(20)
    chain = [
        ((pre.run, "pre", "m1", ()), (3, 1, 1), (x, ws, 3), 0),
        ((main.run, "mm", "m2", (64,)), (2, 1, 1), (ws, w, out, 3), 0),
    ]
    rp = fastlaunch.Replay(chain, x, out, None)
    x_new = torch.randn(3, 8)
    got = rp(x_new)
    (p_call,), (m_call,) = pre.calls, main.calls
    assert p_call[:5] == (3, 1, 1, 77, "pre") and m_call[:5] == (2, 1, 1, 77, "mm")
    assert p_call[9].data_ptr() == x_new.data_ptr() and p_call[10] is ws
    assert m_call[9] is ws and m_call[10] is w and m_call[11].data_ptr() == got.data_ptr()
    assert m_call[12:] == (3, 64)
    with pytest.raises(ValueError, match="x and output"):  # reversed: x read last
        fastlaunch.Replay(chain[::-1], x, out, None)
    with pytest.raises(ValueError, match="x and output"):  # the output written by no launch
        fastlaunch.Replay(chain[:1], x, out, None)


def test_linear_cuda_replays_a_two_launch_path(fast, monkeypatch):
    """A path of two launches (x -> kept workspace -> output, as mma_int8's pre-pass and
    matmul) is noted as a chain from its second call on and replayed in order after."""
    monkeypatch.setattr(lin, "_replayable", lambda x: x.is_contiguous())
    monkeypatch.setattr(fastlaunch, "_LAUNCHERS", {})
    pre_l, mm_l = Launcher(), Launcher()
    pre_k, mm_k = FakeKernel(pre_l), FakeKernel(mm_l)
    ws = torch.zeros(1, 64, dtype=torch.int8)
    full = []

    def fake_two(x2, codes, scales, mins, bias, N, K, *rest, **kw):
        full.append(1)
        out = torch.empty(x2.shape[0], N, dtype=x2.dtype)
        fastlaunch.launch(pre_k, (1,), (x2, ws, ws, x2.shape[0]), {"BLOCK": 8}, (8,), 0)
        fastlaunch.launch(mm_k, (N,), (ws, codes, out, x2.shape[0]), {"BLOCK": 8}, (8,), 0)
        return out

    monkeypatch.setattr(L, "tiled_linear", fake_two)
    monkeypatch.setattr(L, "route", lambda *a: "tiled")
    codes = torch.zeros(16 * 64 // 2, dtype=torch.uint8)
    weight = (codes, torch.ones(16, dtype=torch.float16), torch.zeros(16, dtype=torch.float16))
    xs = [torch.randn(1, 64, dtype=torch.bfloat16) for _ in range(4)]
    outs = [lin.linear_cuda(x, *weight, None, [16, 64], "affine", 4, 64, 1) for x in xs]
    assert len(full) == 2  # compile, note the chain; then two replays of it
    assert len(pre_l.calls) == len(mm_l.calls) == 3
    assert pre_l.calls[-1][9].data_ptr() == xs[-1].data_ptr() and pre_l.calls[-1][10] is ws
    assert mm_l.calls[-1][9] is ws and mm_l.calls[-1][11].data_ptr() == outs[-1].data_ptr()


class CudaLauncher:
    """A stand-in for Triton 3.6's launcher of the same name: its ``__call__`` uses the same
    names in the same way (scratch memory, then ``self.launch`` with the cooperative and PDL
    flags and the two scratch pointers before the arguments), so ``direct_launch`` takes it."""

    def __init__(self, scratch: int = 0):
        self.global_scratch_size = scratch
        self.global_scratch_align = 1
        self.profile_scratch_size = 0
        self.profile_scratch_align = 1
        self.launch_cooperative_grid = 0
        self.launch_pdl = 0
        self.calls = []
        self.launch = lambda *a: self.calls.append(a)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        def allocate_scratch(size, align, allocator):
            return None if size == 0 else ("scratch", size, align, allocator)

        global_scratch = allocate_scratch(
            self.global_scratch_size, self.global_scratch_align, _allocation._allocator
        )
        profile_scratch = allocate_scratch(
            self.profile_scratch_size, self.profile_scratch_align, _allocation._profile_allocator
        )
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid,
                    self.launch_pdl, global_scratch, profile_scratch, *args)  # fmt: skip


class _allocation:  # the module name the stand-in's __call__ reads
    _allocator = "alloc"
    _profile_allocator = "profile"


def test_direct_launch_matches_the_launchers_own_call(fast):
    """A replay calls the known launcher's ``launch`` itself, with exactly the arguments the
    launcher's ``__call__`` would pass; a launcher needing scratch memory, or any other
    launcher, is called as before."""
    launcher = CudaLauncher()
    assert fastlaunch.direct_launch(launcher) == (launcher.launch, 0, 0)
    assert fastlaunch.direct_launch(CudaLauncher(scratch=64)) is None
    assert fastlaunch.direct_launch(Launcher()) is None  # another class: its own call
    x = torch.randn(2, 8)
    out = torch.empty(2, 5)
    w = torch.zeros(40)
    args = (x, w, out, 2, 5, 8)
    rp = fastlaunch.Replay(((launcher, "fn", "meta", (16,)), (4, 2, 1), args, 0), x, out, None)
    x_new = torch.randn(2, 8)
    got = rp(x_new)
    (direct,) = launcher.calls
    launcher.calls.clear()
    launcher(4, 2, 1, 77, "fn", "meta", None, None, None, x_new, w, got, 2, 5, 8, 16)
    (own,) = launcher.calls
    assert direct == own


def test_refill_launches_into_a_fresh_output(fast):
    """``fastlaunch.Refill``: the recorded launch again, a new output of the recorded shape and
    dtype at the output's positions, every other argument as recorded."""
    k = Launcher()
    codes, scales = torch.zeros(40, dtype=torch.uint8), torch.ones(4)
    out = torch.empty(8, 10, dtype=torch.bfloat16)
    args = (codes, scales, out, 8, 10)
    rf = fastlaunch.Refill(((k.run, "fn", "meta", (64,)), (3, 1, 1), args, 0), out)
    got = rf()
    assert got.shape == (8, 10) and got.dtype == torch.bfloat16
    assert got.data_ptr() != out.data_ptr()
    (call,) = k.calls
    assert call[:7] == (3, 1, 1, 77, "fn", "meta", None)
    passed = call[9:]
    assert passed[0] is codes and passed[1] is scales and passed[2] is got
    assert passed[3:] == (8, 10, 64)
    with pytest.raises(ValueError, match="did not write"):  # the launch wrote another tensor
        fastlaunch.Refill(((k.run, "fn", "meta", ()), (1, 1, 1), (codes, out.clone()), 0), out)


def test_decode_route_keeps_its_decode_launch(fast, monkeypatch):
    """Decode + F.linear (rows past the fused kernels, a prefill): the first decode of a weight
    in a dtype compiles, the second notes its launch, later ones launch it into a fresh weight
    whatever the number of rows; results equal ``x @ W^T`` each time. A CUDA graph capture, a
    profiler's hooks or another dtype take the full path."""
    monkeypatch.setattr(fastlaunch, "_LAUNCHERS", {})
    torch.manual_seed(0)
    W = torch.randn(16, 64).to(torch.bfloat16)

    class Writer(Launcher):  # a decode kernel: writes the weight into its output argument
        def run(self, *a):
            super().run(*a)
            out = next(t for t in a[9:] if isinstance(t, torch.Tensor) and t.shape == W.shape)
            out.copy_(W.to(out.dtype))

    launcher = Writer()
    kernel = FakeKernel(launcher)
    full = []

    def fake_dequantize(codes, scales, mins, shape, *rest):
        full.append(rest[-1])
        out = torch.empty(shape, dtype=rest[-1])
        jit = kernel.jit
        fastlaunch.launch(kernel, (4,), (codes, scales, out, 16), {"BLOCK": 8}, (8,), 0)
        if kernel.jit > jit:  # Triton's own path ran it: write as the kernel would
            out.copy_(W.to(out.dtype))
        return out

    monkeypatch.setattr(lin, "dequantize", fake_dequantize)
    monkeypatch.setattr(L, "route", lambda *a: "decode")
    codes = torch.zeros(16 * 64 // 2, dtype=torch.uint8)
    weight = (codes, torch.ones(16, dtype=torch.float16), torch.zeros(16, dtype=torch.float16))

    def call(x, parts=weight):
        got = lin.linear_cuda(x, *parts, None, [16, 64], "affine", 4, 64, 1)
        torch.testing.assert_close(got, F.linear(x, W.to(x.dtype)), rtol=0, atol=0)

    for rows in (100, 300, 77, 512):  # prompt lengths past the replays' 64 rows
        call(torch.randn(rows, 64, dtype=torch.bfloat16))
    assert len(full) == 2 and kernel.jit == 1  # compile, note; then two refills
    assert len(launcher.calls) == 3
    call(torch.randn(70, 64, dtype=torch.float16))
    assert full[-1] == torch.float16 and len(full) == 3  # another dtype: its own
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    call(torch.randn(90, 64, dtype=torch.bfloat16))
    assert len(full) == 4  # inside a graph capture: the full path
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: False)  # a profiler
    call(torch.randn(90, 64, dtype=torch.bfloat16))
    assert len(full) == 5
    # scales given as a strided view: the decode would read a copy, so nothing is kept
    monkeypatch.setattr(fastlaunch, "_no_hooks", lambda: True)
    strided = (weight[0], torch.ones(32, dtype=torch.float16)[::2], weight[2])
    for _ in range(4):
        call(torch.randn(80, 64, dtype=torch.bfloat16), strided)
    assert len(full) == 9 and not strided[0]._qt_cuda_plan.refills


# -- a launcher whose launch expands tensor descriptors (Triton 3.6's wrap_handle_tensordesc) ----
_BASE_ARGS_FORMAT_LEN = 13  # read by the stand-in's inner, as Triton's module global


def make_tensordesc_arg(arg, metadata):
    """Stand-in of Triton's: the descriptor as its tensor map (here a tuple naming what the
    real one encodes), shape and strides."""
    m = ("map", arg.base.data_ptr(), tuple(arg.shape), tuple(arg.strides), metadata["swizzle"])
    return [m, *arg.shape, *arg.strides]


def wrap_handle_tensordesc(launcher, tensordesc_indices, tensordesc_meta):
    """Stand-in of Triton 3.6's: the same closure names, expanding each descriptor argument."""

    def inner(*args):
        final_args = list(args[:_BASE_ARGS_FORMAT_LEN])
        tensordesc_idx = 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx]))
                tensordesc_idx += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b, strict=True)
    )


def test_gemm16_kept_launch_expands_the_codes_descriptor_once(fast):
    """``launch.Gemm16Kept`` with a launcher whose launch expands descriptors: it calls the C
    launch itself, the codes' descriptor expanded when kept, and passes exactly what the
    launcher's own call passes for the new rows (x's descriptor, rows, grid, output)."""
    G = pytest.importorskip("qtensors.torch.kernels.gemm16_gluon")
    if not G.HAVE_GEMM16:
        pytest.skip("this Triton has no Gluon")
    M, N, K = 200, 192, 512
    cfg = L.Gemm16Config(128, 64, 4, split_k=2)
    grid, meta, _ = L._gemm16_plan(M, N, K, "affine", 64, False, cfg)
    c_calls = []
    launcher = CudaLauncher()
    launcher.launch = wrap_handle_tensordesc(
        lambda *a: c_calls.append(a), {0, 1}, [{"swizzle": 128}, {"swizzle": 32}]
    )
    TD = G.TensorDescriptor
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    words = torch.zeros(N, K // 8, dtype=torch.int32)
    c_desc = TD(words, [N, K // 8], [K // 8, 1], [64, 8], meta["C_SL"])
    x_desc = TD(x, [M, K], [K, 1], [128, 64], meta["X_SL"])
    s, ws, locks = torch.ones(3), torch.zeros(4), torch.zeros(2, dtype=torch.int32)
    args = (x_desc, c_desc, s, s, s, out, ws, locks, M, N, K, K // 64, N, 4)
    tail = (0, 64, False)
    kept = L.Gemm16Kept([((launcher, "fn", "packed", tail), grid, args, 0)], x, out, None)
    assert kept.direct is not None

    x2 = torch.randn(130, K).to(torch.bfloat16)
    got = kept(x2)
    direct = c_calls.pop()
    own_args = list(args)
    own_args[0] = TD(x2, [130, K], [K, 1], [128, 64], meta["X_SL"])
    own_args[5], own_args[8] = got, 130
    launcher(6, 2, 1, 77, "fn", "packed", None, None, None, *own_args, *tail)
    own = c_calls.pop()
    assert _same(direct, own)
    assert direct[:3] == (6, 2, 1) and direct[13][1] == x2.data_ptr() and direct[14] == 130


class _Desc:
    """What the stand-in ``make_tensordesc_arg`` reads of a tensor descriptor."""

    def __init__(self, base: torch.Tensor) -> None:
        self.base, self.shape, self.strides = base, list(base.shape), list(base.stride())


def test_replay_expands_a_fixed_descriptor_once(fast, monkeypatch):
    """A replay of a launch taking the weight's codes as a tensor descriptor (the W4A8 Gluon
    kernel's TMA ring) calls the C launch with the descriptor expanded when the replay was
    kept, and passes exactly what the launcher's own call passes for the new x and output; the
    descriptor stays referenced by the replay. A descriptor of x itself is not expanded ahead."""
    expanded = []
    real = make_tensordesc_arg

    def counting(arg, metadata):
        expanded.append(arg)
        return real(arg, metadata)

    monkeypatch.setitem(wrap_handle_tensordesc.__globals__, "make_tensordesc_arg", counting)
    c_calls = []
    launcher = CudaLauncher()
    launcher.launch = wrap_handle_tensordesc(lambda *a: c_calls.append(a), {1}, [{"swizzle": 64}])
    x = torch.randn(16, 8)
    out = torch.empty(16, 5)
    codes = _Desc(torch.zeros(5, 4, dtype=torch.int32))
    args = (x, codes, torch.ones(3), out, 16, 5, 8)
    rp = fastlaunch.Replay(((launcher, "fn", "packed", (64,)), (4, 2, 1), args, 0), x, out, None)
    assert len(expanded) == 1 and codes in rp.held
    x_new = torch.randn(16, 8)
    got = rp(x_new)
    got2 = rp(torch.randn(16, 8))
    assert len(expanded) == 1  # once, when kept
    direct = c_calls[0]
    c_calls.clear()
    launcher(4, 2, 1, 77, "fn", "packed", None, None, None, x_new, codes, args[2], got, 16, 5,
             8, 64)  # fmt: skip
    (own,) = c_calls
    assert _same(direct, own)
    assert got2 is not got
    # a launch whose x is the descriptor (swapped per call) is not expanded ahead, nor one of
    # a launcher this module does not know
    args2 = [_Desc(x), torch.ones(3), out, 16]
    assert fastlaunch._expanded(launcher, args2, (1,)) is None
    assert fastlaunch._expanded(Launcher().run, args2, ()) is None
