"""Reading safetensors inputs (a file, or a model folder of shards) through the `safetensors`
package, one tensor at a time and with bounded memory.

Listing reads only headers. `read` opens the file afresh for every tensor: with torch, safetensors
hands out tensors that view a private memory map of the whole file, and the pages a tensor touched
stay in the process (and in its peak RSS) for as long as that map lives. Opening per tensor ties
the map's life to the tensor, so memory stays bounded by the tensors in flight, not the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import QtensorsError

#: safetensors dtype names -> qtensors dtype names (spec section 3).
ST_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
ITEMSIZE = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "uint32": 4,
    "int32": 4,
    "uint64": 8,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
#: dtypes numpy cannot hold: reading them needs torch.
TORCH_ONLY = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}


class InputError(QtensorsError, ValueError):
    """The input is not a safetensors file or model folder we can convert."""


def _safetensors():
    try:
        import safetensors
    except ImportError:  # pragma: no cover - depends on the environment
        raise InputError(
            "reading safetensors files needs the safetensors package: "
            "pip install 'qtensors[convert]' (or pip install safetensors)"
        ) from None
    return safetensors


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return True


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, from its header alone."""

    name: str
    dtype: str  # qtensors dtype name
    shape: tuple[int, ...]
    path: str  # the safetensors file holding it

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * ITEMSIZE[self.dtype]


def list_file(path: str) -> tuple[dict[str, str], list[Entry]]:
    """The metadata and the tensors (in file order) of a safetensors file, from its header."""
    st = _safetensors()
    try:
        with st.safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
            keys = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            entries = []
            for k in keys:
                sl = f.get_slice(k)
                st_dtype = sl.get_dtype()
                dtype = ST_DTYPES.get(st_dtype)
                if dtype is None:
                    raise InputError(
                        f"{path}: tensor {k!r} has dtype {st_dtype}, which qtensors cannot store"
                    )
                entries.append(Entry(k, dtype, tuple(int(d) for d in sl.get_shape()), path))
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise InputError(f"cannot read {path} as a safetensors file: {e}") from e
    return meta, entries


def framework_for(dtypes: Iterable[str]) -> str:
    """numpy ("np") unless a dtype needs torch ("pt"): numpy imports in a blink, torch in a
    second or two, and the encoder works from either."""
    need = sorted(set(dtypes) & TORCH_ONLY)
    if not need:
        return "np"
    if not have_torch():
        raise InputError(
            f"{', '.join(need)} tensors need torch, which numpy cannot hold: pip install torch"
        )
    return "pt"


class TensorReader:
    """Reads tensors one at a time through safetensors, reusing a file handle for at most
    `budget` bytes of tensors: the pages a handle's memory map touched stay resident (and count
    in the RSS) until the handle and every tensor viewing it are gone, so a fresh handle every
    `budget` bytes bounds that memory; reusing it meanwhile keeps many small tensors cheap
    (opening parses the whole header)."""

    def __init__(self, framework: str, budget: int = 64 << 20) -> None:
        self.framework = framework
        self.budget = budget
        self._handle: Any = None
        self._path: str | None = None
        self._used = 0

    def read(self, entry: Entry) -> Any:
        """With "np" a numpy array (a copy, read now); with "pt" a torch tensor viewing a private
        map of the file (read when touched, see `touch`)."""
        if self.framework == "np" and entry.dtype in TORCH_ONLY:
            raise InputError(
                f"tensor {entry.name!r} in {entry.path} is {entry.dtype}, which numpy cannot "
                "hold: install torch to convert it"
            )
        if self._handle is None or self._path != entry.path or self._used >= self.budget:
            self.close()
            self._handle = _safetensors().safe_open(entry.path, framework=self.framework)
            self._path = entry.path
        self._used += entry.nbytes
        return self._handle.get_tensor(entry.name)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._path, self._used = None, None, 0


def touch(x: Any) -> None:
    """Fault in every page of a lazily mapped torch tensor (reads it from disk, GIL released)."""
    if not hasattr(x, "untyped_storage"):
        return
    import torch

    n = x.numel()
    if n == 0:
        return
    flat = x.reshape(-1).view(torch.uint8)  # any dtype, bool and float8 included
    # One byte per 4 KiB page; the kernel's fault-around and readahead take the rest.
    flat[::4096].sum()


# -- model folders -----------------------------------------------------------------------------


@dataclass
class Index:
    """A `*.safetensors.index.json` file: which shard holds each tensor."""

    path: str  # relative to the folder
    metadata: dict[str, Any]
    weight_map: dict[str, str]
    extra: dict[str, Any]


def read_index(folder: str, rel: str) -> Index:
    full = os.path.join(folder, rel)
    try:
        with open(full, encoding="utf-8") as fh:
            doc = json.load(fh)
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{full} is not a valid safetensors index: {e}") from e
    extra = {k: v for k, v in doc.items() if k not in ("metadata", "weight_map")}
    return Index(rel, dict(doc.get("metadata") or {}), dict(weight_map), extra)


def walk_folder(folder: str) -> list[str]:
    """Every file of `folder`, as sorted relative paths with '/' separators (hidden entries and
    symlinked folders skipped)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fn in sorted(files):
            if fn.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(root, fn), folder)
            out.append(rel.replace(os.sep, "/"))
    return out


def model_weight_files(folder: str) -> list[str]:
    """The top-level weight files of a model folder: the shards its index names (in index
    order of first appearance), else every top-level `*.safetensors` file."""
    top = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    indexes = [f for f in top if f.endswith(".safetensors.index.json")]
    if indexes:
        shards: list[str] = []
        for ix in indexes:
            for shard in read_index(folder, ix).weight_map.values():
                if shard not in shards:
                    shards.append(shard)
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise InputError(f"{folder}: the index names shards that are missing: {missing}")
        return shards
    files = [f for f in top if f.endswith(".safetensors")]
    if not files:
        raise InputError(f"{folder} holds no .safetensors file")
    return files
