"""qtensors.torch.load_model: filling real and meta-device models from files and model folders,
quantized modules kept or decoded, both readers, tied weights, name prefixes, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import QuantizedEmbedding, QuantizedLinear


class Inner(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 32, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(12, dim)
        self.fc1 = nn.Linear(dim, 3 * dim)
        self.fc2 = nn.Linear(3 * dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.arange(12, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos(self.steps[: ids.shape[-1]])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.norm(h))


class Wrapper(nn.Module):
    base_model_prefix = "body"

    def __init__(self) -> None:
        super().__init__()
        self.body = Inner()


QUANT = {
    "fc1.weight": qt.Affine(bits=4, group_size=16, axis=-1),
    "fc2.weight": qt.FLEXGEN,
    "embed.weight": qt.NF4(group_size=16),
    "pos.weight": qt.Symmetric(bits=8, group_size=8, axis=0),
}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Inner()
    path = tmp_path / "inner.qtensors"
    qt.save_file(model.state_dict(), path, quant=QUANT)
    ref = Inner()
    ref.load_state_dict(qt.load_file(path, framework="pt"))  # the reference: CPU decode
    return path, ref


IDS = torch.tensor([[1, 5, 7, 39, 0, 2]])


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize(
    "io_kw",
    [
        {},
        {"io": "builtin", "staged": True, "chunk_bytes": 1000, "slots": 2, "threads": 2},
        {"io": "stream"},
    ],
    ids=["builtin", "builtin-ring", "stream"],
)
def test_meta_model(saved, keep, io_kw):
    path, ref = saved
    with qtt.init_empty_weights():
        model = Inner()
    assert model.fc1.weight.is_meta and not model.steps.is_meta
    res = qtt.load_model(model, path, device="cpu", keep_quantized=keep, **io_kw)
    assert not res.missing_keys and not res.unexpected_keys
    assert not any(p.is_meta for p in model.parameters())
    # kept quantized, the CPU multiplies by the packed codes (its own fp32 summation order)
    tol = 1e-5 if keep else 0
    torch.testing.assert_close(model(IDS), ref(IDS), rtol=tol, atol=tol)
    # the tied pair stays one parameter, decoded; the untied quantized layers stay quantized
    assert model.head.weight is model.embed.weight
    assert isinstance(model.embed, nn.Embedding)
    if keep:
        assert isinstance(model.fc1, QuantizedLinear) and isinstance(model.fc2, QuantizedLinear)
        assert isinstance(model.pos, QuantizedEmbedding)
        assert sorted(res.quantized_modules) == ["fc1", "fc2", "pos"]
        assert model.fc1.bias is not None and not model.fc1.bias.is_meta
    else:
        assert type(model.fc1) is nn.Linear and not res.quantized_modules
    assert res.bytes_read > 0


def test_real_model_and_dtype(saved):
    path, ref = saved
    model = Inner()
    res = qtt.load_model(model, path, keep_quantized=False, dtype=torch.float16)
    assert res.device == torch.device("cpu")
    assert model.fc1.weight.dtype == torch.float16 and model.steps.dtype == torch.int64
    torch.testing.assert_close(model.fc1.weight, ref.fc1.weight.half(), rtol=0, atol=0)


def test_prefix_and_folder_with_index(tmp_path, saved):
    _, ref = saved
    sd = ref.state_dict()
    names = list(sd)
    folder = tmp_path / "model"
    folder.mkdir()
    half = len(names) // 2
    shards = {"a.qtensors": names[:half], "b.qtensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        qt.save_file({k: sd[k] for k in keys}, folder / shard, quant=QUANT)
        weight_map.update({k: shard for k in keys})
    (folder / "model.qtensors.index.json").write_text(
        json.dumps({"metadata": {"format": "qtensors"}, "weight_map": weight_map})
    )
    assert [p.rsplit("/", 1)[-1] for p in qtt.model_files(folder)] == ["a.qtensors", "b.qtensors"]
    with torch.device("meta"):
        wrapped = Wrapper()
    res = qtt.load_model(wrapped, folder, device="cpu", strict=True)
    assert not res.unexpected_keys
    # the non-persistent buffer was built on meta and is in no file: not a missing key
    assert wrapped.body.fc1(torch.ones(1, 32)).shape == (1, 96)


def test_key_map_and_errors(saved):
    path, _ = saved
    model = Inner(tie=False)
    res = qtt.load_model(model, path, key_map=lambda k: None if k.startswith("pos") else k)
    assert "pos.weight" in res.unexpected_keys and "pos.weight" in res.missing_keys
    with pytest.raises(KeyError, match=r"pos\.weight"):
        qtt.load_model(Inner(tie=False), path, strict=True, key_map=lambda k: k.replace("pos", "x"))
    small = Inner(vocab=41)
    with pytest.raises(ValueError, match="shape"):
        qtt.load_model(small, path)


def test_bad_io(saved):
    path, _ = saved
    with pytest.raises(ValueError, match="io"):
        qtt.load_model(Inner(), path, io="nope")


def test_save_model_stores_tied_weights_once(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = qtt.save_model(model, tmp_path / "m.qtensors", quant=qt.Raw())
    with qt.safe_open(path) as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    fresh = LlamaForCausalLM(cfg).eval()
    res = qtt.load_model(fresh, path)
    assert not res.missing_keys
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
