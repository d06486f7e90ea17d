"""GPTQ, AWQ and compressed-tensors model folders imported (qtensors.interop.quantized_folder).

compressed-tensors checkpoints are made and decoded by the compressed-tensors package itself
(PackedQuantizationCompressor). AWQ packing is checked against AutoAWQ's own WQLinear_GEMM packer
and dequantize_gemm (`pip install --no-deps autoawq`: pure Python without its CUDA kernels).
GPTQModel / AutoGPTQ are source builds of CUDA extensions, so the GPTQ (and folder-level AWQ)
packers below are written from their documented layouts, independent of the importer's
unpackers, with their reference decode (q - z) * s in fp16. Every imported weight must decode
bit for bit to the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("safetensors.torch")

import qtensors as qt  # noqa: E402
from qtensors.errors import ForeignFormatError  # noqa: E402
from qtensors.interop import detect, import_model  # noqa: E402
from qtensors.interop.intgroups import (  # noqa: E402
    IntGroups,
    codes_part,
    exact_in,
    fold_g_idx,
    map_exact,
)

HIDDEN, FF, LAYERS = 64, 128, 2
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
LINEARS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_llama(folder, dtype):
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=HIDDEN,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def save_quantized(folder, state, qconfig):
    st.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (folder / "config.json").write_text(json.dumps(cfg))


def imported(dst):
    with qt.safe_open(str(dst / "model.qtensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_bit_equal(got, want, name):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name


# -- GPTQ and AWQ packers, from their documented layouts -------------------------------------------


def group_params(w, g_idx, groups, bits, sym):
    """Per (out, group) scale (fp16) and integer zero of min-max / absmax quantization."""
    maxq = (1 << bits) - 1
    w = w.float()
    lo = torch.stack([w[:, g_idx == k].amin(1) for k in range(groups)], 1).clamp(max=0)
    hi = torch.stack([w[:, g_idx == k].amax(1) for k in range(groups)], 1).clamp(min=0)
    if sym:
        scale = (torch.maximum(-lo, hi) * 2 / maxq).clamp(min=1e-5).half()
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        scale = ((hi - lo) / maxq).clamp(min=1e-5).half()
        zero = torch.round(-lo / scale.float()).to(torch.int64).clamp(0, maxq)
    q = torch.round(w / scale.float()[:, g_idx] + zero[:, g_idx]).clamp(0, maxq).to(torch.int64)
    return q, scale, zero


def pack_words(vals, bits, dim):
    """Pack `vals` (non-negative ints) along `dim`, field j of a word at bits j*bits."""
    per = 32 // bits
    v = vals.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for j in range(per):
        words |= (v[..., j] & ((1 << bits) - 1)) << (bits * j)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim)


def gptq_tensors(w, bits, gs, sym, v1, g_idx=None):
    cols = w.shape[1]
    g_idx = torch.arange(cols) // gs if g_idx is None else g_idx
    groups = cols // gs
    q, scale, zero = group_params(w, g_idx, groups, bits, sym)
    if v1 and not sym:
        zero[0, 0] = 0  # v1 stores zero - 1: this one wraps and reads back as 2^bits
        q[0, g_idx == 0] = torch.randint(0, 1 << bits, (int((g_idx == 0).sum()),))
    stored = zero - 1 if v1 else zero
    read_zero = ((stored & ((1 << bits) - 1)) + 1) if v1 else zero  # as AutoGPTQ reads it
    tensors = {
        "qweight": pack_words(q.T.contiguous(), bits, 0),
        "qzeros": pack_words(stored.T.contiguous(), bits, 1),
        "scales": scale.T.contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }
    ref = (q - read_zero[:, g_idx]).half() * scale[:, g_idx]  # AutoGPTQ's decode, in fp16
    return tensors, ref


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(vals):
    """(rows, out) 4-bit values -> (rows, out/8) words, nibble i holding output AWQ_ORDER[i]."""
    v = vals.reshape(vals.shape[0], -1, 8)[:, :, AWQ_ORDER]
    return pack_words(v.reshape(vals.shape[0], -1), 4, 1)


def awq_tensors(w, gs):
    cols = w.shape[1]
    g_idx = torch.arange(cols) // gs
    q, scale, zero = group_params(w, g_idx, cols // gs, 4, sym=False)
    tensors = {
        "qweight": awq_pack(q.T.contiguous()),
        "qzeros": awq_pack(zero.T.contiguous()),
        "scales": scale.T.contiguous(),
    }
    return tensors, (q - zero[:, g_idx]).half() * scale[:, g_idx]


def gptq_folder(tmp_path, bits, gs, sym, v1, act_order=False):
    src = tmp_path / "src"
    state = tiny_llama(src, torch.float16)
    refs = {}
    gen = torch.Generator().manual_seed(1)
    for i in range(LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            w = state.pop(p + ".weight")
            g_idx = None
            if act_order:  # GPTQ's desc_act: groups formed in a permuted column order
                perm = torch.randperm(w.shape[1], generator=gen)
                g_idx = torch.empty(w.shape[1], dtype=torch.int64)
                g_idx[perm] = torch.arange(w.shape[1]) // gs
            t, refs[p + ".weight"] = gptq_tensors(w, bits, gs, sym, v1, g_idx)
            state.update({f"{p}.{k}": v for k, v in t.items()})
    qc = {"quant_method": "gptq", "bits": bits, "group_size": gs, "sym": sym}
    qc.update(desc_act=act_order, checkpoint_format="gptq" if v1 else "gptq_v2")
    save_quantized(src, state, qc)
    return src, state, refs


@pytest.mark.parametrize(
    "bits,sym,v1", [(4, True, True), (4, False, True), (4, False, False), (8, True, False)]
)
def test_gptq_imports_bit_exact(tmp_path, bits, sym, v1):
    src, state, refs = gptq_folder(tmp_path, bits, 32, sym, v1)
    assert detect(src) == "gptq"
    dst = tmp_path / "dst"
    report = import_model(src, dst)
    got = imported(dst)
    for name, ref in refs.items():
        assert_bit_equal(got[name], ref, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name], state[name])
    assert report.count("exact") == len(refs) and report.count("reencoded") == 0
    encs = {t.encoding.split()[0] for t in report.tensors if t.how == "exact"}
    assert encs == ({"symmetric"} if sym else {"affine"})
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    assert not (dst / "model.safetensors").exists()


def test_gptq_act_order_is_folded_exactly(tmp_path):
    src, _, refs = gptq_folder(tmp_path, 4, 16, False, False, act_order=True)
    report = import_model(src, tmp_path / "dst")
    got = imported(tmp_path / "dst")
    for name, ref in refs.items():
        assert_bit_equal(got[name], ref, name)
    assert all("act-order" in t.encoding for t in report.tensors if t.how == "exact")


def test_fold_keeps_runs_of_constant_group():
    g_idx = np.repeat(np.array([1, 0, 3, 2]), 4)  # runs of 4 columns, groups out of order
    scales = np.arange(8, dtype=np.float64).reshape(2, 4) + 1
    g = IntGroups((2, 16), scales, "float16", None, 4, 4, g_idx)
    folded, note = fold_g_idx(g, "GPTQ", "w")
    assert folded.group_size == 4 and "4 -> 4" in note
    assert np.array_equal(folded.scales, scales[:, [1, 0, 3, 2]])
    g2 = IntGroups((2, 16), scales, "float16", None, 4, 4, np.arange(16) // 4)
    assert fold_g_idx(g2, "GPTQ", "w")[0].g_idx is None


def test_mins_fall_back_to_fp32_only_when_inexact():
    s = np.array([[0.1, 0.3]], dtype=np.float16).astype(np.float64)
    exact = IntGroups((1, 64), s, "float16", np.array([[4, 2]]), 4, 32)  # z a power of two
    assert map_exact(exact, "GPTQ", "w").encoding.scale_dtype == "float16"
    odd = IntGroups((1, 64), s, "float16", np.array([[7, 13]]), 4, 32)
    assert not exact_in(-np.array([7, 13]) * s[0], "float16")
    assert map_exact(odd, "GPTQ", "w").encoding.scale_dtype == "float32"


def test_awq_imports_bit_exact(tmp_path):
    src = tmp_path / "src"
    state = tiny_llama(src, torch.float16)
    refs = {}
    for i in range(LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            t, refs[p + ".weight"] = awq_tensors(state.pop(p + ".weight"), 32)
            state.update({f"{p}.{k}": v for k, v in t.items()})
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}
    save_quantized(src, state, qc)
    assert detect(src) == "awq"
    report = import_model(src, tmp_path / "dst")
    got = imported(tmp_path / "dst")
    for name, ref in refs.items():
        assert_bit_equal(got[name], ref, name)
    assert report.count("exact") == len(refs)

    qc["version"] = "gemv"
    save_quantized(src, state, qc)
    with pytest.raises(ForeignFormatError, match=r"version = 'gemv'"):
        import_model(src, tmp_path / "dst2")
    assert not (tmp_path / "dst2").exists()


def _autoawq():
    """AutoAWQ's own GEMM packer and dequantizer (pure Python; it imports `datasets` for
    calibration only, which a stub stands in for when it is not installed)."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("awq") is None:
        pytest.skip("pip install --no-deps autoawq")
    if importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules:
        stub = types.ModuleType("datasets")
        stub.load_dataset = None
        sys.modules["datasets"] = stub
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    return WQLinear_GEMM, dequantize_gemm


def test_awq_unpack_matches_autoawq():
    """AutoAWQ's WQLinear_GEMM.from_linear packs, its dequantize_gemm decodes; our unpacking
    and mapping decode to the same fp16 values bit for bit."""
    from qtensors import _core
    from qtensors.interop import packed_int as P

    wq, dequantize_gemm = _autoawq()
    gen = torch.Generator().manual_seed(3)
    out, cols, gs = 64, 128, 32
    lin = torch.nn.Linear(cols, out, bias=False).half()
    lin.weight.data = ((torch.rand(out, cols, generator=gen) - 0.5) * 0.1).half()
    scales = (torch.rand(cols // gs, out, generator=gen) * 0.01 + 0.0143).half()
    zeros = torch.randint(4, 12, (cols // gs, out), generator=gen)
    m = wq.from_linear(lin, 4, gs, scales=scales, zeros=zeros)
    want = dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, gs).T.contiguous()  # [out, in]
    codes = P.awq_unpack(m.qweight.numpy(), out, "qweight").T
    z = P.awq_unpack(m.qzeros.numpy(), out, "qzeros").T.astype(np.int64)
    g = IntGroups((out, cols), m.scales.numpy().T.astype(np.float64), "float16", z, 4, gs)
    mapped = map_exact(g, "AWQ", "w")
    parts = [codes_part(np.ascontiguousarray(codes), 4, (out, cols), "AWQ", "w")]
    parts += [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in mapped.scale_parts]
    enc = json.dumps(mapped.encoding.to_dict(2))
    got = np.frombuffer(_core.decode(parts, "float16", [out, cols], enc), np.float16)
    assert got.tobytes() == want.numpy().tobytes()


# -- compressed-tensors, by its own compressor ----------------------------------------------------


def ct_folder(tmp_path, bits, sym, strategy="group", gs=32):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor as PQC,
    )
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    del ct
    src = tmp_path / "src"
    state = tiny_llama(src, torch.bfloat16)
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy=strategy,
        group_size=gs if strategy == "group" else None,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    refs = {}
    for i in range(LAYERS):
        for lin in LINEARS:
            p = f"model.layers.{i}.{lin}"
            w = state.pop(p + ".weight")
            size = gs if strategy == "group" else w.shape[1]
            g = w.float().reshape(w.shape[0], -1, size)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
            sd = {"weight": w, "weight_scale": scale.to(torch.bfloat16)}
            if not sym:
                sd["weight_zero_point"] = zp
            packed = PQC.compress(sd, scheme)
            refs[p + ".weight"] = PQC.decompress(packed, scheme)["weight"]
            state.update({f"{p}.{k}": v for k, v in packed.items()})
    qc = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"]
    )
    save_quantized(src, state, qc.model_dump(mode="json"))
    return src, refs


@pytest.mark.parametrize(
    "bits,sym,strategy", [(4, True, "group"), (4, False, "group"), (8, True, "channel")]
)
def test_compressed_tensors_imports_bit_exact(tmp_path, bits, sym, strategy):
    src, refs = ct_folder(tmp_path, bits, sym, strategy)
    assert detect(src) == "compressed-tensors"
    report = import_model(src, tmp_path / "dst")
    got = imported(tmp_path / "dst")
    for name, ref in refs.items():
        assert ref.dtype == torch.bfloat16
        assert_bit_equal(got[name], ref, name)
    assert report.count("exact") == len(refs)


def test_imported_model_runs_like_the_reference(tmp_path):
    import qtensors.torch as qtt

    src, refs = ct_folder(tmp_path, 4, False)
    dst = tmp_path / "dst"
    import_model(src, dst)
    ours = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM, keep_quantized=False)
    got = ours.state_dict()
    for name, ref in refs.items():
        assert torch.equal(got[name], ref), name
    x = torch.tensor([[1, 5, 9, 2, 40]])
    kept = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM)
    with torch.inference_mode():
        a, b = ours(x).logits.float(), kept(x).logits.float()
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_cli_convert_recognises_quantized_folders(tmp_path, capsys):
    from qtensors.cli import main

    src, _ = ct_folder(tmp_path, 4, True)
    assert main(["convert", str(src), str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "model.qtensors").exists()
    assert main(["convert", str(src), str(tmp_path / "out2")]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "out3"), "--preset", "nf4"]) == 1
    assert "maps exactly" in capsys.readouterr().err


def test_malformed_folders_name_format_and_tensor(tmp_path):
    src, state, _ = gptq_folder(tmp_path, 4, 32, True, True)
    bad = dict(state)
    bad["model.layers.1.mlp.up_proj.scales"] = bad["model.layers.1.mlp.up_proj.scales"][:, :5]
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    save_quantized(src, bad, qc)
    with pytest.raises(ForeignFormatError, match=r"GPTQ tensor 'model.layers.1.mlp.up_proj"):
        import_model(src, tmp_path / "dst")
    del bad["model.layers.1.mlp.up_proj.scales"]
    save_quantized(src, bad, qc)
    with pytest.raises(ForeignFormatError, match=r"GPTQ module .*up_proj.*no scales"):
        import_model(src, tmp_path / "dst")
    save_quantized(src, state, {**qc, "bits": 3})
    with pytest.raises(ForeignFormatError, match="bits = 3"):
        import_model(src, tmp_path / "dst")
    save_quantized(src, state, {**qc, "checkpoint_format": "marlin"})
    with pytest.raises(ForeignFormatError, match="checkpoint_format = 'marlin'"):
        import_model(src, tmp_path / "dst")
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}}
    save_quantized(src, state, ct)
    with pytest.raises(ForeignFormatError, match="format = 'float-quantized'"):
        import_model(src, tmp_path / "dst")
    group = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}
    ct.update(format="mixed-precision", config_groups={"g": {**group, "format": "naive"}})
    save_quantized(src, state, ct)
    with pytest.raises(ForeignFormatError, match=r"config_groups\.g\.format = 'naive'"):
        import_model(src, tmp_path / "dst")
    ct["config_groups"] = {"g": {**group, "format": "pack-quantized"}}
    save_quantized(src, state, ct)
    with pytest.raises(ForeignFormatError, match=r"config_groups\.g\.weights\.type = 'float'"):
        import_model(src, tmp_path / "dst")
    save_quantized(src, state, {**qc, "checkpoint_format": "marlin"})
    with pytest.raises(ForeignFormatError, match="checkpoint_format = 'marlin'"):
        import_model(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
