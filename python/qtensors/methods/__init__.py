"""Quantization methods: how a weight's codes and group parameters are chosen. Every method
writes ordinary qtensors data (affine, symmetric, NF4 groups or MXFP4/NVFP4 blocks) that every
reader decodes.

* ``rtn``: round-to-nearest per group (the default; no data).
* ``hqq``: half-quadratic, a better group fit of the weights alone (no data).
* ``gptq``: column-by-column error compensation with the inputs' Hessian (calibration data).
* ``awq``: activation-aware channel scales folded into the model, then a clipping search
  (calibration data); ``awq-gptq``: the same scales, then GPTQ.

``qtensors.torch.quantize_model(model, encoding, method=..., calibration=..., tokenizer=...)``
runs them on a model (``runner``: block by block, true-sequential within a block; linears
outside the blocks on their inputs from the quantized model); ``qtensors convert --method``
streams a model folder through it (``lazy``: one float block in memory). ``get_method(name,
**settings)`` gives one to use directly (``method.quantize_weight(weight, encoding, stats)``).
RTN fills every encoding (through the core); GPTQ and AWQ fill affine, symmetric (balanced or
full levels), NF4, MXFP4 and NVFP4 (``grid``: each format's own scale rules); HQQ affine groups
only (it fits zero points, which the others do not have).
"""

from __future__ import annotations

from typing import Any

from . import runner
from .awq import AWQ, AWQGPTQ
from .base import ActivationObserver, HessianObserver, Method, Observer
from .calibration import CalibrationError, calibration_windows, read_texts
from .gptq import GPTQ
from .hqq import HQQ
from .rtn import RTN

METHODS: dict[str, type] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "awq-gptq": AWQGPTQ, "hqq": HQQ}

__all__ = [
    "AWQ",
    "AWQGPTQ",
    "GPTQ",
    "HQQ",
    "METHODS",
    "RTN",
    "ActivationObserver",
    "CalibrationError",
    "HessianObserver",
    "Method",
    "Observer",
    "calibration_windows",
    "get_method",
    "read_texts",
    "runner",
]


def get_method(method: str | Method, **settings: Any) -> Method:
    """A method by name (``rtn``, ``gptq``, ``awq``, ``awq-gptq``, ``hqq``) with ``settings``,
    or itself."""
    if not isinstance(method, str):
        if settings:
            raise TypeError("settings go to the method's constructor, not with an instance")
        return method
    cls = METHODS.get(method.lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return cls(**settings)
