"""transformers' own loaders on converted folders (quant_method "qtensors"): config.json's
quantization_config, AutoModelForCausalLM / AutoModel / pipeline / SentenceTransformer with the
linears kept quantized, outputs equal to qtensors.torch.from_pretrained's; the architecture
picked from the config; rotary buffers of a meta-built model; the kernel warm-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import QuantizedLinear
from qtensors.torch.warmup import default_rows, gemm16_only_rows

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama saved by transformers, converted to int4-g64 with lm_head raw."""
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    base = tmp_path_factory.mktemp("llama")
    src, dst = base / "src", base / "dst"
    model.save_pretrained(src)
    qt.convert(src, dst, quant="int4-g64", keep=["lm_head.weight"])
    return src, dst


IDS = torch.tensor([[3, 17, 40, 5, 88, 1]])


def test_config_round_trip(tiny_llama):
    src, dst = tiny_llama
    with open(dst / "config.json", encoding="utf-8") as fh:
        qc = json.load(fh)["quantization_config"]
    assert qc["quant_method"] == "qtensors"
    assert qc["encoding"] == {
        "name": "affine",
        "group_size": 64,
        "axis": -1,
        "bits": 4,
        "scale_dtype": "float16",
    }
    assert qc["keep"] == ["lm_head.weight"]
    assert qc["modules_not_quantized"] == ["lm_head"]
    assert qc["weights"] == "model.qtensors"
    # transformers' index names every tensor, all in the qtensors shard
    with open(dst / "model.safetensors.index.json", encoding="utf-8") as fh:
        index = json.load(fh)
    assert index["metadata"]["format"] == "qtensors"
    with qt.safe_open(dst / "model.qtensors") as f:
        assert sorted(index["weight_map"]) == sorted(f.keys())
    assert set(index["weight_map"].values()) == {"model.qtensors"}
    # transformers reads it back as our config class
    cfg = transformers.AutoConfig.from_pretrained(dst)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst)
    loaded = model.config.quantization_config
    assert type(loaded).__name__ == "QtensorsConfig"
    assert loaded.modules_not_quantized == ["lm_head"] and loaded.warmup is True
    assert cfg.quantization_config["encoding"] == loaded.encoding
    # a folder holding such an index beside its safetensors: convert skips the pointer index
    mixed = dst.parent / "mixed"
    shutil.copytree(src, mixed)
    shutil.copy(dst / "model.safetensors.index.json", mixed)
    res = qt.convert(mixed, dst.parent / "again", quant="int8")
    assert any("model.safetensors.index.json (the output of" in n for n in res.notes)
    with open(dst.parent / "again" / "model.safetensors.index.json", encoding="utf-8") as fh:
        assert set(json.load(fh)["weight_map"].values()) == {"model.qtensors"}


def test_auto_causal_lm_keeps_linears_quantized(tiny_llama):
    src, dst = tiny_llama
    model = transformers.AutoModelForCausalLM.from_pretrained(dst)
    assert type(model).__name__ == "LlamaForCausalLM"
    q = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(q) == 2 * 7  # q k v o gate up down per layer; lm_head kept raw
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.qtensors_load_result.missing_keys == []
    # the rotary frequencies are the model's own, not left on meta nor zeros
    fresh = transformers.AutoModelForCausalLM.from_pretrained(src)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    # the same logits as qtensors' own loader (same file, same kernels)
    ours = qtt.from_pretrained(dst)
    assert type(ours).__name__ == "LlamaForCausalLM"  # from config.architectures
    with torch.no_grad():
        got = model(IDS).logits
        want = ours(IDS).logits
        ref = fresh(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and close to the float model (4-bit weights of a random model: loose)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ours.generate(IDS, max_new_tokens=4, do_sample=False))


def test_auto_model_and_device_map(tiny_llama):
    _, dst = tiny_llama
    model = transformers.AutoModel.from_pretrained(dst, device_map="cpu", dtype=torch.float32)
    assert type(model).__name__ == "LlamaModel"
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    ours = qtt.from_pretrained(dst, model_cls=transformers.AutoModel)
    with torch.no_grad():
        torch.testing.assert_close(
            model(IDS).last_hidden_state, ours(IDS).last_hidden_state, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match="one device"):
        transformers.AutoModel.from_pretrained(dst, device_map={"embed_tokens": "cpu", "": "meta"})


def test_save_pretrained_and_on_the_fly_quantization_refused(tiny_llama, tmp_path):
    src, dst = tiny_llama
    model = transformers.AutoModelForCausalLM.from_pretrained(dst)
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "out")
    config_cls = type(model.config.quantization_config)
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config_cls())


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )


def test_registration_order_and_loud_failure_without_it(tiny_llama):
    _, dst = tiny_llama
    # qtensors.torch imported first: registered as soon as transformers imports its quantizers
    ok = _run(
        "import qtensors.torch, transformers as t\n"
        f"m = t.AutoModelForCausalLM.from_pretrained({str(dst)!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[-1] == "QuantizedLinear"
    # transformers' quantizers imported first: registered at once by import qtensors.torch
    ok = _run(
        "import transformers as t, transformers.quantizers.auto, qtensors.torch\n"
        f"m = t.AutoModelForCausalLM.from_pretrained({str(dst)!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[-1] == "QuantizedLinear"
    # never registered: transformers fails on the qtensors shards instead of random weights
    bad = _run(f"import transformers as t; t.AutoModelForCausalLM.from_pretrained({str(dst)!r})")
    assert bad.returncode != 0
    assert "qtensors" in bad.stderr


def test_warmup_runs_each_layer_kind_once(tiny_llama):
    _, dst = tiny_llama
    model = qtt.from_pretrained(dst)
    warmed = qtt.warmup(model)
    # 2 layers, 7 linears each, 4 distinct (shape, encoding, dtype): q/o [64,64], k/v [32,64],
    # gate/up [128,64], down [64,128], and the joined siblings' (fuse_siblings): q|k|v
    # [128,64] (gate's), gate|up [256,64]; each batch size of the routing (the CUDA-core
    # kernel's specialisations, the tl.dot kernel if routed, the decode path; not the gemm16
    # route's own, which run only on sm_90 for its tables' weights); plus the embedding table
    rows = [m for m in default_rows() if m not in gemm16_only_rows()]
    assert len(rows) >= 3 and rows[0] == 1
    assert len(warmed) == 5 * len(rows) + 1
    shapes = {w[1] for w in warmed if w[0] == "linear"}
    assert shapes == {(64, 64), (32, 64), (128, 64), (64, 128), (256, 64)}
    assert [w for w in warmed if w[0] == "embedding"] == [
        ("embedding", (96, 64), ("affine", 4, 64, 1, "float16"), True, torch.float32, "cpu", 1)
    ]
    assert qtt.warmup(model, rows=(1,)) == [w for w in warmed if w[-1] == 1]
    # the CPU compiles nothing: loads onto the CPU warm nothing
    assert model.qtensors_load_result.warmed == []


def test_meta_built_model_gets_its_rotary_buffers(tiny_llama):
    src, dst = tiny_llama
    cfg = transformers.AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert model.model.rotary_emb.inv_freq.is_meta
    res = qtt.load_model(model, dst, device="cpu")
    assert res.meta_buffers == []
    fresh = transformers.LlamaForCausalLM(cfg)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


@pytest.fixture(scope="module")
def minilm_q(bert_path, tmp_path_factory):
    src = os.path.dirname(bert_path)
    dst = tmp_path_factory.mktemp("minilm") / "q"
    qt.convert(src, dst, quant="int8")
    return src, dst


SENTENCES = ["A man is playing a guitar.", "The weather is sunny today.", "Stocks fell."]


@pytest.mark.slow
def test_minilm_auto_model_and_pipeline(minilm_q):
    src, dst = minilm_q
    model = transformers.AutoModel.from_pretrained(dst)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 6 * 6 + 1  # + pooler
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    ours = qtt.from_pretrained(dst)
    emb = qtt.sentence_embeddings(model, tok, SENTENCES)
    torch.testing.assert_close(emb, qtt.sentence_embeddings(ours, tok, SENTENCES), rtol=0, atol=0)
    ref_model = transformers.AutoModel.from_pretrained(src).eval()
    ref = qtt.sentence_embeddings(ref_model, tok, SENTENCES)
    assert (emb * ref).sum(1).min() > 0.999  # int8
    pipe = transformers.pipeline("feature-extraction", model=str(dst))
    assert any(isinstance(m, QuantizedLinear) for m in pipe.model.modules())
    feats = torch.tensor(pipe(SENTENCES[0])[0])
    batch = tok([SENTENCES[0]], return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).last_hidden_state[0]
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sentence_transformers(minilm_q):
    st = pytest.importorskip("sentence_transformers")
    src, dst = minilm_q
    model = st.SentenceTransformer(str(dst), device="cpu")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    got = torch.as_tensor(model.encode(SENTENCES, convert_to_numpy=True))
    ref = torch.as_tensor(
        st.SentenceTransformer(src, device="cpu").encode(SENTENCES, convert_to_numpy=True)
    )
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() > 0.999, cos
