"""transformers' own loaders for converted qtensors folders.

    import qtensors.torch                      # registers quant_method "qtensors" with transformers
    model = AutoModelForCausalLM.from_pretrained("llama-q4", device_map="cuda")   # 4-bit linears
    pipe = pipeline("text-generation", model="llama-q4", device_map="cuda")
    st = SentenceTransformer("MiniLM-q4")

`qtensors convert` writes a `quantization_config` (`quant_method: "qtensors"`) into the folder's
config.json and a `model.safetensors.index.json` that maps every tensor to its `.qtensors` shard
(`qtensors._hf_folder`). transformers then finds a quantized checkpoint and asks the quantizer
registered for that method, this one, which does what bitsandbytes' or torchao's do, with
qtensors reading the bytes:

* before the weights load (`_process_model_before_weight_loading`, the model still on the meta
  device): every plain ``nn.Linear`` / ``nn.Embedding`` whose weight the shards store quantized
  becomes a ``QuantizedLinear`` / ``QuantizedEmbedding`` on meta (shapes and encodings from the
  headers; no data read). transformers' own safetensors pass is given an empty checkpoint and
  shown an empty state dict, so it reads, moves and initialises nothing of the model's
  weights; it still computes the non-persistent buffers (rotary ``inv_freq``) as for any model;
* after it (`_process_model_after_weight_loading`): ``load_model`` streams the shards to the
  device (the Rust reader, pinned buffers, asynchronous copies) and, on CUDA, warms the Triton
  kernels for every quantized shape of the model (``warmup.py``), so the first forward compiles
  nothing.

One device per model: ``device_map`` may be None (CPU), a device, or a map with one device;
``"auto"`` means the first GPU (else the CPU). Quantizing an unconverted model on the fly
(passing ``QtensorsConfig`` to ``from_pretrained`` of a float checkpoint) is refused: convert it
first. ``save_pretrained`` is refused too: save with ``qtensors.torch.save_model``.

Registration is lazy: importing ``transformers.quantizers.auto`` costs seconds, so
``import qtensors.torch`` registers at once only if transformers' quantizers are already
imported, and otherwise as soon as transformers imports them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import struct
import sys
import tempfile
from typing import Any

import torch

from .._hf_folder import HF_INDEX, QUANT_METHOD

AUTO_MODULE = "transformers.quantizers.auto"


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------


def install() -> None:
    """Register the quantizer with transformers now, or when transformers imports its registry."""
    auto = sys.modules.get(AUTO_MODULE)
    if auto is not None:
        register(auto)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' quantizer registry so that the
    registration runs right after that module executes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != AUTO_MODULE:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = None
        for finder in [*sys.meta_path, importlib.machinery.PathFinder]:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            register(module)

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def register(auto: Any) -> None:
    """Register ``QtensorsConfig`` and ``QtensorsHfQuantizer`` in transformers' registry module."""
    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_cls, quantizer_cls = _classes()
    auto.register_quantization_config(QUANT_METHOD)(config_cls)
    auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


_CLASSES: tuple[type, type] | None = None


def _classes() -> tuple[type, type]:
    """The config and quantizer classes (their bases come from transformers, imported here)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _define_classes()
    return _CLASSES


# ------------------------------------------------------------------------------------------------
# helpers the quantizer uses
# ------------------------------------------------------------------------------------------------


def empty_checkpoint() -> str:
    """A safetensors file holding no tensor, for transformers' own pass over the checkpoint
    (written once per user under the temporary folder, atomically)."""
    data = b"{}      "
    blob = struct.pack("<Q", len(data)) + data
    path = os.path.join(tempfile.gettempdir(), f"qtensors-empty-{os.getuid()}.safetensors")
    try:
        with open(path, "rb") as fh:
            if fh.read() == blob:
                return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def single_device(device_map: Any) -> torch.device:
    """The one device of a transformers ``device_map`` (None: the CPU)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = {str(_as_device(d)) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"qtensors loads a model onto one device; this device_map spans {sorted(devices)}"
            )
        return _as_device(next(iter(device_map.values())))
    return _as_device(device_map)


def _as_device(d: Any) -> torch.device:
    if isinstance(d, int):
        return torch.device("cuda", d)
    if d == "disk":
        raise ValueError(
            "qtensors does not offload to disk through device_map: use qtensors.torch.offload"
        )
    dev = torch.device(d)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _hide_state_dict(module: torch.nn.Module, state_dict: dict, prefix: str, meta: Any) -> None:
    if prefix == "":
        state_dict.clear()


def _define_classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from . import prewarm
    from .loading import load_model, quantized_skeleton, warm_loaded
    from .modules import QuantizedEmbedding, QuantizedLinear, QuantizedWeight

    class QtensorsConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a folder ``qtensors convert`` wrote: ``encoding`` (the
        policy), ``keep`` (patterns kept raw), ``modules_not_quantized``, ``weights`` (the
        qtensors index or file); ``warmup`` (default True): compile the CUDA kernels during the
        load; ``fuse_siblings`` (default True): join the linears that read one input
        (``qtensors.torch.fuse_siblings``). Unknown keys (a newer writer's) are kept."""

        def __init__(
            self,
            encoding: Any = None,
            keep: list[str] | None = None,
            modules_not_quantized: list[str] | None = None,
            weights: str | None = None,
            warmup: bool = True,
            fuse_siblings: bool = True,
            **kwargs: Any,
        ) -> None:
            self.quant_method = QUANT_METHOD
            self.encoding = encoding
            self.keep = list(keep or [])
            self.modules_not_quantized = list(modules_not_quantized or [])
            self.weights = weights
            self.warmup = warmup
            self.fuse_siblings = fuse_siblings
            for k, v in kwargs.items():
                if k != "quant_method":
                    setattr(self, k, v)

    class QtensorsHfQuantizer(HfQuantizer):
        """Loads a converted qtensors folder for ``PreTrainedModel.from_pretrained`` (see the
        module's docstring)."""

        requires_calibration = True  # only converted folders: nothing is quantized on the fly

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.folder: str | None = None
            self.device = torch.device("cpu")
            self._hook: Any = None
            self._prewarm: Any = None

        def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
            if isinstance(device_map, dict):
                single_device(device_map)

        def update_device_map(self, device_map: Any) -> Any:
            if isinstance(device_map, str) and device_map in (
                "auto",
                "balanced",
                "balanced_low_0",
                "sequential",
            ):
                dev = "cuda:0" if torch.cuda.is_available() else "cpu"
                return {"": torch.device(dev)}
            return device_map

        def _process_model_before_weight_loading(
            self,
            model: Any,
            checkpoint_files: list[str] | None = None,
            device_map: Any = None,
            **kwargs: Any,
        ) -> Any:
            self.device = single_device(device_map)
            self.folder = _folder_of(model, checkpoint_files)
            tied = set()
            for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items():
                tied.update((k, v))
            with torch.device("meta"):
                quantized_skeleton(model, self.folder, skip=tied)
            for m in model.modules():
                if isinstance(m, (QuantizedLinear, QuantizedEmbedding, QuantizedWeight)):
                    m._is_hf_initialized = True
            # transformers' own pass reads an empty checkpoint into an empty state dict: the
            # weights are all ours, read after it (the list is the one it loads from).
            if checkpoint_files is not None:
                checkpoint_files[:] = [empty_checkpoint()]
            register = getattr(model, "register_state_dict_post_hook", None)
            if register is None:  # torch < 2.5
                register = model._register_state_dict_hook
            self._hook = register(_hide_state_dict)
            # first-use costs: the helpers start now, the replica runs beside the load (prewarm.py)
            self._prewarm = prewarm.Prewarm(
                type(model),
                model.config,
                self.device,
                getattr(model, "dtype", None),
                files=self.folder,
                fuse_siblings=bool(getattr(self.quantization_config, "fuse_siblings", True)),
            ).start()
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            assert self.folder is not None
            warmup = bool(getattr(self.quantization_config, "warmup", True))
            fuse = bool(getattr(self.quantization_config, "fuse_siblings", True))
            warming, self._prewarm = self._prewarm, None
            try:
                # the weights read in a worker while the replica runs here (prewarm.py)
                load = functools.partial(
                    load_model, model, self.folder, device=self.device, strict=True,
                    warmup=False, fuse_siblings=fuse,
                )  # fmt: skip
                result = warming.alongside(load) if warming is not None else load()
            finally:
                prewarm_s = warming.join() if warming is not None else 0.0
            result.prewarm_seconds = prewarm_s
            err = None if warming is None else warming.error
            result.prewarm_error = None if err is None else repr(err)
            if warmup:  # after the replica: one thread compiles at a time
                warm_loaded(model, result)
            model.qtensors_load_result = result
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return False

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    return QtensorsConfig, QtensorsHfQuantizer


def _folder_of(model: Any, checkpoint_files: list[str] | None) -> str:
    """The converted folder: where transformers found the index of the shards."""
    for f in checkpoint_files or ():
        folder = os.path.dirname(os.path.abspath(f))
        if os.path.exists(os.path.join(folder, HF_INDEX)):
            return folder
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if name and os.path.isdir(name):
        return name
    raise FileNotFoundError(
        "qtensors: cannot tell which folder this model comes from; load a local folder "
        "written by `qtensors convert`"
    )
