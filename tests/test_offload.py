"""`qtensors.torch.offload` on the CPU: an offloaded model computes exactly what the same model
with the file loaded fully computes, with weights present only while their module runs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import qtensors as qt
from qtensors.torch import init_empty_weights
from qtensors.torch.offload import offload


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _saved(model: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    qt.save_file(model.state_dict(), path)
    return qt.load_file(path, framework="pt")


def _fully_loaded(cls, cfg, weights):
    m = cls(cfg).eval()
    m.load_state_dict(weights, strict=False)
    return m


def _offloaded(cls, cfg, path, **kw):
    with init_empty_weights():
        m = cls(cfg).eval()
    return offload(m, path, device="cpu", **kw)


def test_llama_equals_fully_loaded(tmp_path):
    torch.manual_seed(0)
    cfg = _llama_config()
    path = tmp_path / "llama.qtensors"
    weights = _saved(LlamaForCausalLM(cfg), path)
    ref = _fully_loaded(LlamaForCausalLM, cfg, weights)
    off = _offloaded(LlamaForCausalLM, cfg, path, prefetch=2)
    h = off.qtensors_offload
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = ref(ids[:, :8], use_cache=True)
        got = off(ids[:, :8], use_cache=True)
        assert torch.equal(got.logits, want.logits)
        first_pass_misses = h.stats()["misses"]
        # Token by token with the KV cache: still identical; the learned order prefetches every
        # module in time, so no load waits on a miss after the first pass.
        pw, pg = want.past_key_values, got.past_key_values
        for t in range(8, 12):
            w = ref(ids[:, t : t + 1], past_key_values=pw, use_cache=True)
            g = off(ids[:, t : t + 1], past_key_values=pg, use_cache=True)
            assert torch.equal(g.logits, w.logits)
            pw, pg = w.past_key_values, g.past_key_values
    st = h.stats()
    assert st["misses"] == first_pass_misses
    assert st["units"] == len([p for p in ref.parameters()])  # one unit per parametrized module
    assert st["loads"] == 5 * st["units"]
    # Weights left after use: every parameter is a meta placeholder again, nothing is active,
    # and no more than `prefetch` modules are loaded ahead.
    assert all(p.device.type == "meta" for p in off.parameters())
    assert not h.active and len(h.pending) <= 2
    h.remove()


def test_gpt2_tied_weights(tmp_path):
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    path = tmp_path / "gpt2.qtensors"
    src = GPT2LMHeadModel(cfg).eval()
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    qt.save_file(sd, path)  # the tied lm_head is found under its alias transformer.wte.weight
    weights = qt.load_file(path, framework="pt")
    ref = _fully_loaded(GPT2LMHeadModel, cfg, weights)
    ref.tie_weights()
    off = _offloaded(GPT2LMHeadModel, cfg, path, prefetch=1)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(off(ids).logits, ref(ids).logits)
        assert torch.equal(off(ids).logits, ref(ids).logits)


def test_minilm(tmp_path, bert_path):
    path = tmp_path / "minilm.qtensors"
    qt.convert(bert_path, path)
    cfg = BertConfig.from_json_file(os.path.join(os.path.dirname(bert_path), "config.json"))
    ref = _fully_loaded(BertModel, cfg, qt.load_file(path, framework="pt"))
    off = _offloaded(BertModel, cfg, path, prefetch=3, verify=True)
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        for _ in range(2):
            got = off(input_ids=ids, attention_mask=mask).last_hidden_state
            assert torch.equal(got, want)


def test_errors(tmp_path):
    torch.manual_seed(2)
    cfg = _llama_config()
    path = tmp_path / "llama.qtensors"
    model = LlamaForCausalLM(cfg)
    sd = model.state_dict()
    qt.save_file({k: v for k, v in sd.items() if k != "lm_head.weight"}, path)
    with pytest.raises(ValueError, match="not in the file"):
        _offloaded(LlamaForCausalLM, cfg, path)
    # strict=False keeps a parameter that has values (not meta) resident on the device.
    m = LlamaForCausalLM(cfg).eval()
    offload(m, path, device="cpu", strict=False)
    assert m.lm_head.weight.device.type == "cpu"
    assert m.model.embed_tokens.weight.device.type == "meta"
    # A file truncated after opening: the forward that needs the lost bytes names the tensor.
    qt.save_file(sd, path)
    off = _offloaded(LlamaForCausalLM, cfg, path, prefetch=0)
    os.truncate(path, os.path.getsize(path) - 1000)
    with pytest.raises(qt.FormatError, match=r"truncated while streaming tensor 'lm_head\.weight'"):
        with torch.no_grad():
            off(torch.zeros(1, 4, dtype=torch.long))
    # The failed module's weights were not left behind.
    assert all(p.device.type == "meta" for p in off.parameters())
