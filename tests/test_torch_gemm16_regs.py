"""The Gluon kernel that decodes the weight into the ``wgmma``'s register operand
(``kernels/gemm16_regs_gluon.py``) where a CPU can check it: Triton's interpreter does not run
Gluon, so the kernel is compiled for sm_90 on the CPU; the compile itself checks that the decoded
values reach the ``wgmma``'s register layout without data movement (``assert_trivial``), and its
SASS is checked for what the design needs. Its results are checked on the GPU by
``benches/probe_gemm16_regs.py`` (against decode + ``F.linear``, and bit for bit against the
same kernel with no product in flight)."""

from __future__ import annotations

import pytest
import torch
from helpers import sm90_sass

triton = pytest.importorskip("triton")
from qtensors.torch.kernels import gemm16_regs_gluon as R  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

needs_gluon = pytest.mark.skipif(not R.HAVE_GEMM16_REGS, reason="this Triton has no Gluon")


def _compile(M: int, cfg: L.Gemm16RegsConfig, enc: str = "affine", gs: int = 64):
    """``gemm16_regs_kernel`` for sm_90 as planned for ``M`` rows (K = 4096, bf16, fp16 scales)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    N, K = 4096, 4096
    _, meta, _ = L._gemm16_regs_plan(M, N, K, enc, gs, True, cfg)
    options = {"num_warps": meta.pop("num_warps")}
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    words = torch.zeros(N, K // 8, dtype=torch.int32)
    scales = torch.zeros(N, K // gs, dtype=torch.float16)
    TD = R.TensorDescriptor
    s_desc = TD(scales, [N, K // gs], [K // gs, 1], [cfg.block_f, 8], meta["S_SL"])
    descs = dict(
        x_desc=TD(x, [M, K], [K, 1], [meta["BLOCK_T"], 64], meta["X_SL"]),
        c_desc=TD(words, [N, K // 8], [K // 8, 1], [cfg.block_f, 8], meta["C_SL"]),
        s_desc=s_desc,
        m_desc=s_desc,
    )
    ptrs = dict(bias_ptr="*bf16", out_ptr="*bf16", ws_ptr="*fp32", lock_ptr="*i32")
    fn = R.gemm16_regs_kernel
    sig = {}
    for p in fn.arg_names:
        sig[p] = "constexpr" if p in meta else (mangle_type(descs[p]) if p in descs else
                                                ptrs.get(p, "i32"))  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.arg_names)
             if p.endswith("_ptr") or p in ("K", "stride_om")}  # fmt: skip
    src = GluonASTSource(fn=fn, signature=sig, constexprs=meta, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


_sass = sm90_sass


@needs_gluon
@pytest.mark.parametrize(
    "M, cfg",
    [
        (256, L.Gemm16RegsConfig(128, 4)),
        (200, L.Gemm16RegsConfig(64, 3)),
        (100, L.Gemm16RegsConfig(128, 4)),
    ],
    ids=["256rows-2wg", "200rows-1wg", "100rows"],
)
def test_compiles_for_sm90_as_designed(M, cfg):
    k = _compile(M, cfg)
    sass = _sass(k)
    rows = L.gemm16_regs_rows(M)
    # the products are wgmma as wide as the rows, the weight from registers (not a descriptor)
    assert f"HGMMA.64x{rows}x16.F32.BF16 R24, R" in sass
    assert "STL" not in sass and "LDL" not in sass  # no register spills to local memory
    # one product in flight while the next step is decoded
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    # codes and scales come from the TMA ring (shared loads), not from global memory
    assert "LDG.E.128" not in sass and "LDS.128" in sass and "UTMALDG.2D" in sass
    assert k.metadata.shared <= 227 * 1024  # one CTA's shared memory fits an sm_90 SM


@needs_gluon
@pytest.mark.parametrize("enc, gs", [("symmetric", 64), ("affine", 128)])
def test_other_codes_compile(enc, gs):
    assert "HGMMA" in _sass(_compile(256, L.Gemm16RegsConfig(128, 4), enc, gs))


@needs_gluon
def test_layouts_refuse_what_the_kernel_cannot_tile():
    with pytest.raises(ValueError, match="features"):
        R.layouts(96, 256)  # not whole warpgroups of 64 features
    with pytest.raises(ValueError, match="rows"):
        R.layouts(128, 512)  # wider than a wgmma
    with pytest.raises(ValueError, match="rows"):
        R.layouts(128, 96)  # not a power of two


@needs_gluon
def test_plan_rows_grid_and_split():
    assert [L.gemm16_regs_rows(m) for m in (1, 64, 65, 128, 200, 256, 300)] == [
        64, 64, 128, 128, 256, 256, 256,
    ]  # fmt: skip
    cfg = L.Gemm16RegsConfig(128, 4)
    grid, meta, key = L._gemm16_regs_plan(300, 1000, 4096, "symmetric", 128, False, cfg)
    assert grid == (2 * 8, 1)  # ceil(300 / 256) x ceil(1000 / 128) tiles, one K slice
    assert meta["ENC"] == 1 and meta["GS"] == 128 and meta["BLOCK_T"] == 256
    assert meta["num_warps"] == 8 and meta["SPLIT_K"] == 1
    assert hash(key) == hash(L._gemm16_regs_plan(300, 1000, 4096, "symmetric", 128, False, cfg)[2])
    assert (
        L._gemm16_regs_plan(100, 4096, 4096, "affine", 64, False, L.Gemm16RegsConfig(64))[1][
            "num_warps"
        ]
        == 4
    )  # one warpgroup for 64 features
