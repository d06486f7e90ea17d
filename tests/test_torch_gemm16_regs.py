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
from helpers import sm90_sass, wgmma_operand_hazards

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
    meta = dict(L._gemm16_regs_plan(M, N, K, enc, gs, True, cfg)[1])  # (the plan is cached)
    options = {"num_warps": meta.pop("num_warps")}
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    words = torch.zeros(N, K // 8, dtype=torch.int32)
    scales = torch.zeros(N, K // gs, dtype=torch.float16)
    TD = R.TensorDescriptor
    s_desc = TD(scales, [N, K // gs], [K // gs, 1], [cfg.block_f, cfg.scale_box], meta["S_SL"])
    descs = dict(
        x_desc=TD(x, [M, K], [K, 1], [meta["BLOCK_T"], 64], meta["X_SL"]),
        c_desc=TD(words, [N, K // 8], [K // 8, 1], [cfg.block_f, 8], meta["C_SL"]),
        s_desc=s_desc,
        m_desc=s_desc,
    )
    ptrs = dict(scales_ptr="*fp16", mins_ptr="*fp16", bias_ptr="*bf16", out_ptr="*bf16",
                ws_ptr="*fp32", lock_ptr="*i32")  # fmt: skip
    fn = R.gemm16_regs_kernel
    sig = {}
    for p in fn.arg_names:
        sig[p] = "constexpr" if p in meta else (mangle_type(descs[p]) if p in descs else
                                                ptrs.get(p, "i32"))  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.arg_names)
             if p.endswith("_ptr") or p in ("K", "G", "stride_om")}  # fmt: skip
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
    # one product in flight while the next step is decoded, into registers of its own: no
    # instruction writes an operand register of a product not yet retired
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    assert wgmma_operand_hazards(sass) == []
    # codes and scales come from the TMA ring (shared loads), not from global memory
    assert "LDG.E.128" not in sass and "LDS.128" in sass and "UTMALDG.2D" in sass
    assert k.metadata.shared <= 227 * 1024  # one CTA's shared memory fits an sm_90 SM


@needs_gluon
@pytest.mark.parametrize("enc, gs", [("symmetric", 64), ("affine", 128)])
def test_other_codes_compile(enc, gs):
    sass = _sass(_compile(256, L.Gemm16RegsConfig(128, 4), enc, gs))
    assert "HGMMA" in sass and wgmma_operand_hazards(sass) == []


@needs_gluon
def test_scales_from_global_memory_or_wider_copies():
    ring = _compile(256, L.Gemm16RegsConfig(128, 4, scales_tma=True))
    # the ring carries only activations and codes, the scales come by loads into registers
    glob = _compile(256, L.Gemm16RegsConfig(128, 4, scales_tma=False))
    sass = _sass(glob)
    assert "LDG.E" in sass and wgmma_operand_hazards(sass) == []
    assert sass.count("UTMALDG.2D") < _sass(ring).count("UTMALDG.2D")
    assert glob.metadata.shared < ring.metadata.shared
    # 16 groups a copy: the scales' ring twice as wide, the same code otherwise
    wide = _compile(256, L.Gemm16RegsConfig(128, 4, scales_tma=True, scale_box=16))
    assert wide.metadata.shared - ring.metadata.shared == 2 * 4 * 128 * 8 * 2
    assert wgmma_operand_hazards(_sass(wide)) == []


def _line(addr: int, ins: str) -> str:
    """One line as ``cuobjdump -sass`` prints it."""
    return f"        /*{addr:04x}*/                   {ins} ;"


def _product(addr: int, a_reg: int, end: str = "") -> str:
    return _line(addr, f"HGMMA.64x256x16.F32.BF16 R24, R{a_reg}, gdesc[UR8], R24{end}")


def test_operand_hazard_checker_sees_an_overwrite_in_flight():
    def code(wait_before_write: str) -> str:
        return "\n".join([
            _line(0x10, "SHF.R.U32.HI R168, RZ, R16, R8"),  # the loop's decode writes R168
            _line(0x20, "WARPGROUP.ARRIVE"),
            _product(0x30, 168),
            _product(0x40, 172, ", gsb0"),
            _line(0x50, wait_before_write),
            _line(0x60, "@P1 BRA 0x10"),
            _line(0x70, "EXIT"),
        ])  # fmt: skip

    # one group may stay in flight: the next pass's write to R168 races it
    assert [a for a, _ in wgmma_operand_hazards(code("WARPGROUP.DEPBAR.LE gsb0, 0x1"))] == ["0x10"]
    assert wgmma_operand_hazards(code("WARPGROUP.DEPBAR.LE gsb0, 0x0")) == []
    # 64-bit writes cover two registers; products from shared memory (gdesc A) read none
    wide = code("WARPGROUP.DEPBAR.LE gsb0, 0x0") + "\n" + "\n".join([
        _product(0x80, 176, ", gsb0"),
        _line(0x90, "IMAD.WIDE R178, R2, 0x4, R6"),
        _line(0xA0, "IMAD.WIDE R174, R2, 0x4, R6"),
        _line(0xB0, "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"),
        _line(0xC0, "MOV R2, R3"),
    ])  # fmt: skip
    assert [a for a, _ in wgmma_operand_hazards(wide)] == ["0x90"]  # R178, not R174


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
    grid3, meta3, key3 = L._gemm16_regs_plan(300, 1000, 4096, "symmetric", 128, False, cfg, 3)
    assert grid3 == (2 * 8, 3) and meta3["SPLIT_K"] == 3 and key3 != key  # K slices: axis 1
    assert hash(key) == hash(L._gemm16_regs_plan(300, 1000, 4096, "symmetric", 128, False, cfg)[2])
    assert (
        L._gemm16_regs_plan(100, 4096, 4096, "affine", 64, False, L.Gemm16RegsConfig(64))[1][
            "num_warps"
        ]
        == 4
    )  # one warpgroup for 64 features


def _run_x2_asm(asm: str, word: int, sel: int, s: float, m: float, dt) -> tuple[float, float]:
    """``_values_x2``'s PTX run on the CPU: its six instructions over 32-bit registers, a
    pair's halves rounded to ``dt`` (numpy: float16; bfloat16 through torch)."""
    import re

    def halves(r: int) -> torch.Tensor:
        return torch.tensor([r & 0xFFFF, r >> 16], dtype=torch.int32).to(torch.int16).view(dt)

    def pack(t: torch.Tensor) -> int:
        lo, hi = (int(v) & 0xFFFF for v in t.to(dt).view(torch.int16))
        return lo | hi << 16

    def pair(v: float) -> int:
        return pack(torch.tensor([v, v], dtype=torch.float32))

    regs = {"$1": word, "$3": sel, "$5": pair(s), "$6": pair(m)}
    val = lambda x: regs[x] if x in regs else int(x, 0)  # noqa: E731
    for op, args in re.findall(r"(?<![.\w])(\w[\w.]*) ([^;{}]+);", asm):
        if op == "reg":  # (a declaration)
            continue
        d, *a = [x.strip() for x in args.split(",")]
        if op == "shr.b32":
            r = val(a[0]) >> val(a[1])
        elif op == "mov.b32":
            r = val(a[0])
        elif op == "prmt.b32":  # d.byte i = byte (nibble i of the selector) of {a, b}
            src = (val(a[0]) | val(a[1]) << 32).to_bytes(8, "little")
            r = sum(src[(val(a[2]) >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "lop3.b32":
            assert a[3] == "0xEA"  # (a & b) | c
            r = (val(a[0]) & val(a[1])) | val(a[2])
        elif op.startswith("sub.rn."):
            r = pack(halves(val(a[0])).float() - halves(val(a[1])).float())
        elif op.startswith("fma.rn."):  # one rounding of the exact product and sum
            x, y, z = (halves(val(v)).double() for v in a)
            r = pack(x * y + z)
        else:
            raise AssertionError(f"no emulation of {op}")
        regs[d] = r & 0xFFFFFFFF
    lo, hi = halves(regs["$0"]).float().tolist()
    return lo, hi


@needs_gluon
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_paired_decode_bits(dt):
    # every byte value in every lane's position of a word: the pair is (low nibble, high
    # nibble) times the scale plus the min, each rounded once
    asm = R._X2_BF16.value if dt == torch.bfloat16 else R._X2_F16.value
    s, m = 0.0373, -0.29
    for a in range(4):
        sel = a + (a + 4) * 256  # as the kernel makes it
        for b in range(256):
            word = (b << 8 * a) | (0x5A5A5A5A & ~(0xFF << 8 * a))  # other bytes: noise
            lo, hi = _run_x2_asm(asm, word, sel, s, m, dt)
            sd, md = (torch.tensor(v).to(dt).double() for v in (s, m))
            want = [float((float(c) * sd + md).to(dt)) for c in (b & 15, b >> 4)]
            assert [lo, hi] == want, (a, b)


@needs_gluon
def test_kept_launch_takes_new_rows(monkeypatch):
    """``Gemm16RegsKept``: a ``gemm16_regs_kernel`` launch noted at 200 rows, called with 130,
    launches the same kernel with the new activations' descriptor, rows, grid and output (the
    output also as the workspace and counters where it stood for them); every other argument
    the noted one's."""
    M, N, K = 200, 192, 512
    cfg = L.Gemm16RegsConfig(64, 3)
    grid, meta, _ = L._gemm16_regs_plan(M, N, K, "affine", 64, False, cfg)
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    out = torch.empty(M, N, dtype=torch.bfloat16)
    TD = R.TensorDescriptor
    x_desc = TD(x, [M, K], [K, 1], [256, 64], meta["X_SL"])
    c_desc, scales, mins = object(), torch.ones(3), torch.ones(3)
    # split 1, no counters: the output stands for the workspace and the counters
    args = (x_desc, c_desc, c_desc, c_desc, scales, mins, scales, out, out, out, M, N, K,
            K // 64, N, K // 64)  # fmt: skip
    calls = []
    hit = (lambda *a: calls.append(a), "function", "packed", ("tail",))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    kept = L.Gemm16RegsKept([(hit, grid, args, 0)], x, out, None)
    assert grid == (3, 1) and kept.col_tiles == 3 and kept.block_m == 256

    x2 = torch.ones(130, K, dtype=torch.bfloat16)
    got = kept(x2)
    assert got.shape == (130, N)
    (a,) = calls
    assert a[:9] == (3, 1, 1, 7, "function", "packed", None, None, None)
    launched = a[9:]
    assert launched[-1] == "tail" and len(launched) == len(args) + 1
    d = launched[0]
    assert isinstance(d, TD) and d.base is x2 and list(d.shape) == [130, K]
    assert launched[7] is got and launched[8] is got and launched[9] is got
    assert launched[10] == 130
    for i in (1, 2, 3, 4, 5, 6, 11, 12, 13, 14, 15):
        assert launched[i] is args[i]
    with pytest.raises(ValueError, match="activations"):
        L.Gemm16RegsKept([(hit, grid, args, 0)], x.clone(), out, None)
