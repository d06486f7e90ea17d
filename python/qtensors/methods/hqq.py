"""HQQ, half-quadratic quantization (Badri & Shaji 2023): no calibration data; each group's
parameters are fitted to the weights themselves under a sparsity-promoting lp error (p < 1),
which lets a few outliers go and fits the bulk of the weights.

Half-quadratic splitting introduces ``W_e ~ W - W_r`` (``W_r`` the decoded weights) and
alternates: codes for the current parameters; ``W_e`` by the generalised soft-thresholding of
the lp norm (``beta``); the parameter that minimises ``||W - W_e - W_r||^2`` in closed form;
``beta *= kappa``. As the paper does, the scale stays fixed and the zero point (here the stored
``min``) is optimised, so HQQ takes affine groups only. (Fitting the scale of symmetric groups
instead lowered the lp objective but clipped the large weights: SmolLM2 int4-g128 symmetric went
to 2.30x the fp32 perplexity against RTN's 1.51x, so it is refused rather than offered.)

Each group keeps the best parameters seen, judged by ``mean |W - W_r|^p`` with the parameters
as stored (rounded to the scale dtype), starting from round-to-nearest's: the result's
objective is never above RTN's. The loop stops early once no group improves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..encodings import Encoding
from ..quantized import QuantizedTensor
from .base import WeightOnly
from .grid import Grid, group_mask, grouped, rows_view
from .packing import quantized_tensor


@dataclass
class HQQ(WeightOnly):
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    #: objective after each iteration of the last weight quantized (non-increasing)
    last_history: list[float] = field(default_factory=list, repr=False, compare=False)

    name = "hqq"

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "p": self.p,
            "beta": self.beta,
            "kappa": self.kappa,
            "iters": self.iters,
        }

    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Any = None
    ) -> QuantizedTensor:
        grid = Grid.of(encoding)
        check_affine(grid)
        codes, s, m, self.last_history = hqq_quantize(
            rows_view(weight.detach(), grid), grid, self.p, self.beta, self.kappa, self.iters
        )
        return quantized_tensor(grid, codes, s, m)


def check_affine(grid: Grid) -> None:
    if grid.fp4:
        raise ValueError(
            f"HQQ fits each group's zero point, and {grid.kind} blocks have no zero point (E2M1 "
            "levels symmetric around 0, only a block scale): use method='gptq' or 'awq' for "
            "FP4 blocks, or an affine encoding (e.g. 'int4-g64') for HQQ"
        )
    if grid.kind != "affine":
        raise ValueError(
            f"HQQ fits each group's zero point, which {grid.kind} groups do not have: use an "
            "affine encoding (e.g. 'int4-g64' or qt.Affine(bits=4, group_size=64)), or "
            "method='gptq' for symmetric and NF4 groups"
        )


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def hqq_quantize(
    w: torch.Tensor,
    grid: Grid,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[float]]:
    """Codes ``[rows, n]``, parameters ``[rows, G]`` and the objective after each iteration
    (mean over groups of the best-so-far lp error, non-increasing)."""
    check_affine(grid)
    rows, n = w.shape
    g = grid.group_size
    W = grouped(w.float(), g)  # [rows, G, g]
    mask = group_mask(n, g, W.device)
    count = mask.sum(-1)  # real elements per group

    def objective(s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        r = grid.fake(W, s[..., None], None if m is None else m[..., None])
        return ((W - r).abs().pow(p) * mask).sum(-1) / count

    s, m = grid.params(W)
    best_s, best_m = s.clone(), None if m is None else m.clone()
    best = objective(s, m)
    history = [float(best.mean())]
    for _ in range(iters):
        s3 = s[..., None]
        m3 = None if m is None else m[..., None]
        c = grid.encode(W, s3, m3)
        W_e = shrink_lp(W - grid.decode(c, s3, m3), beta, p)
        target = W - W_e  # what the decoded weights should match
        # the zero point: mean of target - code * scale
        m = grid.st((((target - c.float() * s3) * mask).sum(-1)) / count)
        beta *= kappa
        err = objective(s, m)
        better = err < best
        if not bool(better.any()):
            break
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
        history.append(float(best.mean()))
    codes = grid.encode(W, best_s[..., None], None if best_m is None else best_m[..., None])
    return codes.reshape(rows, -1)[:, :n], best_s, best_m, history
