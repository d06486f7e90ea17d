"""The load's background replica (``qtensors.torch.prewarm``): built without weights, runs on
zeros, contained when it fails, only on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtensors.torch import prewarm as P

transformers = pytest.importorskip("transformers")


def _config(layers: int = 4):
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )


def test_replica_has_one_layer_and_no_weights():
    cfg = _config()
    model = P.build_replica(transformers.LlamaForCausalLM, cfg)
    assert len(model.model.layers) == 1
    assert cfg.num_hidden_layers == 4  # the caller's config is untouched
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, P._Zeros) and model.lm_head.out_features == 96
    assert model.model.embed_tokens.num_embeddings == P.EMBED_ROWS
    assert all(p.is_meta for p in model.parameters())
    # what is left: the embedding's rows and the norms
    assert sum(p.numel() for p in model.parameters()) == P.EMBED_ROWS * 64 + 3 * 64


def test_replica_runs_a_prompt_on_zeros():
    model = P.build_replica(transformers.LlamaForCausalLM, _config())
    P._materialize(model, torch.device("cpu"), torch.float32)
    assert all(not t.is_meta and not t.any() for t in [*model.parameters(), *model.buffers()])
    calls = []
    model.register_forward_hook(
        lambda m, a, k, out: calls.append(out.logits.shape), with_kwargs=True
    )
    P.run_replica(model, torch.device("cpu"))
    assert calls == [(1, P.PROMPT_TOKENS, 96)]


def test_only_cuda_devices_start_a_thread():
    for device in (None, "cpu"):
        p = P.Prewarm(transformers.LlamaForCausalLM, _config(), device, torch.float16).start()
        assert p._thread is None and p.join() == 0.0 and p.error is None


def test_failures_are_contained(monkeypatch):
    class Broken(transformers.LlamaForCausalLM):
        def __init__(self, config):
            raise RuntimeError("cannot build")

    p = P.Prewarm(Broken, _config(), "cuda", torch.float16).start()
    assert p._thread is None and p.join() == 0.0
    assert "cannot build" in str(p.error)

    def boom(*args):
        raise RuntimeError("no device")

    monkeypatch.setattr(P, "_materialize", boom)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start()
    assert p._thread is not None
    assert p.join() >= 0.0 and "no device" in str(p.error)
    assert p._model is None  # its memory is released either way


def test_switched_off(monkeypatch):
    monkeypatch.setattr(P, "ENABLED", False)
    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda", torch.float16)
    assert p._model is None and p.start().join() == 0.0
