"""qtensors for PyTorch: GPU dequantization ops, quantized modules, and loading straight into
models.

    import qtensors.torch as qtt
    w = qtt.dequantize(q, device="cuda")                 # a QuantizedTensor, decoded on the GPU
    qtt.load_model(model, "model.qtensors", device="cuda")   # linears stay 4-bit on the GPU
    model = qtt.from_pretrained("MiniLM-qtensors", device="cuda")   # transformers, one call
    AutoModelForCausalLM.from_pretrained("llama-q4", device_map="cuda")   # registered quantizer
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
from .hf_quantizer import install as _install_hf_quantizer
from .linear import linear_op
from .loading import LoadResult, load_model, model_files, save_model, state_dict_for_file
from .modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight
from .offload import OffloadHandle, offload
from .ops import HAVE_TRITON, dequantize_op, dequantize_torch
from .siblings import fuse_siblings, unfuse_siblings
from .transformers import from_pretrained, init_empty_weights, sentence_embeddings
from .warmup import warmup

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
    "fuse_siblings",
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
    "unfuse_siblings",
    "warmup",
]

# transformers' from_pretrained / pipeline / SentenceTransformer of converted folders
# (quant_method "qtensors"); lazy: costs nothing until transformers imports its quantizers.
_install_hf_quantizer()

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
    *,
    method: _typing.Any = "rtn",
    calibration: _typing.Any = None,
    tokenizer: _typing.Any = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    device: _torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    holdout: _typing.Any = None,
    load_block: _typing.Any = None,
    fuse_siblings: bool = True,
    **settings: _typing.Any,
) -> _torch.nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` (and ``nn.Embedding`` with
    ``embeddings``) by its quantized counterpart, quantized with ``encoding`` (an encoding or a
    preset name such as ``"nf4"``; default FLEXGEN);
    names matching a ``skip`` pattern (fnmatch) stay as they are. In place.

    ``method`` picks how codes and group parameters are chosen (``qtensors.methods``):
    ``"rtn"`` (default) and ``"hqq"`` need no data; ``"gptq"`` and ``"awq"`` need
    ``calibration`` (texts with ``tokenizer``, or token ids), of which ``samples`` windows of
    ``seq_len`` tokens are drawn (``seed``), and run the model's blocks one at a time on
    ``device`` (default: where the model is), ``batch_size`` windows per forward. Linears
    outside the blocks (e.g. an lm_head not skipped) are quantized with the method too, their
    inputs taken from one forward of the model with its blocks quantized. ``settings`` go to
    the method (e.g. ``act_order=False``). Embeddings always get round-to-nearest. The method
    and its settings are kept in ``model.qtensors_quantization`` and ``save_model`` records
    them in the file's metadata.

    ``holdout`` (token ids ``[n, L]``): measure each linear's relative output error on these
    other windows (any method; recorded under ``layer_error``), for comparing methods.
    ``load_block(i, block)``: called before block ``i`` is used (streaming builds fill it).
    ``fuse_siblings``: join the linears that read one input (q/k/v, gate/up) so that each
    group multiplies once (``qtensors.torch.fuse_siblings``; the members' parts become views of
    the group's, nothing is stored twice).
    """
    import fnmatch

    from .. import methods as _methods
    from ..encodings import FLEXGEN, Raw, as_encoding
    from .loading import _swappable

    enc = FLEXGEN if encoding is None else as_encoding(encoding, "encoding")
    if isinstance(enc, Raw):
        raise ValueError("quantize_model needs a quantizing encoding, not raw")
    m = _methods.get_method(method, **settings)
    if m.name != "rtn":  # an encoding the method cannot fill is refused before any work
        from ..methods.grid import Grid
        from ..methods.hqq import check_affine

        grid = Grid.of(enc, f"method {m.name!r}")
        if m.name == "hqq":
            check_affine(grid)
    record: dict[str, _typing.Any] = {**m.settings(), "encoding": _describe(enc)}
    if m.needs_calibration or holdout is not None:
        if m.needs_calibration:
            # check the data before any work, so a mistake fails at once
            windows = _methods.calibration_windows(
                calibration, tokenizer, samples, seq_len, seed, method=f"method {m.name!r}"
            )
            record["calibration"] = {
                "samples": int(windows.shape[0]),
                "seq_len": int(windows.shape[1]),
                "seed": seed,
            }
        else:  # only measuring: the blocks run on the held-back windows alone
            windows = holdout
        record.update(
            _methods.runner.quantize_blocks(
                model,
                enc,
                m,
                windows,
                skip=skip,
                device=device,
                batch_size=batch_size,
                progress=_want_progress(progress),
                holdout=holdout,
                load_block=load_block,
            )
        )
        outside = [
            name
            for name, module in model.named_modules()
            if name
            and _swappable(module, _torch.nn.Linear)
            and not any(fnmatch.fnmatchcase(name, p) for p in skip)
        ]
        if m.needs_calibration and outside:
            _methods.runner.quantize_outside(
                model, outside, enc, m, windows, batch_size=batch_size, device=device
            )
    for name, module in list(model.named_modules()):
        if any(fnmatch.fnmatchcase(name, p) for p in skip) or not name:
            continue
        if _swappable(module, _torch.nn.Linear):
            if m.name == "rtn":
                new: _torch.nn.Module = QuantizedLinear.from_linear(module, enc)
            else:  # a method on the weights alone (calibrated ones took theirs above)
                q = m.quantize_weight(module.weight, enc, None)
                w = module.weight
                qw = QuantizedWeight.from_quantized(q, device=w.device, dtype=w.dtype)
                bias = module.bias
                new = QuantizedLinear.from_weight(
                    qw, None if bias is None else _torch.nn.Parameter(bias.detach().clone())
                )
        elif embeddings and _swappable(module, _torch.nn.Embedding):
            new = QuantizedEmbedding.from_embedding(module, enc)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.qtensors_quantization = record
    if fuse_siblings:
        from .siblings import fuse_siblings as _fuse

        _fuse(model)
    return model


def _describe(enc: _typing.Any) -> dict[str, _typing.Any]:
    return enc.to_dict(2)


def _want_progress(progress: bool | None) -> bool:
    from .._progress import want_progress

    return want_progress(progress)
