"""Disk offload for inference: `qtensors.torch.offload(model, "model.qtensors", device="cuda")`.

The model's weights stay in the qtensors file (quantized, read through the page cache); only the
layer that runs has its weights on the device:

* every module that owns parameters found in the file becomes a *unit*; its parameters are
  replaced by placeholders on the ``meta`` device (so the model may be built without memory
  to begin with, under ``qtensors.torch.init_empty_weights()``);
* a forward pre-hook waits for the unit's weights, installs them and schedules the next
  ``prefetch`` units; a forward hook puts the placeholders back, so the weights leave the
  device after use;
* a background thread loads units: each tensor's byte range is read with large reads
  (``_core.StreamReader``, GIL released) into pinned buffers, copied to the GPU on a copy
  stream and dequantized there (``torch.ops.qtensors.dequantize``), all while the previous
  unit computes. The order of units is learned as they run (first pass: module order), and the
  last unit prefetches the first ones of the next forward, so token-by-token decoding streams
  the model continuously.
* on the CPU, units load as ``qtensors.stream`` reads to the CPU (``stream.read_host_ahead``:
  read mode "auto", several tensors in flight; the prefetched units load at once).

Decoded weights are cast to the dtype of the parameter they replace (after decoding to the
file's dtype, exactly as ``load_state_dict`` would), so the output equals the same model with
the file loaded fully. Parameters that are not in the file and buffers stay resident on the
device (``strict=True`` refuses parameters missing from the file).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._arrays import torch_dtype
from ..stream import (
    DEFAULT_PINNED,
    DEVICE_MODE,
    HOST_MODE,
    DeviceStager,
    Entry,
    decode_host,
    dequantize_device,
    open_entries,
    quantized_from_torch,
    read_host,
    read_host_ahead,
)

__all__ = ["OffloadHandle", "offload"]


@dataclass
class _Unit:
    id: int
    name: str
    module: nn.Module
    #: (attribute, file entry, dtype of the parameter, placeholder)
    params: list[tuple[str, Entry, torch.dtype, nn.Parameter]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for _, e, _, _ in self.params)


class OffloadHandle:
    """The hooks and loader of an offloaded model (``model.qtensors_offload``).

    ``stats()``: units loaded, bytes read, loads that were not prefetched in time and the time
    forwards waited for weights. ``remove()``: take the hooks off and stop the loader (the
    offloaded parameters stay placeholders).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        device: Any = "cuda",
        prefetch: int = 2,
        verify: bool = False,
        mode: str | None = None,
        threads: int = 4,
        pinned: int = DEFAULT_PINNED,
        strict: bool = True,
    ) -> None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.prefetch = max(0, int(prefetch))
        self.verify = verify
        cuda = dev.type == "cuda"
        if mode is None:  # the engine mode of qtensors.stream for the same device
            mode = DEVICE_MODE if cuda else HOST_MODE
        self.entries = open_entries(path, mode=mode, threads=threads)
        self.units: list[_Unit] = []
        self._build(model, strict)
        self.stager = DeviceStager(dev, pinned) if cuda else None
        # The stager is used from one thread at a time; host loads of the units prefetched run
        # at once (each reading its tensors at once: several reads in flight, as a cold disk
        # needs).
        workers = 1 if cuda else max(1, self.prefetch)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qtensors-offload")
        self.pending: dict[int, Future] = {}
        self.active: dict[int, list[torch.Tensor]] = {}
        self.next_of: dict[int, int] = {}
        self.last: int | None = None
        self.lock = threading.Lock()
        self.hooks: list[Any] = []
        for u in self.units:
            self.hooks.append(u.module.register_forward_pre_hook(self._pre_hook(u)))
            self.hooks.append(u.module.register_forward_hook(self._post_hook(u), always_call=True))
        self.counters = {"loads": 0, "bytes": 0, "misses": 0, "wait_s": 0.0}

    # -- setup -----------------------------------------------------------------------------
    def _build(self, model: nn.Module, strict: bool) -> None:
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        missing: list[str] = []
        for mod_name, mod in model.named_modules():
            unit = _Unit(len(self.units), mod_name, mod)
            for attr, p in list(mod._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                names = [full] + [a for a in aliases.get(id(p), []) if a != full]
                e = next((self.entries[n] for n in names if n in self.entries), None)
                if e is None:
                    if p.device.type == "meta":
                        missing.append(full)
                        continue
                    if strict:
                        missing.append(full)
                        continue
                    mod._parameters[attr] = nn.Parameter(
                        p.detach().to(self.device), requires_grad=p.requires_grad
                    )
                    continue
                if tuple(e.info["shape"]) != tuple(p.shape):
                    raise ValueError(
                        f"parameter {full!r} has shape {tuple(p.shape)}, the file's tensor "
                        f"{e.name!r} has {tuple(e.info['shape'])}"
                    )
                dtype = p.dtype if p.dtype.is_floating_point else torch_dtype(e.info["dtype"])
                placeholder = nn.Parameter(
                    torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=False
                )
                mod._parameters[attr] = placeholder
                unit.params.append((attr, e, dtype, placeholder))
            for attr, b in list(mod._buffers.items()):
                if b is None:
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                if b.device.type != "meta":
                    mod._buffers[attr] = b.to(self.device)
                elif full in self.entries:
                    mod._buffers[attr] = self._load_now(self.entries[full]).to(b.dtype)
                else:
                    raise ValueError(
                        f"buffer {full!r} is on the meta device and not in the file: build the"
                        " model under qtensors.torch.init_empty_weights() (parameters on meta,"
                        " buffers real)"
                    )
            if unit.params:
                self.units.append(unit)
        if missing:
            raise ValueError(
                f"{len(missing)} parameters are not in the file (e.g. {missing[:3]}); pass"
                " strict=False to keep those that have values resident on the device"
            )

    def _load_now(self, e: Entry) -> torch.Tensor:
        t = decode_host(read_host(e, self.verify), e, "pt")
        return t.to(self.device)

    # -- loading (loader thread) -----------------------------------------------------------
    def _load(self, u: _Unit):
        tensors: list[torch.Tensor] = []
        if self.stager is None:
            dtypes = {id(e): dtype for _, e, dtype, _ in u.params}
            for e, buf in read_host_ahead([e for _, e, _, _ in u.params], self.verify):
                t = decode_host(buf, e, "pt")
                tensors.append(t if t.dtype == dtypes[id(e)] else t.to(dtypes[id(e)]))
            return tensors, None
        torch.cuda.set_device(self.device)
        stream = self.stager.copy_stream
        for _, e, dtype, _ in u.params:
            dst, _done = self.stager.load(e, self.verify)
            with torch.cuda.stream(stream):
                t = dequantize_device(quantized_from_torch(dst, e))
                if t.dtype != dtype:
                    t = t.to(dtype)
            tensors.append(t)
        ready = torch.cuda.Event()
        ready.record(stream)
        return tensors, ready

    def _submit(self, uid: int) -> Future:
        return self.pool.submit(self._load, self.units[uid])

    # -- hooks -----------------------------------------------------------------------------
    def _pre_hook(self, u: _Unit):
        def hook(module: nn.Module, args: Any) -> None:
            self._before(u)

        return hook

    def _post_hook(self, u: _Unit):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._after(u)

        return hook

    def _before(self, u: _Unit) -> None:
        with self.lock:
            fut = self.pending.pop(u.id, None)
            if fut is None:
                self.counters["misses"] += 1
                fut = self._submit(u.id)
            if self.last is not None and self.last != u.id:
                self.next_of[self.last] = u.id
            self.last = u.id
            self._schedule(u.id)
        t0 = time.perf_counter()
        tensors, ready = fut.result()
        self.counters["wait_s"] += time.perf_counter() - t0
        self.counters["loads"] += 1
        self.counters["bytes"] += u.nbytes
        if ready is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ready)
            for t in tensors:
                t.record_stream(cur)
        for (attr, _, _, _), t in zip(u.params, tensors, strict=True):
            u.module._parameters[attr] = nn.Parameter(t, requires_grad=False)
        self.active[u.id] = tensors

    def _schedule(self, uid: int) -> None:
        """Start loading the `prefetch` units expected after `uid`; drop other prefetches."""
        want: list[int] = []
        v = uid
        for _ in range(self.prefetch):
            v = self.next_of.get(v, (v + 1) % len(self.units))
            if v == uid or v in want:
                break
            want.append(v)
        for k in list(self.pending):
            if k not in want:
                del self.pending[k]  # mispredicted: its weights are freed when it completes
        for v in want:
            if v not in self.pending and v not in self.active:
                self.pending[v] = self._submit(v)

    def _after(self, u: _Unit) -> None:
        for attr, _, _, placeholder in u.params:
            u.module._parameters[attr] = placeholder
        self.active.pop(u.id, None)

    # -- public ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            "bytes_per_pass": sum(u.nbytes for u in self.units),
            **self.counters,
        }

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        with self.lock:
            self.pending.clear()
        self.pool.shutdown(wait=True)
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def offload(
    model: nn.Module,
    path: str | os.PathLike[str],
    device: Any = "cuda",
    *,
    prefetch: int = 2,
    verify: bool = False,
    mode: str | None = None,
    threads: int = 4,
    pinned: int = DEFAULT_PINNED,
    strict: bool = True,
) -> nn.Module:
    """Run `model` with its weights left in the qtensors file (or model folder) `path`.

    Each module's parameters are loaded to `device` just before its forward (the next
    `prefetch` modules load meanwhile, overlapped with compute) and leave it after. Returns the
    model; its hooks and loader are ``model.qtensors_offload`` (an `OffloadHandle`).
    Inputs must be on `device`. `mode`, `threads`, `pinned`: as in `qtensors.stream` (by default
    its read mode for `device`: "auto" on the CPU, where a unit's tensors, and the units
    prefetched, are read at once).
    """
    from .siblings import unfuse_siblings

    unfuse_siblings(model)  # a joined group would keep its members' weights resident
    handle = OffloadHandle(
        model,
        path,
        device,
        prefetch=prefetch,
        verify=verify,
        mode=mode,
        threads=threads,
        pinned=pinned,
        strict=strict,
    )
    model.qtensors_offload = handle  # type: ignore[assignment]
    return model
