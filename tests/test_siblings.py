"""Sibling fusion (``qtensors.torch.fuse_siblings``): quantized linears that read one input
multiply once, on tiny transformers models and on hand-built groups, against the same model
unfused; the members' parts are views of the group's, saved and moved as before."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from helpers import tiny_bert
from torch import nn

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import linear as linear_mod
from qtensors.torch import siblings
from qtensors.torch.siblings import fuse_siblings, group_of, unfuse_siblings

transformers = pytest.importorskip("transformers")

AXIS1 = qt.Affine(bits=4, group_size=32, axis=-1)
ENCODINGS = [
    AXIS1,
    qt.FLEXGEN,  # groups along the output rows
    qt.Affine(bits=3, group_size=16, axis=-1, scale_dtype="bfloat16"),
    qt.Symmetric(bits=8, group_size=32, axis=-1),
    qt.NF4(group_size=32, axis=-1),
    qt.MXFP4(),
]


def tiny_llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


class Attention(nn.Module):
    """q, k, v of different widths on one input (k and v: a GQA layer's)."""

    def __init__(self, enc, bias: bool = True, rows=(64, 32, 32)) -> None:
        super().__init__()
        torch.manual_seed(2)
        for name, n in zip(("q_proj", "k_proj", "v_proj"), rows, strict=True):
            setattr(self, name, qtt.QuantizedLinear.from_linear(nn.Linear(64, n, bias=bias), enc))

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.q_proj(x), self.k_proj(kv), self.v_proj(kv)


def count_linears(monkeypatch) -> list:
    calls = []
    real = linear_mod.linear_cpu

    def counting(x, *args):
        calls.append(tuple(args[4]))  # the weight's shape
        return real(x, *args)

    monkeypatch.setattr(linear_mod, "linear_cpu", counting)
    return calls


def quantized_pair(model, enc=AXIS1):
    plain = qtt.quantize_model(model, enc, fuse_siblings=False)
    fused = copy.deepcopy(plain)
    return plain, fused, fuse_siblings(fused)


# -- whole models -------------------------------------------------------------------------------
def test_llama_fused_equals_unfused_with_fewer_calls(monkeypatch):
    plain, fused, n = quantized_pair(tiny_llama())
    assert n == 4  # q/k/v and gate/up in each of 2 layers
    ids = torch.randint(0, 96, (2, 9))
    calls = count_linears(monkeypatch)
    with torch.no_grad():
        want = plain(ids).logits
        n_plain = len(calls)
        got = fused(ids).logits
    n_fused = len(calls) - n_plain
    assert (n_plain, n_fused) == (2 * 7 + 1, 2 * 4 + 1)
    assert (64 + 32 + 32, 64) in calls and (128 + 128, 64) in calls
    # the CPU kernels compute each output column alone: the same bits
    assert torch.equal(got, want)
    prompt = ids[:1, :5]
    a = plain.generate(prompt, max_new_tokens=6, do_sample=False)
    b = fused.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert all(group_of(m).enabled for m in fused.modules() if group_of(m) is not None)


def test_quantize_model_fuses_by_default():
    model = qtt.quantize_model(tiny_llama(1), AXIS1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert group_of(attn.q_proj) is group_of(attn.v_proj) is not None
    assert group_of(mlp.gate_proj) is group_of(mlp.up_proj) is not None
    assert group_of(attn.o_proj) is None and group_of(mlp.down_proj) is None
    off = qtt.quantize_model(tiny_llama(1), AXIS1, fuse_siblings=False)
    assert all(group_of(m) is None for m in off.modules())


def test_bert_fused_equals_unfused(monkeypatch):
    plain, fused, n = quantized_pair(tiny_bert(1))
    assert n == 2  # query/key/value in each layer
    ids = torch.randint(0, 96, (2, 7))
    calls = count_linears(monkeypatch)
    with torch.no_grad():
        want = plain(input_ids=ids).last_hidden_state
        n_plain = len(calls)
        got = fused(input_ids=ids).last_hidden_state
    assert len(calls) - n_plain == n_plain - 2 * 2
    assert torch.equal(got, want)


def test_from_pretrained_and_hf_quantizer_fuse(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "src")
    qt.convert(tmp_path / "src", tmp_path / "dst", quant="int4-g64", keep=["lm_head.weight"])
    ids = torch.tensor([[3, 17, 40, 5, 88, 1]])
    a = qtt.from_pretrained(tmp_path / "dst")
    b = qtt.from_pretrained(tmp_path / "dst", fuse_siblings=False)
    c = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert sum(1 for m in a.modules() if group_of(m) is not None) == 2 * 5
    assert a.qtensors_load_result.sibling_groups == 4
    assert all(group_of(m) is None for m in b.modules())
    assert group_of(c.model.layers[1].self_attn.k_proj) is not None
    with torch.no_grad():
        want = b(ids).logits
        assert torch.equal(a(ids).logits, want)
        assert torch.equal(c(ids).logits, want)


# -- which groups join --------------------------------------------------------------------------
@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
def test_encodings_join_exactly(enc):
    plain = Attention(enc)
    fused = copy.deepcopy(plain)
    assert fuse_siblings(fused) == 1
    g = group_of(fused.q_proj)
    # FLEXGEN groups 64 rows: k (32 rows, one ragged group) can only come last, v stays out
    want_members = 2 if enc.axis == 0 else 3
    assert len(g.members) == want_members
    x = torch.randn(3, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), fused(x), strict=True):
            assert torch.equal(a, b)
        for name in ("q_proj", "k_proj", "v_proj"):  # each member alone, and decoded
            p, f = getattr(plain, name), getattr(fused, name)
            assert torch.equal(p.weight.dequantize(), f.weight.dequantize())
            assert torch.equal(p(x[:2]), f(x[:2]))


def test_members_are_views_of_one_concatenation():
    fused = Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    storages = {
        t.untyped_storage().data_ptr()
        for m in (fused.q_proj, fused.k_proj, fused.v_proj)
        for t in (*m.weight._parts(), m.bias)
    }
    want = {p.untyped_storage().data_ptr() for p in g.parts.values() if p is not None}
    assert storages == want and len(want) == 4  # codes, scales, mins, bias
    assert sum(p.numel() * p.element_size() for p in g.parts.values()) == sum(
        t.numel() * t.element_size() for t in fused.state_dict().values() if torch.is_tensor(t)
    )


def test_refused_groups():
    assert fuse_siblings(Attention(qt.NVFP4())) == 0  # one tensor scale per weight
    mixed = Attention(AXIS1)
    mixed.v_proj = qtt.QuantizedLinear.from_linear(nn.Linear(64, 32), qt.NF4(group_size=32))
    assert fuse_siblings(mixed) == 1
    assert len(group_of(mixed.q_proj).members) == 2 and group_of(mixed.v_proj) is None
    half_bias = Attention(AXIS1)
    half_bias.k_proj.bias = None  # biases all or none
    assert fuse_siblings(half_bias) == 1 and group_of(half_bias.k_proj) is None
    # 3-bit codes of 7 inputs: rows end mid-byte. q's 8 rows (168 bits) end on a byte, so k
    # starts on one and joins (its 105 bits last, padded as its own codes are); v would start
    # at bit 273 and stays out
    enc = qt.Affine(bits=3, group_size=5, axis=-1)
    ragged = Attention(enc)
    for name, n in (("q_proj", 8), ("k_proj", 5), ("v_proj", 3)):
        setattr(ragged, name, qtt.QuantizedLinear.from_linear(nn.Linear(7, n), enc))
    x = torch.randn(2, 7)
    with torch.no_grad():
        want = ragged(x)
        assert fuse_siblings(ragged) == 1
        assert group_of(ragged.q_proj).members == [ragged.q_proj, ragged.k_proj]
        assert group_of(ragged.v_proj) is None
        for a, b in zip(want, ragged(x), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="two or more"):
        fuse_siblings(Attention(AXIS1), groups=[("q_proj",)])
    custom = Attention(AXIS1)
    assert fuse_siblings(custom, groups=[("k_proj", "v_proj")]) == 1
    assert group_of(custom.q_proj) is None and fuse_siblings(custom) == 0  # members stay put


# -- calls --------------------------------------------------------------------------------------
def test_kept_slices_only_for_the_same_unmodified_input(monkeypatch):
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    calls = count_linears(monkeypatch)
    x = torch.randn(2, 64)
    with torch.no_grad():
        q = fused.q_proj(x)
        k_other = fused.k_proj(x.clone())  # another tensor: computes (the group's multiply)
        v_same = fused.v_proj(x.clone())  # the clone above's kept slice is not this one
        assert torch.equal(q, plain.q_proj(x))
        assert torch.equal(k_other, plain.k_proj(x))
        assert torch.equal(v_same, plain.v_proj(x))
        g = group_of(fused.q_proj)
        assert g.unused == 2 and not g.enabled  # two kept sets went unused: the group stops
        g.enabled, g.unused = True, 0
        calls.clear()
        fused.q_proj(x)
        x.mul_(2)  # in place: the kept slices are stale
        k = fused.k_proj(x)
        assert len(calls) == 2 and calls[1][0] == 128  # the group's multiply again, for k
        v = fused.v_proj(x)  # the slice kept by k's call
        assert len(calls) == 2 and g.unused == 1
        assert torch.equal(k, plain.k_proj(x)) and torch.equal(v, plain.v_proj(x))
        y = torch.randn(1, 3, 64)
        calls.clear()
        fresh = Attention(AXIS1)  # (k's call above kept a slice for q, never used)
        fuse_siblings(fresh)
        out = fresh(y)  # the whole group: one multiply, each member its slice
        assert calls == [(128, 64)]
        for a, b in zip(out, plain(y), strict=True):
            assert torch.equal(a, b)


def test_unused_slices_stop_the_group(monkeypatch):
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    x, enc = torch.randn(2, 64), torch.randn(5, 64)
    with torch.no_grad():
        for _ in range(4):  # cross-attention: k and v read the encoder's states
            for a, b in zip(fused(x, enc), plain(x, enc), strict=True):
                assert torch.equal(a, b)
        assert not g.enabled and g.unused == siblings.MAX_UNUSED
        calls = count_linears(monkeypatch)
        fused(x, enc)
    assert [c[0] for c in calls] == [64, 32, 32]  # each member alone, no wasted rows


def test_grad_and_inference_mode():
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    x = torch.randn(2, 64, requires_grad=True)
    out = fused(x)  # gradients: each member alone through the op's autograd
    sum(o.sum() for o in out).backward()
    x2 = x.detach().clone().requires_grad_(True)
    sum(o.sum() for o in plain(x2)).backward()
    assert torch.equal(x.grad, x2.grad)
    with torch.inference_mode():
        y = torch.randn(2, 64)
        for a, b in zip(fused(y), plain(y), strict=True):
            assert torch.equal(a, b)


def test_kept_slices_are_per_thread():
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    x = torch.randn(2, 64)
    seen = {}
    with torch.no_grad():
        fused.q_proj(x)

        def other():
            seen["kept"] = g._local.__dict__.get("kept")
            seen["k"] = fused.k_proj(x)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert g._local.kept is not None  # this thread's, untouched by the other
        assert seen["kept"] is None and torch.equal(seen["k"], plain.k_proj(x))
        errors = []

        def run(seed):
            gen = torch.Generator().manual_seed(seed)
            for _ in range(20):
                y = torch.randn(3, 64, generator=gen)
                for a, b in zip(fused(y), plain(y), strict=True):
                    if not torch.equal(a, b):
                        errors.append(seed)

        threads = [threading.Thread(target=run, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


def test_member_at_offset_zero_keeps_its_own_plan():
    """q's codes start where the group's do: the per-weight caches must not mix them up."""
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    assert fused.q_proj.weight.codes.data_ptr() == g.parts["codes"].data_ptr()
    # the CUDA path's plan is kept per codes tensor object, as the CPU path's
    w, p = fused.q_proj.weight, g.parts
    own = linear_mod._cuda_weight(w.codes, w.scales, w.mins, *w.op_args)
    joined = linear_mod._cuda_weight(p["codes"], p["scales"], p["mins"], *g.op_args)
    assert own is not joined and (own.shape, joined.shape) == ((64, 64), (128, 64))
    assert linear_mod._cuda_weight(w.codes, w.scales, w.mins, *w.op_args) is own
    x, y = torch.randn(1, 64), torch.randn(1, 64)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(fused(x)[0], plain.q_proj(x))  # the group's multiply
            assert torch.equal(fused.q_proj(y), plain.q_proj(y))  # q alone (a miss)
            assert fused.q_proj(y).shape == (1, 64)


def test_compile_fullgraph_traces_the_group_call():
    """Each member traces the group's multiply (identical calls: inductor's pass merges them,
    tests/test_compile_siblings.py) and narrows it to its rows."""
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    fused.requires_grad_(False)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.args[5] for n in gm.graph.nodes if "qtensors.linear" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    x = torch.randn(3, 64)
    for a, b in zip(compiled(x), plain(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [tuple(s) for s in seen] == [(128, 64)] * 3


# -- state, saving, moves -----------------------------------------------------------------------
def test_state_dict_and_saved_file_unchanged(tmp_path):
    plain, fused, _ = quantized_pair(tiny_llama())
    sa, sb = plain.state_dict(), fused.state_dict()
    assert list(sa) == list(sb)
    for k, v in sa.items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb[k]) and v.shape == sb[k].shape and v.dtype == sb[k].dtype
    pa = qtt.save_model(plain, tmp_path / "a.qtensors")
    pb = qtt.save_model(fused, tmp_path / "b.qtensors")
    assert open(pa, "rb").read() == open(pb, "rb").read()
    # loading into a fused model copies into the views: the group multiplies the new weights
    other = qtt.quantize_model(tiny_llama(), qt.Affine(bits=4, group_size=32, axis=-1))
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01)
        for m in plain.modules():
            if isinstance(m, qtt.QuantizedWeight):
                m.scales.mul_(1.5)
        other.load_state_dict(plain.state_dict())
        assert all(group_of(m).valid() for m in other.modules() if group_of(m) is not None)
        assert torch.equal(other(ids).logits, plain(ids).logits)


def test_moves_keep_the_sharing():
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    x = torch.randn(2, 64, dtype=torch.float64)
    fused.double()
    plain.double()
    assert g.valid() and g.parts["bias"].dtype == torch.float64
    assert fused.k_proj.bias.untyped_storage().data_ptr() == g.parts["bias"].data_ptr()
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x), strict=True):
            assert torch.equal(a, b)
    fused.k_proj.float()  # one member alone: the group stands aside until the others follow
    plain.k_proj.float()
    assert not g.valid()
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x), strict=True):
            assert torch.equal(a, b)
    fused.q_proj.float()
    fused.v_proj.float()
    plain.float()
    assert g.valid()
    with torch.no_grad():
        for a, b in zip(fused(x.float()), plain(x.float()), strict=True):
            assert torch.equal(a, b)


def test_copies_and_unfuse():
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    twin = copy.deepcopy(fused)
    g2 = group_of(twin.q_proj)
    assert g2 is group_of(twin.v_proj) is not group_of(fused.q_proj)
    assert twin.q_proj.weight.codes.untyped_storage().data_ptr() == g2.parts["codes"].data_ptr()
    x = torch.randn(2, 64)
    with torch.no_grad():
        for a, b in zip(twin(x), plain(x), strict=True):
            assert torch.equal(a, b)
    joined = g2.parts["codes"].untyped_storage().data_ptr()
    buf = io.BytesIO()
    torch.save(fused, buf)  # the whole module, pickled: the group comes back joined
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        for a, b in zip(loaded(x), plain(x), strict=True):
            assert torch.equal(a, b)
    assert group_of(loaded.k_proj).valid()
    assert unfuse_siblings(twin) == 1 and group_of(twin.k_proj) is None
    own = {m.weight.codes.untyped_storage().data_ptr() for m in (twin.q_proj, twin.k_proj)}
    assert joined not in own and len(own) == 2
    with torch.no_grad():
        for a, b in zip(twin(x), plain(x), strict=True):
            assert torch.equal(a, b)


def test_warmup_runs_the_joined_shapes_and_leaves_the_groups_alone(monkeypatch):
    _, fused, _ = quantized_pair(tiny_llama(1))
    warmed = qtt.warmup(fused, rows=(1, 3))
    shapes = {k[1] for k in warmed}
    assert {(128, 64), (256, 64), (64, 64), (32, 64)} <= shapes
    groups = {id(group_of(m)): group_of(m) for m in fused.modules() if group_of(m) is not None}
    assert all(g.enabled and g.unused == 0 for g in groups.values())
    assert all(g._local.__dict__.get("kept") is None for g in groups.values())


def test_members_given_other_buffers_end_the_group():
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    g = group_of(fused.q_proj)
    other = Attention(qt.Affine(bits=8, group_size=32, axis=-1))
    with torch.no_grad():
        for m in (other.k_proj, other.v_proj):
            m.bias.add_(1)
    fused.load_state_dict(other.state_dict(), assign=True)  # new tensors, not copies
    plain.load_state_dict(other.state_dict(), assign=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x), strict=True):
            assert torch.equal(a, b)
    assert g.dissolved and all(p is None for p in g.parts.values())
    assert all(group_of(m) is None for m in fused.modules())


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_bf16_rows(rows):
    """bf16 up to CPU_PACKED_MAX_ROWS rows takes the members' route: the same bits; larger bf16
    batches are routed by the weight's size too (linear._route), so the joined weight may take
    another kernel than a small member: equal within the int8 activations' rounding."""
    plain, fused = Attention(AXIS1), Attention(AXIS1)
    fuse_siblings(fused)
    x = torch.randn(rows, 64).bfloat16()
    with torch.no_grad():
        for a, b in zip(fused(x), plain(x), strict=True):
            if rows <= linear_mod.CPU_PACKED_MAX_ROWS:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
