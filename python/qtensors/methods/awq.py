"""AWQ, activation-aware weight quantization (Lin et al. 2023): the input channels that carry
large activations matter most, so they are scaled up before quantization (a smaller relative
rounding error) and the inverse scale is folded into whatever produces them (a norm's weight or
the previous linear's rows), so inference costs nothing extra.

Per block, for each group of linears sharing one input (``scale_groups``), at the runner's
stage where it is due (earlier stages quantized): ``s = x_mean^alpha`` (the paper's and
llm-awq's formula; ``duo_scaling``: AutoAWQ's ``/ (w_mean^(1-alpha) + 1e-4)``), normalised by
``sqrt(max s * min s)``, with ``alpha`` from a grid of 20 points in [0, 1) minimising the
squared error of the module's output (the attention, the MLP, or the linear itself), each
candidate rounded by the encoding's own round-to-nearest, scored against the float module's
output on the same (quantized-stream) inputs, or with ``float_targets`` against the float
model's own output of that module (a float copy of the block on a float stream: measured worse
on SmolLM2, 1.285x against 1.259x of fp32 perplexity, so off). Then the clipping search: per
group of weights, the shrinking of its range (ratios 1, 0.95, ..., 0.55) that minimises the
mean squared error of its share of the layer's output over every calibration row (the groups'
Gram matrices, ``ActivationObserver``; the reference samples 512 rows), q/k included
(``clip_qk``; the reference skips them). Then ``refit``: with each group's codes fixed, its
scale (and affine min) that minimises that same objective is a least-squares fit in closed
form; it is rounded to what the format stores, the codes re-rounded, 4 times, each group
keeping its best (a refinement of the reference, which stops at the clipping grid).
``alpha = 0`` and ratio 1 are plain round-to-nearest, so on its own objectives AWQ is never
worse than RTN. On SmolLM2 these defaults took AWQ from 1.311x to 1.253x of fp32 perplexity at
int4-g128 symmetric (per-layer error 0.75 -> 0.68 of RTN's) and from 1.106x to 1.064x at
int4-g64 affine (0.80 -> 0.70; ``benches/results/methods_awq_g*_refit.txt``).

``AWQGPTQ`` ("awq-gptq") folds the same scales, then rounds the scaled weights with GPTQ
instead of the clipping search (a common combination: the scales protect the salient
channels, GPTQ compensates the rounding error); it keeps the duo term it was measured with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..encodings import Encoding
from ..quantized import QuantizedTensor
from .base import ActivationObserver, HessianObserver
from .gptq import GPTQ
from .grid import Grid, expand, grouped, rows_view
from .packing import quantized_tensor
from .rtn import rtn_fake


@dataclass
class ScaleGroup:
    """Linears fed by the same input, the module producing it (``prev``), and the module whose
    output the scale search watches (``inspect``, fed by that same input)."""

    prev: nn.Module
    linears: list[nn.Linear]
    inspect: nn.Module


def _get(block: nn.Module, path: str) -> Any:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The foldable groups of a Llama-like decoder block or a BERT-like encoder block.

    Only a producer whose output feeds nothing but these linears can absorb a scale: in BERT
    the LayerNorms also feed the residual stream, so only value -> attention output remains.
    Grouped-query v -> o is skipped, as AWQ's code does (a scale tied across the query heads
    sharing a value head folds exactly, but measured worse on SmolLM2: v and o errors rose).
    """
    groups: list[ScaleGroup] = []

    def add(prev: str, linears: list[str], inspect: str | None) -> None:
        p = _get(block, prev)
        lins = [_get(block, n) for n in linears]
        if not _foldable(p) or any(type(x) is not nn.Linear for x in lins):
            return  # absent, or already quantized
        feat = p.out_features if isinstance(p, nn.Linear) else p.weight.shape[0]
        if any(x.in_features != feat for x in lins):  # e.g. grouped-query v_proj -> o_proj
            return
        groups.append(ScaleGroup(p, lins, _get(block, inspect) if inspect else lins[0]))

    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    add("input_layernorm", attn, "self_attn")
    add("self_attn.v_proj", ["self_attn.o_proj"], None)
    add("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp")
    add("mlp.up_proj", ["mlp.down_proj"], None)
    add("attention.self.value", ["attention.output.dense"], None)
    return groups


def _foldable(m: nn.Module | None) -> bool:
    """A float linear, or a norm (a float weight per feature, no ``in_features``)."""
    if type(m) is nn.Linear:
        return True
    return isinstance(getattr(m, "weight", None), nn.Parameter) and not hasattr(m, "in_features")


def fold_scales(group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' input
    columns by it: the float function is unchanged."""
    with torch.no_grad():
        prev = group.prev
        s = s.to(prev.weight.device, prev.weight.dtype)
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None])
        else:  # a norm: y = x_hat * weight (+ bias)
            prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
        for lin in group.linears:
            lin.weight.mul_(s.to(lin.weight.device, lin.weight.dtype)[None, :])


class _Capture:
    """The (args, kwargs) every call of a module gets (pre-hook) while the block runs."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self._h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((args, kwargs))

    def close(self) -> None:
        self._h.remove()


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class AWQ:
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    max_shrink: float = 0.5
    search_batches: int = 4
    clip_qk: bool = True
    float_targets: bool = False
    refit: int = 4

    name = "awq"
    needs_calibration = True

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "n_grid": self.n_grid,
            "duo_scaling": self.duo_scaling,
            "clip": self.clip,
            "max_shrink": self.max_shrink,
            "clip_qk": self.clip_qk,
            "float_targets": self.float_targets,
            "refit": self.refit,
        }

    def observer(
        self, linear: nn.Linear, name: str = "", encoding: Encoding | None = None
    ) -> ActivationObserver:
        # AWQ's code skips clipping q/k (their errors reach the output through the attention
        # scores, which a linear's own output error does not see); ``clip_qk`` clips them too
        qk = any(k in name for k in ("q_proj", "k_proj", "query", "key"))
        grid = None if encoding is None else Grid.of(encoding)
        clip = self.clip and (self.clip_qk or not qk) and grid is not None and grid.axis % 2 == 1
        return ActivationObserver(linear.in_features, grid.group_size if clip else None)

    # -- scales ----------------------------------------------------------------------------
    def prepare_stage(
        self, block: nn.Module, stage: list[str], run: Any, encoding: Encoding
    ) -> list[float]:
        """Search and fold the scales of the groups due at this stage (the runner is about to
        observe and quantize its linears); the chosen alphas.

        A group is due at the stage of its consumers, or of its producer when that is a linear
        (the producer must still be float to absorb the scale: v -> o is searched with q/k/v,
        up -> down with gate/up). Earlier stages are already quantized, so each search sees
        the inputs the quantized model will give (true-sequential, as GPTQ's stages)."""
        grid = Grid.of(encoding)
        members = {id(block.get_submodule(n)) for n in stage}
        alphas = []
        for group in scale_groups(block):
            if id(group.prev) not in members and all(id(x) not in members for x in group.linears):
                continue
            caps = [_Capture(group.inspect), _Capture(group.linears[0])]
            try:
                run(self.search_batches, stop_after=group.inspect)
            finally:
                for c in caps:
                    c.close()
            inspect_calls, lin_calls = caps[0].calls, caps[1].calls
            x_mean = torch.cat(
                [a[0].reshape(-1, a[0].shape[-1]).abs().float() for a, _ in lin_calls]
            ).mean(0)
            targets = None
            if self.float_targets:  # the float model's outputs, on its own inputs
                targets = run.float_outputs(group.inspect, self.search_batches)
            alpha, s = self._search(group, grid, x_mean, inspect_calls, targets)
            fold_scales(group, s)
            alphas.append(alpha)
        return alphas

    def _search(
        self,
        group: ScaleGroup,
        grid: Grid,
        x_mean: torch.Tensor,
        calls: list,
        targets: list[torch.Tensor] | None = None,
    ) -> tuple[float, torch.Tensor]:
        """The best alpha and its scales: the least squared error of ``group.inspect``'s outputs
        on ``calls`` against ``targets`` (by default its float outputs on the same calls)."""
        originals = [lin.weight.detach().clone() for lin in group.linears]

        def output() -> list[torch.Tensor]:
            return [_first(group.inspect(*a, **k)).float() for a, k in calls]

        with torch.no_grad():
            ref = output() if targets is None else targets
            w_mean = self._w_mean(originals, grid) if self.duo_scaling else None
            best = (float("inf"), 0.0, torch.ones_like(x_mean))
            for i in range(self.n_grid):
                alpha = i / self.n_grid
                s = x_mean.pow(alpha)
                if w_mean is not None:
                    s = s / (w_mean.pow(1 - alpha) + 1e-4)
                s = s.clamp_min(1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for lin, w in zip(group.linears, originals, strict=True):
                    sw = s.to(w.device)[None, :]
                    lin.weight.copy_(rtn_fake(w * sw, grid).to(w.dtype) / sw)
                err = sum(float((o - r).pow(2).mean()) for o, r in zip(output(), ref, strict=True))
                if err < best[0]:
                    best = (err, alpha, s)
            for lin, w in zip(group.linears, originals, strict=True):
                lin.weight.copy_(w)
        return best[1], best[2]

    @staticmethod
    def _w_mean(weights: list[torch.Tensor], grid: Grid) -> torch.Tensor:
        """Per input channel mean of |w| relative to its group's absmax (AWQ's weight term)."""
        w = torch.cat([x.float() for x in weights])
        g = grid.group_size if grid.axis % 2 == 1 else w.shape[1]
        gw = grouped(w, g)
        rel = gw.abs() / gw.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        return rel.reshape(w.shape[0], -1)[:, : w.shape[1]].mean(0)

    # -- weights ---------------------------------------------------------------------------
    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Any
    ) -> QuantizedTensor:
        grid = Grid.of(encoding).fit(weight)
        w = weight.detach().float()
        if (
            isinstance(stats, ActivationObserver)
            and stats.gram is not None
            and stats.group_size == grid.group_size
            and grid.axis % 2 == 1
        ):
            rows, gram = rows_view(w, grid), stats.gram.to(w.device)
            ratio = best_clip(rows, gram, grid, self.n_grid, self.max_shrink)
            c, s, m = clipped_rtn(rows, grid, ratio)
            if self.refit:
                c, s, m = refit(rows, gram, grid, s, m, self.refit)
            return quantized_tensor(grid, c, s, m)
        return quantized_tensor(grid, *clipped_rtn(rows_view(w, grid), grid, None))


@dataclass
class AWQGPTQ(AWQ):
    """AWQ's scales, then GPTQ's rounding (``gptq``: its settings)."""

    gptq: GPTQ = field(default_factory=GPTQ)
    duo_scaling: bool = True

    name = "awq-gptq"

    def settings(self) -> dict[str, Any]:
        clip = ("clip", "max_shrink", "clip_qk", "refit")
        own = {k: v for k, v in super().settings().items() if k not in clip}
        return {**own, "gptq": {k: v for k, v in self.gptq.settings().items() if k != "method"}}

    def observer(
        self, linear: nn.Linear, name: str = "", encoding: Encoding | None = None
    ) -> HessianObserver:
        return self.gptq.observer(linear, name, encoding)

    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Any
    ) -> QuantizedTensor:
        return self.gptq.quantize_weight(weight, encoding, stats)


def clipped_rtn(
    w: torch.Tensor, grid: Grid, ratio: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN with each group's range ``[lo, hi]`` shrunk to ``[lo * r, hi * r]``."""
    g, n = grid.group_size, w.shape[1]
    gw = grouped(w, g)
    lo, hi = gw.amin(-1), gw.amax(-1)
    if ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    s, m = grid.params_from_range(lo, hi)
    return grid.encode(w, expand(s, g, n), expand(m, g, n)), s, m


def best_clip(
    w: torch.Tensor,
    gram: torch.Tensor,
    grid: Grid,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    chunk: int = 256,
) -> torch.Tensor:
    """Per (row, group) shrink ratio minimising the mean squared error of that group's share
    of the output, ``mean_t (sum_j x_tj (w_j - q_j))^2 = d^T H_g d`` with ``gram`` the
    groups' ``H_g`` (``[G, g, g]``, ``ActivationObserver``): AWQ's objective over every
    calibration row rather than a sample of them."""
    g, rows = grid.group_size, w.shape[0]
    h = gram.float()
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    best_ratio = torch.ones(rows, h.shape[0], device=w.device)
    for r0 in range(0, rows, chunk):
        wc = grouped(w[r0 : r0 + chunk], g)  # [R, G, g] (ragged padding meets zero rows of H)
        lo, hi = wc.amin(-1), wc.amax(-1)
        best_err = torch.full(lo.shape, float("inf"), device=w.device)
        for r in ratios:
            s, m = grid.params_from_range(lo * r, hi * r)
            d = wc - grid.fake(wc, s[..., None], None if m is None else m[..., None])
            err = (torch.einsum("rgk,gkl->rgl", d, h) * d).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0 : r0 + chunk] = torch.where(better, r, best_ratio[r0 : r0 + chunk])
    return best_ratio


def group_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d^T H_g d`` per (row, group) of grouped differences ``d`` ``[R, G, g]``."""
    return (torch.einsum("rgk,gkl->rgl", d, h) * d).sum(-1)


def refit(
    w: torch.Tensor,
    gram: torch.Tensor,
    grid: Grid,
    s: torch.Tensor,
    m: torch.Tensor | None,
    iters: int = 4,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes and parameters after refitting each group's parameters to its codes: with the
    codes fixed, the scale (and an affine group's min) minimising the clipping search's own
    objective ``d^T H_g d`` is a weighted least-squares fit in closed form (2x2 for affine,
    one ratio for symmetric, NF4 and the FP4 blocks); the parameters are rounded to what the
    format stores (``Grid.nearest_scale``: the scale dtype, E8M0 or E4M3), the codes
    re-rounded to them, and the step repeated ``iters`` times. Each (row, group) keeps the
    best parameters seen, the clipped start included, so its objective never rises."""
    g, n = grid.group_size, w.shape[1]
    h = gram.float()
    s, m = s.clone(), None if m is None else m.clone()
    affine = m is not None
    h1 = h.sum(-1)  # H_g 1, [G, g]: the affine fit's column of ones
    codes = []
    for r0 in range(0, w.shape[0], chunk):
        rs = slice(r0, r0 + chunk)
        wc = grouped(w[rs], g)  # [R, G, g]
        hw = torch.einsum("rgk,gkl->rgl", wc, h)  # H_g w, fixed
        s_c = s[rs]
        m_c = None if m is None else m[rs]
        c, best = _codes_and_error(grid, wc, h, s_c, m_c)
        for _ in range(iters):
            # the decoded value is ``v * s (+ m)`` with ``v`` the code's value at scale 1
            v = c.float() if affine else grid.decode(c, torch.ones_like(s_c)[..., None], None)
            hv = torch.einsum("rgk,gkl->rgl", v, h)
            vhv, vhw = (v * hv).sum(-1), (v * hw).sum(-1)
            if affine:
                vh1, one_h1, one_hw = (v * h1).sum(-1), h1.sum(-1), hw.sum(-1)
                det = vhv * one_h1 - vh1 * vh1
                ok = det > 1e-12 * (vhv * one_h1).clamp_min(1e-30)
                safe = torch.where(ok, det, torch.ones_like(det))
                s_new = (vhw * one_h1 - vh1 * one_hw) / safe
                m_new = (vhv * one_hw - vh1 * vhw) / safe
            else:
                ok = vhv > 0
                s_new = vhw / torch.where(ok, vhv, torch.ones_like(vhv))
                m_new = None
            ok &= s_new > 0
            if not grid.fp4:  # a near-singular fit stays within the group's own magnitude
                lim = 2 * wc.abs().amax(-1)
                ok &= s_new <= lim
                if m_new is not None:
                    ok &= m_new.abs() <= lim
            s_try = grid.nearest_scale(torch.where(ok, s_new, s_c))
            m_try = None if m_new is None else grid.st(torch.where(ok, m_new, m_c))
            c_try, err = _codes_and_error(grid, wc, h, s_try, m_try)
            better = err < best
            best = torch.where(better, err, best)
            s_c = torch.where(better, s_try, s_c)
            if affine:
                m_c = torch.where(better, m_try, m_c)
            c = torch.where(better[..., None], c_try, c)
        s[rs] = s_c
        if affine:
            m[rs] = m_c
        codes.append(c.reshape(c.shape[0], -1)[:, :n])  # the best codes, ragged padding cut
    return torch.cat(codes), s, m


def _codes_and_error(
    grid: Grid, wc: torch.Tensor, h: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codes of grouped weights ``wc`` under per-group parameters, and their
    objective ``d^T H_g d``."""
    mm = None if m is None else m[..., None]
    c = grid.encode(wc, s[..., None], mm)
    return c, group_error(wc - grid.decode(c, s[..., None], mm), h)
