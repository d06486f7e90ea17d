"""Joined siblings under ``torch.compile``: each member calls the group's multiply and narrows
it; inductor's pass (``qtensors.torch.inductor_pass``) merges the identical calls, so the
output code multiplies once per group, and cuts a call whose rows are read in part. Results
against the same model eager and unfused; other backends; a user's own pass in the same slot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import qtensors as qt
import qtensors.torch as qtt
from qtensors.torch import inductor_pass
from qtensors.torch.siblings import fuse_siblings, group_of

AXIS1 = qt.Affine(bits=4, group_size=32, axis=-1)
CALL = "= torch.ops.qtensors.linear.default("


class Block(nn.Module):
    """An attention's q/k/v (GQA widths) and a gated MLP's gate/up under one parent."""

    ROWS = (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("gate_proj", 96), ("up_proj", 96))

    def __init__(self, enc=AXIS1, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        for name, n in self.ROWS:
            setattr(self, name, qtt.QuantizedLinear.from_linear(nn.Linear(64, n, bias=bias), enc))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return q, k, v, self.gate_proj(x) * self.up_proj(x)


class CrossAttention(nn.Module):
    """q reads the decoder's states, k and v the encoder's; a cached decode step calls q alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
            setattr(self, name, qtt.QuantizedLinear.from_linear(nn.Linear(64, n), AXIS1))

    def forward(self, x, kv=None):
        if kv is None:
            return self.q_proj(x)
        return self.q_proj(x), self.k_proj(kv), self.v_proj(kv)


@pytest.fixture(autouse=True)
def fresh_compile():
    """Each test compiles afresh (no FX graph cache: a test that changes the pass must not be
    served another's code) and leaves inductor's pass slot as it found it."""
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False, post_grad_custom_post_pass=None):
        yield
    torch._dynamo.reset()


def pair(cls=Block, **kw):
    plain = cls(**kw).requires_grad_(False)
    fused = copy.deepcopy(plain)
    fuse_siblings(fused)
    return plain, fused


def compiled_code(model, *args, **kw):
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, fullgraph=True, **kw), *args)
    return out, "\n".join(code)


def calls(code: str) -> list[str]:
    """The qtensors linear calls of inductor's output code, by the weight shape they pass."""
    return [line.split("], ")[0].rsplit("[", 1)[1] for line in code.splitlines() if CALL in line]


def assert_outputs(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_inductor_multiplies_once_per_group():
    plain, fused = pair()
    x = torch.randn(3, 64)
    with torch.no_grad():
        want, eager = plain(x), fused(x)
    out, code = compiled_code(fused, x)
    assert_outputs(out, want)
    assert_outputs(out, eager)
    # one call per group, on the group's stacked rows (q/k/v: 128, gate/up: 192)
    assert sorted(calls(code)) == ["128, 64", "192, 64"]
    assert out[0].stride() == eager[0].stride()  # views of the group's output, as eager's
    assert inductor_pass._has_ours(inductor_config.post_grad_custom_post_pass)
    # dynamic shapes: one compile for several batches, still one call per group
    torch._dynamo.reset()
    x3 = torch.randn(2, 5, 64)
    out, code = compiled_code(fused, x3, dynamic=True)
    assert_outputs(out, plain(x3))
    assert sorted(calls(code)) == ["128, 64", "192, 64"]


@pytest.mark.parametrize("joined, rows", [(False, 3), (True, 1)])
def test_members_alone(joined, rows):
    """A model not joined calls each linear; so does a joined one on a one-row input (a batch-1
    decode step): that step is host-bound, and the join's guards would cost more than its
    launches save."""
    plain, fused = pair()
    x = torch.randn(rows, 64)
    out, code = compiled_code(fused if joined else plain, x)
    assert_outputs(out, plain(x))
    assert sorted(calls(code)) == ["32, 64", "32, 64", "64, 64", "96, 64", "96, 64"]


def test_rows_read_in_part_are_cut():
    """k / v on another input, and q alone: each call computes the rows it is read for."""
    plain, fused = pair(CrossAttention)
    x, enc = torch.randn(2, 64), torch.randn(5, 64)
    out, code = compiled_code(fused, x, enc)
    assert_outputs(out, plain(x, enc))
    assert calls(code) == ["64, 64", "64, 64"]  # q's rows on x, k and v's on enc
    torch._dynamo.reset()
    out, code = compiled_code(fused, x)
    assert_outputs([out], [plain(x)])
    assert calls(code) == ["64, 64"]


def test_users_post_grad_pass_still_runs(monkeypatch):
    seen = []

    class Counting(CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(n.op == "call_function" for n in graph.nodes))

        def uuid(self):
            return "counting-test-pass"

    plain, fused = pair()
    x = torch.randn(3, 64)
    # set before the first compile: ours runs after it
    mine = Counting()
    inductor_config.post_grad_custom_post_pass = mine
    out, code = compiled_code(fused, x)
    assert_outputs(out, plain(x))
    assert seen and sorted(calls(code)) == ["128, 64", "192, 64"]
    slot = inductor_config.post_grad_custom_post_pass
    assert slot is not mine and inductor_pass._has_ours(slot)
    # set after our pass was installed: the next compile chains ours again
    for lists in (True, False):  # a torch that takes a list of passes, one that takes one
        monkeypatch.setattr(inductor_pass, "_LISTS", lists)
        inductor_config.post_grad_custom_post_pass = mine
        seen.clear()
        torch._dynamo.reset()
        out, code = compiled_code(fused, x)
        assert_outputs(out, plain(x))
        assert seen and sorted(calls(code)) == ["128, 64", "192, 64"]
        slot = inductor_config.post_grad_custom_post_pass
        assert isinstance(slot, list) if lists else isinstance(slot, inductor_pass._Chain)
        assert slot.uuid() if not lists else all(p.uuid() for p in slot)


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
def test_other_backends(backend):
    """No inductor pass there: the members' identical calls stay, with the same results."""
    plain, fused = pair()
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = torch.compile(fused, backend=backend, fullgraph=True)(x)
    assert_outputs(out, plain(x))


def test_compiled_group_follows_its_members():
    """Members given other buffers run alone (dynamo guards the group's views); inputs and
    biases that need gradients take the members' own weights, which get their gradients."""
    plain, fused = pair()
    x = torch.randn(3, 64)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
    other = Block().requires_grad_(False)
    with torch.no_grad():
        other.k_proj.weight.scales.mul_(2)
    fused.k_proj.load_state_dict(other.k_proj.state_dict(), assign=True)
    want = plain(x)
    with torch.no_grad():
        got = compiled(x)
    assert_outputs(got[:1] + got[2:], want[:1] + want[2:])
    assert_outputs([got[1]], [other.k_proj(x)])
    # one part given alone (its scales)
    v = fused.v_proj.weight
    v.scales = v.scales * 2
    with torch.no_grad():
        got, alone = compiled(x), fused.v_proj(x)
    assert not torch.allclose(alone, want[2])
    assert_outputs([got[2]], [alone])
    # biases that need gradients (x does not): the members' own, not the group's
    plain, fused = pair()
    plain.requires_grad_(True)
    fused.requires_grad_(True)
    sum(t.sum() for t in torch.compile(fused, backend="aot_eager")(x)).backward()
    sum(t.sum() for t in plain(x)).backward()
    assert group_of(fused.q_proj) is not None
    for name, _ in Block.ROWS:
        a, b = getattr(fused, name).bias.grad, getattr(plain, name).bias.grad
        torch.testing.assert_close(a, b)


def test_merge_stops_at_mutations():
    """Equal calls merge, unless a mutation lies between them (a post-grad graph may write
    an input in place)."""

    def graph(mutate: bool) -> torch.fx.Graph:
        g = torch.fx.Graph()
        x, codes, scales, mins = (g.placeholder(n) for n in ("x", "codes", "scales", "mins"))
        args = (x, codes, scales, mins, None, [64, 64], "affine", 4, 32, 1)
        a = g.call_function(torch.ops.qtensors.linear.default, args)
        if mutate:
            g.call_function(torch.ops.aten.add_.Tensor, (x, 1.0))
        b = g.call_function(torch.ops.qtensors.linear.default, args)
        g.output((a, b))
        return g

    assert inductor_pass.merge(graph(False)) == 1
    assert inductor_pass.merge(graph(True)) == 0
