"""Stream tensors from disk to a device: `qtensors.stream(path, device="cuda")`.

    for name, t in qt.stream("model.qtensors", device="cuda"):
        ...  # t: the decoded tensor on the GPU, in file order

How it moves bytes (one tensor = one contiguous byte range in files qtensors writes; parts that
another writer placed far apart are read separately, never the span between them):

* a background thread reads each tensor's parts with large reads through the Rust core
  (`_core.StreamReader`: `pread` with `posix_fadvise` read-ahead, `O_DIRECT`, or a memory map,
  split over several threads, the GIL released) into a small ring of reusable *pinned* buffers;
* each filled buffer is copied to the device with `non_blocking=True` on a dedicated CUDA copy
  stream; a CUDA event per buffer lets the thread reuse it only once its copy has finished;
* the consumer (the caller's thread) makes its current stream wait for the tensor's copies and
  dequantizes it there with `torch.ops.qtensors.dequantize` (Triton), so reading, copying and
  decoding of successive tensors overlap.

Memory stays bounded: the pinned ring is fixed (`pinned` bytes), and the tensors read but not
yet handed out never exceed `prefetch` bytes of stored data (a single tensor larger than the
window is read alone). On the CPU (`device="cpu"`) tensors are read into plain host buffers, a
few at once (`HOST_READERS`: a cold disk needs several reads in flight), and decoded by the
Rust core.

Errors concern one tensor and surface when the iteration reaches it: a file truncated or
rewritten while it streams raises `FormatError` naming the tensor and the offset, a checksum
mismatch (`verify=True`) raises `ChecksumError`; the tensors before it are yielded first.
Stopping early (`break`, `close()`, leaving a `with` block, or dropping the iterator) stops the
thread and releases its buffers.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from ._arrays import from_buffer, normalize_framework
from .quantized import PART_NAMES, QuantizedTensor, wrap_parts

__all__ = ["TensorStream", "stream"]

MiB = 1 << 20
#: Default window of read-ahead (stored bytes of tensors read but not yet handed out).
DEFAULT_PREFETCH = 512 * MiB
#: Default total size of the pinned staging ring.
DEFAULT_PINNED = 128 * MiB
#: Default number of pinned buffers in the ring.
PINNED_SLOTS = 4
#: Granularity of reads into host memory on the CPU path (checks for a stop between them).
HOST_PIECE = 64 * MiB
#: Tensors read at once on the CPU path, each into its own buffer: a cold disk needs several
#: reads in flight, and one tensor of a few MiB fills too few (bench_stream_compressed.py).
HOST_READERS = 4
#: Read modes (`_core.StreamReader`): on the CPU, cached bytes from the page cache and the rest
#: with O_DIRECT ("auto": a cold read costs the kernel no page-cache work; measured against
#: "pread" in bench_stream_compressed.py). CUDA keeps "pread" until measured there.
HOST_MODE = "auto"
DEVICE_MODE = "pread"
DIRECT_ALIGN = 4096


# ------------------------------------------------------------------------------------------------
# sources: files and model folders
# ------------------------------------------------------------------------------------------------


def resolve_files(path: str | os.PathLike[str]) -> list[str]:
    """The qtensors files of `path`: the file itself, or for a model folder the shards named by
    its `*.qtensors.index.json` (in order of first use), else every `*.qtensors` file, sorted."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return [path]
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".qtensors.index.json"))
    if indexes:
        files: list[str] = []
        for ix in indexes:
            with open(os.path.join(path, ix), encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            for shard in weight_map.values():
                full = os.path.join(path, shard)
                if full not in files:
                    files.append(full)
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".qtensors"))
    if not files:
        raise FileNotFoundError(f"no .qtensors file in the folder {path}")
    return files


@dataclass
class Entry:
    """One tensor of one file: its header entry and the buffer its parts are read into
    (`StreamReader.tensor_layout`: the parts, and the gaps between those close together)."""

    reader: Any
    index: int
    name: str
    info: dict[str, Any]
    #: absolute file offset of the first part; buffer offsets keep its phase modulo 4 KiB
    start: int
    #: bytes of the buffer
    nbytes: int
    #: (part name, offset in the buffer, length) in encoding order
    parts: list[tuple[str, int, int]] = field(default_factory=list)

    def pieces(self, chunk: int) -> list[tuple[int, int]]:
        """(offset, length) of the reads, at most ``chunk`` bytes each, that fill the buffer (one
        empty read for an empty buffer)."""
        return [(p, min(chunk, self.nbytes - p)) for p in range(0, max(self.nbytes, 1), chunk)]

    def read_into(self, pos: int, out: Any, verify: bool = False) -> None:
        """Bytes ``[pos, pos + len(out))`` of the buffer into ``out`` (one of ``pieces``);
        ``verify``: check the checksums of the parts once read to their end (pieces in order)."""
        self.reader.read(self.index, pos, out, verify)


def open_entries(
    path: str | os.PathLike[str], mode: str = "pread", threads: int = 4, chunk_size: int = 8 * MiB
) -> dict[str, Entry]:
    """Open every file of `path` for streaming; every tensor by name, in file order."""
    entries: dict[str, Entry] = {}
    for f in resolve_files(path):
        reader = _core.StreamReader(f, mode=mode, threads=threads, chunk_size=chunk_size)
        header = json.loads(reader.header_json())
        for i, t in enumerate(header["tensors"]):
            start, _ = reader.tensor_range(i)
            nbytes, layout = reader.tensor_layout(i)
            where = {n: (off, ln) for n, off, ln in layout}
            names = PART_NAMES.get(t["encoding"]["name"], tuple(t["parts"]))
            parts = [(n, *where[n]) for n in names]
            if t["name"] in entries:
                raise ValueError(f"tensor {t['name']!r} appears in two files of {path}")
            entries[t["name"]] = Entry(reader, i, t["name"], t, start, nbytes, parts)
    return entries


# ------------------------------------------------------------------------------------------------
# decoding a tensor from its bytes
# ------------------------------------------------------------------------------------------------


def _scale_shape(info: dict[str, Any]) -> tuple[int, ...]:
    enc = info["encoding"]
    s = list(info["shape"]) or [1]
    a = enc["axis"]
    s[a] = -(-s[a] // enc["group_size"])
    return tuple(s)


def quantized_from_torch(buf, e: Entry) -> QuantizedTensor:
    """A QuantizedTensor whose parts view the torch uint8 tensor `buf` (any device) holding the
    bytes of `e`'s buffer."""

    from ._arrays import torch_dtype

    info = e.info
    enc = info["encoding"]
    shape = tuple(info["shape"])
    views = {n: buf[off : off + ln] for n, off, ln in e.parts}
    if enc["name"] == "raw":
        data = views["data"].view(torch_dtype(info["dtype"])).reshape(shape)
        return QuantizedTensor(data, None, None, shape, info["dtype"], enc, "pt", buf)
    sdt = torch_dtype(enc["scale_dtype"])
    sshape = _scale_shape(info)
    scales = views["scales"].view(sdt).reshape(sshape)
    mins = views["mins"].view(sdt).reshape(sshape) if "mins" in views else None
    # nvfp4's per-tensor fp32 scale (spec 4.9)
    ts = views["tensor_scale"].view(torch_dtype("float32")) if "tensor_scale" in views else None
    return QuantizedTensor(
        views["codes"], scales, mins, shape, info["dtype"], enc, "pt", buf, tensor_scale=ts
    )


def dequantize_device(q: QuantizedTensor):
    """Decode a QuantizedTensor of torch parts on their device (`torch.ops.qtensors.dequantize`:
    Triton on CUDA, the Rust core on the CPU)."""
    if q.encoding["name"] == "raw":
        return q.codes
    from ._arrays import torch_dtype
    from .torch.ops import dequantize_op

    enc = q.encoding
    bits = 4 if enc["name"] == "nf4" else int(enc["bits"])
    return dequantize_op(
        q.codes,
        q.scales,
        q.mins if q.mins is not None else q.tensor_scale,  # nvfp4: its tensor scale
        list(q.shape),
        enc["name"],
        bits,
        int(enc["group_size"]),
        int(enc["axis"]),
        torch_dtype(q.dtype),
    )


def decode_host(buf: np.ndarray, e: Entry, framework: str):
    """Decode `e` from the host bytes `buf` with the Rust core; a new array of `framework`."""
    info = e.info
    if info["encoding"]["name"] == "raw":
        # Zero-copy: `buf` belongs to this tensor alone.
        return from_buffer(buf, info["dtype"], tuple(info["shape"]), framework)
    parts = [buf[off : off + ln] for _, off, ln in e.parts]
    out = _core.decode(parts, info["dtype"], list(info["shape"]), json.dumps(info["encoding"]))
    return from_buffer(out, info["dtype"], tuple(info["shape"]), framework)


def quantized_host(buf: np.ndarray, e: Entry, framework: str) -> QuantizedTensor:
    info = e.info
    return wrap_parts(
        [buf] * len(e.parts),
        [off for _, off, _ in e.parts],
        [ln for _, _, ln in e.parts],
        tuple(info["shape"]),
        info["dtype"],
        info["encoding"],
        framework,
        writable=True,
        owner=buf,
    )


# ------------------------------------------------------------------------------------------------
# staging: file -> pinned ring -> device
# ------------------------------------------------------------------------------------------------


class Stopped(Exception):
    """Raised inside the loader thread when its consumer went away."""


class DeviceStager:
    """Reads tensors' byte ranges into a ring of pinned buffers and copies them to a CUDA device
    on a copy stream. Used from one thread at a time."""

    def __init__(self, device, pinned: int = DEFAULT_PINNED, slots: int = PINNED_SLOTS) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)
        slots = max(2, slots)
        self.slot_bytes = max(DIRECT_ALIGN, (pinned // slots) // DIRECT_ALIGN * DIRECT_ALIGN)
        # +DIRECT_ALIGN: room to place each read at the file offset's phase modulo 4 KiB, so
        # O_DIRECT reads land straight in the pinned buffer.
        self.slots = [
            torch.empty(self.slot_bytes + DIRECT_ALIGN, dtype=torch.uint8, pin_memory=True)
            for _ in range(slots)
        ]
        self.addrs = [s.data_ptr() for s in self.slots]
        self.arrays = [s.numpy() for s in self.slots]
        self.events: list[Any] = [None] * slots
        self.next = 0
        self.pinned_bytes = sum(s.numel() for s in self.slots)

    def load(self, e: Entry, verify: bool, stop: threading.Event | None = None):
        """The bytes of `e`'s buffer in a new device uint8 tensor (allocated on the copy stream)
        and an event recorded after its last copy."""
        torch = self.torch
        n = e.nbytes
        with torch.cuda.stream(self.copy_stream):
            dst = torch.empty(n, dtype=torch.uint8, device=self.device)
            off = 0
            # One read for an empty tensor too, so that verify sees its (empty) parts.
            while off < n or (n == 0 and off == 0):
                if stop is not None and stop.is_set():
                    raise Stopped
                k = self.next
                self.next = (k + 1) % len(self.slots)
                ev = self.events[k]
                if ev is not None:
                    ev.synchronize()  # the slot's previous copy has finished
                m = min(self.slot_bytes, n - off)
                pos = e.start + off
                pad = (pos - self.addrs[k]) % DIRECT_ALIGN
                e.reader.read(e.index, off, self.arrays[k][pad : pad + m], verify)
                if m:
                    dst[off : off + m].copy_(self.slots[k][pad : pad + m], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
                self.events[k] = ev
                off += m
                if n == 0:
                    break
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return dst, done

    def close(self) -> None:
        for ev in self.events:
            if ev is not None:
                ev.synchronize()
        self.slots = []
        self.arrays = []
        self.events = []


def read_host(e: Entry, verify: bool, stop: threading.Event | None = None) -> np.ndarray:
    """The bytes of `e`'s buffer in a new host array placed at the file offset's phase modulo
    4 KiB: O_DIRECT reads land in it without a bounce copy, and parts are as aligned as in the
    file (64 bytes at least)."""
    n = e.nbytes
    raw = np.empty(n + DIRECT_ALIGN, dtype=np.uint8)
    pad = (e.start - raw.ctypes.data) % DIRECT_ALIGN
    buf = raw[pad : pad + n]
    for off, m in e.pieces(HOST_PIECE):  # (one empty read for an empty tensor: verify sees it)
        if stop is not None and stop.is_set():
            raise Stopped
        e.read_into(off, buf[off : off + m], verify)
    return buf


def read_host_ahead(
    entries: Iterable[Entry], verify: bool = False, readers: int | None = None
) -> Iterator[tuple[Entry, np.ndarray]]:
    """`read_host` of every entry, `readers` (default `HOST_READERS`) at once, yielded in order:
    the CPU path of `load_model` and `offload` (a cold disk needs several reads in flight; the
    stream's own loader thread does the same with its read-ahead window). Stopping the
    iteration early waits for the reads in flight and drops them."""
    readers = max(1, readers or HOST_READERS)
    stop = threading.Event()
    window: deque[tuple[Entry, Future]] = deque()
    with ThreadPoolExecutor(readers, thread_name_prefix="qtensors-read") as pool:
        try:
            for e in entries:
                window.append((e, pool.submit(read_host, e, verify, stop)))
                if len(window) >= readers:
                    got, fut = window.popleft()
                    yield got, fut.result()
            while window:
                got, fut = window.popleft()
                yield got, fut.result()
        finally:
            stop.set()


# ------------------------------------------------------------------------------------------------
# the stream
# ------------------------------------------------------------------------------------------------


class _Window:
    """Bytes read ahead but not yet handed out, bounded by `limit` (one oversized item alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.used = 0
        self.peak = 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit:
                if stop.is_set():
                    raise Stopped
                self.cond.wait(0.1)
            if stop.is_set():
                raise Stopped
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


_END = object()


class _Pipeline:
    """State shared by a TensorStream and its loader thread (the thread holds no reference to
    the TensorStream, so dropping the stream stops it)."""

    def __init__(self, plan: list[Entry], device, verify: bool, prefetch: int, pinned: int):
        self.plan = plan
        self.device = device
        self.verify = verify
        self.window = _Window(prefetch)
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.stager: DeviceStager | None = None
        self.pinned_bytes = 0
        if device is not None and device.type == "cuda":
            self.stager = DeviceStager(device, pinned)
            self.pinned_bytes = self.stager.pinned_bytes
        self.thread = threading.Thread(target=self._run, name="qtensors-stream", daemon=True)
        self.started = False
        self.closed = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.thread.start()

    def _run(self) -> None:
        if self.stager is None:
            self._run_host()
            return
        try:
            self.stager.torch.cuda.set_device(self.stager.device)
            for k, e in enumerate(self.plan):
                self.window.acquire(e.nbytes, self.stop)
                if k + 1 < len(self.plan):
                    nxt = self.plan[k + 1]
                    nxt.reader.will_need_tensor(nxt.index, 64 * MiB)
                try:
                    payload = self.stager.load(e, self.verify, self.stop)
                except Stopped:
                    raise
                except BaseException as exc:
                    self.queue.put((k, None, exc))
                    return
                self.queue.put((k, payload, None))
        except Stopped:
            pass
        finally:
            self.queue.put(_END)

    def _run_host(self) -> None:
        """The CPU path: up to HOST_READERS tensors read at once, handed out in plan order (as
        futures: a tensor's error surfaces when the iteration reaches it)."""
        try:
            with ThreadPoolExecutor(HOST_READERS, thread_name_prefix="qtensors-read") as pool:
                for k, e in enumerate(self.plan):
                    self.window.acquire(e.nbytes, self.stop)
                    if k + 1 < len(self.plan):
                        nxt = self.plan[k + 1]
                        nxt.reader.will_need_tensor(nxt.index, 64 * MiB)
                    self.queue.put((k, pool.submit(read_host, e, self.verify, self.stop), None))
        except Stopped:
            pass
        finally:
            self.queue.put(_END)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop.set()
        self.window.wake()
        if (
            self.started
            and self.thread.is_alive()
            and threading.current_thread() is not self.thread
        ):
            self.thread.join()
        # Drop whatever was read ahead.
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.stager is not None:
            self.stager.close()
            self.stager = None


class TensorStream:
    """Iterator of `(name, tensor)` returned by `stream()`; also a context manager.

    `stats()` gives the bytes streamed, the peak of the read-ahead window and the pinned
    staging size; `close()` stops the loader thread and frees its buffers.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        names: Sequence[str] | None = None,
        device: Any = None,
        prefetch: int = DEFAULT_PREFETCH,
        *,
        quantized: bool = False,
        verify: bool = False,
        framework: str = "pt",
        mode: str | None = None,
        threads: int = 4,
        chunk_size: int = 8 * MiB,
        pinned: int = DEFAULT_PINNED,
    ) -> None:
        self._framework = normalize_framework(framework)
        self._quantized = quantized
        dev = None
        if self._framework == "pt":
            import torch

            if device is None:  # where it can run: the GPU if there is one
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dev = torch.device(device)
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif device is not None and str(device) != "cpu":
            raise ValueError("framework='np' streams to the CPU only (device='cpu')")
        self._device = dev
        to_cuda = dev is not None and dev.type == "cuda"
        if mode is None:
            mode = DEVICE_MODE if to_cuda else HOST_MODE
        entries = open_entries(path, mode=mode, threads=threads, chunk_size=chunk_size)
        if names is None:
            plan = list(entries.values())
        else:
            missing = [n for n in names if n not in entries]
            if missing:
                raise KeyError(f"no tensor named {missing[0]!r} in {os.fspath(path)}")
            plan = [entries[n] for n in names]
        self.mode = plan[0].reader.mode if plan else mode
        self._pipe = _Pipeline(plan, dev, verify, prefetch, pinned)
        self._yielded = 0
        self._bytes = 0

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self

    def __next__(self) -> tuple[str, Any]:
        pipe = self._pipe
        if pipe.closed:
            raise StopIteration
        pipe.start()
        item = pipe.queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        k, payload, exc = item
        e = pipe.plan[k]
        if isinstance(payload, Future):
            try:
                payload = payload.result()
            except BaseException as ex:  # the read's own error (Stopped only after a close)
                payload, exc = None, ex
        pipe.window.release(e.nbytes)
        if exc is not None:
            self.close()
            raise exc
        self._yielded += 1
        self._bytes += e.nbytes
        return e.name, self._finish(e, payload)

    def _finish(self, e: Entry, payload: Any):
        if self._device is not None and self._device.type == "cuda":
            import torch

            dst, done = payload
            cur = torch.cuda.current_stream(self._device)
            cur.wait_event(done)
            dst.record_stream(cur)
            q = quantized_from_torch(dst, e)
            return q if self._quantized else dequantize_device(q)
        buf = payload
        if self._quantized:
            return quantized_host(buf, e, self._framework)
        return decode_host(buf, e, self._framework)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the loader thread and free the pinned buffers (idempotent)."""
        self._pipe.close()

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        pipe = getattr(self, "_pipe", None)
        if pipe is not None:
            pipe.close()

    def __len__(self) -> int:
        return len(self._pipe.plan)

    def stats(self) -> dict[str, Any]:
        return {
            "tensors": self._yielded,
            "bytes": self._bytes,
            "window": self._pipe.window.limit,
            "peak_window_bytes": self._pipe.window.peak,
            "pinned_bytes": self._pipe.pinned_bytes,
            "mode": self.mode,
        }


def stream(
    path: str | os.PathLike[str],
    names: Sequence[str] | None = None,
    device: Any = None,
    prefetch: int = DEFAULT_PREFETCH,
    *,
    quantized: bool = False,
    verify: bool = False,
    framework: str = "pt",
    mode: str | None = None,
    threads: int = 4,
    chunk_size: int = 8 * MiB,
    pinned: int = DEFAULT_PINNED,
) -> TensorStream:
    """Stream the tensors of a qtensors file (or model folder) to `device`, yielding
    `(name, tensor)` in file order, or in the order of `names`.

    * `device`: "cuda" (or "cuda:N"): read into pinned buffers, copied on a separate CUDA stream,
      dequantized on the GPU; "cpu": read and decoded by the Rust core; None (the default):
      "cuda" when torch sees a GPU, else "cpu".
    * `prefetch`: bytes (stored) read ahead of the consumer; bounds host / device memory.
    * `quantized=True`: yield `QuantizedTensor`s (packed parts on `device`) instead of decoded
      tensors. `verify=True`: check every part's checksum on the bytes read.
    * `framework`: "pt" (torch tensors) or "np" (numpy arrays; CPU only).
    * `mode`: "pread" (page cache with read-ahead hints; the default to CUDA), "direct"
      (O_DIRECT, no page cache; falls back to pread where refused), "auto" (what the page cache
      holds from it, the rest O_DIRECT; the default on the CPU) or "mmap"; `threads` reads of
      `chunk_size` bytes run at once (per tensor; on the CPU `HOST_READERS` tensors are read at
      once); `pinned`: bytes of the pinned staging ring (CUDA).
    """
    return TensorStream(
        path,
        names,
        device,
        prefetch,
        quantized=quantized,
        verify=verify,
        framework=framework,
        mode=mode,
        threads=threads,
        chunk_size=chunk_size,
        pinned=pinned,
    )
