"""A fast, checked reader of a GGUF file's header (metadata and tensor table), its tensor data
memory-mapped.

gguf's own `GGUFReader` builds a numpy object for every element of every metadata array (a
tokenizer's 50k tokens and merges), which takes 12 s for SmolLM2-135M on the development machine,
longer than the whole import is allowed; this reads the same header in well under a second. The
tests check it against `GGUFReader` field by field. Every count and length is checked against
the bytes left before it is used, so a malformed file raises `ForeignFormatError` (naming the
key or tensor), never allocates by an unchecked number.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import ForeignFormatError

# GGUF metadata value types (the gguf spec's gguf_type), as (struct code, numpy dtype).
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass
class Field:
    """A metadata value: `type` is the GGUF value type; arrays have `item_type` and a list (of
    str) or a numpy array (of numbers) as `value`."""

    type: int
    value: Any
    item_type: int | None = None


@dataclass
class TensorInfo:
    name: str
    type_name: str
    type_id: int
    #: numpy order (GGUF lists ne[0], the innermost dimension, first)
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    data: np.ndarray  # uint8 bytes of the tensor, a view of the file's memory map


class GGUFFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        import gguf

        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                self._fail(f"{size} bytes is too short for a GGUF header")
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self._pos = 0
        if bytes(self._buf[:4]) != b"GGUF":
            self._fail("does not start with the magic bytes GGUF")
        self._pos = 4
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            self._fail(f"GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        # every entry takes at least 8 + 4 bytes: counts beyond that are lies
        if n_kv > size // 12 or n_tensors > size // 12:
            self._fail(f"claims {n_kv} metadata keys and {n_tensors} tensors in {size} bytes")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string("a metadata key")
            vtype = self._scalar(4)
            if key in self.fields:
                self._fail(f"metadata key {key!r} appears twice")
            self.fields[key] = self._value(vtype, key)
        align = self.fields.get("general.alignment")
        alignment = int(align.value) if align is not None else 32
        if alignment <= 0 or alignment & (alignment - 1):
            self._fail(f"general.alignment {alignment} is not a power of two")
        raw_tensors = []
        for _ in range(n_tensors):
            name = self._string("a tensor name")
            n_dims = self._scalar(4)
            if n_dims > MAX_DIMS:
                self._fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [self._scalar(10) for _ in range(n_dims)]
            type_id, offset = self._scalar(4), self._scalar(10)
            raw_tensors.append((name, ne, type_id, offset))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: list[TensorInfo] = []
        seen: set[str] = set()
        for name, ne, type_id, offset in raw_tensors:
            if name in seen:
                self._fail(f"tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                self._fail(f"tensor {name!r} has unknown type {type_id}")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in ne:
                n *= d
            if ne and ne[0] % block:
                self._fail(
                    f"tensor {name!r} ({qtype.name}): rows of {ne[0]} elements are not whole "
                    f"blocks of {block}"
                )
            nbytes = n // block * type_size
            start = data_start + offset
            if offset % alignment or start + nbytes > size:
                self._fail(
                    f"tensor {name!r} ({qtype.name}): {nbytes} bytes at offset {offset} do not "
                    f"fit in the file ({size} bytes, data from {data_start}) or are misaligned"
                )
            data = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=start)
            shape = tuple(int(d) for d in reversed(ne))
            self.tensors.append(TensorInfo(name, qtype.name, type_id, shape, offset, nbytes, data))

    def _fail(self, msg: str) -> None:
        raise ForeignFormatError(f"GGUF {self.path}: {msg}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > len(self._buf):
            self._fail(f"truncated: {what} needs {n} bytes at offset {self._pos}")

    def _scalar(self, vtype: int) -> Any:
        code, _ = _SCALARS[vtype]
        n = struct.calcsize(code)
        self._need(n, "a value")
        (v,) = struct.unpack_from(code, self._buf, self._pos)
        self._pos += n
        return v

    def _string(self, what: str) -> str:
        n = self._scalar(10)
        self._need(n, what)
        raw = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not UTF-8")
            raise AssertionError from None

    def _value(self, vtype: int, key: str) -> Field:
        if vtype in _SCALARS:
            return Field(vtype, self._scalar(vtype))
        if vtype == STRING:
            return Field(STRING, self._string(f"the value of {key!r}"))
        if vtype != ARRAY:
            self._fail(f"metadata key {key!r} has unknown value type {vtype}")
        item, count = self._scalar(4), self._scalar(10)
        if item in _SCALARS:
            dt = np.dtype(_SCALARS[item][1]).newbyteorder("<")
            self._need(count * dt.itemsize, f"the array {key!r}")
            arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=self._pos).copy()
            self._pos += count * dt.itemsize
            return Field(ARRAY, arr, item)
        if item == STRING:
            self._need(count * 8, f"the array {key!r}")
            return Field(
                ARRAY, [self._string(f"an element of {key!r}") for _ in range(count)], item
            )
        self._fail(f"metadata array {key!r} has items of type {item} (nested arrays unsupported)")
        raise AssertionError

    def string(self, key: str) -> str | None:
        f = self.fields.get(key)
        return f.value if f is not None and f.type == STRING else None

    # -- what transformers reads ------------------------------------------------------------------

    def as_gguf_reader(self) -> Any:
        """An object with the `fields` and `tensors` of gguf's GGUFReader, in the shape
        transformers' `load_gguf_checkpoint` reads them (`parts[i]` for each `data` index,
        `types`): strings as bytes, numbers as 1-element lists."""
        fields = {}
        for key, f in self.fields.items():
            if f.type == ARRAY:
                if f.item_type == STRING:
                    parts = [s.encode("utf-8") for s in f.value]
                else:
                    parts = [[v] for v in f.value.tolist()]
                fields[key] = SimpleNamespace(
                    name=key, parts=parts, data=list(range(len(parts))), types=[ARRAY, f.item_type]
                )
            elif f.type == STRING:
                fields[key] = SimpleNamespace(
                    name=key, parts=[f.value.encode("utf-8")], data=[0], types=[STRING]
                )
            else:
                fields[key] = SimpleNamespace(name=key, parts=[[f.value]], data=[0], types=[f.type])
        tensors = [SimpleNamespace(name=t.name) for t in self.tensors]
        return SimpleNamespace(fields=fields, tensors=tensors)
