"""Load qtensors files into existing torch modules, straight onto the device.

    model = MyModel(config)                          # or built on the meta device
    qtensors.torch.load_model(model, "model.qtensors", device="cuda")

How the bytes travel: one I/O engine under ``load_model``, ``qtensors.stream`` and ``offload``, the
Rust ``StreamReader`` (``pread`` with read-ahead hints, O_DIRECT or mmap; GIL released). Each
tensor's parts (``StreamReader.tensor_layout``: one buffer per tensor) are cut into chunks read by
a few threads at once into a small ring of pinned host buffers, and each chunk is copied to the
device asynchronously (``non_blocking``) while the next ones are read. A pinned buffer is reused
only once the copy out of it has finished (a CUDA event). Host memory in use is therefore the ring
(``slots x chunk``, 64 MiB by default), whatever the model size. On the device the stored parts
either become the buffers of a ``QuantizedLinear`` / ``QuantizedEmbedding`` (``keep_quantized``) or
are decoded there by ``torch.ops.qtensors.dequantize`` into the parameter's dtype.

For a CPU target tensors are read as ``qtensors.stream`` reads them to the CPU (the same engine
mode, ``"auto"``: cached pages copied, the rest O_DIRECT; several tensors in flight, each into its
own buffer) and decoded by the Rust core. ``io="stream"`` runs ``qtensors.stream``'s pipeline
instead (a loader thread, checksums with ``verify=True``).

Measured on an H100 machine (benches/results/gpu_load_h100.txt; 1.1B-parameter Llama-shaped
model, int4-g64 vs the same weights in fp16 through ``safetensors.torch.load_file(device=
"cuda")``, each in a fresh process): kept quantized, 0.34 s cold / 0.16 s warm against 1.45 s /
0.42 s, with 68 MB of peak host memory against 2.3 GB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..files import safe_open
from ..stream import (
    DEVICE_MODE,
    HOST_MODE,
    Entry,
    open_entries,
    quantized_from_torch,
    read_host_ahead,
    resolve_files,
)
from ._layout import scale_shape
from .modules import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    torch_dtype,
)
from .ops import dequantize

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".qtensors.index.json"
DEFAULT_CHUNK = 8 << 20
DEFAULT_SLOTS = 8


@dataclass
class LoadResult:
    """What ``load_model`` did."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    quantized_modules: list[str] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    device: torch.device | None = None
    #: non-persistent buffers left on the meta device (no file holds them and the model could
    #: not recompute them: only transformers models can)
    meta_buffers: list[str] = field(default_factory=list)
    #: the quantized layer signatures ``warmup`` ran (CUDA loads), and its seconds
    warmed: list[Any] = field(default_factory=list)
    warmup_seconds: float = 0.0
    #: the resolved tensor-parallel plan of this rank (``tp_plan`` loads)
    tensor_parallel: Any = None
    #: the sibling groups joined (``fuse_siblings``)
    sibling_groups: int = 0
    #: seconds of the loaders' replica run beside the load (``prewarm.py``; 0: none ran)
    prewarm_seconds: float = 0.0
    #: why that replica could not be built or run (it only warms: the load went on without it)
    prewarm_error: str | None = None


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def model_files(path: str | os.PathLike[str]) -> list[str]:
    """The qtensors files of ``path``: the file itself, or the shards a model folder's
    ``*.qtensors.index.json`` names (in index order), or every ``*.qtensors`` in the folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{os.fspath(path)} does not exist")
    return resolve_files(path)


# ------------------------------------------------------------------------------------------------
# streaming tensors of a file to the device
# ------------------------------------------------------------------------------------------------


class _Streamer:
    """Reads tensors (``qtensors.stream`` entries: the Rust ``StreamReader`` does every read,
    GIL released) into device tensors: chunks read by a few threads at once into a ring of
    (pinned, for CUDA) buffers, each copied to the device asynchronously on the current
    stream. Host targets read without it (``stream.read_host_ahead``)."""

    def __init__(
        self,
        device: torch.device,
        chunk: int = DEFAULT_CHUNK,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.chunk = chunk
        self.nslots = max(1, slots)
        self.threads = threads or max(1, min(self.nslots, os.cpu_count() or 1, 8))
        self._bufs: list[torch.Tensor] = []

    def _slot_buffers(self) -> list[torch.Tensor]:
        if not self._bufs:
            self._bufs = [
                torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.cuda)
                for _ in range(self.nslots)
            ]
        return self._bufs

    def stream(self, entries: Iterable[Entry]) -> Iterator[tuple[Entry, torch.Tensor]]:
        """Yield ``(entry, bytes of its buffer)`` in order, each once all its copies are enqueued
        on the current stream (device work queued after it sees the data)."""
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="qtensors-load")
        try:
            yield from self._stream_staged(pool, entries)
        finally:
            pool.shutdown(wait=True)

    def _stream_staged(self, pool: ThreadPoolExecutor, entries: Iterable[Entry]):
        cuda = self.cuda
        bufs = self._slot_buffers()
        arrays = [b.numpy() for b in bufs]
        free = deque(range(self.nslots))
        events: list[torch.cuda.Event | None] = [None] * self.nslots
        # chunk jobs in flight: (entry number, slot, n, dst offset, future)
        inflight: deque[tuple[int, int, int, int, Future]] = deque()
        todo: dict[int, list[Any]] = {}  # entry number -> [entry, dst, chunks not yet copied]
        order: deque[int] = deque()
        stream = torch.cuda.current_stream(self.device) if cuda else None

        def finish_one() -> None:
            idx, slot, n, pos, fut = inflight.popleft()
            fut.result()
            entry = todo[idx]
            if n:
                entry[1][pos : pos + n].copy_(bufs[slot][:n], non_blocking=cuda)
            if cuda:
                ev = torch.cuda.Event()
                ev.record(stream)
                events[slot] = ev
            free.append(slot)
            entry[2] -= 1

        def ready() -> Iterator[tuple[Entry, torch.Tensor]]:
            while order and todo[order[0]][2] == 0:
                e, dst, _ = todo.pop(order.popleft())
                yield e, dst

        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            for idx, e in enumerate(entries):
                dst = torch.empty(e.nbytes, dtype=torch.uint8, device=self.device)
                pieces = e.pieces(self.chunk)
                todo[idx] = [e, dst, len(pieces)]
                order.append(idx)
                for pos, n in pieces:
                    if not free:
                        finish_one()
                        yield from ready()
                    slot = free.popleft()
                    ev = events[slot]
                    if ev is not None:
                        ev.synchronize()
                    fut = pool.submit(e.read_into, pos, arrays[slot][:n])
                    inflight.append((idx, slot, n, pos, fut))
                yield from ready()
            while inflight:
                finish_one()
                yield from ready()
            yield from ready()


# ------------------------------------------------------------------------------------------------
# the model side
# ------------------------------------------------------------------------------------------------


def _swappable(module: nn.Module, kind: type[nn.Module]) -> bool:
    """An nn.Linear / nn.Embedding whose forward is the stock one (subclasses that change the
    computation are left alone), and for embeddings no max_norm / sparse gradients."""
    if not isinstance(module, kind) or type(module).forward is not kind.forward:
        return False
    if kind is nn.Embedding:
        return module.max_norm is None and not module.sparse
    return True


def _default_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; for a model on the meta device, CUDA when
    there is a GPU, else the CPU."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            break
        return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Targets:
    """Where each state_dict name of the model lives, and which names share a tensor."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kind: dict[str, str] = {}  # name -> "param" | "buffer" | "qweight"
        self.groups: dict[str, list[str]] = {}  # name -> every name sharing its tensor
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.kind[name] = "param"
            by_id.setdefault(id(p), []).append(name)
        for name, b in model.named_buffers(remove_duplicate=False):
            if name in self.kind:
                continue
            self.kind[name] = "buffer"
            by_id.setdefault(id(b), []).append(name)
        for name, m in model.named_modules(remove_duplicate=False):
            if isinstance(m, QuantizedWeight):
                for sub in ("codes", "scales", "mins"):
                    self.kind.pop(f"{name}.{sub}", None)
                self.kind[name] = "qweight"
                by_id.setdefault(id(m), []).append(name)
        for names in by_id.values():
            for n in names:
                if n in self.kind:
                    self.groups[n] = names
        self.persistent = {
            k for k in model.state_dict(keep_vars=True) if not k.endswith("_extra_state")
        }
        self.persistent = {k for k in self.persistent if not self._under_qweight(k)} | {
            n for n, k in self.kind.items() if k == "qweight"
        }
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.prefix = prefix + "." if prefix else ""

    def _under_qweight(self, key: str) -> bool:
        head, _, _ = key.rpartition(".")
        return self.kind.get(head) == "qweight"

    def resolve(self, file_key: str) -> str | None:
        if file_key in self.kind:
            return file_key
        p = self.prefix
        if p:
            if p + file_key in self.kind:
                return p + file_key
            if file_key.startswith(p) and file_key[len(p) :] in self.kind:
                return file_key[len(p) :]
        return None

    def split(self, name: str) -> tuple[nn.Module, str]:
        mod_path, _, leaf = name.rpartition(".")
        return self.model.get_submodule(mod_path), leaf

    def current(self, name: str) -> Any:
        module, leaf = self.split(name)
        if self.kind[name] == "qweight":
            return getattr(module, leaf)
        if leaf in module._parameters:
            return module._parameters[leaf]
        return module._buffers.get(leaf)

    def assign(self, name: str, value: torch.Tensor) -> None:
        """Set ``value`` for ``name`` and every name tied to it."""
        old = self.current(name)
        if self.kind[name] == "param":
            rg = old.requires_grad if isinstance(old, torch.Tensor) else False
            value = nn.Parameter(value, requires_grad=rg and value.is_floating_point())
        for n in self.groups.get(name, [name]):
            module, leaf = self.split(n)
            if self.kind[n] == "param":
                module._parameters[leaf] = value
            else:
                module._buffers[leaf] = value

    def replace_module(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), child, new)


def quantized_skeleton(
    model: nn.Module,
    path: str | os.PathLike[str],
    skip: Iterable[str] = (),
    key_map: Callable[[str], str | None] | None = None,
) -> list[str]:
    """Make each plain ``nn.Linear`` / ``nn.Embedding`` whose weight the files store quantized
    a ``QuantizedLinear`` / ``QuantizedEmbedding`` on the meta device, from the headers alone
    (shape, encoding; the dtype is the module's), so the model has its final structure before
    ``load_model`` fills it. Weights named in ``skip`` and tied weights stay as they are (they
    are decoded at load). Returns the modules replaced."""
    targets = _Targets(model)
    skip = set(skip)
    done: list[str] = []
    for path_i in model_files(path):
        with safe_open(path_i) as f:
            infos = [f.tensor_info(k) for k in f.keys()]
        for info in infos:
            name = key_map(info["name"]) if key_map is not None else targets.resolve(info["name"])
            if name is None or name in skip or targets.kind.get(name) != "param":
                continue
            module_path, _, leaf = name.rpartition(".")
            enc = info["encoding"]
            if leaf != "weight" or enc["name"] == "raw" or len(targets.groups[name]) > 1:
                continue
            module = model.get_submodule(module_path)
            shape = tuple(int(d) for d in info["shape"])
            if tuple(module.weight.shape) != shape or not module.weight.is_floating_point():
                continue  # load_model reports the mismatch
            dtype = module.weight.dtype
            new: nn.Module
            if _swappable(module, nn.Linear):
                new = QuantizedLinear(
                    shape[1], shape[0], bias=False, encoding=enc, device="meta", dtype=dtype
                )
                new.bias = module.bias
            elif _swappable(module, nn.Embedding):
                new = QuantizedEmbedding(
                    shape[0], shape[1], module.padding_idx, encoding=enc, device="meta", dtype=dtype
                )
            else:
                continue
            targets.replace_module(module_path, new)
            done.append(module_path)
    return done


def place_zeros(
    model: nn.Module,
    path: str | os.PathLike[str],
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
) -> list[str]:
    """Place every tensor of the files that ``model`` has a place for, as ``load_model`` would,
    with zero bytes instead of the file's: the same modules (``QuantizedLinear`` in the file's
    encoding, tied weights shared), shapes and dtypes, from the headers alone (nothing is
    read). Tensors over ``max_bytes`` stored, and those whose placement fails, are left as they
    are. For a model of the same structure that only has to run the same kernels (the load's
    replica, ``prewarm.py``). Returns the names placed."""
    targets = _Targets(model)
    plan = []
    for fkey, e in open_entries(path, mode=DEVICE_MODE, threads=1).items():
        name = targets.resolve(fkey)
        fits = max_bytes is None or e.nbytes <= max_bytes
        if name is not None and name in targets.kind and fits:
            plan.append((e, name))
    planned = {name for _, name in plan}
    result = LoadResult(device=torch.device(device))
    placed: list[str] = []
    for e, name in plan:
        share = _shares_tied(targets, name, planned)
        buf = torch.zeros(e.nbytes, dtype=torch.uint8, device=device)
        parts = quantized_from_torch(buf, e).parts()
        try:
            _place(targets, name, e.info, parts, True, dtype, result, e.info["shape"], share)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            log.debug("place_zeros: %s left as it is: %r", name, exc)
            continue
        placed.append(name)
    return placed


def materialize_meta_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give the non-persistent buffers still on the meta device (a model built under
    ``torch.device("meta")``: rotary ``inv_freq``, ``position_ids``) real values on ``device``.
    A transformers model recomputes them with its own ``_init_weights``, the way its
    ``from_pretrained`` does, with every other tensor of those modules left untouched. Returns
    the names of the buffers that stay on meta (models without ``_init_weights``)."""
    owners: list[tuple[str, nn.Module, list[str]]] = []
    for mod_name, module in model.named_modules():
        names = [
            k
            for k, b in module._buffers.items()
            if b is not None and b.is_meta and k in module._non_persistent_buffers_set
        ]
        if names:
            owners.append((mod_name, module, names))
    if not owners:
        return []
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is None:
        return [f"{m}.{k}" if m else k for m, _, names in owners for k in names]
    try:  # transformers' init functions skip tensors flagged initialised
        from transformers import initialization as hf_init

        guard = hf_init.guard_torch_init_functions()
    except (ImportError, AttributeError):
        guard = contextlib.nullcontext()
    with torch.no_grad(), guard:
        for _, module, names in owners:
            keep = [t for t in module.parameters(recurse=False)]
            keep += [b for k, b in module._buffers.items() if b is not None and k not in names]
            for t in keep:
                t._is_hf_initialized = True
            for k in names:
                module._buffers[k] = torch.empty_like(module._buffers[k], device=device)
            init_weights(module)
    return []


def load_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    keep_quantized: bool = True,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    key_map: Callable[[str], str | None] | None = None,
    *,
    io: str = "builtin",
    chunk_bytes: int = DEFAULT_CHUNK,
    slots: int = DEFAULT_SLOTS,
    threads: int | None = None,
    staged: bool | None = None,
    mode: str | None = None,
    warmup: bool = True,
    tp_plan: str | dict[str, str] | None = None,
    tp_group: Any = None,
    fuse_siblings: bool = False,
    **stream_options: Any,
) -> LoadResult:
    """Fill ``model`` (real or on the meta device) from a qtensors file or model folder.

    * Every tensor of the file whose name is a parameter or buffer of ``model`` (also with or
      without the model's ``base_model_prefix``, or as ``key_map`` maps it; None skips it) is
      streamed to ``device`` (default: the model's device, or CUDA when the model is on meta and
      a GPU exists).
    * ``keep_quantized``: the ``weight`` of each plain ``nn.Linear`` / ``nn.Embedding`` stored
      quantized makes that module a ``QuantizedLinear`` / ``QuantizedEmbedding`` holding the
      stored parts; tied weights (an embedding and its LM head) share one such weight, except
      under ``tp_plan`` where they are decoded. Otherwise, and for every other
      quantized tensor, the parts are decoded on the device.
    * Floating tensors take ``dtype`` when given, else the dtype the model's tensor has (meta
      tensors have one too); other tensors keep the file's dtype.
    * Tensors of ``model`` that no file provides are listed in ``missing_keys`` (an error with
      ``strict``); file tensors the model lacks in ``unexpected_keys``.

    I/O: every byte goes through the Rust ``StreamReader`` (``mode``: ``"pread"``, ``"direct"``
    for O_DIRECT, ``"mmap"``, ``"auto"``; default as in ``qtensors.stream``: ``"auto"`` for the
    CPU, ``"pread"`` through the ring), as in ``qtensors.stream`` and ``offload``.
    ``io="builtin"`` (default): each tensor's parts are read by ``threads`` threads in chunks of
    ``chunk_bytes`` into a ring of ``slots`` pinned buffers and copied to the device
    asynchronously (``staged`` forces or skips the ring; by default CUDA targets use it). Without
    the ring, tensors are read as ``qtensors.stream`` reads them to the CPU: several at once
    (``stream.HOST_READERS``), each into its own buffer (by ``threads`` threads, default 4).
    ``io="stream"`` goes through ``qtensors.stream``'s pipeline instead
    (``stream_options`` are its options: ``verify=True``, ``pinned``, ``prefetch``...). Either way
    host memory stays at a ring of pinned buffers (64 MiB by default), whatever the model size.
    Non-persistent buffers a model built on the meta device holds are recomputed on ``device``
    (transformers models; ``materialize_meta_buffers``).

    ``warmup`` (CUDA targets): run each distinct quantized layer once at the end
    (``qtensors.torch.warmup``), so the first forward compiles no kernel; ``result.warmed`` lists
    what ran, ``result.warmup_seconds`` its time (not in ``result.seconds``).

    ``fuse_siblings``: join the quantized linears that read one input (q/k/v, gate/up) before
    the warm-up (``qtensors.torch.fuse_siblings``; not under ``tp_plan``).

    ``tp_plan`` (``"auto"`` or a transformers-style dict; ``torch.distributed`` initialised):
    tensor parallelism over ``tp_group`` (default: the world). Each rank reads only its shard of
    every weight the plan splits (rows of column-wise linears, group-aligned columns of row-wise
    ones; ``qtensors.torch.tensor_parallel``) and the split layers get their collectives.
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else _default_device(model)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    targets = _Targets(model)
    result = LoadResult(device=dev)
    loaded: set[str] = set()
    tp = None
    if tp_plan is not None:
        from .tensor_parallel import TensorParallel

        if io != "builtin":
            raise ValueError("tp_plan loads through io='builtin' (shards are read, not streamed)")
        tp = TensorParallel.prepare(model, tp_plan, tp_group)

    ring = dev.type == "cuda" if staged is None else staged
    if mode is None and io == "builtin":
        mode = DEVICE_MODE if ring else HOST_MODE
    # plan: (entry, model name) in file order; every tensor's header from the Rust reader. The
    # ring's pool reads pieces in parallel; without it, each tensor's reads use the threads.
    reader_threads = 1 if ring else (threads or 4)
    entries = open_entries(
        path, mode=mode or DEVICE_MODE, threads=reader_threads, chunk_size=chunk_bytes
    )
    plan: list[tuple[Entry, str]] = []
    for fkey, e in entries.items():
        name = key_map(fkey) if key_map is not None else targets.resolve(fkey)
        if name is None or name not in targets.kind:
            result.unexpected_keys.append(fkey)
        elif tp is not None:
            plan.append((tp.shard(e, targets.groups.get(name, [name])), name))
        else:
            plan.append((e, name))

    planned = {name for _, name in plan}

    def place(name: str, info: dict[str, Any], parts: list[torch.Tensor], full: Any) -> None:
        # tensor parallelism splits tied weights its own way, decoded
        share = tp is None and _shares_tied(targets, name, planned)
        _place(targets, name, info, parts, keep_quantized, dtype, result, full, share)
        loaded.update(targets.groups.get(name, [name]))

    if io == "stream":
        from ..stream import stream

        if threads:
            stream_options.setdefault("threads", threads)
        by_key = {e.name: (name, e.info) for e, name in plan}
        with stream(
            path, list(by_key), device=dev, quantized=True, mode=mode, **stream_options
        ) as s:
            for fkey, q in s:
                name, info = by_key[fkey]
                place(name, info, q.parts(), info["shape"])
            result.bytes_read += s.stats()["bytes"]
    elif io == "builtin":
        names = {id(e): name for e, name in plan}
        if ring:
            streamer = _Streamer(dev, chunk=chunk_bytes, slots=slots, threads=threads)
            read = streamer.stream([e for e, _ in plan])
        else:
            read = ((e, torch.from_numpy(b)) for e, b in read_host_ahead(e for e, _ in plan))
        for e, buf in read:
            full = getattr(e, "full_shape", e.info["shape"])
            place(names[id(e)], e.info, quantized_from_torch(buf, e).parts(), full)
            result.bytes_read += e.nbytes
    else:
        raise ValueError(f"io must be 'stream' or 'builtin', not {io!r}")

    result.missing_keys = sorted(k for k in targets.persistent if k not in loaded)
    if strict and result.missing_keys:
        raise KeyError(f"no tensor in {os.fspath(path)} for: {', '.join(result.missing_keys)}")
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    result.meta_buffers = materialize_meta_buffers(model, dev)
    result.seconds = time.perf_counter() - t0
    if fuse_siblings and tp is None:
        from .siblings import fuse_siblings as fuse

        result.sibling_groups = fuse(model)
    if warmup:
        warm_loaded(model, result)
    if tp is not None:  # after warmup: its forwards must not run collectives
        tp.install(model)
        result.tensor_parallel = tp
    return result


def _shares_tied(targets: _Targets, name: str, planned: set[str]) -> bool:
    """Whether tied weights share one quantized weight: the files hold one of their names (else
    the last copy wins, decoded, as in ``load_state_dict``)."""
    return sum(n in planned for n in targets.groups.get(name, [name])) == 1


def warm_loaded(model: nn.Module, result: LoadResult) -> None:
    """``load_model``'s warm-up (``qtensors.torch.warmup``) of a model it loaded to CUDA with
    quantized layers; records what ran and its seconds in ``result``."""
    if result.device is None or result.device.type != "cuda" or not result.quantized_modules:
        return
    from .warmup import warmup as warm_kernels

    t1 = time.perf_counter()
    result.warmed = warm_kernels(model)
    result.warmup_seconds = time.perf_counter() - t1


def _tied_swappable(targets: _Targets, name: str, shape: tuple[int, ...]) -> bool:
    """Whether every name tied to `name` is the 2-D weight of a plain nn.Linear / nn.Embedding
    (an input embedding and the LM head reading it), so that all can share one quantized
    weight."""
    if len(shape) != 2:
        return False
    for n in targets.groups[name]:
        path, _, leaf = n.rpartition(".")
        if leaf != "weight" or targets.kind.get(n) != "param":
            return False
        m = targets.model.get_submodule(path)
        if not (_swappable(m, nn.Linear) or _swappable(m, nn.Embedding)):
            return False
    return True


def _place(
    targets: _Targets,
    name: str,
    info: dict[str, Any],
    parts: list[torch.Tensor],
    keep_quantized: bool,
    dtype: torch.dtype | None,
    result: LoadResult,
    full_shape: Any,
    share_tied: bool = True,
) -> None:
    # `shape`: what is placed (a tensor-parallel shard, or the whole tensor as stored)
    shape = tuple(int(d) for d in info["shape"])
    enc = info["encoding"]
    kind = targets.kind[name]
    old = targets.current(name)
    old_shape = tuple(old.shape)
    if old_shape != tuple(int(d) for d in full_shape):
        raise ValueError(
            f"{name}: the file holds shape {list(full_shape)}, the model {list(old_shape)}"
        )

    def float_dtype(file_dtype: torch.dtype) -> torch.dtype:
        if dtype is not None:
            return dtype
        cur = getattr(old, "dtype", None)
        if isinstance(cur, torch.dtype) and cur.is_floating_point:
            return cur
        return file_dtype

    if enc["name"] == "raw":
        if kind == "qweight":
            raise ValueError(f"{name}: the model holds it quantized, the file raw")
        t = parts[0]
        if t.is_floating_point():
            t = t.to(float_dtype(t.dtype))
        targets.assign(name, t)
        return

    codes, scales, mins = parts[0], parts[1], parts[2] if len(parts) > 2 else None
    out_dtype = float_dtype(torch_dtype(info["dtype"]))
    module_path, _, leaf = name.rpartition(".")
    module = targets.model.get_submodule(module_path)
    tied = len(targets.groups.get(name, [name])) > 1
    if kind == "qweight":
        qw = QuantizedWeight.from_parts(codes, scales, mins, shape, enc, out_dtype)
        targets.replace_module(name, qw)
        result.quantized_modules.append(module_path)
        return
    if keep_quantized and tied and share_tied and _tied_swappable(targets, name, shape):
        # A tied embedding and LM head share one QuantizedWeight: the head multiplies by the
        # packed codes (decoded, it is the largest matmul of a small LM's decoding step).
        qw = QuantizedWeight.from_parts(codes, scales, mins, shape, enc, out_dtype)
        for n in targets.groups[name]:
            path = n.rpartition(".")[0]
            m = targets.model.get_submodule(path)
            if _swappable(m, nn.Linear):
                targets.replace_module(path, QuantizedLinear.from_weight(qw, m.bias))
            else:
                targets.replace_module(path, QuantizedEmbedding.from_weight(qw, m.padding_idx))
            result.quantized_modules.append(path)
        return
    if keep_quantized and leaf == "weight" and not tied and kind == "param":
        if _swappable(module, nn.Linear):
            qw = QuantizedWeight.from_parts(codes, scales, mins, shape, enc, out_dtype)
            targets.replace_module(module_path, QuantizedLinear.from_weight(qw, module.bias))
            result.quantized_modules.append(module_path)
            return
        if _swappable(module, nn.Embedding):
            qw = QuantizedWeight.from_parts(codes, scales, mins, shape, enc, out_dtype)
            targets.replace_module(
                module_path, QuantizedEmbedding.from_weight(qw, module.padding_idx)
            )
            result.quantized_modules.append(module_path)
            return
    bits = 4 if enc["name"] == "nf4" else int(enc["bits"])
    sshape = list(scale_shape(shape, enc["axis"], enc["group_size"]))
    value = dequantize(
        codes,
        scales.reshape(sshape),
        None if mins is None else mins.reshape(() if enc["name"] == "nvfp4" else sshape),
        list(shape),
        enc["name"],
        bits,
        int(enc["group_size"]),
        int(enc["axis"]),
        out_dtype,
    )
    targets.assign(name, value)
    result.decoded.append(name)


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def state_dict_for_file(model: nn.Module) -> dict[str, Any]:
    """The model's tensors in the form ``qtensors.save_file`` takes: each ``QuantizedWeight`` as
    one QuantizedTensor under its name (``layer.weight``), the rest as CPU tensors. A tensor
    shared under several names (tied embeddings and LM head) is stored once, under its first
    name: ``load_model`` fills every name of a tied group from it."""
    qweights = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    out: dict[str, Any] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        head = key.rpartition(".")[0]
        if head in qweights:
            if head not in out:
                out[head] = qweights[head].to_quantized()
            continue
        if not isinstance(value, torch.Tensor):
            continue
        same = (id(value.untyped_storage()), value.storage_offset(), value.shape, value.stride())
        if value.numel() and same in seen:
            continue
        seen.add(same)
        out[key] = value.detach().cpu()
    return out


def save_model(
    model: nn.Module,
    filename: str | os.PathLike[str],
    quant: Any = None,
    metadata: dict[str, str] | None = None,
    tokenizer: Any = None,
) -> str:
    """Write ``model``'s tensors to a qtensors file: quantized modules as they are stored, the
    other tensors encoded by ``quant`` as in ``qtensors.save_file`` (default: FLEXGEN for float
    tensors of rank >= 2, the rest raw; ``qtensors.Raw()`` keeps them all as they are).

    ``filename`` naming a folder (an existing one, or a path without extension) gives a model
    folder ``from_pretrained`` loads: ``model.qtensors`` plus the model's config (and
    generation config, and ``tokenizer``'s files when given). The quantization method a model
    was quantized with (``quantize_model``) is recorded in the metadata under
    ``quantization_method`` (JSON). Returns the path of the qtensors file written."""
    import json

    from ..files import save_file

    meta = dict(metadata or {})
    record = getattr(model, "qtensors_quantization", None)
    if record:  # measurements (layer_error) are not part of how the file was made
        made = {k: v for k, v in record.items() if k != "layer_error"}
        meta.setdefault("quantization_method", json.dumps(made, sort_keys=True))
    path = os.fspath(filename)
    if os.path.isdir(path) or not os.path.splitext(path)[1]:
        os.makedirs(path, exist_ok=True)
        for part in (
            getattr(model, "config", None),
            getattr(model, "generation_config", None),
            tokenizer,
        ):
            if part is not None and hasattr(part, "save_pretrained"):
                part.save_pretrained(path)
        path = os.path.join(path, "model.qtensors")
    save_file(state_dict_for_file(model), path, quant=quant, metadata=meta)
    return path
