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

    def observer(
        self, linear: nn.Linear, name: str = "", encoding: Encoding | None = None
    ) -> Observer | None: ...

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

    def observer(self, linear: nn.Linear, name: str = "", encoding: Encoding | None = None) -> None:
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
    """Per-input-channel mean |x| and the per-group Gram matrices ``mean x_g x_g^T`` over every
    input row (groups of ``group_size`` consecutive input channels, the last one zero-padded):
    the mean squared output error of a group's weight change ``d`` is ``d^T H_g d``, exactly
    the clipping search's objective on all the calibration rows, at ``rows * features * g``
    to accumulate and ``features * g`` to keep."""

    def __init__(self, features: int, group_size: int | None = None) -> None:
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.rows = 0
        self.group_size = group_size
        self.gram: torch.Tensor | None = None  # [G, g, g], a running mean over the rows

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        self.abs_sum += x.abs().sum(0).double().cpu()
        self.rows += n
        if self.group_size is None:
            return
        g = self.group_size
        pad = -x.shape[1] % g
        xg = torch.nn.functional.pad(x, (0, pad)).reshape(n, -1, g).transpose(0, 1)  # [G, n, g]
        if self.gram is None:
            self.gram = torch.zeros(xg.shape[0], g, g, device=x.device)
        self.gram.mul_((self.rows - n) / self.rows)
        self.gram.baddbmm_(xg.transpose(1, 2), xg, alpha=1.0 / self.rows)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()
