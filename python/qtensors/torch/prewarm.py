"""First-use costs, paid in the background while a model's weights load.

The first forward of a freshly loaded model spends most of its time on things no weight
decides: the first call of each torch op on the device (library and kernel set-up) and of each
of our Triton kernels (its compiled binary found in Triton's cache and loaded). On the H200 a
1.1B Llama's first forward took 0.34 s against 0.015 s for the second, with int4 weights as
with fp16 ones (``benches/results/gpu_load_bytecode_h200.txt``); under the profiler the
attention's first call took 65 ms, the rotary embedding's 57, ``index_select``'s 47, ``pow``'s
29 (``gpu_load_profile_qtt_bytecode_h200.txt``), against a 0.14 s load. Loading CUDA modules
eagerly does not help (2.2 s at start-up, the first forward slower:
``gpu_load_eager_modules_h200.txt``).

``Prewarm`` builds a one-layer replica of the model (same class and config, so the same ops in
the same dtypes and head sizes). Given the model's files, the replica's tensors are placed as
the loader places them, from the headers alone (``loading.place_zeros``): its quantized linears
and embeddings are ``QuantizedLinear`` / ``QuantizedEmbedding`` of the real shapes and
encodings, so it runs the very kernels (and Triton specializations) the model will, siblings
joined as the loader joins them. Tensors it cannot place (no files, or over
``MAX_TENSOR_BYTES``) get stand-ins: linears that return zeros, embeddings of a few rows. Every
tensor is zero, so no value can send an index out of range. The caller's thread (the one that
will run the model: some of torch's caches are per thread) runs it on the device on a short
prompt, then each quantized linear on one row (a decoding step's kernels), while a worker thread
reads the real weights: torch releases the GIL inside its ops, so both proceed. Helper threads
meanwhile make the set-ups every thread shares: Triton's driver, and the first calls of common
ops (``common_ops``).

A replica that cannot be built or run (an unusual architecture) is skipped with a debug log
and ``LoadResult.prewarm_error``: it only warms. Measured on the H200 (1.1B Llama, int4-g64,
``gpu_load_replica_here_h200.txt``): first forward 0.033 s against 0.54 s without it, time to
first token 0.49 s against 0.79 s (fp16 through transformers: 0.98 s in that run).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: ``QTENSORS_PREWARM=0`` turns it off; ``=torch`` keeps the replica to stand-ins (torch's ops
#: only, none of our kernels: nothing placed from the files)
ENABLED = os.environ.get("QTENSORS_PREWARM", "1") != "0"
FROM_FILES = os.environ.get("QTENSORS_PREWARM", "1") != "torch"
#: the replica's prompt: as long as a short chat turn (the same kernels as a longer one)
PROMPT_TOKENS = 16
#: rows kept of each stand-in embedding table: the replica's token ids are zeros, its positions
#: below ``PROMPT_TOKENS`` (plus a model's offset: OPT's is 2)
EMBED_ROWS = 32
#: tensors stored larger than this get stand-ins (the replica's memory stays small beside the
#: model's: a 70B Llama's embedding is 0.5 GB in 4 bits)
MAX_TENSOR_BYTES = 256 << 20
#: threads that make the first calls of common ops (``common_ops``) beside the replica
#: (``QTENSORS_PREWARM_THREADS``; 0: none): the set-ups overlap in part across threads
HELPER_THREADS = int(os.environ.get("QTENSORS_PREWARM_THREADS", "3"))
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


def build_replica(
    cls: Any, config: Any, files: Any = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A one-layer replica of ``cls(config)`` on the meta device. With ``files`` (the model's
    file or folder), each tensor the replica has is placed as the loader places it, in
    ``dtype`` (``loading.place_zeros``; up to ``MAX_TENSOR_BYTES``). Linears and embeddings
    left unplaced become ``_Zeros`` and embeddings of ``EMBED_ROWS`` rows."""
    return fill_replica(empty_replica(cls, config), files, dtype)


def empty_replica(cls: Any, config: Any) -> nn.Module:
    """``cls`` built with one layer on the meta device (transformers patches ``nn.Module``
    while building: only one thread may build at a time)."""
    from .transformers import build_empty

    return build_empty(cls, _one_layer(config))


def fill_replica(model: nn.Module, files: Any, dtype: torch.dtype | None) -> nn.Module:
    """``build_replica``'s placement and stand-ins, on an ``empty_replica`` (any thread)."""
    placed: set[str] = set()
    if files is not None:
        from .loading import place_zeros

        placed = set(place_zeros(model, files, "meta", dtype, MAX_TENSOR_BYTES))
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if f"{path}.{name}.weight".lstrip(".") in placed:
                continue  # the real module, placed from the files (raw: cuBLAS warms too)
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
    """Every tensor of ``model`` on ``device``: meta ones as zeros, floating parameters in
    ``dtype``, buffers in their own dtypes (as the loaders leave a model's: its rotary
    frequencies stay fp32; a quantized weight's parts are buffers). Buffers the build computed
    (rotary frequencies) keep their values."""
    with torch.no_grad():
        for m in model.modules():
            for k, p in m._parameters.items():
                if p is not None and (p.is_meta or p.device != device):
                    dt = dtype if dtype is not None and p.is_floating_point() else p.dtype
                    z = torch.zeros(p.shape, dtype=dt, device=device)
                    m._parameters[k] = nn.Parameter(z, requires_grad=False)
            for k, b in m._buffers.items():
                if b is not None and b.is_meta:
                    m._buffers[k] = torch.zeros(b.shape, dtype=b.dtype, device=device)
                elif b is not None and b.device != device:
                    m._buffers[k] = b.to(device)


def run_replica(model: nn.Module, device: torch.device) -> None:
    """The replica's forward on a ``PROMPT_TOKENS`` prompt, then each distinct quantized
    linear on one row (a decoding step's kernels, ``warmup``). Not a whole decoding step:
    attention with a cache would lengthen the replica (0.43 s with one, against a 0.2 s load,
    ``gpu_load_prewarm_h200.txt``) for kernels the prompt's forward mostly loaded."""
    from .warmup import warmup

    with torch.inference_mode():
        ids = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long, device=device)
        extra = {}
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            extra["decoder_input_ids"] = ids[:, :1]  # T5, BART: the decoder's first step
        model(input_ids=ids, **extra)
    warmup(model, rows=(1,), remember=False)


def _attention_shape(config: Any) -> tuple[int, int, int]:
    """(heads, key/value heads, head size) of a transformers config (its text part), with
    defaults where it names them otherwise."""
    cfg = getattr(config, "text_config", None) or config
    heads = int(getattr(cfg, "num_attention_heads", None) or 8)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", None) or heads * 64)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return heads, kv, head_dim


def common_ops(config: Any, device: torch.device, dtype: torch.dtype | None) -> list[Any]:
    """First calls of the ops most decoder forwards make, on small zeros, as callables: RMS /
    layer norms in fp32, rotary frequencies (a fp32 matmul: cuBLAS's set-up), the halves'
    rotation, gated activations, the attention at the model's head sizes, a quantized
    embedding's row gathers (code bytes, fp16 / bf16 scales: for a replica whose embedding is a
    stand-in). Made from helper threads while the replica runs, so that their
    set-ups overlap (the first calls of 15 such ops: 0.32-0.41 s on one thread, 0.19-0.20 s on
    four, ``benches/probe_first_use_parallel.py``); the replica still makes every call the
    model makes, these only start some earlier."""
    F = torch.nn.functional
    dt = dtype or torch.float32
    heads, kv, hd = _attention_shape(config)
    n = PROMPT_TOKENS

    def zeros(*shape: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=device)

    def attention(gqa: bool) -> None:
        q, k = zeros(1, heads, n, hd), zeros(1, kv if gqa else heads, n, hd)
        extra = {"enable_gqa": True} if gqa and kv != heads else {}
        F.scaled_dot_product_attention(q, k, k, is_causal=True, **extra)

    rows = torch.zeros(2, dtype=torch.long, device=device)
    return [
        lambda: attention(True),
        lambda: attention(False),
        lambda: zeros(1, 64, 1, dtype=torch.float32) @ zeros(1, 1, n, dtype=torch.float32),
        lambda: zeros(n, 64, dtype=torch.float32).pow(2).mean(-1, keepdim=True),
        lambda: torch.rsqrt(zeros(n, 1, dtype=torch.float32) + 1e-6),
        lambda: zeros(n, 64).float().to(dt),
        *(
            lambda t=t: zeros(4, 8, dtype=t).index_select(0, rows)
            for t in (torch.uint8, torch.float16, torch.bfloat16)
        ),
        lambda: torch.cat((zeros(n, 32, dtype=torch.float32),) * 2, -1).cos().sin(),
        lambda: torch.cat((-zeros(n, 32), zeros(n, 32)), -1) * zeros(n, 64) + zeros(n, 64),
        lambda: F.silu(zeros(n, 64)) * zeros(n, 64),
        lambda: F.gelu(zeros(n, 64), approximate="tanh"),
    ]


def _run_ops(ops: list[Any], device: torch.device) -> None:
    try:
        if device.index is not None:
            torch.cuda.set_device(device)
        with torch.inference_mode():
            for op in ops:
                try:
                    op()
                except Exception as exc:  # an op this torch or device lacks: it only warms
                    log.debug("prewarm: a common op failed: %r", exc)
        torch.cuda.synchronize(device)
    except Exception as exc:
        log.debug("prewarm: the helper failed: %r", exc)


def _start_triton(ready: threading.Event) -> None:
    """Create Triton's driver (once per process: 76 ms on the H200 machine, 72 of them in
    ``platform.architecture()``, which runs ``file`` on the Python binary;
    ``gpu_load_profile_qtt_helpers_h200.txt``), then set ``ready``."""
    try:
        from triton.runtime import driver

        driver.active.get_current_device()
    except Exception as exc:  # no Triton: the replica's kernels fail and are logged there
        log.debug("prewarm: Triton's driver: %r", exc)
    finally:
        ready.set()


class Prewarm:
    """Pays the first-use costs of ``cls(config)`` on ``device`` in ``dtype`` (its files:
    ``files``; ``fuse_siblings`` as the load joins them). Only CUDA devices, where it was
    measured; never raises.

    * ``start()``: helper threads make the set-ups every thread shares (Triton's driver, the
      common ops' kernels);
    * ``alongside(load, ...)``: runs ``load`` in a worker thread while the replica runs on the
      calling thread, the one that will run the model: some caches are per thread (torch keeps
      cuDNN's attention graphs in a ``thread_local`` cache, ``aten/src/ATen/native/cudnn/MHA.cpp``;
      a replica run in another thread left the model's first forward 60-75 ms of building them,
      ``gpu_load_first_forward_h200.txt``);
    * ``join()``: waits for the helpers and returns the replica's seconds (0.0 when it did not
      run)."""

    def __init__(
        self,
        cls: Any,
        config: Any,
        device: Any,
        dtype: torch.dtype | None,
        files: Any = None,
        fuse_siblings: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.fuse = fuse_siblings
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._model: nn.Module | None = None
        self._helpers: list[threading.Thread] = []
        self._triton_ready = threading.Event()
        self._config = config
        self._files = files if FROM_FILES else None
        if not ENABLED or self.device is None or self.device.type != "cuda":
            return
        try:  # on the caller's thread: it patches nn.Module while building
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._model = empty_replica(cls, config)
        except Exception as exc:  # an architecture the replica cannot copy
            log.debug("prewarm: no replica of %s: %r", getattr(cls, "__name__", cls), exc)
            self.error = exc

    @property
    def active(self) -> bool:
        """Whether a replica is built and not yet run."""
        return self._model is not None

    def start(self) -> Prewarm:
        if self._model is None:
            return self
        assert self.device is not None
        try:
            ops = common_ops(self._config, self.device, self.dtype) if HELPER_THREADS else []
        except Exception as exc:  # a config it cannot read: the replica alone
            log.debug("prewarm: no common ops: %r", exc)
            ops = []
        jobs: list[tuple[Any, tuple]] = []
        if self._files is not None:  # our kernels run: Triton's driver made beside
            jobs.append((_start_triton, (self._triton_ready,)))
        else:
            self._triton_ready.set()
        for i in range(min(HELPER_THREADS, len(ops))):
            jobs.append((_run_ops, (ops[i::HELPER_THREADS], self.device)))
        for target, args in jobs:
            t = threading.Thread(target=target, args=args, name="qtensors-prewarm", daemon=True)
            t.start()
            self._helpers.append(t)
        return self

    def run(self) -> float:
        """The replica, on the calling thread; returns its seconds."""
        if self._model is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            assert self.device is not None
            with torch.cuda.device(self.device):
                fill_replica(self._model, self._files, self.dtype)  # the headers read here
                _materialize(self._model, self.device, self.dtype)
                if self.fuse:
                    from .siblings import fuse_siblings

                    fuse_siblings(self._model)
                # one thread makes Triton's driver (two at once would each make one)
                self._triton_ready.wait(timeout=30)
                run_replica(self._model, self.device)
                torch.cuda.synchronize(self.device)
        except Exception as exc:  # it only warms
            log.debug("prewarm: the replica failed: %r", exc)
            self.error = exc
        finally:
            self._model = None  # its memory goes back now
            self.seconds = time.perf_counter() - t0
        return self.seconds

    def alongside(self, load: Any, *args: Any, **kwargs: Any) -> Any:
        """``load(*args, **kwargs)`` in a worker thread (on this thread's CUDA device) while the
        replica runs here; its result, or its exception once the replica is done. Without a
        replica, ``load`` runs here."""
        if self._model is None:
            return load(*args, **kwargs)
        current = torch.cuda.current_device()

        def on_device() -> Any:
            torch.cuda.set_device(current)  # a new thread starts on device 0
            return load(*args, **kwargs)

        with ThreadPoolExecutor(1, thread_name_prefix="qtensors-load") as pool:
            done = pool.submit(on_device)
            self.run()
            return done.result()

    def join(self) -> float:
        for t in self._helpers:
            t.join()
        self._helpers = []
        return self.seconds
