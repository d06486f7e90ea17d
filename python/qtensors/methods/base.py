"""What every quantization method provides, and the statistics calibrated ones collect."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..encodings import Encoding
from ..quantized import QuantizedTensor


@runtime_checkable
class Observer(Protocol):
    """Collects what a method needs from the inputs of one linear layer."""

    def add(self, x: torch.Tensor) -> None: ...


@runtime_checkable
class Method(Protocol):
    """A quantizer of 2-D weights.

    ``needs_calibration``: whether it needs inputs of the layers (then the runner calls
    ``observer`` per linear, feeds it the layer's inputs, and passes it as ``stats``).
    ``prepare_stage`` may rewrite a block's float weights before a stage of its linears is
    observed and quantized (AWQ folds its scales there); the others leave the block alone.
    """

    name: str
    needs_calibration: bool

    def settings(self) -> dict[str, Any]:
        """The method's name and settings, as recorded in a file's metadata."""
        ...

    def observer(self, linear: nn.Linear, name: str = "") -> Observer | None: ...

    def prepare_stage(
        self, block: nn.Module, stage: list[str], run: Any, encoding: Encoding
    ) -> Any: ...

    def quantize_weight(
        self, weight: torch.Tensor, encoding: Encoding, stats: Observer | None
    ) -> QuantizedTensor: ...


class WeightOnly:
    """The part of ``Method`` a method that looks at the weights alone shares: no calibration,
    no observers, nothing to do per block."""

    needs_calibration = False

    def observer(self, linear: nn.Linear, name: str = "") -> None:
        return None

    def prepare_stage(
        self, block: nn.Module, stage: list[str], run: Any, encoding: Encoding
    ) -> None:
        return None


class HessianObserver:
    """``H = 2/n * sum x x^T`` over the n input rows seen so far (GPTQ's proxy Hessian)."""

    def __init__(self, features: int, device: torch.device | None = None) -> None:
        self.H = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        # running mean, so H keeps the same magnitude whatever the number of samples
        self.H.mul_(self.rows / (self.rows + n))
        self.rows += n
        self.H.addmm_(x.t(), x, alpha=2.0 / self.rows)


class ActivationObserver:
    """Per-input-channel mean |x| (AWQ's salience) and a seeded sample of input rows (for the
    clipping search)."""

    def __init__(self, features: int, keep_rows: int = 512, seed: int = 0) -> None:
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.rows = 0
        self.keep_rows = keep_rows
        self.sample: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double().cpu()
        self.rows += x.shape[0]
        # keep a uniform share of every batch: enough rows for the search, bounded memory
        take = min(x.shape[0], self.keep_rows)
        idx = torch.randperm(x.shape[0], generator=self._gen)[:take]
        rows = x[idx.to(x.device)]
        self.sample = rows if self.sample is None else torch.cat([self.sample, rows])
        if self.sample.shape[0] > self.keep_rows:
            keep = torch.randperm(self.sample.shape[0], generator=self._gen)[: self.keep_rows]
            self.sample = self.sample[keep.to(self.sample.device)]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()
