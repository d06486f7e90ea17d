"""qtensors for PyTorch: GPU dequantization ops, quantized modules, and loading straight into
models.

    import qtensors.torch as qtt
    w = qtt.dequantize(q, device="cuda")                 # a QuantizedTensor, decoded on the GPU
    qtt.load_model(model, "model.qtensors", device="cuda")   # linears stay 4-bit on the GPU
    model = qtt.from_pretrained("MiniLM-qtensors", device="cuda")   # transformers, one call
    qtt.offload(model, "model.qtensors", device="cuda")      # weights stay on disk, prefetched
    cache = qtt.QuantizedKVCache(bits=4)                     # a 4-bit KV cache for generate

``torch.ops.qtensors.dequantize`` is the op underneath (Triton on CUDA, the Rust core on the
CPU, plain torch elsewhere, fake tensors under ``torch.compile``); ``torch.ops.qtensors.linear``
multiplies by a quantized weight without decoding it (fused Triton kernels on CUDA).
"""

# No `from __future__ import annotations` and no bare `typing` names: everything imported here
# shows in dir(qtensors.torch), which should list the API (`__all__`) and its submodules only.
import typing as _typing

try:
    import torch as _torch
except ImportError as _e:
    if _e.name != "torch":  # torch is there but broken: its own message says why
        raise
    raise ImportError(
        "qtensors.torch needs PyTorch, which is not installed: pip install 'qtensors[torch]' "
        "(or torch for your CUDA version, from pytorch.org)",
        name="torch",
    ) from None

from ..quantized import QuantizedTensor as _QuantizedTensor
from .linear import linear_op
from .loading import LoadResult, load_model, model_files, save_model, state_dict_for_file
from .modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from .offload import OffloadHandle, offload
from .ops import HAVE_TRITON, dequantize_op, dequantize_torch
from .transformers import from_pretrained, init_empty_weights, sentence_embeddings

__all__ = [
    "HAVE_TRITON",
    "LoadResult",
    "OffloadHandle",
    "QuantizedEmbedding",
    "QuantizedKVCache",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize",
    "dequantize_op",
    "dequantize_torch",
    "from_pretrained",
    "init_empty_weights",
    "linear_op",
    "load_kv_cache",
    "load_model",
    "model_files",
    "offload",
    "quantize_model",
    "save_kv_cache",
    "save_model",
    "sentence_embeddings",
    "state_dict_for_file",
]

# The KV cache subclasses transformers' Cache: imported on first use, transformers is optional.
_KV_NAMES = {
    "QuantizedKVCache": "kv_cache",
    "save_kv_cache": "kv_files",
    "load_kv_cache": "kv_files",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _KV_NAMES:
        import importlib

        module = importlib.import_module(f"{__name__}.{_KV_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dequantize(
    q: _QuantizedTensor,
    dtype: _torch.dtype | None = None,
    device: _torch.device | str | None = None,
) -> _torch.Tensor:
    """Decode a QuantizedTensor (numpy or torch parts) on ``device`` (default: where its parts
    are, the CPU for numpy) into ``dtype`` (default: its logical dtype)."""
    w = QuantizedWeight.from_quantized(q, device=device)
    return w.dequantize(dtype)


def quantize_model(
    model: _torch.nn.Module,
    encoding: _typing.Any = None,
    embeddings: bool = False,
    skip: tuple[str, ...] = (),
) -> _torch.nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` (and ``nn.Embedding`` with
    ``embeddings``) by its quantized counterpart, quantized with ``encoding`` (an encoding or a
    preset name such as ``"nf4"``; default FLEXGEN) on the CPU; names matching a ``skip``
    pattern (fnmatch) stay as they are. In place."""
    import fnmatch

    from ..encodings import FLEXGEN, Raw, as_encoding
    from .loading import _swappable

    enc = FLEXGEN if encoding is None else as_encoding(encoding, "encoding")
    if isinstance(enc, Raw):
        raise ValueError("quantize_model needs a quantizing encoding, not raw")
    for name, module in list(model.named_modules()):
        if any(fnmatch.fnmatchcase(name, p) for p in skip) or not name:
            continue
        if _swappable(module, _torch.nn.Linear):
            new: _torch.nn.Module = QuantizedLinear.from_linear(module, enc)
        elif embeddings and _swappable(module, _torch.nn.Embedding):
            new = QuantizedEmbedding.from_embedding(module, enc)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model
