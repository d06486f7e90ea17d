"""Torch's own first-use costs, paid in the background while a model's weights load.

The first forward of a freshly loaded model spends most of its time on things no weight
decides: the first call of each torch op on the device (library and kernel set-up). On the H200
a 1.1B Llama's first forward took 0.34 s against 0.015 s for the second, with int4 weights as
with fp16 ones (``benches/results/gpu_load_bytecode_h200.txt``); under the profiler the
attention's first call took 65 ms, the rotary embedding's 57, ``index_select``'s 47, ``pow``'s
29 (``gpu_load_profile_qtt_bytecode_h200.txt``), against a 0.14 s load. Loading CUDA modules
eagerly does not help (2.2 s at start-up, the first forward slower:
``gpu_load_eager_modules_h200.txt``).

``Prewarm`` builds a one-layer replica of the model (same class and config, so the same ops in
the same dtypes and head sizes): its linears are stand-ins that return zeros of the right shape
(no weights, no matmul), its embeddings keep a few rows, every parameter and buffer is zeros
(so that no value can send an index out of range). A thread runs it on the device on a short prompt
while the caller reads the real weights: torch releases the GIL inside its ops, so both
proceed. ``join()`` waits for it; a replica that cannot be built or run (an unusual
architecture) is skipped with a debug log: it only warms. Measured
(``gpu_load_prewarm_h200.txt``, three runs): the first forward 0.12-0.15 s instead of
0.42-0.46, the time to first token 0.46-0.58 s against 0.59-0.70 without it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: ``QTENSORS_PREWARM=0`` turns it off
ENABLED = os.environ.get("QTENSORS_PREWARM", "1") != "0"
#: the replica's prompt: as long as a short chat turn (the same kernels as a longer one)
PROMPT_TOKENS = 16
#: rows kept of each embedding table: the replica's token ids are zeros, its positions below
#: ``PROMPT_TOKENS`` (plus a model's offset: OPT's is 2)
EMBED_ROWS = 32
_LAYER_COUNTS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)


class _Zeros(nn.Module):
    """A linear's stand-in: zeros of its output shape, in the input's dtype and device. It has
    an empty ``weight`` (no elements: models read its dtype, as T5's feed-forward does) and no
    bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, 0, device="meta"))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _one_layer(config: Any) -> Any:
    cfg = copy.deepcopy(config)
    for sub in (cfg, getattr(cfg, "text_config", None)):
        if sub is None:
            continue
        for name in _LAYER_COUNTS:
            if isinstance(getattr(sub, name, None), int):
                setattr(sub, name, 1)
        types = getattr(sub, "layer_types", None)
        if isinstance(types, list) and types:
            sub.layer_types = types[:1]
    return cfg


def build_replica(cls: Any, config: Any) -> nn.Module:
    """A one-layer replica of ``cls(config)`` on the meta device: linears as ``_Zeros``,
    embeddings cut to ``EMBED_ROWS`` rows."""
    from .transformers import build_empty

    model = build_empty(cls, _one_layer(config))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, _Zeros(child.in_features, child.out_features))
            elif isinstance(child, nn.Embedding):
                _shrink(child)
    return model.eval()


def _shrink(emb: nn.Embedding) -> None:
    """``emb`` keeps its class (subclasses have their own forward: OPT's positions, Gemma's
    scaled tokens) but only its first ``EMBED_ROWS`` rows."""
    rows = min(emb.num_embeddings, EMBED_ROWS)
    emb.weight = nn.Parameter(torch.empty(rows, emb.embedding_dim, device="meta"))
    emb.num_embeddings = rows
    if emb.padding_idx is not None and emb.padding_idx >= rows:
        emb.padding_idx = None  # F.embedding refuses an index past the table


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Parameters on ``device`` in ``dtype``, buffers in their own dtypes (as the loaders leave
    a model's: its rotary frequencies stay fp32), everything zero."""
    model.to_empty(device=device)
    if dtype is not None:
        for m in model.modules():
            for k, p in m._parameters.items():
                if p is not None and p.is_floating_point():
                    m._parameters[k] = nn.Parameter(p.to(dtype), requires_grad=False)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()


def run_replica(model: nn.Module, device: torch.device) -> None:
    """The replica's forward on a ``PROMPT_TOKENS`` prompt, and the row gathers a quantized
    embedding makes (``QuantizedEmbedding``: ``index_select`` of code bytes and of fp16 / bf16
    scales). Not a decoding step: it would outlast the load (the replica's thread took 0.43 s
    with one, against a 0.2 s load, ``gpu_load_prewarm_h200.txt``), and the time to first token
    is what waits for it."""
    with torch.inference_mode():
        rows = torch.zeros(2, dtype=torch.long, device=device)
        for dt in (torch.uint8, torch.float16, torch.bfloat16):
            torch.zeros(4, 8, dtype=dt, device=device).index_select(0, rows)
        ids = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long, device=device)
        extra = {}
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            extra["decoder_input_ids"] = ids[:, :1]  # T5, BART: the decoder's first step
        model(input_ids=ids, **extra)


class Prewarm:
    """``start()`` a thread that pays torch's first-use costs of ``cls(config)`` on ``device``
    in ``dtype``; ``join()`` waits and returns its seconds (0.0 when it did not run). Only CUDA
    devices, where it was measured; never raises."""

    def __init__(self, cls: Any, config: Any, device: Any, dtype: torch.dtype | None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._model: nn.Module | None = None
        if not ENABLED or self.device is None or self.device.type != "cuda":
            return
        try:  # on the caller's thread: it patches nn.Module while building
            self._model = build_replica(cls, config)
        except Exception as exc:  # an architecture the replica cannot copy
            log.debug("prewarm: no replica of %s: %r", getattr(cls, "__name__", cls), exc)
            self.error = exc

    def start(self) -> Prewarm:
        if self._model is not None:
            self._thread = threading.Thread(target=self._run, name="qtensors-prewarm", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            assert self._model is not None and self.device is not None
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
            _materialize(self._model, self.device, self.dtype)
            run_replica(self._model, self.device)
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # it only warms
            log.debug("prewarm: the replica failed: %r", exc)
            self.error = exc
        finally:
            self._model = None  # its memory goes back now
            self.seconds = time.perf_counter() - t0

    def join(self) -> float:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.seconds
