"""GPTQ (Frantar et al. 2022): quantize a weight column by column and push each column's error
onto the columns not yet quantized, weighted by the inverse of the layer's input Hessian
(Optimal Brain Surgeon), so the layer's outputs on the calibration inputs move as little as
possible.

As the paper and its reference code define it: ``H = 2/n X X^T``; dampening ``damp`` times the
mean diagonal; the upper Cholesky factor of ``H^-1``; columns in blocks with lazy batch updates;
group parameters computed when the sweep reaches a group (from the weights as updated so far).
With ``act_order`` columns go by decreasing ``diag(H)``, and the groups are static (parameters
from the original weights), so the stored layout is the plain one and readers need no
permutation. Columns whose input is always zero ("dead") are set to zero.

On the FP4 block formats the groups are the format's blocks (32 for MXFP4, 16 for NVFP4) and a
block's scale is the format's (E8M0 from the block amax; E4M3 times NVFP4's per-tensor scale,
which ``Grid.fit`` takes from the whole weight before the sweep), codes E2M1 rounded to nearest
even: the bytes ``qt.MXFP4()``/``qt.NVFP4()`` define.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..encodings import Encoding
from ..quantized import QuantizedTensor
from .base import HessianObserver
from .grid import Grid, expand, group_mask, grouped
from .packing import quantized_tensor


@dataclass
class GPTQ:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    search_scales: bool = True

    name = "gptq"
    needs_calibration = True

    def settings(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "block_size": self.block_size,
            "damp": self.damp,
            "act_order": self.act_order,
            "static_groups": self.act_order,
            "search_scales": self.search_scales,
        }

    def observer(
        self, linear: nn.Linear, name: str = "", encoding: Encoding | None = None
    ) -> HessianObserver:
        return HessianObserver(linear.in_features, device=linear.weight.device)

    def prepare_stage(
        self, block: nn.Module, stage: list[str], run: Any, encoding: Encoding
    ) -> None:
        return None

    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Any
    ) -> QuantizedTensor:
        if not isinstance(stats, HessianObserver) or stats.rows == 0:
            raise ValueError("gptq needs the Hessian of the layer's calibration inputs")
        grid = Grid.of(encoding).fit(weight)  # NVFP4: the tensor scale, before the sweep
        codes, scales, mins = gptq_quantize(
            weight, stats.H, grid, self.block_size, self.damp, self.act_order, self.search_scales
        )
        return quantized_tensor(grid, codes, scales, mins)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; more dampening is added
    if H is not positive definite (e.g. fewer samples than features)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = float(H.diagonal().mean())
    for attempt in range(6):
        lam = damp * 10**attempt * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("gptq: the Hessian stays singular even with dampening")


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    grid: Grid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    search_scales: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scales and mins of ``weight [out, in]`` in the grid's row orientation (see
    ``grid.rows_view``): ``[out, in]`` and ``[out, G]`` for groups along the input axis,
    ``[in, out]`` and ``[in, G]`` for groups along the output axis.

    ``search_scales``: each group's range is shrunk by the ratio minimising its squared
    error weighted by diag(H) (``Grid.search_params``) instead of taken whole."""
    W = weight.detach().float().clone()
    out_f, n = W.shape
    H = H.detach().float().to(W.device).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    d = H.diagonal().clone()  # how much each input column's error costs

    def params(
        groups: torch.Tensor, cols: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return grid.search_params(groups, cols) if search_scales else grid.params(groups)

    g = grid.group_size
    along_in = grid.axis % 2 == 1
    if along_in:
        n_groups = -(-n // g)
        S = torch.zeros(out_f, n_groups, device=W.device)
        M = torch.zeros_like(S) if grid.kind == "affine" else None
        if act_order:  # static groups: from the original weights, before any update
            dg = grouped(d[None, :], g) * group_mask(n, g, W.device)  # padding costs nothing
            S, M = params(grouped(W, g), dg)
        # a group must not straddle blocks, so that its columns are all in W1 when it starts
        B = g * max(1, block_size // g)
    else:
        S = torch.zeros(n, -(-out_f // g), device=W.device)
        M = torch.zeros_like(S) if grid.kind == "affine" else None
        B = block_size

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(n)
    perm = perm.to(W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    U = _upper_cholesky_of_inverse(H, damp)
    codes = torch.zeros(out_f, n, dtype=torch.int32, device=W.device)

    order = perm.tolist()
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            orig = order[i1 + i]
            w = W1[:, i]
            if along_in:
                k = orig // g
                if not act_order and orig % g == 0:
                    cols = d[orig : orig + g][None, None, :]
                    s_k, m_k = params(W1[:, i : i + g].unsqueeze(1), cols)
                    S[:, k] = s_k[:, 0]
                    if M is not None:
                        M[:, k] = m_k[:, 0]
                s = S[:, k]
                m = None if M is None else M[:, k]
            else:  # groups run down this column: its parameters come with it
                s_c, m_c = params(grouped(w[None, :], g), None)
                S[orig] = s_c[0]
                s = expand(s_c, g, out_f)[0]
                m = None
                if M is not None:
                    M[orig] = m_c[0]
                    m = expand(m_c, g, out_f)[0]
            c = grid.encode(w, s, m)
            q = grid.decode(c, s, m)
            codes[:, i1 + i] = c
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    codes = codes[:, torch.argsort(perm)]
    if along_in:
        return codes, S, M
    return codes.t().contiguous(), S, M
