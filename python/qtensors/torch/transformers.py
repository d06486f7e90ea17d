"""Hugging Face transformers: build a model from a converted qtensors folder in one call.

    from transformers import AutoModel, AutoTokenizer
    model = qtensors.torch.from_pretrained("MiniLM-qtensors", device="cuda")   # 4-bit on the GPU

``qtensors.convert(src_folder, dst_folder, quant=...)`` makes such a folder (config, tokenizer
and ``*.qtensors`` with its index). The model is built with its parameters on the meta device
(no memory, no random initialisation) and filled by ``load_model``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .loading import LoadResult, load_model, warm_loaded
from .prewarm import Prewarm


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Inside this block every parameter a module registers is moved to the meta device at once
    (its initialisation then costs nothing); buffers stay where they are created, so the
    non-persistent ones a model computes in ``__init__`` (position ids, rotary frequencies)
    survive."""
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            meta = p.detach().to("meta")
            try:
                new = type(p)(meta, requires_grad=p.requires_grad)
            except TypeError:
                new = nn.Parameter(meta, requires_grad=p.requires_grad)
            self._parameters[name] = new

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    """transformers' own switch that skips ``init_weights`` (every weight is loaded after): on
    the meta device each init call still runs torch's Python reference kernels, 0.15 s of a
    1.1B Llama's load under the profiler on the H200 machine (``benches/bench_gpu_load.py
    --profile``, ``benches/results/gpu_load_profile_qtt_before_h200.txt``)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def build_empty(cls: Any, config: Any, **model_kwargs: Any) -> nn.Module:
    """``cls`` (a transformers model class, or an Auto class) built from ``config`` with its
    parameters on the meta device and no weight initialisation; tied weights tied."""
    import transformers

    with init_empty_weights(), _no_init_weights():
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls(config, **model_kwargs)
        else:
            model = cls.from_config(config, **model_kwargs)
    if isinstance(model, transformers.PreTrainedModel):
        model.tie_weights()  # init_weights ties them, and no_init_weights skipped it
    return model


def _resolve_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d)
        return d if isinstance(d, torch.dtype) else None
    return getattr(torch, dtype)


def _check_model_folder(folder: str, need_config: bool) -> None:
    """Say what to pass when `folder` is not a converted model folder (transformers would
    otherwise look the name up on the Hugging Face hub and report that instead)."""
    made_by = "the model folder `qtensors convert MODEL_FOLDER OUT_FOLDER` makes"
    if os.path.isfile(folder):
        raise ValueError(
            f"{folder} is a file: from_pretrained takes {made_by} (config.json and *.qtensors); "
            "to fill a model you built from one file, use qtensors.torch.load_model(model, path)"
        )
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"the folder {folder} does not exist: from_pretrained takes {made_by} "
            "(a local folder, not a Hugging Face hub name)"
        )
    if need_config and not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{folder} has no config.json: from_pretrained takes {made_by}, which copies the "
            "config; or pass config=..."
        )


def architecture_class(config: Any) -> Any:
    """The transformers class ``config.architectures`` names (the one the checkpoint was saved
    from), else ``AutoModel``."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def from_pretrained(
    folder: str | os.PathLike[str],
    model_cls: Any = None,
    *,
    device: torch.device | str | None = None,
    keep_quantized: bool = True,
    dtype: torch.dtype | str | None = None,
    config: Any = None,
    strict: bool = True,
    warmup: bool = True,
    tp_plan: str | dict[str, str] | None = None,
    fuse_siblings: bool = True,
    prewarm: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """A transformers model of a converted qtensors model folder, its weights on ``device``.

    * ``model_cls``: a transformers Auto class or model class; default: the class the config's
      ``architectures`` names (a causal LM keeps its head), else ``AutoModel``.
    * ``keep_quantized``: linear layers (and embeddings) stay quantized on the device as
      ``QuantizedLinear`` / ``QuantizedEmbedding``; False decodes every weight on the device.
    * ``dtype``: dtype of the floating weights (``"auto"``: the config's); default float32.
    * ``strict``: raise if a parameter of the model is in no file.
    * ``warmup``: on CUDA, run every distinct quantized layer once before returning, so the first
      forward compiles no kernel (``qtensors.torch.warmup``).
    * ``tp_plan``: ``"auto"`` (the model's transformers plan) or a dict: tensor parallelism over
      the initialised ``torch.distributed`` world, each rank reading only its shards (see
      ``load_model``); the default device is then ``cuda:LOCAL_RANK`` when there are GPUs.
    * ``fuse_siblings``: join the quantized linears that read one input (q/k/v, gate/up), so
      that each group multiplies once (``qtensors.torch.fuse_siblings``; not with ``tp_plan``).
    * ``prewarm``: on CUDA, while a worker thread reads the weights, this thread runs a
      one-layer replica of the model (its layers placed from the files' headers, all zeros), so
      that the first forward does not pay the first calls of torch's ops and of the quantized
      kernels (``qtensors.torch.prewarm``; ``QTENSORS_PREWARM=0`` turns it off everywhere).
      It holds one layer's weights (and the embeddings and head, up to 256 MiB each) on the
      device until the load returns. Not under ``tp_plan``.

    The model comes back in eval mode; ``model.qtensors_load_result`` says what was loaded.
    """
    folder = os.fspath(folder)
    _check_model_folder(folder, need_config=config is None)
    import transformers

    if config is None:
        config = transformers.AutoConfig.from_pretrained(folder)
    cls = model_cls or architecture_class(config)
    tdtype = _resolve_dtype(dtype, config)
    if tp_plan is not None and device is None and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    warming = Prewarm(
        cls,
        config,
        # tensor parallelism: no replica (its collectives stay on this thread)
        device if prewarm and tp_plan is None else None,
        tdtype,
        files=folder if keep_quantized else None,  # its layers are the model's: our kernels
        fuse_siblings=fuse_siblings,
    ).start()
    try:
        model = build_empty(cls, config, **model_kwargs)
        # the weights read in a worker while the replica runs on this thread (prewarm.py)
        result: LoadResult = warming.alongside(
            load_model,
            model,
            folder,
            device=device,
            keep_quantized=keep_quantized,
            dtype=tdtype,
            # under tensor parallelism the warm-up runs before the collectives are installed
            warmup=warmup and tp_plan is not None,
            tp_plan=tp_plan,
            fuse_siblings=fuse_siblings,
        )
    finally:
        prewarm_s = warming.join()
    result.prewarm_seconds = prewarm_s
    result.prewarm_error = None if warming.error is None else repr(warming.error)
    if warmup and tp_plan is None:  # after the replica: one thread compiles at a time
        warm_loaded(model, result)
    dev = result.device or torch.device("cpu")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise KeyError(f"{folder}: no weights for {', '.join(still_meta)}")
    if strict and result.missing_keys:
        raise KeyError(f"{folder}: no weights for {', '.join(result.missing_keys)}")
    for module in model.modules():
        for k, b in list(module._buffers.items()):
            if b is not None and b.device != dev:
                module._buffers[k] = b.to(dev)
    model.eval()
    model.qtensors_load_result = result
    return model


def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    max_length: int = 256,
) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe of
    all-MiniLM-L6-v2), one row per sentence, as float32."""
    device = next(model.parameters()).device
    batch = tokenizer(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    ).to(device)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)
