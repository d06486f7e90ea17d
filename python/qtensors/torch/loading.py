"""Load qtensors files into existing torch modules, straight onto the device.

    model = MyModel(config)                          # or built on the meta device
    qtensors.torch.load_model(model, "model.qtensors", device="cuda")

How the bytes travel: the file's header gives every part's offset, so each tensor is one span of
the file. Spans are cut into chunks read by a few threads (``os.preadv``, GIL released) into a
small ring of pinned host buffers, and each chunk is copied to the device asynchronously
(``non_blocking``) while the next ones are read. A pinned buffer is reused only once the copy out
of it has finished (a CUDA event). Host memory in use is therefore the ring (``slots x chunk``,
64 MiB by default), whatever the model size. On the device the stored parts either become the
buffers of a ``QuantizedLinear`` / ``QuantizedEmbedding`` (``keep_quantized``) or are decoded
there by ``torch.ops.qtensors.dequantize`` into the parameter's dtype.

For a CPU target the chunks are read straight into the destination tensors (no staging) and
decoded by the Rust core. ``io="stream"`` reads through ``qtensors.stream`` instead (O_DIRECT,
checksums), slower here for whole-model loads.

Measured on an H100 machine (benches/results/gpu_load_h100.txt; 1.1B-parameter Llama-shaped
model, int4-g64 vs the same weights in fp16 through ``safetensors.torch.load_file(device=
"cuda")``, each in a fresh process): kept quantized, 0.34 s cold / 0.16 s warm against 1.45 s /
0.42 s, with 68 MB of peak host memory against 2.3 GB.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._arrays import torch_dtype as dtype_of_name
from ..files import safe_open
from ._layout import scale_shape
from .modules import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    torch_dtype,
)
from .ops import dequantize

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


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------


def model_files(path: str | os.PathLike[str]) -> list[str]:
    """The qtensors files of ``path``: the file itself, or the shards a model folder's
    ``*.qtensors.index.json`` names (in index order), or every ``*.qtensors`` in the folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
        return [path]
    indexes = sorted(f for f in os.listdir(path) if f.endswith(INDEX_SUFFIX))
    if indexes:
        files: list[str] = []
        for ix in indexes:
            with open(os.path.join(path, ix), encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            for shard in weight_map.values():
                full = os.path.normpath(os.path.join(path, shard))
                if full not in files:
                    files.append(full)
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".qtensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .qtensors file")
    return files


def _data_start(path: str) -> int:
    with open(path, "rb") as fh:
        pre = fh.read(24)
    (header_len,) = struct.unpack("<Q", pre[16:24])
    return 24 + header_len


# ------------------------------------------------------------------------------------------------
# streaming spans of a file to the device
# ------------------------------------------------------------------------------------------------


def _pread_into(fd: int, dst: torch.Tensor, offset: int) -> None:
    """Fill the contiguous CPU uint8 tensor ``dst`` from the file at ``offset``."""
    n = dst.numel()
    if n == 0:
        return
    mv = memoryview(dst.numpy()).cast("B")
    got = 0
    while got < n:
        r = os.preadv(fd, [mv[got:]], offset + got)
        if r <= 0:
            raise OSError(f"unexpected end of file reading {n} bytes at offset {offset}")
        got += r


@dataclass
class _Span:
    key: Any
    offset: int
    length: int


class _Streamer:
    """Reads file spans into device tensors: chunked, threaded reads into pinned buffers and
    asynchronous host-to-device copies on the current stream."""

    def __init__(
        self,
        device: torch.device,
        chunk: int = DEFAULT_CHUNK,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        staged: bool | None = None,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        # staged: through the ring of (pinned, for CUDA) host buffers; else straight into dst
        self.staged = self.cuda if staged is None else staged
        self.chunk = chunk
        self.nslots = max(1, slots)
        self.threads = threads or max(1, min(self.nslots, os.cpu_count() or 1, 8))
        self._bufs: list[torch.Tensor] = []
        self.bytes_read = 0

    def _slot_buffers(self) -> list[torch.Tensor]:
        if not self._bufs:
            self._bufs = [
                torch.empty(self.chunk, dtype=torch.uint8, pin_memory=self.cuda)
                for _ in range(self.nslots)
            ]
        return self._bufs

    def stream(self, path: str, spans: Iterable[_Span]) -> Iterator[tuple[_Span, torch.Tensor]]:
        """Yield ``(span, bytes)`` in order, each once all its copies are enqueued on the
        current stream (device work queued after it sees the data)."""
        fd = os.open(path, os.O_RDONLY)
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="qtensors-load")
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if self.staged:
                yield from self._stream_staged(fd, pool, spans)
            else:
                yield from self._stream_host(fd, pool, spans)
        finally:
            pool.shutdown(wait=True)
            os.close(fd)

    def _stream_host(self, fd: int, pool: ThreadPoolExecutor, spans: Iterable[_Span]):
        window: deque[tuple[_Span, torch.Tensor, list[Future]]] = deque()
        inflight = 0
        for span in spans:
            dst = torch.empty(span.length, dtype=torch.uint8)
            futs = [
                pool.submit(_pread_into, fd, dst[p : p + self.chunk], span.offset + p)
                for p in range(0, span.length, self.chunk)
            ]
            window.append((span, dst, futs))
            inflight += len(futs)
            while window and (inflight > 2 * self.nslots or all(f.done() for f in window[0][2])):
                s, d, fs = window.popleft()
                for f in fs:
                    f.result()
                inflight -= len(fs)
                self.bytes_read += s.length
                yield s, d
        while window:
            s, d, fs = window.popleft()
            for f in fs:
                f.result()
            self.bytes_read += s.length
            yield s, d

    def _stream_staged(self, fd: int, pool: ThreadPoolExecutor, spans: Iterable[_Span]):
        cuda = self.cuda
        bufs = self._slot_buffers()
        free = deque(range(self.nslots))
        events: list[torch.cuda.Event | None] = [None] * self.nslots
        # chunk jobs in flight: (span index, slot, n, dst offset, future)
        inflight: deque[tuple[int, int, int, int, Future]] = deque()
        todo: dict[int, list[Any]] = {}  # span index -> [span, dst, chunks not yet copied]
        order: deque[int] = deque()
        stream = torch.cuda.current_stream(self.device) if cuda else None

        def finish_one() -> None:
            idx, slot, n, pos, fut = inflight.popleft()
            fut.result()
            entry = todo[idx]
            entry[1][pos : pos + n].copy_(bufs[slot][:n], non_blocking=cuda)
            if cuda:
                ev = torch.cuda.Event()
                ev.record(stream)
                events[slot] = ev
            free.append(slot)
            entry[2] -= 1

        def ready() -> Iterator[tuple[_Span, torch.Tensor]]:
            while order and todo[order[0]][2] == 0:
                span, dst, _ = todo.pop(order.popleft())
                self.bytes_read += span.length
                yield span, dst

        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            for idx, span in enumerate(spans):
                dst = torch.empty(span.length, dtype=torch.uint8, device=self.device)
                nchunks = -(-span.length // self.chunk)
                todo[idx] = [span, dst, nchunks]
                order.append(idx)
                for pos in range(0, span.length, self.chunk):
                    n = min(self.chunk, span.length - pos)
                    if not free:
                        finish_one()
                        yield from ready()
                    slot = free.popleft()
                    ev = events[slot]
                    if ev is not None:
                        ev.synchronize()
                    fut = pool.submit(_pread_into, fd, bufs[slot][:n], span.offset + pos)
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


def _parts_of(info: dict[str, Any], buf: torch.Tensor, base: int) -> list[torch.Tensor]:
    """The parts of a tensor as views of ``buf`` (which holds the file from offset ``base``)."""
    enc = info["encoding"]
    order = ("data",) if enc["name"] == "raw" else ("codes", "scales", "mins", "tensor_scale")
    out = []
    for pname in order:
        rec = info["parts"].get(pname)
        if rec is None:
            continue
        o = rec["offset"] - base
        raw = buf[o : o + rec["length"]]
        dt = dtype_of_name(rec["dtype"])
        out.append(
            raw.view(dt).reshape(rec["shape"])
            if rec["length"]
            else torch.empty(rec["shape"], dtype=dt, device=buf.device)
        )
    return out


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
    **stream_options: Any,
) -> LoadResult:
    """Fill ``model`` (real or on the meta device) from a qtensors file or model folder.

    * Every tensor of the file whose name is a parameter or buffer of ``model`` (also with or
      without the model's ``base_model_prefix``, or as ``key_map`` maps it; None skips it) is
      streamed to ``device`` (default: the model's device, or CUDA when the model is on meta and
      a GPU exists).
    * ``keep_quantized``: the ``weight`` of each plain ``nn.Linear`` / ``nn.Embedding`` stored
      quantized makes that module a ``QuantizedLinear`` / ``QuantizedEmbedding`` holding the
      stored parts (tied weights excepted: they are decoded). Otherwise, and for every other
      quantized tensor, the parts are decoded on the device.
    * Floating tensors take ``dtype`` when given, else the dtype the model's tensor has (meta
      tensors have one too); other tensors keep the file's dtype.
    * Tensors of ``model`` that no file provides are listed in ``missing_keys`` (an error with
      ``strict``); file tensors the model lacks in ``unexpected_keys``.

    I/O: ``io="builtin"`` (default): each tensor's byte range is read by ``threads`` threads in
    chunks of ``chunk_bytes`` into a ring of ``slots`` pinned buffers and copied to the device
    asynchronously (``staged`` forces or skips the ring; by default CUDA targets use it).
    ``io="stream"`` goes through ``qtensors.stream`` instead (``stream_options`` are its options:
    ``mode="direct"`` for O_DIRECT, ``pinned``, ``prefetch``...). Either way host memory stays at
    a ring of pinned buffers (64 MiB by default), whatever the model size.
    """
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else _default_device(model)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    targets = _Targets(model)
    result = LoadResult(device=dev)
    loaded: set[str] = set()

    # plan: (file, [(file key, model name, header entry)]) in file order
    plan: list[tuple[str, list[tuple[str, str, dict[str, Any]]]]] = []
    for path_i in model_files(path):
        with safe_open(path_i) as f:
            infos = [f.tensor_info(k) for k in f.keys()]
        items = []
        for info in infos:
            fkey = info["name"]
            name = key_map(fkey) if key_map is not None else targets.resolve(fkey)
            if name is None or name not in targets.kind:
                result.unexpected_keys.append(fkey)
            else:
                items.append((fkey, name, info))
        plan.append((path_i, items))

    def place(name: str, info: dict[str, Any], parts: list[torch.Tensor]) -> None:
        _place(targets, name, info, parts, keep_quantized, dtype, result)
        loaded.update(targets.groups.get(name, [name]))

    if io == "stream":
        from ..stream import stream

        if threads:
            stream_options.setdefault("threads", threads)

        for path_i, items in plan:
            if not items:
                continue
            by_key = {fkey: (name, info) for fkey, name, info in items}
            with stream(
                path_i, [k for k, _, _ in items], device=dev, quantized=True, **stream_options
            ) as s:
                for fkey, q in s:
                    name, info = by_key[fkey]
                    place(name, info, q.parts())
                result.bytes_read += s.stats()["bytes"]
    elif io == "builtin":
        streamer = _Streamer(dev, chunk=chunk_bytes, slots=slots, threads=threads, staged=staged)
        for path_i, items in plan:
            base = _data_start(path_i)
            spans = []
            for _, name, info in items:
                recs = list(info["parts"].values())
                lo = min(r["offset"] for r in recs)
                hi = max(r["offset"] + r["length"] for r in recs)
                spans.append(_Span((name, info, lo), base + lo, hi - lo))
            for span, buf in streamer.stream(path_i, spans):
                name, info, lo = span.key
                place(name, info, _parts_of(info, buf, lo))
        result.bytes_read = streamer.bytes_read
    else:
        raise ValueError(f"io must be 'stream' or 'builtin', not {io!r}")

    result.missing_keys = sorted(k for k in targets.persistent if k not in loaded)
    if strict and result.missing_keys:
        raise KeyError(f"no tensor in {os.fspath(path)} for: {', '.join(result.missing_keys)}")
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    result.seconds = time.perf_counter() - t0
    return result


def _place(
    targets: _Targets,
    name: str,
    info: dict[str, Any],
    parts: list[torch.Tensor],
    keep_quantized: bool,
    dtype: torch.dtype | None,
    result: LoadResult,
) -> None:
    shape = tuple(int(d) for d in info["shape"])
    enc = info["encoding"]
    kind = targets.kind[name]
    old = targets.current(name)
    old_shape = tuple(old.shape)
    if old_shape != shape:
        raise ValueError(f"{name}: the file holds shape {list(shape)}, the model {list(old_shape)}")

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
    if enc["name"] in ("mxfp4", "nvfp4") and kind != "qweight":
        # The torch ops do not decode the FP4 formats yet: the Rust core decodes them on the CPU,
        # also under keep_quantized (they show in result.decoded).
        from ..quantized import QuantizedTensor
        from ..quantized import dequantize as decode_parts

        cpu = [p.cpu() for p in parts]
        scale = cpu[2] if len(cpu) > 2 else None
        q = QuantizedTensor(cpu[0], cpu[1], None, shape, info["dtype"], enc, "pt", None, scale)
        targets.assign(name, decode_parts(q).to(device=parts[0].device, dtype=out_dtype))
        result.decoded.append(name)
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
        None if mins is None else mins.reshape(sshape),
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
    one QuantizedTensor under its name (``layer.weight``), the rest as CPU tensors."""
    qweights = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        head = key.rpartition(".")[0]
        if head in qweights:
            if head not in out:
                out[head] = qweights[head].to_quantized()
            continue
        if isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu()
    return out


def save_model(
    model: nn.Module,
    filename: str | os.PathLike[str],
    quant: Any = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s tensors to a qtensors file: quantized modules as they are stored, the
    other tensors encoded by ``quant`` as in ``qtensors.save_file`` (default: FLEXGEN for float
    tensors of rank >= 2, the rest raw)."""
    from ..files import save_file

    save_file(state_dict_for_file(model), filename, quant=quant, metadata=metadata)
