"""The warp-specialized Gluon kernel of 65-256 rows (``kernels/gemm16_gluon.py``) where a CPU can
check it: Triton's interpreter does not run Gluon, so the kernel is compiled for sm_90 on the CPU
for each kind of configuration the route takes, and its SASS is checked for what the design
needs (no spills, a ``wgmma`` kept in flight across steps, the partitions' register budgets);
its plan and routing in Python. Its results are checked on the GPU by ``benches/check_gemm16.py``
(``benches/results/gpu_gemm16_ws_h200.txt``)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import sm90_sass

triton = pytest.importorskip("triton")
from qtensors.torch.kernels import gemm16_gluon as G  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

needs_gluon = pytest.mark.skipif(not G.HAVE_GEMM16, reason="this Triton has no Gluon (3.5+)")


def _compile(cfg: L.Gemm16Config, enc: str = "affine"):
    """``gemm16_kernel`` for sm_90 with ``cfg``'s constexprs (K = 4096, bf16, fp16 scales)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    M, N, K = 256, 4096, 4096
    _, meta, _ = L._gemm16_plan(M, N, K, enc, 64, True, cfg)
    options = {k: meta.pop(k) for k in ("num_warps", "enable_fp_fusion")}
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    words = torch.zeros(N, K // 8, dtype=torch.int32)
    TD = G.TensorDescriptor
    descs = dict(
        x_desc=TD(x, [M, K], [K, 1], [cfg.block_m, 64], meta["X_SL"]),
        c_desc=TD(words, [N, K // 8], [K // 8, 1], [cfg.block_n, 8], meta["C_SL"]),
    )
    ptrs = dict(scales_ptr="*fp16", mins_ptr="*fp16", bias_ptr="*bf16", out_ptr="*bf16",
                ws_ptr="*fp32", lock_ptr="*i32")  # fmt: skip
    fn = G.gemm16_kernel
    sig = {}
    for p in fn.arg_names:
        sig[p] = "constexpr" if p in meta else (mangle_type(descs[p]) if p in descs else
                                                ptrs.get(p, "i32"))  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.arg_names)
             if p.endswith("_ptr") or p in ("K", "G", "stride_om")}  # fmt: skip
    src = GluonASTSource(fn=fn, signature=sig, constexprs=meta, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_sass = sm90_sass


#: one of each kind the table routes: two decoder groups with split K, one group on 256 x 128
#: tiles, one warpgroup of wgmma warps on 128 x 128
KINDS = [
    L.Gemm16Config(split_k=2),
    L.Gemm16Config(256, 128, 8, w_ring=3, decode_regs=128, decode_groups=1),
    L.Gemm16Config(128, 128, 4, decode_regs=104),
]


@needs_gluon
@pytest.mark.parametrize("cfg", KINDS, ids=["256x64-2groups-split", "256x128", "128x128"])
def test_compiles_for_sm90_as_designed(cfg):
    k = _compile(cfg)
    sass = _sass(k)
    assert "HGMMA" in sass  # the products are wgmma
    assert "STL" not in sass and "LDL" not in sass  # no register spills to local memory
    # one product in flight while the next is issued (a serialized wgmma waits for 0)
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    # the partitions' register budgets: the decoders' as asked, and the wgmma warps (the
    # largest) room for their fp32 accumulator and more
    budgets = [int(r, 16) for r in re.findall(r"USETMAXREG\.\w+\.CTAPOOL (?:UP0, )?0x(\w+)", sass)]
    assert cfg.decode_regs in budgets
    assert max(budgets) >= cfg.block_m * cfg.block_n // (32 * cfg.num_warps) + 32
    assert k.metadata.shared <= 227 * 1024  # one CTA's shared memory fits an sm_90 SM


@needs_gluon
def test_symmetric_compiles():
    assert "HGMMA" in _sass(_compile(KINDS[0], "symmetric"))


@needs_gluon
def test_layouts_refuse_what_the_kernel_cannot_tile():
    with pytest.raises(ValueError, match="rows"):
        G.layouts(96, 64, 4, 4)  # 96 rows over one warpgroup of 16-row warps
    with pytest.raises(ValueError, match="rows"):
        G.layouts(128, 64, 6, 4)  # not whole warpgroups
    with pytest.raises(ValueError, match="features"):
        G.layouts(256, 40, 8, 4)  # 4 decoder warps take rows 16 at a time
    with pytest.raises(ValueError, match="features"):
        G.layouts(256, 512, 8, 4)


@needs_gluon
def test_plan_grid_and_split():
    cfg = L.Gemm16Config(split_k=2)
    grid, meta, key = L._gemm16_plan(300, 1000, 4096, "symmetric", 128, False, cfg)
    assert grid == (2 * 16, 2)  # ceil(300 / 256) x ceil(1000 / 64) tiles, 2 K slices
    assert meta["ENC"] == 1 and meta["GS"] == 128 and meta["SPLIT_K"] == 2
    assert meta["DECODE_GROUPS"] == 2 and meta["enable_fp_fusion"] is True
    assert hash(key) == hash(L._gemm16_plan(300, 1000, 4096, "symmetric", 128, False, cfg)[2])


def test_split_gives_every_slice_a_step():
    """A K slice with no step would hang its program (the partitions wait for tiles that never
    come): the split asked is cut to what K has."""
    assert L.gemm16_split(4096, 2) == (2, 32)
    assert L.gemm16_split(9 * 64, 2) == (2, 5)  # 5 + 4 steps
    assert L.gemm16_split(9 * 64, 4) == (3, 3)  # 4 slices of ceil(9 / 4) = 3: the 4th empty
    assert L.gemm16_split(64, 2) == (1, 1) and L.gemm16_split(0, 2) == (1, 0)
    for steps in range(1, 40):
        for split in range(1, 9):
            n, per = L.gemm16_split(steps * 64, split)
            assert 1 <= n <= split and (n - 1) * per < steps <= n * per


def test_table_rows_and_weights():
    """The table's keys are (rows bucket, N, K) of weights the kernel takes, its configs valid."""
    for (bucket, N, K), cfg in L.GEMM16_TABLE.items():
        assert bucket in (128, 256)
        assert L.gemm16_shape(N, K, "affine", 4, 64, 1)
        assert cfg.decode_groups in (1, 2) and (cfg.decode_groups == 1 or cfg.w_ring % 2 == 0)
        assert cfg.decode_groups == 1 or cfg.stages % 2 == 0  # each ring's slots one group's
        if G.HAVE_GEMM16:
            G.layouts(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.decode_warps)


def test_linear_takes_gemm16_where_it_applies(monkeypatch):
    """``linear_cuda`` on the "gemm16" route: the tensors ``gemm16_applies`` refuses (here: not
    on an sm_90 device) take decode + ``F.linear``, with its result; where it applies, the call
    hands gemm16_linear the rows flattened and the weight's parts, and reshapes its output."""
    from qtensors.torch import linear as lin

    torch.manual_seed(0)
    N, K, g = 64, 256, 64
    codes = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8)
    scales = torch.rand(N, K // g, dtype=torch.float16) * 0.1
    mins = -torch.rand(N, K // g, dtype=torch.float16) * 0.5
    args = (codes, scales, mins, None, [N, K], "affine", 4, g, 1)
    x = torch.randn(2, 50, K, dtype=torch.bfloat16)  # 100 rows
    monkeypatch.setattr(L, "route", lambda *a: "gemm16")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA
    want = lin.linear_dequantize(x, *args)
    assert torch.equal(lin.linear_cuda(x, *args), want)  # refused: decode + F.linear

    seen = []

    def fake(x2, c, s, m, bias, n, k, encoding, group_size):
        seen.append((x2.shape, c.data_ptr(), s.numel(), m.numel(), n, k, encoding, group_size))
        return torch.full((x2.shape[0], n), 3.0, dtype=x2.dtype)

    monkeypatch.setattr(L, "gemm16_applies", lambda *a: True)
    monkeypatch.setattr(L, "gemm16_linear", fake)
    monkeypatch.setitem(L.GEMM16_TABLE, (128, N, K), L.Gemm16Config())
    got = lin.linear_cuda(x, *args)
    assert got.shape == (2, 50, N) and bool((got == 3).all())
    assert seen == [((100, K), codes.data_ptr(), N * K // g, N * K // g, N, K, "affine", g)]

    # a weight of GEMM16_REGS_TABLE takes gemm16_regs_linear with the table's configuration
    # where it applies (sm_90), else gemm16_linear if GEMM16_TABLE has it too, else decode
    cfg = L.Gemm16RegsConfig(64, 3, split_k=2)
    monkeypatch.setitem(L.GEMM16_REGS_TABLE, (128, N, K), cfg)
    monkeypatch.setattr(L, "gemm16_regs_applies", lambda *a: True)
    configs = []
    monkeypatch.setattr(L, "gemm16_regs_linear", lambda *a: configs.append(a[-1]) or fake(*a[:-1]))
    got = lin.linear_cuda(x, *args)
    assert got.shape == (2, 50, N) and bool((got == 3).all()) and configs == [cfg]
    monkeypatch.setattr(L, "gemm16_regs_applies", lambda *a: False)
    seen.clear()
    assert bool((lin.linear_cuda(x, *args) == 3).all()) and seen[0][0] == (100, K)
    assert configs == [cfg]  # (not called again)
    monkeypatch.delitem(L.GEMM16_TABLE, (128, N, K))
    seen.clear()
    assert torch.equal(lin.linear_cuda(x, *args), want) and seen == [] and configs == [cfg]


def test_use_gemm16_switches_the_route():
    """``use_gemm16()``: on by default; switched off and on, its cached routes dropped both
    ways."""
    assert L.GEMM16_ROWS == L.GEMM16_ROWS_ON
    try:
        assert L.route(256, 8192, 8192, "affine", 4, 64, 1, True, True) == "gemm16"
        L.use_gemm16(False)
        assert L.route(256, 8192, 8192, "affine", 4, 64, 1, True, True) == "decode"
        L.use_gemm16()
        assert L.route(256, 8192, 8192, "affine", 4, 64, 1, True, True) == "gemm16"
    finally:
        L.use_gemm16()


@needs_gluon
def test_kept_launch_takes_new_rows(monkeypatch):
    """``Gemm16Kept``: a launch noted at 200 rows, called with 130, launches the same kernel
    with the new activations' descriptor, rows, grid and output; every other argument the noted
    one's. A launch that did not read the call's x is refused."""
    M, N, K = 200, 192, 512
    cfg = L.Gemm16Config(128, 64, 4, split_k=2)
    grid, meta, _ = L._gemm16_plan(M, N, K, "affine", 64, False, cfg)
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    TD = G.TensorDescriptor
    x_desc = TD(x, [M, K], [K, 1], [128, 64], meta["X_SL"])
    c_desc, scales, mins, ws, locks = object(), torch.ones(3), torch.ones(3), object(), object()
    args = (x_desc, c_desc, scales, mins, scales, out, ws, locks, M, N, K, K // 64, N, 4)
    calls = []

    def run(*a):
        calls.append(a)

    hit = (run, "function", "packed", ("tail",))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    kept = L.Gemm16Kept([(hit, grid, args, 0)], x, out, None)
    assert grid == (2 * 3, 2) and kept.col_tiles == 3 and kept.split == 2

    x2 = torch.ones(130, K, dtype=torch.bfloat16)
    got = kept(x2)
    assert got.shape == (130, N) and got.dtype == torch.bfloat16
    (a,) = calls
    assert a[:9] == (2 * 3, 2, 1, 7, "function", "packed", None, None, None)
    launched = a[9:]
    assert launched[-1] == "tail" and len(launched) == len(args) + 1
    d = launched[0]
    assert isinstance(d, TD) and d.base is x2 and list(d.shape) == [130, K]
    assert list(d.block_shape) == [128, 64] and d.layout == meta["X_SL"]
    assert launched[5] is got and launched[8] == 130
    for i in (1, 2, 3, 4, 6, 7, 9, 10, 11, 12, 13):
        assert launched[i] is args[i]
    # (a split of 1 passes the output as the workspace too: both replaced)
    args1 = (x_desc, c_desc, scales, mins, scales, out, out, locks, M, N, K, K // 64, N, 64)
    kept1 = L.Gemm16Kept([(hit, (6, 1, 1), args1, 0)], x, out, None)
    got1 = kept1(x2)
    assert calls[-1][9 + 5] is got1 and calls[-1][9 + 6] is got1
    with pytest.raises(ValueError, match="activations"):
        L.Gemm16Kept([(hit, grid, args, 0)], x.clone(), out, None)
    with pytest.raises(ValueError, match="launches"):
        L.Gemm16Kept([(hit, grid, args, 0)] * 2, x, out, None)
    assert L.gemm16_rows(65) == L.gemm16_rows(128) == 128


@needs_gluon
def test_kept_launch_holds_no_call_tensor(monkeypatch):
    """``Gemm16Kept`` keeps none of its first call's x, x's descriptor or output, through the
    launcher's own call or Triton 3.6's C launch with the descriptors expanded once: under
    ``torch.compile(mode="reduce-overhead")`` that call runs in the CUDA graphs' pool, which
    refuses to record while one of its tensors is alive outside the function ("Detected 5
    tensor(s) in the cudagraph pool not tracked as outputs", on the H200 when the route was
    first on by default)."""
    import gc
    import weakref

    M, N, K = 200, 192, 512
    cfg = L.Gemm16Config(128, 64, 4, split_k=1)
    grid, meta, _ = L._gemm16_plan(M, N, K, "affine", 64, False, cfg)
    TD = G.TensorDescriptor

    def expand(a, m):  # a stand-in for Triton 3.6's: a descriptor as its base's address
        return [a.base.data_ptr()]

    launched = []

    def c_launch(*a):
        launched.append(a)

    def fake_expand(run, args, per_call):  # no descriptor but x's is expanded here
        where = {i: i for i in range(len(args))}
        return c_launch, False, False, list(args), where, {0: "meta"}, expand

    for direct in (False, True):
        if direct:
            monkeypatch.setattr(L.fastlaunch, "expand_descriptors", fake_expand)
        x = torch.zeros(M, K, dtype=torch.bfloat16)
        out = torch.empty(M, N, dtype=torch.bfloat16)
        x_desc = TD(x, [M, K], [K, 1], [128, 64], meta["X_SL"])
        scales = torch.ones(3)
        args = (x_desc, object(), scales, scales, scales, out, out, object(), M, N, K, 8, N, 8)
        hit = (lambda *a: None, "function", "packed", ())
        kept = L.Gemm16Kept([(hit, grid, args, 0)], x, out, None)
        assert (kept.direct is not None) == direct
        refs = [weakref.ref(t) for t in (x, out, x_desc)]
        del x, out, x_desc, args
        gc.collect()
        assert [r() for r in refs] == [None, None, None]
        if direct:  # the kept call still launches with the new x and output in place
            monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda d: 7, raising=False)
            x2 = torch.ones(130, K, dtype=torch.bfloat16)
            got = kept(x2)
            (a,) = launched
            assert a[13] == x2.data_ptr() and a[13 + 5] is got and a[13 + 6] is got
            assert a[13 + 8] == 130 and a[13 + 2] is scales
    assert L.gemm16_rows(129) == L.gemm16_rows(256) == 256 and L.gemm16_rows(300) == 384
