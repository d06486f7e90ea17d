"""The load's background replica (``qtensors.torch.prewarm``): built without weights, runs on
zeros, contained when it fails, only on CUDA."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import ClassVar

import pytest
import torch
from torch import nn

from qtensors.torch import prewarm as P
from qtensors.torch.modules import QuantizedEmbedding, QuantizedLinear

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
    P._materialize(model, torch.device("cpu"), torch.bfloat16)
    assert all(not p.is_meta and not p.any() for p in model.parameters())
    assert all(not b.is_meta and b.device.type == "cpu" for b in model.buffers())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep theirs
    calls = []
    model.register_forward_hook(
        lambda m, a, k, out: calls.append(out.logits.shape), with_kwargs=True
    )
    P.run_replica(model, torch.device("cpu"))
    assert calls == [(1, P.PROMPT_TOKENS, 96)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA calls ``Prewarm`` makes itself, as no-ops (the replica's own work is patched by
    each test): these run on machines without a GPU."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())


def test_only_cuda_devices_build_a_replica():
    here = threading.get_ident()
    for device in (None, "cpu"):
        p = P.Prewarm(transformers.LlamaForCausalLM, _config(), device, torch.float16).start()
        assert not p.active and p._helpers == [] and p.error is None
        # no replica: the load runs on the caller's thread, as it would without prewarm
        assert p.alongside(lambda a, b=0: (a, b, threading.get_ident()), 1, b=2) == (1, 2, here)
        assert p.join() == 0.0


def test_failures_are_contained(monkeypatch, fake_cuda):
    class Broken(transformers.LlamaForCausalLM):
        def __init__(self, config):
            raise RuntimeError("cannot build")

    p = P.Prewarm(Broken, _config(), "cuda", torch.float16).start()
    assert not p.active and p.alongside(lambda: "loaded") == "loaded" and p.join() == 0.0
    assert "cannot build" in str(p.error)

    def boom(*args):
        raise RuntimeError("no device")

    monkeypatch.setattr(P, "_materialize", boom)
    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start()
    assert p.active
    assert p.alongside(lambda: "loaded") == "loaded"  # the load is not held back by it
    assert p.join() >= 0.0 and "no device" in str(p.error)
    assert p._model is None  # its memory is released either way


def test_the_replica_runs_here_and_the_load_in_a_worker(monkeypatch, fake_cuda):
    where = {}
    monkeypatch.setattr(P, "_materialize", lambda *a: None)
    here = threading.get_ident
    monkeypatch.setattr(P, "run_replica", lambda *a: where.setdefault("replica", here()))

    def load(x):
        where["load"] = threading.get_ident()
        return x * 2

    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start()
    assert p.alongside(load, 21) == 42 and p.error is None
    assert where["replica"] == threading.get_ident() != where["load"]
    assert not p.active  # it ran once; a second call would only load

    def fails():
        raise KeyError("no weights")

    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start()
    with pytest.raises(KeyError, match="no weights"):  # the load's own error, after the replica
        p.alongside(fails)
    assert not p.active


def test_switched_off(monkeypatch):
    monkeypatch.setattr(P, "ENABLED", False)
    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda", torch.float16)
    assert p._model is None and p.start().join() == 0.0


class _Recorder:
    """A ``Prewarm`` stand-in that records how the loaders use it."""

    made: ClassVar[list] = []

    def __init__(self, cls, config, device, dtype, files=None, fuse_siblings=False):
        self.args = (cls, config, device, dtype)
        self.files, self.fuse = files, fuse_siblings
        # the real build, where each loader makes it (inside transformers' own loading too)
        self.replica = P.build_replica(cls, config, files, dtype)
        self.joined = self.loads = 0
        self.error = RuntimeError("no replica")  # reported, and the load goes on
        _Recorder.made.append(self)

    def start(self):
        return self

    def alongside(self, load, *args, **kwargs):
        self.loads += 1
        return load(*args, **kwargs)

    def join(self):
        self.joined += 1
        return 0.25


@pytest.fixture
def tiny_folder(tmp_path):
    import qtensors as qt

    cfg = _config(2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    qt.convert(tmp_path / "src", tmp_path / "dst", quant="int4-g64", keep=["lm_head.weight"])
    return tmp_path / "dst"


def test_both_loaders_start_and_join_it(tiny_folder, monkeypatch):
    import qtensors.torch as qtt
    from qtensors.torch import transformers as qt_transformers

    monkeypatch.setattr(P, "Prewarm", _Recorder)
    monkeypatch.setattr(qt_transformers, "Prewarm", _Recorder)
    _Recorder.made.clear()
    model = qtt.from_pretrained(tiny_folder, device="cpu", dtype=torch.float16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float16)
    assert len(_Recorder.made) == 2
    assert all(r.joined == 1 and r.loads == 1 for r in _Recorder.made)
    for rec, m in zip(_Recorder.made, (model, hf), strict=True):
        cls, config, device, dtype = rec.args
        assert cls is transformers.LlamaForCausalLM and config.num_hidden_layers == 2
        assert torch.device(device).type == "cpu" and dtype == torch.float16
        assert m.qtensors_load_result.prewarm_seconds == 0.25
        assert m.qtensors_load_result.prewarm_error == "RuntimeError('no replica')"
        assert len(rec.replica.model.layers) == 1 and rec.replica.model.layers[0].self_attn
        # both give it the folder, so its layers are the quantized ones, joined as the load's
        assert os.path.samefile(rec.files, tiny_folder) and rec.fuse
        assert isinstance(rec.replica.model.layers[0].mlp.down_proj, QuantizedLinear)
    off = qtt.from_pretrained(tiny_folder, device="cpu", prewarm=False)
    assert _Recorder.made[-1].args[2] is None  # prewarm=False: no device, so no thread
    assert off.qtensors_load_result.prewarm_seconds == 0.25


@pytest.mark.parametrize(
    "make",
    [
        lambda n: (transformers.BertModel, transformers.BertConfig(
            hidden_size=32, num_hidden_layers=n, num_attention_heads=2, intermediate_size=64,
            vocab_size=50)),
        lambda n: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_embd=32, n_layer=n, n_head=2, vocab_size=50)),
        lambda n: (transformers.T5ForConditionalGeneration, transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=n, num_decoder_layers=n, num_heads=4,
            vocab_size=50, decoder_start_token_id=0)),
        # an nn.Embedding subclass with its own forward (positions, offset 2)
        lambda n: (transformers.OPTForCausalLM, transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=n, ffn_dim=64, num_attention_heads=4,
            vocab_size=50, word_embed_proj_dim=32)),
        # a padding index past the rows kept
        lambda n: (transformers.MistralForCausalLM, transformers.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=50, pad_token_id=49)),
    ],
)  # fmt: skip
def test_other_families_are_cut_to_one_layer(make):
    cls, cfg = make(3)
    model = P.build_replica(cls, cfg)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    # the same modules as the replica of the family's config written with one layer a stack
    _, one = make(1)
    assert len(list(model.modules())) == len(list(P.build_replica(cls, one).modules()))
    assert len(list(model.modules())) < len(list(cls(cfg).modules()))
    P._materialize(model, torch.device("cpu"), torch.float32)
    P.run_replica(model, torch.device("cpu"))


def test_replica_from_files_places_the_loaded_layers(tiny_folder):
    import qtensors.torch as qtt
    from qtensors.torch.siblings import group_of

    loaded = qtt.from_pretrained(tiny_folder, device="cpu", dtype=torch.float16)
    cfg = transformers.AutoConfig.from_pretrained(tiny_folder)
    replica = P.build_replica(transformers.LlamaForCausalLM, cfg, tiny_folder, torch.float16)
    assert len(replica.model.layers) == 1
    mine, theirs = replica.model.layers[0], loaded.model.layers[0]
    for name, m in theirs.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            r = mine.get_submodule(name)
            assert type(r) is type(m) and r.weight.op_args == m.weight.op_args
            assert r.weight.dtype == m.weight.dtype and r.weight.codes.is_meta
    assert isinstance(replica.model.embed_tokens, type(loaded.model.embed_tokens))
    assert replica.model.embed_tokens.weight.shape == loaded.model.embed_tokens.weight.shape
    # the LM head is stored raw: a real linear in the load's dtype (cuBLAS warms too)
    assert type(replica.lm_head) is nn.Linear and replica.lm_head.weight.dtype == torch.float16
    P._materialize(replica, torch.device("cpu"), torch.float16)
    assert all(not t.is_meta for t in [*replica.parameters(), *replica.buffers()])
    assert not mine.mlp.down_proj.weight.codes.any()
    from qtensors.torch.siblings import fuse_siblings

    assert fuse_siblings(replica) == 2  # q/k/v and gate/up, as the load joined them
    joined = group_of(mine.self_attn.q_proj)
    assert joined is not None and joined.op_args == group_of(theirs.self_attn.q_proj).op_args
    logits = []
    replica.register_forward_hook(lambda m, a, k, out: logits.append(out.logits), with_kwargs=True)
    P.run_replica(replica, torch.device("cpu"))
    assert logits[0].shape == (1, P.PROMPT_TOKENS, cfg.vocab_size) and not logits[0].any()


def test_tensors_over_the_cap_get_stand_ins(tiny_folder, monkeypatch):
    monkeypatch.setattr(P, "MAX_TENSOR_BYTES", 1024)
    cfg = transformers.AutoConfig.from_pretrained(tiny_folder)
    replica = P.build_replica(transformers.LlamaForCausalLM, cfg, tiny_folder, torch.float16)
    # the LM head (96 x 64 fp16) is over the cap, the norms are not
    assert isinstance(replica.lm_head, P._Zeros)
    assert replica.model.norm.weight.dtype == torch.float16
    assert not any(isinstance(m, QuantizedLinear) for m in replica.modules())
    assert replica.model.embed_tokens.num_embeddings == P.EMBED_ROWS


@pytest.mark.parametrize(
    "cfg",
    [
        _config(),
        transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64),
        transformers.T5Config(d_model=32, d_kv=8, num_heads=4),
    ],
)
def test_common_ops_run_on_zeros(cfg):
    heads, kv, head_dim = P._attention_shape(cfg)
    assert heads * head_dim >= 32 and heads % kv == 0
    ops = P.common_ops(cfg, torch.device("cpu"), torch.bfloat16)
    for op in ops:
        op()  # each runs as written (a CUDA helper logs and skips one that fails)


def test_helpers_share_the_common_ops_and_are_joined(monkeypatch, fake_cuda):
    ran: list[int] = []
    monkeypatch.setattr(P, "_run_ops", lambda part, device: ran.append(len(part)))
    monkeypatch.setattr(P, "_materialize", lambda *a: None)
    monkeypatch.setattr(P, "run_replica", lambda *a: None)
    monkeypatch.setattr(P, "common_ops", lambda c, d, t: list(range(10)))
    monkeypatch.setattr(P, "HELPER_THREADS", 3)
    p = P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start()
    p.join()
    assert sorted(ran) == [3, 3, 4] and p._helpers == []
    monkeypatch.setattr(P, "HELPER_THREADS", 0)
    ran.clear()
    P.Prewarm(transformers.LlamaForCausalLM, _config(), "cuda:0", torch.float16).start().join()
    assert ran == []


def test_triton_driver_is_made_beside_and_awaited(tiny_folder, monkeypatch, fake_cuda):
    import time

    order: list[str] = []

    def slow_driver(ready: threading.Event) -> None:
        time.sleep(0.05)  # the replica must wait for it, however long it takes
        order.append("driver")
        ready.set()

    monkeypatch.setattr(P, "_start_triton", slow_driver)
    monkeypatch.setattr(P, "_materialize", lambda *a: order.append("materialize"))
    monkeypatch.setattr(P, "run_replica", lambda *a: order.append("run"))
    monkeypatch.setattr(P, "HELPER_THREADS", 0)
    cfg = transformers.AutoConfig.from_pretrained(tiny_folder)
    p = P.Prewarm(transformers.LlamaForCausalLM, cfg, "cuda:0", torch.float16, files=tiny_folder)
    p.start().alongside(lambda: None)
    p.join()
    assert p.error is None and order == ["materialize", "driver", "run"]
    # without files no kernel of ours runs: no driver thread, nothing awaited
    order.clear()
    P.Prewarm(transformers.LlamaForCausalLM, cfg, "cuda:0", torch.float16).start().alongside(int)
    assert order == ["materialize", "run"]


def test_replica_shares_tied_weights_as_the_load_does(tmp_path):
    import qtensors as qt
    import qtensors.torch as qtt

    cfg = _config(2)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    qt.convert(tmp_path / "src", tmp_path / "dst", quant="int4-g64")
    loaded = qtt.from_pretrained(tmp_path / "dst", device="cpu", dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one quantized weight
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "dst")
    replica = P.build_replica(transformers.LlamaForCausalLM, cfg, tmp_path / "dst", torch.bfloat16)
    assert isinstance(replica.lm_head, QuantizedLinear)
    assert isinstance(replica.model.embed_tokens, QuantizedEmbedding)
    assert replica.lm_head.weight is replica.model.embed_tokens.weight
    assert replica.lm_head.weight.op_args == loaded.lm_head.weight.op_args
