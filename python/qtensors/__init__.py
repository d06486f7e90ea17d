"""qtensors: safetensors, but group-quantized.

import qtensors as qt
qt.save_file({"fc.weight": w, "fc.bias": b}, "model.qtensors", quant=qt.FLEXGEN)
tensors = qt.load_file("model.qtensors", "cuda")            # device, as safetensors.torch
with qt.safe_open("model.qtensors", framework="np") as f:
    q = f.get_quantized("fc.weight")   # codes, scales, mins: zero-copy views of the file
"""

from __future__ import annotations

from ._core import FORMAT_VERSION, kernels
from .convert import ConversionInterrupted, convert
from .encodings import (
    FLEXGEN,
    MXFP4,
    NF4,
    NVFP4,
    PRESETS,
    Affine,
    Encoding,
    Raw,
    Symmetric,
    choose_encoding,
)
from .errors import ChecksumError, FormatError, QtensorsError, QuantizationError, UnsupportedError
from .files import load, load_file, safe_open, save, save_file
from .quantized import QuantizedTensor, dequantize, quantize
from .slices import TensorSlice
from .stream import TensorStream, stream

__version__ = "0.1.0"

__all__ = [
    "FLEXGEN",
    "FORMAT_VERSION",
    "MXFP4",
    "NF4",
    "NVFP4",
    "PRESETS",
    "Affine",
    "ChecksumError",
    "ConversionInterrupted",
    "Encoding",
    "FormatError",
    "QtensorsError",
    "QuantizationError",
    "QuantizedTensor",
    "Raw",
    "Symmetric",
    "TensorSlice",
    "TensorStream",
    "UnsupportedError",
    "choose_encoding",
    "convert",
    "dequantize",
    "kernels",
    "load",
    "load_file",
    "quantize",
    "safe_open",
    "save",
    "save_file",
    "stream",
]
