"""Calibrated quantizers (qtensors.methods): GPTQ, AWQ, HQQ and RTN, on tiny layers and models
built here (fast, CPU only)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import reference as R
import torch
from helpers import tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qtensors as qt
import qtensors.torch as qtt
from qtensors.methods import (
    AWQ,
    GPTQ,
    HQQ,
    RTN,
    ActivationObserver,
    CalibrationError,
    HessianObserver,
    calibration_windows,
    get_method,
)
from qtensors.methods.awq import (
    best_clip,
    clipped_rtn,
    fold_scales,
    group_error,
    refit,
    scale_groups,
)
from qtensors.methods.gptq import gptq_quantize
from qtensors.methods.grid import Grid, expand, group_mask, grouped, rows_view
from qtensors.methods.hqq import hqq_quantize
from qtensors.methods.packing import quantized_tensor
from qtensors.methods.rtn import rtn_quantize
from qtensors.torch import QuantizedLinear, QuantizedWeight

transformers = pytest.importorskip("transformers")

ENCODINGS = [
    qt.Affine(bits=4, group_size=16),
    qt.Symmetric(bits=4, group_size=16),
    qt.Symmetric(bits=3, group_size=32, scale_dtype="bfloat16"),
    qt.NF4(group_size=16),
    qt.Affine(bits=4, group_size=16, axis=0),
    qt.Symmetric(bits=4, group_size=16, levels="full"),
    qt.MXFP4(),
    qt.NVFP4(),
    qt.NVFP4(axis=0),
]
IDS = ["affine4", "sym4", "sym3-bf16", "nf4", "affine4-axis0", "sym4-full", "mxfp4", "nvfp4"]
IDS += ["nvfp4-axis0"]


def decoded(q: qt.QuantizedTensor) -> torch.Tensor:
    return QuantizedWeight.from_quantized(q).dequantize(torch.float32)


def reference_decoded(q: qt.QuantizedTensor) -> np.ndarray:
    """Decode the parts with the numpy reference of the spec."""
    parts = {
        "codes": q.codes.numpy(),
        "scales": _storage(q.scales),
        "mins": None if q.mins is None else _storage(q.mins),
        "tensor_scale": None if q.tensor_scale is None else q.tensor_scale.numpy(),
    }
    return R.dequantize_fp32(parts, q.encoding, q.shape)


def _storage(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float8_e4m3fn:  # raw E4M3 bytes, as the file stores them
        return t.view(torch.uint8).numpy()
    return t.numpy()


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    scale = torch.rand(features, generator=g) * 3 + 0.1
    return (torch.randn(n, features, generator=g) @ mix + 0.3) * scale


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm(X @ W.t() - X @ W_hat.t()))


# -- RTN is exactly what qtensors.quantize writes -----------------------------------------------
@pytest.mark.parametrize(
    "enc",
    [
        *ENCODINGS,
        qt.Affine(bits=3, group_size=16),
        qt.Symmetric(bits=4, group_size=16, levels="full"),
    ],
    ids=[*IDS, "a3", "sym4-full"],
)
def test_rtn_matches_core(enc):
    """The torch round-to-nearest the methods search with is the core's, bit for bit."""
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.rand(24, 1) * 3  # 40 columns: a ragged last group
    grid = Grid.of(enc).fit(w)
    mine = quantized_tensor(grid, *rtn_quantize(rows_view(w, grid), grid))
    core = qt.quantize(w, enc, framework="pt")
    for a, b in zip(mine.parts(), core.parts(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("enc", ENCODINGS, ids=IDS)
def test_every_method_writes_what_the_reference_decodes(enc):
    torch.manual_seed(6)
    W = torch.randn(24, 48)
    X = correlated_inputs(128, 48, seed=6)
    affine = Grid.of(enc).kind == "affine"
    for method in (RTN(), HQQ(), GPTQ(), AWQ()) if affine else (RTN(), GPTQ(), AWQ()):
        obs = method.observer(nn.Linear(48, 24), "mlp.down_proj", enc)
        if obs is not None:
            obs.add(X)
        q = method.quantize_weight(W, enc, obs)
        assert q.encoding_object == qt.quantize(W, enc).encoding_object
        np.testing.assert_array_equal(reference_decoded(q), decoded(q).numpy())


# -- GPTQ ---------------------------------------------------------------------------------------
def test_gptq_worked_example():
    """One row of three weights, a given inverse Hessian, a 3-bit symmetric grid of step 0.2.

    By hand (OBS): q1 = Q(0.13) = 0.2, error e1 = (0.13 - 0.2) / Hinv11 = -0.07; the others
    move by -e1 * Hinv1j: w2 = -0.13 + 0.07 * 0.8 = -0.074, w3 = 0.6 - 0.07 * 0.4 = 0.572.
    Removing column 1 leaves Hinv22' = 1 - 0.8^2 = 0.36, Hinv23' = 0.1 + 0.8 * 0.4 = 0.42.
    q2 = Q(-0.074) = 0 (RTN would give -0.2), e2 = -0.074 / 0.36, w3 = 0.572 + 0.074 * 0.42 / 0.36
    = 0.6583, q3 = Q(0.6583) = 0.6 (clamped to 3 steps).
    """
    Hinv = torch.tensor([[1.0, 0.8, -0.4], [0.8, 1.0, 0.1], [-0.4, 0.1, 1.0]], dtype=torch.float64)
    w = torch.tensor([[0.13, -0.13, 0.6]])
    enc = qt.Symmetric(bits=3, group_size=3, scale_dtype="float32")
    step = 0.6 / 3

    def Q(v: float) -> float:
        return max(-3, min(3, round(v / step))) * step

    # the OBS update, written out
    w1, w2, w3 = w[0].tolist()
    q1 = Q(w1)
    e1 = (w1 - q1) / Hinv[0, 0].item()
    w2 -= e1 * Hinv[0, 1].item()
    w3 -= e1 * Hinv[0, 2].item()
    h22 = (Hinv[1, 1] - Hinv[0, 1] ** 2 / Hinv[0, 0]).item()
    h23 = (Hinv[1, 2] - Hinv[0, 1] * Hinv[0, 2] / Hinv[0, 0]).item()
    assert (w2, w3, h22, h23) == pytest.approx((-0.074, 0.572, 0.36, 0.42))
    q2 = Q(w2)
    w3 -= (w2 - q2) / h22 * h23
    expected = [q1, q2, Q(w3)]
    assert expected == pytest.approx([0.2, 0.0, 0.6])

    H = torch.linalg.inv(Hinv).float()
    grid = Grid.of(enc)
    codes, s, _ = gptq_quantize(w, H, grid, damp=0.0, act_order=False)
    got = grid.decode(codes, s, None)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    rtn = decoded(RTN().quantize_weight(w, enc))
    assert rtn[0].tolist() == pytest.approx([0.2, -0.2, 0.6], abs=1e-6)

    # and the compensated row has the lower output error under H
    def err(q):
        d = (w - q).double()
        return float(d @ H.double() @ d.t())

    assert err(got) < err(rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("enc", ENCODINGS, ids=IDS)
def test_gptq_beats_rtn_on_a_random_layer(enc, act_order):
    torch.manual_seed(1)
    W = torch.randn(32, 64)
    X = correlated_inputs(512, 64, seed=2)
    obs = HessianObserver(64)
    for chunk in X.split(100):
        obs.add(chunk)
    torch.testing.assert_close(obs.H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    X_held = correlated_inputs(256, 64, seed=2)  # same distribution, other rows
    X_held = X_held[torch.randperm(256)]
    rtn = output_error(W, decoded(RTN().quantize_weight(W, enc)), X_held)
    gptq = output_error(W, decoded(GPTQ(act_order=act_order).quantize_weight(W, enc, obs)), X_held)
    assert gptq < 0.8 * rtn


@pytest.mark.parametrize("enc", ENCODINGS, ids=IDS)
def test_gptq_on_a_diagonal_hessian_is_rtn(enc):
    """No correlation between inputs: nothing to compensate, GPTQ never does worse than RTN."""
    torch.manual_seed(3)
    W = torch.randn(16, 48)
    obs = HessianObserver(48)
    obs.add(torch.diag(torch.rand(48) + 0.5))  # orthogonal input rows: a diagonal Hessian
    rtn = decoded(RTN().quantize_weight(W, enc))
    d = obs.H.diagonal()

    def err(q: torch.Tensor) -> float:  # the output error under the diagonal Hessian
        return float(((W - q).pow(2) * d).sum())

    for act_order in (False, True):
        plain = GPTQ(act_order=act_order, search_scales=False)
        got = decoded(plain.quantize_weight(W, enc, obs))
        torch.testing.assert_close(got, rtn, rtol=0, atol=0)
        searched = decoded(GPTQ(act_order=act_order).quantize_weight(W, enc, obs))
        assert err(searched) <= err(rtn) * (1 + 1e-6)


def test_gptq_dead_columns_become_zero():
    torch.manual_seed(4)
    W = torch.randn(8, 32)
    X = torch.randn(64, 32)
    X[:, 5] = 0
    obs = HessianObserver(32)
    obs.add(X)
    got = decoded(GPTQ().quantize_weight(W, qt.Affine(bits=4, group_size=16), obs))
    assert torch.isfinite(got).all()
    assert got[:, 5].abs().max() <= (W[:, :16].amax(1) - W[:, :16].amin(1)).max() / 15 / 2 + 1e-3


# -- HQQ ----------------------------------------------------------------------------------------
AFFINE = [(e, i) for e, i in zip(ENCODINGS, IDS, strict=True) if isinstance(e, qt.Affine)]


@pytest.mark.parametrize("enc", [e for e, _ in AFFINE], ids=[i for _, i in AFFINE])
def test_hqq_never_increases_its_objective(enc):
    torch.manual_seed(5)
    w = torch.randn(32, 40)
    w[0, 3] = 9.0  # an outlier: the lp fit should let it go
    grid = Grid.of(enc)
    rows = w.t() if grid.axis % 2 == 0 else w
    *_, history = hqq_quantize(rows, grid)
    assert len(history) >= 2
    assert all(b <= a for a, b in itertools.pairwise(history))
    assert history[-1] < history[0]  # and it does improve on round-to-nearest

    method = HQQ()
    q = method.quantize_weight(w, enc)
    assert method.last_history == history
    p = method.p
    hqq_err = float((w - decoded(q)).abs().pow(p).mean())
    rtn_err = float((w - decoded(RTN().quantize_weight(w, enc))).abs().pow(p).mean())
    assert hqq_err <= rtn_err


def test_hqq_refuses_groups_without_a_zero_point():
    for enc in (qt.Symmetric(bits=4, group_size=16), qt.NF4(group_size=16)):
        with pytest.raises(ValueError, match="affine encoding"):
            HQQ().quantize_weight(torch.randn(8, 32), enc)


# -- AWQ ----------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, kv_heads: int = 4, tie: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that folding into them is really tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def test_awq_folding_leaves_the_float_model_unchanged():
    for model, out in ((tiny_llama(), "logits"), (tiny_bert(), "last_hidden_state")):
        ids = torch.randint(0, 96, (2, 12))
        with torch.no_grad():
            want = getattr(model(input_ids=ids), out)
        blocks = model.model.layers if hasattr(model, "model") else model.encoder.layer
        n_groups = 0
        for block in blocks:
            for group in scale_groups(block):
                s = torch.rand(group.linears[0].in_features) * 4 + 0.25
                fold_scales(group, s)
                n_groups += 1
        assert n_groups == (8 if out == "logits" else 2)  # qkv, v->o, gate/up, up->down
        with torch.no_grad():
            got = getattr(model(input_ids=ids), out)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_awq_skips_folds_that_do_not_fit():
    block = tiny_llama(kv_heads=2).model.layers[0]  # grouped-query: v_proj is narrower than o
    names = [[type(g.prev).__name__, len(g.linears)] for g in scale_groups(block)]
    assert names == [["LlamaRMSNorm", 3], ["LlamaRMSNorm", 2], ["Linear", 1]]


def test_awq_searches_each_group_at_its_stage(monkeypatch):
    """True-sequential AWQ: the MLP's scales are searched with the attention already quantized,
    and a linear producer (v, up) is still float when its consumers' scale is folded into it."""
    model = tiny_llama(seed=16)
    seen: list[tuple[str, list[str]]] = []
    real = AWQ._search

    def spy(self, group, grid, x_mean, calls, targets=None):
        block = model.model.layers[0]
        names = {id(m): n for n, m in block.named_modules()}
        if id(group.prev) in names:  # block 0 only
            quantized = sorted(
                n for n, m in block.named_modules() if isinstance(m, QuantizedLinear)
            )
            seen.append((names[id(group.prev)], quantized))
        return real(self, group, grid, x_mean, calls, targets)

    monkeypatch.setattr(AWQ, "_search", spy)
    ids = torch.randint(2, 92, (4, 16), generator=torch.Generator().manual_seed(5))
    enc = qt.Affine(bits=4, group_size=16)
    qtt.quantize_model(model, enc, method="awq", calibration=ids, samples=4, seq_len=16)
    attn = ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert seen == [
        ("input_layernorm", []),
        ("self_attn.v_proj", []),
        ("post_attention_layernorm", attn),
        ("mlp.up_proj", attn),
    ]
    assert [len(a) for a in model.qtensors_quantization["prepare"]] == [4, 4]


def test_awq_float_targets_are_the_float_models_outputs(monkeypatch):
    """With ``float_targets``, every scale search scores against the float model's own outputs
    of the watched module (its own inputs, nothing quantized upstream), not against the float
    module run on the quantized stream; the option is recorded."""
    model, ref = tiny_llama(seed=21), tiny_llama(seed=21)
    ids = torch.randint(2, 92, (4, 16), generator=torch.Generator().manual_seed(8))
    got: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    real = AWQ._search
    names = {
        id(m): f"model.layers.{i}.{n}"
        for i, b in enumerate(model.model.layers)
        for n, m in b.named_modules()
    }

    def spy(self, group, grid, x_mean, calls, targets=None):
        on_quantized = [out(group.inspect(*a, **k)) for a, k in calls]
        got.append((names[id(group.inspect)], targets[0], on_quantized[0]))
        return real(self, group, grid, x_mean, calls, targets)

    def out(o):
        return (o[0] if isinstance(o, tuple) else o).float()

    monkeypatch.setattr(AWQ, "_search", spy)
    enc = qt.Symmetric(bits=3, group_size=16)
    qtt.quantize_model(
        model,
        enc,
        method="awq",
        float_targets=True,
        calibration=ids,
        samples=4,
        seq_len=16,
        skip=("lm_head",),
        progress=False,
    )
    assert model.qtensors_quantization["float_targets"] is True
    assert len(got) == 8  # qkv, v->o, gate/up, up->down in each of the 2 blocks
    want: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m, _a, o) -> None:
            want[name] = out(o)

        return hook

    hooks = [ref.get_submodule(n).register_forward_hook(keep(n)) for n, _, _ in got]
    with torch.no_grad():  # the windows the runner drew from ids
        ref(input_ids=calibration_windows(ids, samples=4, seq_len=16), use_cache=False)
    for h in hooks:
        h.remove()
    for name, targets, _ in got:
        torch.testing.assert_close(targets, want[name], rtol=1e-5, atol=1e-5)
    # in block 1 the quantized stream differs: the targets really are the float model's
    assert not torch.allclose(got[-1][1], got[-1][2], atol=1e-4)


def test_awq_clips_q_and_k_only_when_asked():
    enc = qt.Affine(bits=4, group_size=16)
    for clip_qk in (False, True):
        awq = AWQ(clip_qk=clip_qk)
        grams = {
            n: awq.observer(nn.Linear(32, 8), n, enc).group_size
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
        }
        want = 16 if clip_qk else None
        assert grams == {
            "self_attn.q_proj": want,
            "self_attn.k_proj": want,
            "self_attn.v_proj": 16,
            "mlp.down_proj": 16,
        }
    axis0 = qt.Affine(bits=4, group_size=16, axis=0)  # no clipping search across output rows
    assert AWQ().observer(nn.Linear(32, 8), "mlp.down_proj", axis0).group_size is None


def test_awq_gptq_folds_scales_then_beats_rtn():
    model, ref = tiny_llama(seed=17), tiny_llama(seed=17)
    ids = torch.randint(2, 92, (8, 16), generator=torch.Generator().manual_seed(6))
    enc = qt.Symmetric(bits=3, group_size=16)
    qtt.quantize_model(model, enc, method="awq-gptq", calibration=ids, samples=8, seq_len=16)
    rec = model.qtensors_quantization
    assert rec["method"] == "awq-gptq" and rec["gptq"]["act_order"] is True
    assert all(len(a) == 4 for a in rec["prepare"])
    rtn = qtt.quantize_model(tiny_llama(seed=17), enc)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        err = (model(input_ids=ids).logits - want).norm()
        assert err < (rtn(input_ids=ids).logits - want).norm()


@pytest.mark.parametrize("enc", ENCODINGS[:4] + ENCODINGS[5:6], ids=IDS[:4] + IDS[5:6])
def test_awq_clip_never_increases_a_groups_output_error(enc):
    """The clipping search keeps ratio 1 (plain RTN) among its candidates: no (row, group)
    share of the output gets worse, symmetric groups (absmax shrunk) included, and on
    outlier-heavy weights some groups get strictly better."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 80, generator=g) * (1 + 6 * (torch.rand(24, 80, generator=g) > 0.97))
    x = correlated_inputs(96, 80, seed=12)
    grid = Grid.of(enc)  # groups along the input axis, as the clipping search needs
    obs = ActivationObserver(80, grid.group_size)
    obs.add(x[:40])
    obs.add(x[40:])  # the running mean over two batches
    ratio = best_clip(w, obs.gram, grid)
    gs, n = grid.group_size, w.shape[1]

    def share_error(r: torch.Tensor | None) -> torch.Tensor:
        c, s, m = clipped_rtn(w, grid, r)
        q = grid.decode(c, expand(s, gs, n), expand(m, gs, n))
        xg = grouped(x, gs) * group_mask(n, gs)  # a ragged group's padding is no input
        return torch.einsum("tgk,rgk->trg", xg, grouped(w - q, gs)).pow(2).mean(0)

    clipped, plain = share_error(ratio), share_error(None)
    assert bool((clipped <= plain * (1 + 1e-6) + 1e-9).all())
    assert bool((clipped < plain * 0.999).any()) and bool((ratio < 1).any())


@pytest.mark.parametrize("enc", ENCODINGS[:4] + ENCODINGS[5:8], ids=IDS[:4] + IDS[5:8])
def test_awq_refit_never_increases_the_clip_objective(enc):
    """The refit starts from the clipping search's parameters and keeps each (row, group)'s
    best: its objective ``d^T H_g d`` never rises, falls for some groups, the scales stay
    storable (the scale dtype, E8M0, E4M3), and the codes are the grid's nearest for them."""
    g = torch.Generator().manual_seed(21)
    w = torch.randn(24, 80, generator=g) * (1 + 6 * (torch.rand(24, 80, generator=g) > 0.97))
    x = correlated_inputs(200, 80, seed=22)
    grid = Grid.of(enc).fit(w)
    gs, n = grid.group_size, w.shape[1]
    obs = ActivationObserver(80, gs)
    obs.add(x)
    _, s, m = clipped_rtn(w, grid, best_clip(w, obs.gram, grid))
    c2, s2, m2 = refit(w, obs.gram, grid, s, m, iters=4, chunk=7)  # chunks: ragged ones too

    def objective(s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        c = grid.encode(w, expand(s, gs, n), expand(m, gs, n))
        q = grid.decode(c, expand(s, gs, n), expand(m, gs, n))
        return group_error(grouped(w - q, gs), obs.gram)

    before, after = objective(s, m), objective(s2, m2)
    assert bool((after <= before * (1 + 1e-6) + 1e-9).all())
    # MXFP4's scales are powers of two: the fit rarely moves one, here none
    assert grid.kind == "mxfp4" or bool((after < before * 0.99).any())
    assert torch.equal(grid.nearest_scale(s2), s2)
    assert m2 is None or torch.equal(grid.st(m2), m2)
    assert torch.equal(c2, grid.encode(w, expand(s2, gs, n), expand(m2, gs, n)))


def test_awq_refit_solves_the_least_squares_fit_for_fixed_codes():
    """With the codes held, one refit step is the weighted least-squares optimum: a group whose
    weights are exactly ``c * s + m`` is recovered from a perturbed start."""
    grid = Grid.of(qt.Affine(bits=4, group_size=8, scale_dtype="float32"))
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (3, 8), generator=g)
    codes[:, 0], codes[:, 1] = 0, 15  # the full range: the exact parameters are RTN's too
    s_true, m_true = torch.tensor([[0.5], [0.25], [2.0]]), torch.tensor([[-1.0], [0.5], [-3.0]])
    w = codes.float() * s_true + m_true
    x = correlated_inputs(64, 8, seed=6)
    obs = ActivationObserver(8, 8)
    obs.add(x)
    # a start close enough that round-to-nearest gives the same codes: one step is exact
    c, s, m = refit(w, obs.gram, grid, s_true * 1.01, m_true + 0.01 * s_true, iters=1)
    assert torch.allclose(s, s_true, rtol=1e-5) and torch.allclose(m, m_true, atol=1e-5)
    assert torch.equal(c, codes.int())


@pytest.mark.parametrize("enc", ENCODINGS[:4] + ENCODINGS[5:8], ids=IDS[:4] + IDS[5:8])
def test_awq_refit_keeps_degenerate_groups(enc):
    """Constant, zero and two-valued groups (a singular fit) and a dead input channel give
    finite, storable parameters that decode the constant groups exactly as RTN does."""
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    w[0], w[1] = 0.0, 0.25  # zero and constant rows
    w[2, :32] = torch.tensor([-1.0, 3.0]).repeat(16)  # two values only
    x = correlated_inputs(50, 64, seed=9)
    x[:, 5] = 0.0
    grid = Grid.of(enc).fit(w)
    obs = ActivationObserver(64, grid.group_size)
    obs.add(x)
    q = AWQ().quantize_weight(w, enc, obs)
    got, want = decoded(q), decoded(RTN().quantize_weight(w, enc, None))
    assert bool(torch.isfinite(got).all())
    assert torch.equal(got[:2], want[:2])


def test_awq_refit_is_recorded_where_it_applies():
    from qtensors.methods.awq import AWQGPTQ

    assert AWQ().settings()["refit"] == 4 and AWQ(refit=0).settings()["refit"] == 0
    assert "refit" not in AWQGPTQ().settings()  # GPTQ chooses its own codes and parameters


# -- calibration ------------------------------------------------------------------------------
class CharTokenizer:
    """A stand-in tokenizer: one token per character."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [2 + ord(c) % 90 for c in text]}


def test_calibration_windows_are_seeded():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    a = calibration_windows(text, CharTokenizer(), samples=4, seq_len=16, seed=3)
    b = calibration_windows([text], CharTokenizer(), samples=4, seq_len=16, seed=3)
    assert a.shape == (4, 16) and torch.equal(a, b)
    assert not torch.equal(a, calibration_windows(text, CharTokenizer(), 4, 16, seed=4))
    ids = torch.arange(100).reshape(2, 50)
    w = calibration_windows(ids, samples=3, seq_len=200)
    assert w.shape == (3, 100)  # shorter data: windows as long as it is


class EncoderCharTokenizer(CharTokenizer):
    """The stand-in tokenizer as an encoder's: CLS and SEP tokens, no EOS."""

    eos_token_id = None
    cls_token_id, sep_token_id = 0, 1


def test_calibration_windows_for_an_encoder_are_shaped_like_its_inputs():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    w = calibration_windows(text, EncoderCharTokenizer(), samples=5, seq_len=16, seed=3)
    assert w.shape == (5, 16)
    assert bool((w[:, 0] == 0).all()) and bool((w[:, -1] == 1).all())
    stream = torch.tensor(CharTokenizer()(text)["input_ids"])
    inner = calibration_windows(stream, samples=5, seq_len=14, seed=3)
    assert torch.equal(w[:, 1:-1], inner)  # the same seeded draw, of L - 2 stream tokens
    # token ids are the caller's: taken as they are, whatever the tokenizer
    ids = calibration_windows(stream, EncoderCharTokenizer(), samples=5, seq_len=16, seed=3)
    assert not bool((ids[:, 0] == 0).any())


def test_calibration_errors_are_clear():
    model = tiny_llama()
    enc = qt.Symmetric(bits=4, group_size=16)
    with pytest.raises(CalibrationError, match="needs calibration data: pass calibration="):
        qtt.quantize_model(model, enc, method="gptq")
    with pytest.raises(CalibrationError, match="no tokens"):
        qtt.quantize_model(model, enc, method="awq", calibration="  ", tokenizer=CharTokenizer())
    with pytest.raises(CalibrationError, match="no tokens"):
        qtt.quantize_model(model, enc, method="gptq", calibration=[])
    with pytest.raises(CalibrationError, match="need a tokenizer: pass tokenizer="):
        qtt.quantize_model(model, enc, method="gptq", calibration=["some text"])
    with pytest.raises(ValueError, match="unknown method 'gptqq'"):
        get_method("gptqq")
    # nothing was touched by the failed calls
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq"])
def test_tiny_model_end_to_end(method, tmp_path):
    model = tiny_llama(seed=7)
    ref = tiny_llama(seed=7)
    text = "Calibration text for a tiny model; it only needs to be long enough. " * 12
    enc = qt.Affine(bits=4, group_size=16)
    qtt.quantize_model(
        model,
        enc,
        method=method,
        calibration=text,
        tokenizer=CharTokenizer(),
        samples=6,
        seq_len=24,
        batch_size=4,
        skip=("lm_head",),
        progress=False,
    )
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(linears) == 14 and isinstance(model.lm_head, nn.Linear)
    record = model.qtensors_quantization
    assert record["method"] == method and record["encoding"]["group_size"] == 16

    ids = torch.randint(2, 92, (2, 20))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.1

    folder = tmp_path / "out"
    path = qtt.save_model(model, folder, quant=qt.Raw())
    # the file is ordinary qtensors data: the numpy reference reads and decodes every weight
    tensors, metadata, _ = R.read_file(path)
    assert json.loads(metadata["quantization_method"])["method"] == method
    for name, lin in linears.items():
        want_w = lin.weight.dequantize(torch.float32).numpy()
        np.testing.assert_array_equal(tensors[f"{name}.weight"], want_w)
    loaded = qtt.from_pretrained(folder, transformers.AutoModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, got, rtol=0, atol=0)


def test_layer_error_on_held_back_windows():
    ids = torch.randint(2, 92, (72, 16), generator=torch.Generator().manual_seed(0))
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama(seed=9)
        qtt.quantize_model(
            model,
            qt.Symmetric(bits=3, group_size=16),
            method=method,
            calibration=ids[:64],
            holdout=ids[64:],
            samples=64,
            seq_len=16,
            skip=("lm_head",),
            progress=False,
        )
        errors[method] = model.qtensors_quantization["layer_error"]
        assert len(errors[method]) == 14
    assert sum(errors["gptq"].values()) < sum(errors["rtn"].values())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_on_an_encoder(method):
    model = tiny_bert(seed=8)
    ids = torch.randint(2, 92, (8, 16))
    qtt.quantize_model(
        model,
        qt.Symmetric(bits=4, group_size=32),
        method=method,
        calibration=ids,
        samples=8,
        seq_len=16,
        progress=False,
    )
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 2 * 6 + 1  # + pooler


# -- the command line ---------------------------------------------------------------------------
def tiny_folder(tmp_path, tie: bool = False):
    """A transformers model folder: tiny Llama weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat ran on under mat log and then".split()
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]"
    )
    src = tmp_path / "src"
    tiny_llama(seed=11, tie=tie).save_pretrained(src)
    tok.save_pretrained(src)
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat and then the dog ran under a log . " * 30)
    return src, text


def test_cli_convert_with_a_method(tmp_path, capsys):
    from qtensors.cli import main

    src, text = tiny_folder(tmp_path)
    dst = tmp_path / "out"
    common = ["--preset", "int4-g64", "--samples", "4", "--seq-len", "16", "-q"]
    assert main(["convert", str(src), str(dst), "--method", "gptq", *common]) == 1
    assert "--method gptq needs --calibration" in capsys.readouterr().err
    assert not dst.exists()
    rc = main(
        ["convert", str(src), str(dst), "--method", "gptq", "--calibration", str(text), *common]
    )
    assert rc == 0
    with qt.safe_open(dst / "model.qtensors") as f:
        meta = json.loads(f.metadata()["quantization_method"])
        assert meta["method"] == "gptq" and meta["calibration"]["samples"] == 4
        assert f.encoding("model.layers.0.mlp.down_proj.weight")["name"] == "affine"
        assert f.encoding("lm_head.weight")["name"] == "raw"
    model = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM)
    ref = tiny_llama(seed=11)
    ids = torch.tensor([[2, 3, 4, 5, 2, 6]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.1


def test_quantize_model_refuses_hqq_on_symmetric_before_touching_the_model():
    model = tiny_llama(seed=3)
    with pytest.raises(ValueError, match="affine encoding"):
        qtt.quantize_model(model, qt.Symmetric(bits=4, group_size=16), method="hqq")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


# -- FP4 blocks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("enc", [qt.MXFP4(), qt.NVFP4()], ids=["mxfp4", "nvfp4"])
def test_quantize_model_rtn_with_fp4_blocks(enc, tmp_path):
    """RTN fills MXFP4/NVFP4 through the core; the linears run through torch.ops.qtensors and
    save_model/from_pretrained round-trip them kept quantized."""
    model = tiny_llama(seed=12)
    ref = tiny_llama(seed=12)
    qtt.quantize_model(model, enc, skip=("lm_head",))
    lins = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(lins) == 14 and all(m.weight.encoding["name"] == enc.name for m in lins)
    w = model.model.layers[0].mlp.down_proj.weight
    want = qt.dequantize(qt.quantize(ref.model.layers[0].mlp.down_proj.weight.detach(), enc))
    torch.testing.assert_close(w.dequantize(torch.float32), torch.as_tensor(want), rtol=0, atol=0)
    ids = torch.randint(2, 92, (2, 12))
    with torch.no_grad():
        got, want_logits = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want_logits).pow(2).mean() / want_logits.pow(2).mean()) < 0.1
    folder = tmp_path / "fp4"
    qtt.save_model(model, folder, quant=qt.Raw())
    loaded = qtt.from_pretrained(folder, transformers.AutoModelForCausalLM)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, got, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["mxfp4", "nvfp4"]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 70),
    binade=st.integers(-30, 30),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp4_grid_rounds_as_the_core(kind, rows, cols, binade, seed):
    """The torch FP4 grid the methods search with writes the core's bytes: many binades, zero
    rows and blocks, E2M1 midpoints (ties), ragged last blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * np.exp2(binade + rng.integers(-8, 8, (rows, 1)))
    x = np.where(rng.random(x.shape) < 0.1, 0.0, x)
    ties = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0], x.shape)
    x = np.where(rng.random(x.shape) < 0.1, ties * 2.0**binade, x)
    w = torch.from_numpy(x.astype(np.float32))
    enc = qt.MXFP4() if kind == "mxfp4" else qt.NVFP4()
    grid = Grid.of(enc).fit(w)
    mine = quantized_tensor(grid, *rtn_quantize(w, grid))
    core = qt.quantize(w, enc, framework="pt")
    for a, b in zip(mine.parts(), core.parts(), strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_fp4_grid_refuses_non_finite_weights_and_an_unfitted_tensor_scale():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    obs = HessianObserver(32)
    obs.add(torch.randn(64, 32))
    for enc in (qt.MXFP4(), qt.NVFP4()):
        with pytest.raises(qt.QuantizationError, match="NaN or Inf"):
            GPTQ().quantize_weight(w, enc, obs)
    with pytest.raises(ValueError, match=r"Grid\.fit"):
        rtn_quantize(torch.randn(4, 32), Grid.of(qt.NVFP4()))


@pytest.mark.parametrize("enc", [qt.MXFP4(), qt.NVFP4()], ids=["mxfp4", "nvfp4"])
def test_gptq_fp4_scales_are_searched_on_the_format_lattice(enc):
    """GPTQ's decoded weights are exactly what the packed parts decode to (every searched block
    scale is a stored E8M0 / E4M3 value), and the search lowers the diag(H)-weighted error."""
    torch.manual_seed(14)
    W = torch.randn(16, 96) * torch.rand(16, 1) * 4
    W[:, 7] *= 5  # an outlier column: neighbouring scales pay off in its blocks
    obs = HessianObserver(96)
    obs.add(torch.diag(torch.rand(96) + 0.5))
    grid = Grid.of(enc).fit(W)
    d = obs.H.diagonal()
    errs = {}
    for search in (False, True):
        codes, S, _ = gptq_quantize(W, obs.H, grid, search_scales=search)
        mine = grid.decode(codes, S.repeat_interleave(grid.group_size, 1)[:, :96], None)
        q = quantized_tensor(grid, codes, S, None)
        np.testing.assert_array_equal(reference_decoded(q), mine.numpy())
        errs[search] = float(((W - mine).pow(2) * d).sum())
    assert errs[True] < errs[False]


@pytest.mark.parametrize("enc", [qt.MXFP4(), qt.NVFP4()], ids=["mxfp4", "nvfp4"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_on_fp4_blocks_end_to_end(method, enc, tmp_path):
    """quantize_model with GPTQ/AWQ on MXFP4/NVFP4; the saved folder loads, keeps the FP4
    encoding, and gives the same logits; the numpy reference decodes every weight."""
    model = tiny_llama(seed=13)
    ref = tiny_llama(seed=13)
    ids = torch.randint(2, 92, (8, 32), generator=torch.Generator().manual_seed(1))
    qtt.quantize_model(
        model,
        enc,
        method=method,
        calibration=ids,
        samples=8,
        seq_len=32,
        skip=("lm_head",),
        progress=False,
    )
    lins = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(lins) == 14 and all(m.weight.encoding["name"] == enc.name for m in lins.values())
    with torch.no_grad():
        got, want = model(input_ids=ids[:2]).logits, ref(input_ids=ids[:2]).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.1
    folder = tmp_path / "fp4"
    path = qtt.save_model(model, folder, quant=qt.Raw())
    tensors, metadata, _ = R.read_file(path)
    assert json.loads(metadata["quantization_method"])["method"] == method
    for name, lin in lins.items():
        want_w = lin.weight.dequantize(torch.float32).numpy()
        np.testing.assert_array_equal(tensors[f"{name}.weight"], want_w)
    loaded = qtt.from_pretrained(folder, transformers.AutoModelForCausalLM)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids[:2]).logits, got, rtol=0, atol=0)


def test_hqq_says_why_it_does_not_fit_fp4_blocks():
    model = tiny_llama(seed=13)
    for enc in (qt.MXFP4(), qt.NVFP4()):
        with pytest.raises(ValueError, match="no zero point"):
            qtt.quantize_model(model, enc, method="hqq")
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_blocks_run_in_true_sequential_stages():
    from qtensors.methods.runner import stages

    block = tiny_llama(seed=14).model.layers[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    hidden = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    rotary = tiny_llama(seed=14).model.rotary_emb(hidden, pos)
    calls = [((hidden,), {"position_embeddings": rotary, "attention_mask": None})]
    assert stages(block, linears, calls) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_lm_head_is_calibrated_when_not_skipped(method):
    model = tiny_llama(seed=15)
    ref = tiny_llama(seed=15)
    ids = torch.randint(2, 92, (8, 16), generator=torch.Generator().manual_seed(3))
    final: list[torch.Tensor] = []
    ref.lm_head.register_forward_pre_hook(lambda _m, a: final.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        ref(input_ids=ids)
    enc = qt.Symmetric(bits=3, group_size=16)
    qtt.quantize_model(model, enc, method=method, calibration=ids, samples=8, seq_len=16)
    assert isinstance(model.lm_head, QuantizedLinear)
    W = ref.lm_head.weight.detach()
    X = torch.cat(final)
    rtn = output_error(W, decoded(RTN().quantize_weight(W, enc)), X)
    got = output_error(W, model.lm_head.weight.dequantize(torch.float32), X)
    assert got < rtn  # the head saw its (quantized-model) inputs, not the weights alone


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_convert_with_a_method_holds_one_float_block(tmp_path, method, monkeypatch):
    """The folder's weights are read block by block: when a block is filled, the blocks before
    it are quantized already and those after it are still empty (meta)."""
    from qtensors.methods.convert import convert_with_method
    from qtensors.methods.lazy import ShardWeights

    src, text = tiny_folder(tmp_path, tie=True)
    real = ShardWeights.materialize
    blocks: list[nn.ModuleList] = []
    states = []

    def spy(self, module, prefix, dtype, exclude=None):
        if exclude is not None:  # the first call: everything outside the blocks
            blocks.append(exclude)
        else:
            layers, i = blocks[0], int(prefix.split(".")[2])
            done = all(isinstance(layers[j].mlp.down_proj, QuantizedLinear) for j in range(i))
            empty = all(layers[j].mlp.down_proj.weight.is_meta for j in range(i, len(layers)))
            states.append((i, done, empty))
        real(self, module, prefix, dtype, exclude)

    monkeypatch.setattr(ShardWeights, "materialize", spy)
    dst = tmp_path / "out"
    out = convert_with_method(
        str(src),
        str(dst),
        qt.Affine(bits=4, group_size=16),
        method,
        calibration=str(text),
        samples=4,
        seq_len=16,
        progress=False,
    )
    assert states == [(0, True, True), (1, True, True)]
    assert out["method"] == method
    model = qtt.from_pretrained(dst, transformers.AutoModelForCausalLM)
    ref = tiny_llama(seed=11, tie=True)
    ids = torch.tensor([[2, 3, 4, 5, 2, 6]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.1


def test_cli_convert_quantize_head(tmp_path):
    from qtensors.cli import main

    src, text = tiny_folder(tmp_path)
    dst = tmp_path / "out"
    argv = ["convert", str(src), str(dst), "--preset", "int4-g64", "--method", "gptq"]
    argv += ["--calibration", str(text), "--samples", "4", "--seq-len", "16", "--quantize-head"]
    assert main([*argv, "-q"]) == 0
    with qt.safe_open(dst / "model.qtensors") as f:
        assert f.encoding("lm_head.weight")["name"] == "affine"
        assert f.encoding("model.embed_tokens.weight")["name"] == "raw"
