"""The Gluon W4A8 kernel (``kernels/mma_int8_gluon.py``) where a CPU can check it.

Triton's interpreter does not run Gluon, so: the kernel's index algebra (the codes' bytes to MMA
columns, the pre-pass's slots) replayed in numpy with the same reshapes and permutes against
the plain product; the pre-pass's FRAGMENT order under the interpreter (a child process); the
kernel compiled for sm_90 on the CPU, where every layout conversion is asserted to be a no-op
and the SASS must use no shared memory; the routing. Its results are checked on the GPU by
``benches/probe_mma_gluon.py`` (``benches/results/gpu_mma_gluon_probe*_h200.txt``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import imma_loop, loop_loads_read_in_loop, sm90_sass

from qtensors.torch.kernels import launch as L
from qtensors.torch.kernels import mma_int8_gluon as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("blocked", [False, True])
def test_fragment_order_is_two_permutations(blocked):
    code_of_k, slot_of_k = G.fragment_order(blocked)
    assert sorted(code_of_k.tolist()) == list(range(64))
    assert sorted(slot_of_k.tolist()) == list(range(64))
    if blocked:  # each MMA k-step (32 columns) multiplies one 32-code block
        assert (code_of_k[:32] < 32).all() and (code_of_k[32:] >= 32).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_index_algebra_gives_the_product(seed):
    """The kernel's A (bytes -> nibbles -> reshape / join / permute) and B (stored slots ->
    reshape / permute) replayed in numpy: their product is codes @ x for one chunk."""
    rng = np.random.default_rng(seed)
    N, M = 24, 5
    codes = rng.integers(0, 16, (N, 64))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)  # byte j: 2j lo, 2j+1 hi
    x = rng.integers(-127, 128, (M, 64))
    code_of_k, slot_of_k = G.fragment_order()
    stored = np.empty((M, 64), np.int64)
    stored[:, slot_of_k] = x[:, code_of_k]  # what the pre-pass writes
    words = packed.view("<u4")  # [N, 8] words, as the kernel loads them
    as_bytes = words.view(np.uint8).reshape(N, 8, 4)
    lo = (as_bytes & 15).reshape(N, 4, 2, 4)
    hi = (as_bytes >> 4).reshape(N, 4, 2, 4)
    a = np.stack([lo, hi], -1).transpose(0, 4, 2, 1, 3).reshape(N, 64)
    q = stored.T.reshape(16, 4, M)  # [16 words, 4 bytes, M]: the loaded words, byte-split
    q = q.reshape(64, M)
    b = q.reshape(4, 2, 2, 4, M).transpose(1, 2, 0, 3, 4).reshape(64, M)
    assert np.array_equal(a.astype(np.int64) @ b, codes @ x.T)
    # and a wrong mapping (the nibbles not permuted) does not
    a_plain = np.stack([lo, hi], -1).reshape(N, 64)
    assert not np.array_equal(a_plain.astype(np.int64) @ b, codes @ x.T)


@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_index_algebra_gives_each_blocks_product(seed):
    """Groups of 32 (MXFP4): ``_a_blocks`` (quad lane ``a`` holding words ``a`` and ``4 + a``)
    and ``_b_blocks`` replayed in numpy: k-step ``B``'s product is exactly block ``B``'s
    codes @ x, so each block's sum can take its own scale."""
    rng = np.random.default_rng(seed)
    N, M = 24, 5
    codes = rng.integers(0, 16, (N, 64))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    x = rng.integers(-127, 128, (M, 64))
    code_of_k, slot_of_k = G.fragment_order(blocked=True)
    stored = np.empty((M, 64), np.int64)
    stored[:, slot_of_k] = x[:, code_of_k]
    as_bytes = packed.view("<u4").view(np.uint8).reshape(N, 8, 4)  # word w = 4B + a
    lo = (as_bytes & 15).reshape(N, 2, 4, 4).transpose(0, 2, 3, 1)  # [N, a, c, B]
    hi = (as_bytes >> 4).reshape(N, 2, 4, 4).transpose(0, 2, 3, 1)
    q = stored.T.reshape(64, M)
    b = q.reshape(4, 2, 2, 4, M).transpose(1, 2, 0, 3, 4).reshape(64, M)  # _b_operand
    b_blocks = b.reshape(2, 32, M).transpose(1, 2, 0)  # [32, M, B]
    for blk in range(2):
        a = np.stack([lo[..., blk], hi[..., blk]], -1).transpose(0, 3, 1, 2).reshape(N, 32)
        want = codes[:, 32 * blk : 32 * blk + 32] @ x[:, 32 * blk : 32 * blk + 32].T
        assert np.array_equal(a.astype(np.int64) @ b_blocks[..., blk], want)
        # blocks of 16 (NVFP4): the activations' stored words 4a + 2B + h kept for a // 2 ==
        # half only (``_b_blocks``'s HALF) give that 16-code block's product
        for half in range(2):
            words = stored.T.reshape(16, 4, M).copy()
            words[(np.arange(16) >> 3) != half] = 0
            bh = words.reshape(4, 2, 2, 4, M).transpose(1, 2, 0, 3, 4).reshape(64, M)
            bh = bh.reshape(2, 32, M).transpose(1, 2, 0)[..., blk]
            c0 = 32 * blk + 16 * half
            want = codes[:, c0 : c0 + 16] @ x[:, c0 : c0 + 16].T
            assert np.array_equal(a.astype(np.int64) @ bh, want)


def _interpret(code: str) -> None:
    """Run ``code`` in a child process under Triton's interpreter (set before Triton is
    imported); it prints "ok" at its end."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_prepass_reads_each_activation_twice_with_dup():
    """``quantize_kernel(DUP=True)`` (8-bit codes as 4-bit pairs: K and the groups doubled)
    stores what the pre-pass stores for x with each value repeated, factors included."""
    code = textwrap.dedent(
        """
        import torch
        from qtensors.torch.kernels.mma_int8 import quantize_kernel
        torch.manual_seed(0)
        M, K, GS, MP = 3, 256, 128, 16
        x = torch.randn(M, K, dtype=torch.bfloat16)
        x2 = x.repeat_interleave(2, dim=1)
        K2, G = 2 * K, 2 * K // (2 * GS)
        out = []
        for src, dup in ((x, True), (x2, False)):
            xq = torch.full((MP, K2), 99, dtype=torch.int8)
            xs = torch.full((2, G, MP), 7.0)
            quantize_kernel[(MP, 1)](src, xq, xs, M, MP, K2, G, src.stride(0), GS=2 * GS,
                                     GROUPS=8, FRAGMENT=True, DUP=dup)
            out.append((xq, xs))
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
        assert out[0][0][:M].abs().max() == 127
        print("ok")
        """
    )
    _interpret(code)


@pytest.mark.parametrize(
    ("gs", "K", "blocked"), [(128, 384, False), (32, 320, True), (16, 320, True)]
)
def test_prepass_fragment_order_under_the_interpreter(gs, K, blocked):
    """``quantize_kernel(FRAGMENT=True)`` stores each chunk's int8 activations at
    ``fragment_order``'s slots, with the same per-group factors as the halves order; with
    ``BLOCKED`` (groups of 32 or 16, two or four a chunk) at ``fragment_order(blocked=True)``'s."""
    code = textwrap.dedent(
        f"""
        import numpy as np, torch
        from qtensors.torch.kernels.mma_int8 import quantize_kernel
        from qtensors.torch.kernels.mma_int8_gluon import fragment_order
        torch.manual_seed(0)
        M, K, GS, MP, BLOCKED = 3, {K}, {gs}, 16, {blocked}
        G = K // GS
        x = torch.randn(M, K, dtype=torch.bfloat16) * torch.rand(1, K) * 4
        out = {{}}
        for frag in (True, False):
            xq = torch.full((MP, K), 99, dtype=torch.int8)
            xs = torch.full((2, G, MP), 7.0)
            quantize_kernel[(MP, 3)](x, xq, xs, M, MP, K, G, x.stride(0), GS=GS, GROUPS=8,
                                     FRAGMENT=frag, BLOCKED=frag and BLOCKED)
            out[frag] = (xq.numpy().astype(np.int64), xs)
        code, slot = fragment_order(blocked=BLOCKED)
        nat = np.empty((MP, K), np.int64)  # the halves order back in code order
        halves = out[False][0].reshape(MP, G, 2, GS // 2)
        nat.reshape(MP, G, GS // 2, 2)[..., 0] = halves[:, :, 0]
        nat.reshape(MP, G, GS // 2, 2)[..., 1] = halves[:, :, 1]
        frag = out[True][0].reshape(MP, K // 64, 64)
        assert (frag[:, :, slot] == nat.reshape(MP, K // 64, 64)[:, :, code]).all()
        assert (nat[M:] == 0).all() and nat[:M].any()
        assert torch.equal(out[True][1], out[False][1])
        print("ok")
        """
    )
    _interpret(code)


def _compile(block_n, block_m, warps, groups, gs, enc, split, kspec, stages=0, swords=0,
             scale="*fp16", arch=90, xtma=False):  # fmt: skip
    """The register kernel, or with ``stages`` the TMA one (its codes a descriptor); ``swords``:
    the scales read as that many words a row and step; ``scale``: their type (not FP4);
    ``arch``: the sm_ target; ``xtma``: the TMA kernel's activations by TMA too."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kern = G.mma_int8_gluon_tma_kernel if stages else G.mma_int8_gluon_kernel
    block = gs if gs in G.BLOCK_SIZES else 0
    layouts = dict(G.layouts(block_n, block_m, warps, groups, gs // 64, block, swords))
    if stages:
        layouts.update(STAGES=stages, XTMA=xtma)
    else:
        for name in G.TMA_LAYOUTS:
            del layouts[name]
    meta = dict(
        ENC=enc, GS=gs, HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split,
        GROUPS=groups, KSPEC=kspec, **layouts,
    )  # fmt: skip
    fp4 = enc in (G.GLUON_ENC["mxfp4"], G.GLUON_ENC["nvfp4"])
    scales, mins = ("*u8", "*fp32") if fp4 else (scale, scale)
    ptrs = dict(xq_ptr="*i8", codes_ptr="*u8", scales_ptr=scales, mins_ptr=mins,
                xs_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16", ws_ptr="*fp32",
                lock_ptr="*i32")  # fmt: skip
    if stages:  # the descriptor's type, as Triton names it at a launch
        words = torch.zeros(block_n, 4096, dtype=torch.int32)
        meta_k = dict(GS=gs, GROUPS=groups, BLOCK_N=block_n, CODES_SL=layouts["CODES_SL"])
        desc = L._codes_descriptor(words.view(torch.uint8), block_n, 4096 * 8, meta_k)
        ptrs["codes_desc"] = mangle_type(desc)
        meta_x = dict(meta, XTMA=xtma)
        xq = torch.zeros(block_m, 4096, dtype=torch.int8)
        xs = torch.zeros(2, 4096 // gs, block_m)
        q_desc, d_desc = L._acts_descriptors(xq, xs, meta_x, desc)
        ptrs.update(xq_desc=mangle_type(q_desc), xs_desc=mangle_type(d_desc))
    sig = {p: "constexpr" if p in meta else ptrs.get(p, "i32") for p in kern.arg_names}
    aligned = {"row_bytes", "K", "stride_xm", "G", "MP", "k_split"}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, p in enumerate(kern.arg_names)
        if p.endswith("_ptr") or p in aligned
    }
    src = GluonASTSource(fn=kern, signature=sig, constexprs=meta, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 16, 2, 2, 64, 0, 1, 4096),  # the routed default, compiled for K = 4096
        (64, 16, 4, 1, 128, 1, 1, 0),
        (128, 32, 4, 2, 64, 0, 1, 0),
        (64, 16, 4, 4, 64, 1, 1, 2048),
    ],
)
def test_compiles_for_sm90_without_shared_memory(cfg):
    """Every ``convert_layout`` in the kernel asserts it is trivial (the compile fails
    otherwise), and nothing is staged through shared memory."""
    k = _compile(*cfg)
    assert k.metadata.shared == 0
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in k.asm["ptx"]
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in k.asm["ptx"]  # min terms


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 16, 2, 2, 64, 0, 1, 4096, 3),  # the routed default, compiled for K = 4096
        (64, 16, 4, 1, 128, 1, 1, 0, 2),
        (128, 32, 4, 2, 64, 0, 4, 0, 4),  # split-K epilogue
        (64, 16, 2, 2, 128, 1, 1, 0, 3),  # 128-byte rows of codes a step
    ],
)
def test_tma_kernel_compiles_for_sm90(cfg):
    """The TMA kernel: its layout conversions trivial (asserted by the compile), the codes
    copied by the TMA engine into a ring of ``STAGES`` steps (and nothing else staged)."""
    block_n, _bm, _w, groups, gs, *_, stages = cfg
    k = _compile(*cfg)
    ptx = k.asm["ptx"]
    assert "cp.async.bulk.tensor.2d.shared::" in ptx  # ::cluster (3.6) or ::cta (3.9)
    assert "mbarrier.try_wait" in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx
    ring = stages * block_n * gs * groups // 2
    assert ring <= k.metadata.shared <= ring + 1024 + 8 * stages  # + barriers, split-K counter


def test_tma_plan_and_descriptor():
    """The plan gives the TMA kernel its ring and layouts (the register kernel none); the
    descriptor views the codes as ``[N, K / 8]`` words, one step's tile a copy."""
    plan = L._mma_int8_plan.__wrapped__
    *_, meta, _key = plan(16, 4096, 4096, "affine", 64, False, -1, None, True, True, True, 3)
    assert meta["STAGES"] == 3 and "LT" in meta and "CODES_SL" in meta
    *_, meta0, _key0 = plan(16, 4096, 4096, "affine", 64, False, -1, None, True, True, True, 0)
    assert "STAGES" not in meta0 and "LT" not in meta0
    codes = torch.zeros(96, 2048, dtype=torch.uint8)
    desc = L._codes_descriptor(codes, 96, 4096, meta)
    assert list(desc.shape) == [96, 512] and list(desc.strides) == [512, 1]
    assert desc.block_shape == [meta["BLOCK_N"], 64 * meta["GROUPS"] // 8]
    assert desc.base.data_ptr() == codes.data_ptr()


@pytest.fixture
def device_capability(monkeypatch):
    """Set the capability ``torch.cuda`` reports (``_tma_device`` caches it per device: cleared
    on each change and after the test)."""
    cap = {}

    def set_cap(v):
        cap["v"] = v
        L._tma_device.cache_clear()
        L._hopper_device.cache_clear()

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: cap["v"])
    yield set_cap
    L._tma_device.cache_clear()
    L._hopper_device.cache_clear()


def test_tma_applies(device_capability):
    codes = torch.zeros(64, 64, dtype=torch.uint8)
    device_capability((9, 0))
    assert not L.tma_applies(codes, 128, -1)  # not on the CPU
    assert L.tma_applies(codes, 128, 0) == (codes.data_ptr() % 16 == 0)
    assert not L.tma_applies(codes.view(-1)[4:], 128, 0)  # a start off 16 bytes
    assert not L.tma_applies(codes[:, :40], 80, 0)  # rows of 40 bytes
    device_capability((8, 9))
    assert not L.tma_applies(codes, 128, 0)  # no TMA before Hopper


def test_gemm16_route_runs_on_hopper_only(device_capability, monkeypatch):
    """The gemm16 kernels (on by default) take sm_90 devices alone: their ``wgmma`` is Hopper's,
    and their tables were measured there; elsewhere the route decodes, then cuBLAS."""
    monkeypatch.setattr(L.gemm16_gluon, "HAVE_GEMM16", True)
    monkeypatch.setattr(L.gemm16_regs_gluon, "HAVE_GEMM16_REGS", True)
    monkeypatch.setattr(L.mma_int8_gluon, "HAVE_TMA", True)
    x = torch.zeros(128, 64, dtype=torch.bfloat16)
    codes = torch.zeros(64, 32, dtype=torch.uint8)
    aligned = x.data_ptr() % 16 == 0 and codes.data_ptr() % 16 == 0
    device_capability((9, 0))
    assert L.gemm16_applies(x, codes, 0) == L.gemm16_regs_applies(x, codes, 0) == aligned
    assert not L.gemm16_applies(x.float(), codes, 0)  # fp16 / bf16 activations only
    for cap in ((8, 0), (10, 0), (12, 0)):
        device_capability(cap)
        assert not L.gemm16_applies(x, codes, 0) and not L.gemm16_regs_applies(x, codes, 0)


def test_split_k_epilogue_compiles():
    k = _compile(64, 16, 4, 2, 64, 0, 4, 0)
    assert k.metadata.shared <= 1024  # the counter's broadcast only
    assert "atom.global" in k.asm["ptx"]


def test_layouts_refuse_what_the_kernel_cannot_tile():
    with pytest.raises(ValueError, match="block_n"):
        G.layouts(32, 16, 4, 2, 1)  # fewer features than 16 a warp
    with pytest.raises(ValueError, match="block_m"):
        G.layouts(64, 64, 4, 2, 1)
    with pytest.raises(ValueError, match="chunks a step"):
        G.layouts(64, 16, 4, 4, 2)


def test_routing(monkeypatch):
    codes = torch.zeros(64, 32, dtype=torch.uint8)
    scales = torch.ones(64, 1, dtype=torch.bfloat16)
    assert not L.gluon_applies(codes, scales, -1, 16)  # not on the CPU
    monkeypatch.setattr(L, "_gluon_device", lambda index: True)
    assert L.gluon_applies(codes, scales, 0, 16)
    assert L.gluon_applies(codes, scales.half(), 0, 16)
    assert not L.gluon_applies(codes, scales.float(), 0, 16)  # tf32 would round fp32 mins
    assert not L.gluon_applies(codes, scales, 0, L.INT8_MMA_GLUON_MAX_M + 1)
    assert not L.gluon_applies(codes.view(-1)[1:1025], scales, 0, 16)  # not 4-byte aligned
    monkeypatch.setattr(L, "INT8_MMA_GLUON", False)
    assert not L.gluon_applies(codes, scales, 0, 16)


# -- NF4 (``ENC`` 2): its codes as int8 levels by ``prmt`` ------------------------------------


def _run_ptx(asm: str, word: int) -> int:
    """The few PTX instructions ``mma_int8_gluon._nf4_asm`` uses, run on 32-bit ints (``$1``
    the input, ``$0`` the result): an independent reading of the asm the GPU runs."""
    regs = {"$1": word & 0xFFFFFFFF}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    body = asm.strip().strip("{}")
    for ins in body.split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        v = [val(a) for a in src]
        if op == "mov.b32":
            r = v[0]
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "xor.b32":
            r = v[0] ^ v[1]
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "prmt.b32":  # generic mode: selector nibbles 0-7 pick bytes of b:a
            table = v[0] | (v[1] << 32)
            r = 0
            for i in range(4):
                sel = (v[2] >> (4 * i)) & 0xF
                byte = (table >> (8 * (sel & 7))) & 0xFF
                if sel & 8:  # sign replication
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[d] = r & 0xFFFFFFFF
    return regs["$0"]


@pytest.mark.parametrize("enc", ["nf4", "fp4"])
def test_lookup_asm_gives_each_codes_int8_level(enc):
    """Every word of 8 4-bit codes (random words and each code in each position): the even and
    the odd codes' levels as int8, one byte each in code order: the bytes the affine path's
    nibble masks put in the same places. NF4: ``round(level * 127)``; FP4 (MXFP4 / NVFP4):
    twice the E2M1 value, exact."""
    from qtensors.torch._layout import E2M1_LEVELS, NF4_LEVELS

    if enc == "nf4":
        levels, asm_of = [round(v * 127) for v in NF4_LEVELS], G._nf4_asm
    else:
        levels, asm_of = [int(2 * v) for v in E2M1_LEVELS], G._fp4_asm
        assert levels[:8] == [0, 1, 2, 3, 4, 6, 8, 12]
        assert levels[9:] == [-v for v in levels[1:8]]
    even_asm, odd_asm = asm_of(False), asm_of(True)
    rng = np.random.default_rng(0)
    words = [int(w) for w in rng.integers(0, 2**32, 200, dtype=np.uint64)]
    words += [c << (4 * i) for c in range(16) for i in range(8)]
    for w in words:
        codes = [(w >> (4 * i)) & 0xF for i in range(8)]
        for asm, picked in ((even_asm, codes[0::2]), (odd_asm, codes[1::2])):
            got = _run_ptx(asm, w)
            got_levels = [int(np.int8(np.uint8((got >> (8 * i)) & 0xFF))) for i in range(4)]
            assert got_levels == [levels[c] for c in picked], (hex(w), got_levels)


def test_symmetric8_bytes_split_into_nibbles_that_add_up_to_the_signed_code():
    """8-bit symmetric codes (ENC 3): each byte's low nibble and its high one less 128, as
    the kernel's asm makes them (read by ``_run_ptx``), add up to ``c - 128``, the code's
    signed value, for every byte value in every position."""
    asm = G.SYM8_HIGH_ASM
    for c in range(256):
        for i in range(4):
            w = c << (8 * i)
            lo = (_run_ptx("and.b32 $0, $1, 0x0F0F0F0F;", w) >> (8 * i)) & 0xFF
            hi = int(np.int8(np.uint8((_run_ptx(asm, w) >> (8 * i)) & 0xFF)))
            assert 0 <= lo <= 15 and lo + hi == c - 128


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 16, 2, 1, 256, 3, 1, 8192, 0),  # 8-bit g128 as pairs: 2K, groups of 256
        (64, 16, 2, 1, 256, 3, 1, 8192, 3),
        (64, 16, 2, 2, 128, 3, 4, 0, 3),  # 8-bit g64, split K
    ],
)
def test_symmetric8_kernels_compile_for_sm90(cfg):
    k = _compile(*cfg)
    ptx = k.asm["ptx"]
    assert "xor.b32" in ptx and "tf32" not in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx


@pytest.mark.parametrize("stages", [0, 3])
def test_nf4_kernels_compile_for_sm90(stages):
    """NF4 through both Gluon kernels: the levels by ``prmt``, the int8 MMA, no min terms
    (no tf32 MMA), the register kernel still without shared memory."""
    k = _compile(64, 16, 2, 2, 64, 2, 1, 4096, stages)
    ptx = k.asm["ptx"]
    assert "prmt.b32" in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx
    assert "tf32" not in ptx
    if not stages:
        assert k.metadata.shared == 0


def test_nf4_routes_to_the_gluon_kernel_where_it_applies(monkeypatch):
    """NF4 at 5-32 rows of fp16 / bf16 with int8 activations: the Gluon W4A8 kernel
    ("int8mma"); past its rows, without int8 activations, fp32 or groups it cannot take:
    decode + cuBLAS. Where the tensors keep it from running (here: no GPU), ``linear_cuda``
    decodes, with the decode's result."""
    route = L.route.__wrapped__
    args = (4096, 4096, "nf4", 4, 64, 1, True)
    assert route(16, *args, True, True) == "int8mma"
    assert route(5, *args, True, True) == "int8mma"
    assert route(L.INT8_MMA_GLUON_MAX_M + 1, *args, True, True) == "decode"
    assert route(16, *args, True, False) == "decode"  # INT8_ACTIVATIONS off
    assert route(16, *args, False, True) == "decode"  # fp32
    assert route(16, 4096, 4096, "nf4", 4, 32, 1, True, True, True) == "decode"  # groups of 32
    assert route(2, *args, True, True) == "tiled"  # the batch 1-4 int8 kernel
    assert route(16, 4096, 4096, "affine", 4, 64, 1, True, True, True) == "mma"
    sym8 = (4096, 4096, "symmetric", 8, 128, 1, True)
    assert route(16, *sym8, True, True) == "int8mma"
    # past 16 rows only on 16.8M+ weights (2048 x 5632 at 32 rows: decode + cuBLAS faster)
    assert route(32, *sym8, True, True) == "int8mma"
    assert route(17, 2048, 5632, "symmetric", 8, 128, 1, True, True, True) == "decode"
    assert route(16, 2048, 5632, "symmetric", 8, 128, 1, True, True, True) == "int8mma"
    assert L.gluon_only_shape(4096, 4096, "symmetric", 8, 128, 1) == "symmetric8"
    assert L.gluon_only_shape(4096, 4096, "symmetric", 8, 256, 1) is None  # groups past 128
    assert L.gluon_only_shape(4096, 4096, "affine", 8, 128, 1) is None
    assert route(16, 4096, 4096, "affine", 8, 128, 1, True, True, True) == "decode"
    with pytest.raises(ValueError, match="int8 mma kernel takes"):
        L._mma_int8_plan.__wrapped__(16, 256, 256, "nf4", 64, False, -1, None, True, False)
    L._mma_int8_plan.__wrapped__(16, 256, 256, "nf4", 64, False, -1, None, True, True)

    from qtensors.torch import linear as lin

    monkeypatch.setattr(L, "route", lambda *a: "int8mma")
    N, K, g = 64, 128, 64
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8)
    scales = torch.rand(N, K // g, dtype=torch.bfloat16)
    x = torch.randn(8, K, dtype=torch.bfloat16)
    a = (codes, scales, None, None, [N, K], "nf4", 4, g, 1)
    want = lin.linear_dequantize(x, *a)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA
    torch.testing.assert_close(lin._linear_cuda(lin._cuda_weight(*a[:3], *a[4:]), x, *a), want)
    codes8 = torch.randint(0, 256, (N * K,), dtype=torch.uint8)  # 8-bit: decoded off the GPU too
    a8 = (codes8, scales, None, None, [N, K], "symmetric", 8, g, 1)
    got8 = lin._linear_cuda(lin._cuda_weight(*a8[:3], *a8[4:]), x, *a8)
    torch.testing.assert_close(got8, lin.linear_dequantize(x, *a8))


# -- MXFP4 / NVFP4 (``ENC`` 4 / 5): blocks of 32 / 16, twice the E2M1 values as int8 -----------


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 16, 2, 4, 32, 4, 1, 4096, 0),  # MXFP4, register kernel, two chunks a step
        (64, 16, 2, 4, 32, 4, 1, 4096, 3),  # TMA
        (64, 32, 2, 2, 32, 4, 4, 0, 3),  # 32 rows, one chunk a step, split K
        (64, 16, 2, 8, 16, 5, 1, 4096, 0),  # NVFP4 (ENC 5, blocks of 16), register kernel
        (64, 16, 2, 8, 16, 5, 1, 4096, 3),
        (64, 32, 2, 4, 16, 5, 4, 0, 3),
    ],
)
def test_fp4_kernels_compile_for_sm90(cfg):
    """MXFP4 / NVFP4 through both Gluon kernels: the blocks' operands split from the chunk's
    without data movement (asserted by the compile), the values by ``prmt``, an int8 MMA a
    block (NVFP4: two a k-step), no min terms; the register kernel without shared memory."""
    block_n, _bm, _w, groups, gs, *_, stages = cfg
    k = _compile(*cfg)
    ptx = k.asm["ptx"]
    assert "prmt.b32" in ptx and "tf32" not in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx
    if not stages:
        assert k.metadata.shared == 0
    else:
        ring = stages * block_n * gs * groups // 2
        assert ring <= k.metadata.shared <= ring + 1024 + 8 * stages


def test_mxfp4_plan_and_routing(monkeypatch):
    """MXFP4 at 5-32 rows: ``mma_linear`` takes the Gluon kernel where it applies (blocks of 32,
    whole 64-code chunks), ``mma.py`` otherwise; the plan's pre-pass is blocked and a step
    holds 64 x ``groups`` codes as for groups of 64."""
    plan = L._mma_int8_plan.__wrapped__
    *_, quant, _g, _s, _k, meta, _key = plan(16, 4096, 4096, "mxfp4", 32, False, -1, None, True,
                                             True, True, 3)  # fmt: skip
    assert quant[1]["BLOCKED"] and quant[1]["FRAGMENT"] and quant[1]["GS"] == 32
    assert meta["ENC"] == G.GLUON_ENC["mxfp4"] and meta["GROUPS"] == 4 and meta["GS"] == 32
    with pytest.raises(ValueError, match="int8 mma kernel takes"):
        plan(16, 4096, 4096, "mxfp4", 32, False, -1, None, True, False)  # not the tl.dot one
    assert L.int8_mma_shape(4096, "mxfp4", 32, gluon=True)
    assert not L.int8_mma_shape(4096 + 32, "mxfp4", 32, gluon=True)  # a half chunk
    assert not L.int8_mma_shape(4096, "mxfp4", 32)
    bf16 = torch.bfloat16
    assert L.int8_mma_applies(16, 4096, 4096, "mxfp4", 32, bf16)
    assert L.int8_mma_applies(L.INT8_MMA_GLUON_MAX_M, 4096, 4096, "mxfp4", 32, bf16)
    assert not L.int8_mma_applies(L.INT8_MMA_GLUON_MAX_M + 1, 4096, 4096, "mxfp4", 32, bf16)
    assert not L.int8_mma_applies(16, 4096, 4096, "mxfp4", 32, torch.float32)
    assert not L.int8_mma_applies(4, 4096, 4096, "mxfp4", 32, bf16)
    # past 16 rows only on 16.8M+ weights (2048 x 5632 at 32 rows: mma.py faster)
    assert L.int8_mma_applies(16, 2048, 5632, "mxfp4", 32, bf16)
    assert not L.int8_mma_applies(17, 2048, 5632, "mxfp4", 32, bf16)
    route = L.route.__wrapped__
    assert route(16, 4096, 4096, "mxfp4", 4, 32, 1, True, True, True) == "mma"
    codes = torch.zeros(64, 32, dtype=torch.uint8)
    e8m0 = torch.full((64, 2), 127, dtype=torch.uint8)
    monkeypatch.setattr(L, "_gluon_device", lambda index: True)
    assert L.gluon_applies(codes, e8m0, 0, 16)

    # where the Gluon kernel does not apply (here: no GPU), mma_linear runs mma.py
    calls = []
    monkeypatch.setattr(L, "gluon_applies", lambda *a: False)
    monkeypatch.setattr(L, "mma_int8_linear", lambda *a, **k: calls.append("int8"))
    monkeypatch.setattr(L, "_begin", lambda *a: (calls.append("mma.py"), True, -1, None))
    L.mma_linear(torch.zeros(16, 4096, dtype=bf16), codes, e8m0, None, None, 64, 4096,
                 "mxfp4", 32)  # fmt: skip
    monkeypatch.setattr(L, "gluon_applies", lambda *a: True)
    L.mma_linear(torch.zeros(16, 4096, dtype=bf16), codes, e8m0, None, None, 64, 4096,
                 "mxfp4", 32)  # fmt: skip
    assert calls == ["mma.py", "int8"]


def test_nvfp4_routes_to_the_gluon_kernel():
    """NVFP4 at 5-16 rows on 16.8M+ weights (where it beat decode + cuBLAS): route "int8mma";
    the plan takes its blocks of 16 eight a step (128 codes, as the other encodings' default)."""
    route = L.route.__wrapped__
    args = (4096, 4096, "nvfp4", 4, 16, 1, True)
    assert route(5, *args, True, True) == "int8mma"
    assert route(16, *args, True, True) == "int8mma"
    assert route(17, *args, True, True) == "decode"
    assert route(32, 8192, 8192, "nvfp4", 4, 16, 1, True, True, True) == "decode"
    assert route(16, 2048, 5632, "nvfp4", 4, 16, 1, True, True, True) == "decode"
    assert route(16, *args, True, False) == "decode"  # INT8_ACTIVATIONS off
    assert route(4, *args, True, True) == "tiled"
    assert L.gluon_only_shape(4096, 4096, "nvfp4", 4, 16, 1) == "nvfp4"
    assert L.gluon_only_shape(4096, 4096 + 16, "nvfp4", 4, 16, 1) is None  # a partial chunk
    plan = L._mma_int8_plan.__wrapped__
    *_, quant, _g, _s, _k, meta, _key = plan(16, 4096, 4096, "nvfp4", 16, False, -1, None, True,
                                             True, True, 3)  # fmt: skip
    assert quant[1]["BLOCKED"] and quant[1]["GS"] == 16
    assert meta["ENC"] == G.GLUON_ENC["nvfp4"] and meta["GROUPS"] == 8
    codes = torch.zeros(64, 32, dtype=torch.uint8)
    e4m3 = torch.ones(64, 4, dtype=torch.float8_e4m3fn)
    assert not L.gluon_applies(codes, e4m3, -1, 16)  # not on the CPU


# -- 8-row tiles (``launch.GLUON_TILE8_MAX_M``) ---------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 8, 2, 2, 64, 0, 1, 4096, 0),  # affine, register kernel, compiled for K
        (64, 8, 2, 2, 64, 2, 4, 0, 3),  # NF4, TMA, split K
        (64, 8, 2, 4, 32, 4, 1, 4096, 3),  # MXFP4
        (64, 8, 2, 8, 16, 5, 1, 0, 3),  # NVFP4
    ],
)
def test_eight_row_tiles_compile_for_sm90(cfg):
    """8-row tiles: one MMA n-tile (half the MMAs of a 16-row tile), every conversion free."""
    k = _compile(*cfg)
    k16 = _compile(cfg[0], 16, *cfg[2:])
    mma = "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32"
    assert 2 * k.asm["ptx"].count(mma) == k16.asm["ptx"].count(mma) > 0
    if not cfg[-1]:
        assert k.metadata.shared == 0


def test_plan_takes_eight_row_tiles_up_to_narrow_m(monkeypatch):
    plan = L._mma_int8_plan.__wrapped__
    for M, want in ((5, 8), (L.GLUON_TILE8_MAX_M, 8), (L.GLUON_TILE8_MAX_M + 1, 16), (17, 32)):
        MP, quant, *_, meta, _key = plan(M, 4096, 4096, "affine", 64, False, -1, None, True, True,
                                         True, 3)  # fmt: skip
        assert meta["BLOCK_M"] == want and MP == want and quant[0][0] == want
        assert meta["KSPEC"] == (4096 if want <= 16 else 0)  # one tile of rows: compiled for K
    monkeypatch.setattr(L, "GLUON_TILE8_MAX_M", 0)
    assert plan(5, 4096, 4096, "affine", 64, False, -1, None, True, True, True, 3)[0] == 16
    with pytest.raises(ValueError, match="block_m >= 16"):  # the tl.dot kernel: 16 at least
        plan(5, 4096, 4096, "affine", 64, False, -1, L.MmaConfig(8, 64, 2, 0, 4), True, False)


def test_tma_plan_takes_32_features_a_program_on_narrow_weights():
    """The TMA kernel's programs take 32 features on weights of up to ``GLUON_NARROW_N``
    outputs (twice the programs), 64 past it; the register kernel keeps 64; a given config
    wins."""
    plan = L._mma_int8_plan.__wrapped__
    for N, stages, want in ((4096, 3, 32), (2048, 3, 32), (6144, 3, 64), (4096, 0, 64)):
        *_, meta, _key = plan(16, N, 4096, "affine", 64, False, -1, None, True, True, True,
                              stages)  # fmt: skip
        assert meta["BLOCK_N"] == want, (N, stages)
    cfg = L.MmaConfig(0, 64, 2, 0, 2)
    *_, meta, _key = plan(16, 4096, 4096, "affine", 64, False, -1, cfg, True, True, True, 3)
    assert meta["BLOCK_N"] == 64


def test_scale_words_where_a_rows_step_is_whole_words():
    """``_scale_words``: a row's scales of a K step as 32-bit words (1 or 2) where they fill
    whole words and every row starts on one; else 0 (16-bit values / bytes as before)."""
    sw = L._scale_words
    assert sw("affine", 2, 64) == 1 and sw("symmetric", 4, 64) == 2
    assert sw("affine", 1, 64) == 0  # half a word a step
    assert sw("affine", 2, 63) == 0  # rows of an odd number of fp16 scales: not all aligned
    assert sw("mxfp4", 4, 128) == 1 and sw("nvfp4", 8, 256) == 2  # E8M0 / E4M3 bytes
    assert sw("mxfp4", 4, 130) == 0 and sw("nvfp4", 4, 256) == 1
    plan = L._mma_int8_plan.__wrapped__
    for words, want in ((True, 1), (False, 0)):
        *_, meta, _key = plan(16, 256, 4096, "affine", 64, False, -1, None, True, True, True, 3,
                              words)  # fmt: skip
        assert meta["SWORDS"] == want and meta["GROUPS"] == 2
    with pytest.raises(ValueError, match="1 or 2 words"):
        G.layouts(64, 16, 2, 2, 1, 0, 4)


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 16, 2, 2, 64, 0, 1, 4096, 3, 1, "*bf16"),  # the routed default, TMA, bf16 scales
        (64, 16, 2, 2, 64, 0, 1, 4096, 0, 1, "*fp16"),  # the register kernel, fp16 scales
        (64, 8, 2, 4, 64, 1, 1, 4096, 3, 2, "*fp16"),  # 8-row tiles, two words a row
        (64, 16, 2, 4, 32, 4, 1, 4096, 3, 1, "*u8"),  # MXFP4: four E8M0 bytes a word
        (64, 16, 2, 8, 16, 5, 1, 4096, 3, 2, "*u8"),  # NVFP4: eight E4M3 bytes, two words
    ],
)
def test_scale_words_are_carried_as_loaded(cfg):
    """With the scales as words, nothing in the main loop reads a scale load's register after
    the load: the values wait in their registers for the step two ahead that uses them. Read
    as 16-bit values, ptxas repacked them right after the load (``PRMT``), so each iteration
    ended waiting for its own loads (a third of the stall samples on the H200,
    ``benches/results/gpu_gluon_tma_src_h200.txt``)."""
    *args, stages, swords, scale = cfg
    k = _compile(*args, stages=stages, swords=swords, scale=scale)
    sass = sm90_sass(k)
    assert "IMMA" in sass
    assert loop_loads_read_in_loop(sass) == []


def test_loop_loads_read_in_loop_finds_a_load_read_before_the_back_edge():
    """The helper on hand-written SASS: a 32-bit load read in its own iteration is found; one
    read only after the loop, or overwritten unread, is not."""
    sass = (  # as cuobjdump prints it: each line indented
        """
        /*0100*/                   IMMA.16832.S8.S8.SAT R8, R4.ROW, R6.COL, RZ ;
        /*0110*/                   LDG.E R20, desc[UR6][R2.64] ;
        /*0120*/                   LDG.E R21, desc[UR6][R2.64+0x4] ;
        /*0130*/                   LDG.E R22, desc[UR6][R2.64+0x8] ;
        /*0140*/                   PRMT R30, R20, 0x7632, R31 ;
        /*0150*/                   MOV R22, RZ ;
        /*0160*/              @!P0 BRA 0x100 ;
        /*0170*/                   FADD R9, R21, R22 ;
        /*0180*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4], R3 ;
        /*0190*/                   BRA 0x110 ;
        """
    )
    found = loop_loads_read_in_loop(sass)
    assert found == [("LDG.E R20, desc[UR6][R2.64]", "PRMT R30, R20, 0x7632, R31")]


@pytest.mark.parametrize(
    "arch, enc, groups, gs",
    [
        (80, 0, 2, 64),  # affine g64 on an A100
        (80, 1, 2, 64),  # symmetric
        (80, 2, 2, 64),  # NF4
        (80, 3, 1, 256),  # 8-bit symmetric as 4-bit pairs in groups of 2 x 128
        (80, 4, 4, 32),  # MXFP4
        (80, 5, 8, 16),  # NVFP4
        (86, 0, 2, 64),
        (89, 4, 4, 32),
    ],
)
def test_register_kernel_compiles_for_the_pre_hopper_gpus_it_is_routed_to(arch, enc, groups, gs):
    """``gluon_applies`` routes the register kernel to every sm_80+ device (the TMA one needs
    sm_90): each encoding's routed configuration compiles for sm_80, 86 and 89 through ptxas,
    with the int8 ``mma.sync`` those GPUs have and nothing of Hopper's (no GPU of theirs to run
    it on here: compiled, not run)."""
    k = _compile(64, 16, 2, groups, gs, enc, 1, 4096, arch=arch)
    ptx = k.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32" in ptx
    assert "wgmma" not in ptx and "cp.async.bulk" not in ptx and "griddepcontrol" not in ptx
    assert k.asm["cubin"]


@pytest.mark.parametrize("xtma", [0, 1, 2])
def test_tma_kernel_takes_activations_from_its_ring(xtma):
    """``XTMA``: each step's int8 activations (1) and their factors (2) come by TMA with the
    step's codes, on the slot's one barrier: more copies a refill, ring slots for them in
    shared memory, and none of their global loads left in the main loop (the scales' stay)."""
    k = _compile(64, 16, 2, 2, 64, 0, 1, 4096, 3, swords=1, xtma=xtma)
    copies = 1 + (xtma > 0) + (xtma > 1)
    assert k.asm["ptx"].count("cp.async.bulk.tensor") == copies * (3 + 2)  # prologue + loop
    ring = 3 * 64 * 64 + (xtma > 0) * 3 * 16 * 128 + (xtma > 1) * 3 * 2 * 16 * 4
    assert ring <= k.metadata.shared <= ring + 1024
    ops = [t.split()[0] for _a, t in imma_loop(sm90_sass(k))]
    assert ("LDG.E.128" in ops) == (xtma == 0)  # the activations, 16 bytes a row
    assert ("LDG.E.64" in ops) == (xtma < 2)  # the factors of the thread's rows
    assert "LDG.E" in ops  # the scales, as words


def test_act_tma_rules_and_descriptors():
    """Where the plan turns ``XTMA`` down, and the descriptors it gives the TMA kernel."""
    assert L.act_tma(2, 2, 2, 16, False) == 2
    assert L.act_tma(2, 2, 2, 8, False) == 1  # 64-byte factor slots: misaligned copies
    assert L.act_tma(2, 2, 4, 8, False) == 2
    assert L.act_tma(1, 4, 2, 16, False) == 0  # 256-byte rows: wider than any swizzle
    assert L.act_tma(1, 2, 4, 16, True) == 0  # the blocked FP4 codes: measured slower
    plan = L._mma_int8_plan.__wrapped__
    for M, enc, g, mode, want in ((16, "affine", 64, 2, 2), (5, "affine", 64, 2, 1),
                                  (16, "nf4", 64, 1, 1), (16, "mxfp4", 32, 1, 0),
                                  (16, "affine", 128, 1, 0), (16, "affine", 64, 0, 0)):  # fmt: skip
        MP, *_, meta, key = plan(M, 4096, 4096, enc, g, False, -1, None, True, True, True, 3,
                                 True, mode)  # fmt: skip
        assert meta["XTMA"] == want, (M, enc, g, mode)
        assert ("XTMA", want) in key
        G_ = 4096 // g
        xq = torch.zeros(MP, 4096, dtype=torch.int8)
        xs = torch.zeros(2, G_, MP)
        stand_in = object()
        q, d = L._acts_descriptors(xq, xs, meta, stand_in)
        if want == 0:
            assert q is stand_in and d is stand_in
            continue
        step = g * meta["GROUPS"]
        assert list(q.shape) == [MP, 1024] and q.block_shape == [meta["BLOCK_M"], step // 4]
        assert q.base.data_ptr() == xq.data_ptr()
        if want == 1:
            assert d is stand_in
        else:
            assert list(d.shape) == [G_, MP] and d.block_shape == [meta["GROUPS"], meta["BLOCK_M"]]
            assert d.base.data_ptr() == xs.data_ptr()


def test_act_descriptors_of_kept_workspaces_are_made_once(monkeypatch):
    """The descriptors of ``mma_int8_linear``'s kept workspaces are made on the first call and
    reused; a buffer that is not the kept one (a CUDA-graph capture's) gets its own each call."""
    monkeypatch.setattr(L, "_WORKSPACES", {})
    monkeypatch.setattr(L, "_ACT_DESCRIPTORS", {})
    plan = L._mma_int8_plan.__wrapped__
    MP, *_, meta, _key = plan(16, 4096, 4096, "affine", 64, False, -1, None, True, True, True,
                              3, True, 2)  # fmt: skip
    dev = torch.device("cpu")
    xq = L._workspace(dev, (MP, 4096), torch.int8, L._XQ_USE)
    xs = L._workspace(dev, (2, 64, MP), torch.float32, L._XS_USE)
    first = L._acts_descriptors(xq, xs, meta, None)
    again = L._acts_descriptors(xq, xs, meta, None)
    assert again[0] is first[0] and again[1] is first[1]
    assert first[0].base.data_ptr() == xq.data_ptr() and first[1].base.data_ptr() == xs.data_ptr()
    other = torch.zeros_like(xq)  # not the kept buffer
    a = L._acts_descriptors(other, xs, meta, None)
    b = L._acts_descriptors(other, xs, meta, None)
    assert a[0] is not b[0] and a[0].base.data_ptr() == other.data_ptr()
    one = dict(meta, XTMA=1)  # mode 1: the factors' descriptor is the stand-in
    stand_in = object()
    q, d = L._acts_descriptors(xq, xs, one, stand_in)
    assert d is stand_in and q.base.data_ptr() == xq.data_ptr()
