"""Tensor parallelism on the CPU: two gloo processes loading a converted Llama-shaped model with
``tp_plan="auto"`` (each reading only its shards) give the logits of one process holding the
whole model; plans and styles are resolved or refused by name."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch.tensor_parallel import TensorParallelError, resolve_plan

transformers = pytest.importorskip("transformers")

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "tp_child.py")

CASES = {
    # biases on q/k/v/o and the MLP: row-wise layers must add theirs once, after the sum; an
    # odd vocabulary: ranks hold 128 and 127 rows of the embedding and the LM head
    "int4-g64-bias": (
        dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2, vocab_size=255),
        qt.Affine(bits=4, group_size=64, axis=-1),
    ),
    # groups along the output features, tied embeddings (split by vocabulary rows both ways)
    "flexgen-tied": (
        dict(tie_word_embeddings=True, num_key_value_heads=4),
        qt.Affine(bits=4, group_size=32, axis=0),
    ),
}


def llama(**overrides):
    overrides.setdefault("vocab_size", 256)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at zero: a bias added twice would pass
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def test_model_plan_takes_the_config_plan_and_the_heads():
    from qtensors.torch.tensor_parallel import model_plan

    model = llama(vocab_size=256)
    model._tp_plan = {"lm_head": "colwise_rep"}  # a version keeping only the head's rules here
    model.model._tp_plan = None
    plan = model_plan(model)
    assert plan["lm_head"] == "colwise_rep"
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (overrides, enc) in CASES.items():
        out[name] = str(tmp_path_factory.mktemp(name) / "model")
        qtt.save_model(llama(**overrides), out[name], quant=enc)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(folders: list[str], out_dir, world: int) -> list[list[dict]]:
    """Per folder, each rank's saved results (ranks started as torchrun would)."""
    port = str(free_port())
    procs, outs = [], []
    for rank in range(world):
        outs.append([os.path.join(out_dir, f"{i}-rank{rank}.pt") for i in range(len(folders))])
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")
        args = [a for pair in zip(folders, outs[-1], strict=True) for a in pair]
        procs.append(
            subprocess.Popen(
                [sys.executable, CHILD, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [[torch.load(o[i]) for o in outs] for i in range(len(folders))]


def test_two_ranks_give_the_logits_of_one(folders, tmp_path):
    results = run_ranks(list(folders.values()), tmp_path, 2)
    assert set(results[0][0]["compiled"]) == {
        "model.layers.0.mlp.down_proj",
        "lm_head",
        "model.embed_tokens",
    }
    for (case, folder), ranks in zip(folders.items(), results, strict=True):
        whole = qtt.from_pretrained(folder, device="cpu")
        ids = (torch.arange(12).reshape(2, 6) * 37 + 5) % whole.config.vocab_size
        with torch.inference_mode():
            want = whole(ids).logits
        scale = want.abs().max().item()
        for r in ranks:  # fp32 sums in another order: a few ulps of the largest logit
            torch.testing.assert_close(r["logits"], want, rtol=0, atol=2e-5 * scale, msg=case)
        # each rank holds half of every split layer, and read about half of the file
        shapes = ranks[0]["shapes"]
        assert shapes["model.layers.0.self_attn.q_proj"] == [64, 128]
        assert shapes["model.layers.0.self_attn.o_proj"] == [128, 64]
        assert shapes["model.layers.0.mlp.down_proj"] == [128, 128]
        assert shapes["model.embed_tokens"] == [128, 128]
        # torch.compile(fullgraph=True) traced the hooks' collectives (no graph break) and
        # computes what eager does (first case only: one compile keeps the test short)
        for r in ranks if "compiled" in ranks[0] else []:
            for path, (eager, compiled) in r["compiled"].items():
                torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5, msg=path)
        stored = sum(os.path.getsize(f) for f in qtt.model_files(folder))
        for r in ranks:
            assert r["bytes_read"] < 0.6 * stored, (case, r["bytes_read"], stored)


def test_plans_resolve_and_refuse_by_name():
    model = llama(num_key_value_heads=2)
    plan = resolve_plan(model, "auto")
    assert plan["model.layers.1.mlp.down_proj"] == "rowwise"
    assert plan["model.layers.0.self_attn.k_proj"] == "colwise"
    assert "model.norm" not in plan
    # a dict plan, written relative to the base model as transformers' are
    assert resolve_plan(model, {"layers.*.mlp.up_proj": "colwise"}) == {
        f"model.layers.{i}.mlp.up_proj": "colwise" for i in range(2)
    }
    with pytest.raises(TensorParallelError, match="'sequence_parallel' is not supported"):
        resolve_plan(model, {"layers.*.mlp.up_proj": "sequence_parallel"})
    with pytest.raises(TensorParallelError, match="linear layers, not LlamaRMSNorm"):
        resolve_plan(model, {"norm": "colwise"})
    with pytest.raises(TensorParallelError, match="'auto' or a dict"):
        resolve_plan(model, "tp")


def test_tp_plan_needs_an_initialised_process_group(tmp_path):
    model = llama()
    path = tmp_path / "m.qtensors"
    qtt.save_model(model, path)
    with pytest.raises(TensorParallelError, match="init_process_group"):
        qtt.load_model(model, path, device="cpu", tp_plan="auto")
