"""A transformers model built without its weights (``qtensors.torch.init_empty_weights``),
filled from the folder's safetensors shards one module at a time: ``convert --method`` holds
the parts outside the blocks (embeddings, final norm, head), one block in float at a time, and
the quantized blocks already done, never the float model.

Only the shards' headers are read up front (``_source.list_file``); a module's tensors are
copied out of the shards when it is materialised (``_source.TensorReader``, whose memory maps
are dropped after each module); a block's float linears are freed when the runner swaps them
for quantized ones.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import nn

from .. import _source


class ShardWeights:
    """Where each tensor of a model folder's safetensors shards lives, from the headers."""

    def __init__(self, folder: str) -> None:
        self.entries: dict[str, _source.Entry] = {}
        for rel in _source.model_weight_files(folder):
            for e in _source.list_file(os.path.join(folder, rel))[1]:
                self.entries[e.name] = e
        self.nbytes = sum(e.nbytes for e in self.entries.values())

    def materialize(
        self,
        module: nn.Module,
        prefix: str,
        dtype: torch.dtype,
        exclude: nn.Module | None = None,
    ) -> None:
        """Give every meta parameter of ``module`` (named ``prefix + name`` in the shards; not
        those inside ``exclude``) its value from the shards, floating ones as ``dtype``, on the
        CPU. A parameter shared by several modules (tied embeddings and head) is read once."""
        skip = set() if exclude is None else {id(m) for m in exclude.modules()}
        done: dict[int, nn.Parameter] = {}
        reader = _source.TensorReader("pt")
        try:
            for mname, mod in module.named_modules(remove_duplicate=False):
                if id(mod) in skip:
                    continue
                for leaf, p in list(mod._parameters.items()):
                    if p is None or not p.is_meta:
                        continue
                    if id(p) not in done:
                        name = f"{prefix}{mname}.{leaf}" if mname else prefix + leaf
                        done[id(p)] = self._read(reader, name, p, dtype)
                    mod._parameters[leaf] = done[id(p)]
        finally:
            reader.close()

    def _read(
        self, reader: _source.TensorReader, name: str, p: nn.Parameter, dtype: torch.dtype
    ) -> nn.Parameter:
        entry = self.entries.get(name)
        if entry is None:
            raise _source.InputError(f"the model's {name} is in no safetensors shard")
        if tuple(p.shape) != entry.shape:
            raise _source.InputError(
                f"{name}: {list(entry.shape)} in {entry.path}, the model expects {list(p.shape)}"
            )
        t = reader.read(entry)  # a view of the shard's memory map: copy it out
        t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
        return nn.Parameter(t, requires_grad=False)


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Freed float blocks otherwise stay in the process: after the first large buffer is freed,
    glibc raises its mmap threshold, later same-sized buffers come from the heap, and the
    heap, fragmented by the small allocations between them, is not shrunk (measured on
    SmolLM2: +8 MiB kept per block without it, the quantized block's 1.9 MiB with it)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass
