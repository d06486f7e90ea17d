"""Round-to-nearest: each group's min-max (or absmax) parameters and nearest codes, i.e.
``qtensors.quantize``. The baseline every other method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..encodings import Encoding
from ..quantized import QuantizedTensor, quantize
from .base import WeightOnly
from .grid import Grid, expand, from_rows, grouped, rows_view


@dataclass
class RTN(WeightOnly):
    name = "rtn"

    def settings(self) -> dict[str, Any]:
        return {"method": self.name}

    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Any = None
    ) -> QuantizedTensor:
        # the Rust core: every encoding, MXFP4 and NVFP4 included (rtn_quantize is its torch twin,
        # for the methods that round inside their searches)
        return quantize(weight.detach().cpu(), encoding, framework="pt")


def rtn_quantize(
    w: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes ``[rows, n]`` and parameters ``[rows, G]`` of ``w`` (groups along its last axis;
    an NVFP4 grid fitted to it, ``Grid.fit``)."""
    g, n = grid.group_size, w.shape[1]
    s, m = grid.params(grouped(w.float(), g))
    return grid.encode(w, expand(s, g, n), expand(m, g, n)), s, m


def rtn_fake(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``weight`` (any orientation the grid allows) round-tripped through RTN."""
    grid = grid.fit(weight)
    w = rows_view(weight.detach(), grid)
    g, n = grid.group_size, w.shape[1]
    c, s, m = rtn_quantize(w, grid)
    return from_rows(grid.decode(c, expand(s, g, n), expand(m, g, n)), grid)
