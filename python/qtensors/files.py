"""The safetensors-like file API: `save_file`, `load_file` and lazy `safe_open` handles."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from . import _core
from ._arrays import FRAMEWORKS, as_bytes, from_buffer, normalize_framework
from .encodings import QuantSpec, Raw, choose_encoding
from .quantized import QuantizedTensor, wrap_parts
from .slices import TensorSlice

DEFAULT_ALIGNMENT = 64
DIRECT_IO_ALIGNMENT = 4096


def save_file(
    tensors: Mapping[str, Any],
    filename: str | os.PathLike[str],
    quant: QuantSpec = None,
    metadata: Mapping[str, str] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    *,
    compression: str | None = None,
    lossless: bool = False,
) -> None:
    """Write `tensors` (numpy arrays, torch tensors or QuantizedTensors) to `filename`.

    `quant` picks each tensor's encoding (see `qtensors.encodings.choose_encoding`): None (the
    default) stores float tensors of rank >= 2 as FLEXGEN (4-bit, group 64, axis 0) and the
    rest raw; an encoding (`qt.NF4()`) or a preset name (`"nf4"`, `"int8"`, ...) replaces
    FLEXGEN; `"raw"` stores everything raw; a mapping `{pattern: encoding, preset name or "raw"}`
    decides by name (None there also means raw). QuantizedTensors are stored as they are.
    `metadata` maps str to str (anything else raises TypeError, as in safetensors).
    `alignment=4096` aligns every part for direct I/O.
    `compression="zstd"`: parts are compressed in independent 1 MiB chunks where that saves at
    least 5% (floats split into byte planes first; spec 2.1), and reads still decode only the
    chunks they need. `lossless=True`: every tensor stored raw and compressed (`quant` must be
    left unset): `load_file` gives back identical bytes, in a smaller file than safetensors'.
    The file appears atomically: on any error nothing is left under `filename`.
    """
    from .encodings import normalize_quant

    compression = _check_compression(compression, lossless, quant)
    if lossless:
        quant = "raw"
    quant = normalize_quant(quant)
    meta = dict(metadata or {})
    for k, v in meta.items():  # as safetensors: a silent str() would change what readers get
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata keys and values must be str, not {type(k).__name__}: "
                f"{type(v).__name__} ({k!r}: {v!r}); convert them first, e.g. json.dumps(value)"
            )
    plans: list[tuple[str, str, list[int], str]] = []
    sources: list[tuple[str, Any]] = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, not {type(name).__name__}")
        if isinstance(value, QuantizedTensor):
            plans.append((name, value.dtype, list(value.shape), json.dumps(value.encoding)))
            sources.append(("parts", value))
            continue
        data, dtype, shape = as_bytes(value)
        enc = choose_encoding(name, dtype, shape, quant)
        enc_dict = {"name": "raw"} if isinstance(enc, Raw) else enc.to_dict(len(shape))
        plans.append((name, dtype, list(shape), json.dumps(enc_dict)))
        sources.append(("values", (data, dtype)))
    writer = _core.Writer(os.fspath(filename), plans, meta, alignment, compression)
    try:
        for i, (kind, src) in enumerate(sources):
            if kind == "parts":
                writer.write_parts(i, [as_bytes(p)[0] for p in src.parts()])
            else:
                data, dtype = src
                writer.write_tensor(i, data, dtype)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


COMPRESSIONS = ("zstd",)


def _check_compression(compression: str | None, lossless: bool, quant: QuantSpec) -> str | None:
    """The codec to write with: `compression`, or zstd for `lossless`."""
    if compression is not None and compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {COMPRESSIONS} (or None)")
    if lossless:
        if quant is not None and quant != "raw":
            raise ValueError("lossless=True stores every tensor raw: leave quant unset")
        return compression or "zstd"
    return compression


def load_file(
    filename: str | os.PathLike[str], device: str = "cpu", *, framework: str | None = None
) -> dict[str, Any]:
    """Read every tensor, decoded to its original dtype.

    As `safetensors.torch.load_file(filename, device)`: the second argument is the device. The
    result is numpy arrays, or torch tensors with `framework="pt"` or any device but "cpu".
    """
    fw = _framework_for(device, framework)
    with safe_open(filename, framework=fw, device=device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def save(
    tensors: Mapping[str, Any],
    quant: QuantSpec = None,
    metadata: Mapping[str, str] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
) -> bytes:
    """The bytes of the file `save_file` would write (as `safetensors.torch.save`)."""
    with tempfile.TemporaryDirectory(prefix="qtensors-") as tmp:
        path = os.path.join(tmp, "tensors.qtensors")
        save_file(tensors, path, quant=quant, metadata=metadata, alignment=alignment)
        with open(path, "rb") as f:
            return f.read()


def load(
    data: bytes | bytearray | memoryview, device: str = "cpu", *, framework: str | None = None
) -> dict[str, Any]:
    """Every tensor of a qtensors file held in memory (as `safetensors.torch.load`), validated
    exactly as a file on disk is."""
    fw = _framework_for(device, framework)
    with _in_memory_file(data) as path, safe_open(path, framework=fw, device=device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _framework_for(device: Any, framework: str | None) -> str:
    """numpy by default; torch when asked or when the device is not the CPU."""
    if not isinstance(device, str) and type(device).__name__ != "device":
        raise TypeError(f"device must be a str or torch.device, not {type(device).__name__}")
    if str(device) in FRAMEWORKS:
        raise TypeError(
            f"the second argument of load_file/load is the device (as in safetensors.torch."
            f"load_file), not the framework {device!r}: pass framework={device!r}"
        )
    if framework is None:
        return "np" if str(device) == "cpu" else "pt"
    fw = normalize_framework(framework)
    if fw == "np" and str(device) != "cpu":
        raise ValueError(f"numpy arrays live on the CPU: use framework='pt' for device {device!r}")
    return fw


@contextlib.contextmanager
def _in_memory_file(data: bytes | bytearray | memoryview) -> Iterator[str]:
    """A path to `data`: an anonymous in-memory file where the OS has them (Linux), else a
    temporary file that is removed afterwards."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("qtensors-load", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="qtensors-") as tmp:
        path = os.path.join(tmp, "tensors.qtensors")
        with open(path, "wb") as f:
            f.write(data)
        yield path


class safe_open:
    """A lazy, memory-mapped view of a qtensors file.

    Opening validates the whole header (never the data) so it is instant; tensors are decoded
    on demand. `get_quantized` returns the stored parts as zero-copy views of the file.
    Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        framework: str = "np",
        device: str = "cpu",
        verify: bool = False,
    ) -> None:
        self._framework = normalize_framework(framework)
        self._device = device
        self._reader: Any = _core.Reader(os.fspath(filename))
        # The header is validated in Rust; Python holds only the names and reads an entry when
        # a tensor is asked for, so opening costs no JSON parse of the whole header.
        self._names: list[str] = self._reader.names()
        self._name_set = frozenset(self._names)
        self._entries: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, str] = self._reader.metadata()
        self._data_start: int = self._reader.data_start
        self.alignment: int = self._reader.alignment
        if verify:
            self.verify()

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget the file. Views already handed out keep the mapping alive until they go."""
        self._reader = None

    def _open_reader(self):
        if self._reader is None:
            raise ValueError("this qtensors file is closed")
        return self._reader

    # -- listing ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def _info(self, name: str) -> dict[str, Any]:
        entry = self._entries.get(name)
        if entry is None:
            if name not in self._name_set:
                raise KeyError(f"no tensor named {name!r} in this file")
            entry = json.loads(self._open_reader().tensor_json(name))
            self._entries[name] = entry
        return entry

    def encoding(self, name: str) -> dict[str, Any]:
        return dict(self._info(name)["encoding"])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> str:
        return str(self._info(name)["dtype"])

    def tensor_info(self, name: str) -> dict[str, Any]:
        """The header entry of a tensor: dtype, shape, encoding and parts."""
        return json.loads(json.dumps(self._info(name)))

    # -- data ------------------------------------------------------------------------------
    def get_tensor(self, name: str):
        """The tensor decoded to its original dtype (a new array)."""
        info = self._info(name)
        buf = self._open_reader().decode(name)
        t = from_buffer(buf, info["dtype"], tuple(info["shape"]), self._framework)
        if self._framework == "pt" and self._device != "cpu":
            t = t.to(self._device)
        return t

    def get_slice(self, name: str) -> TensorSlice:
        """A lazily indexed view of a tensor: `f.get_slice(name)[:, 1024:2048]` decodes only
        the selected box (reading only the groups it touches); `get_shape()`, `get_dtype()`."""
        self._info(name)
        return TensorSlice(self, name)

    def _decode_box(self, name: str, box: list[tuple[int, int]]):
        info = self._info(name)
        buf = self._open_reader().decode(name, region=box)
        shape = tuple(b - a for a, b in box)
        t = from_buffer(buf, info["dtype"], shape, self._framework)
        if self._framework == "pt" and self._device != "cpu":
            t = t.to(self._device)
        return t

    def get_quantized(self, name: str) -> QuantizedTensor:
        """The stored parts as zero-copy views of the file (read-only with numpy; with torch,
        writable private copy-on-write pages: writes never reach the file). Compressed parts
        are decompressed into new buffers instead (no zero-copy for them)."""
        info = self._info(name)
        reader = self._open_reader()
        reader.check_unchanged()  # torch.frombuffer would hide the buffer export's FormatError
        enc = info["encoding"]
        from .quantized import PART_NAMES

        names = PART_NAMES[enc["name"]]
        parts = [info["parts"][n] for n in names]
        if info["dtype"] == "bool":
            # The view must not show numpy and torch different values (spec 3): check the bytes.
            reader.decode(name)
        # Compressed parts cannot be views of the file: they are decoded into new buffers.
        bufs = [
            reader.decode_part(name, n) if "compression" in p else reader
            for n, p in zip(names, parts, strict=True)
        ]
        return wrap_parts(
            bufs,
            [0 if "compression" in p else self._data_start + p["offset"] for p in parts],
            [len(b) if b is not reader else p["length"] for b, p in zip(bufs, parts, strict=True)],
            tuple(info["shape"]),
            info["dtype"],
            enc,
            self._framework,
            writable=self._framework == "pt",
            owner=reader,
        )

    def verify(self, name: str | None = None) -> None:
        """Check checksums (of one tensor, or all); raises ChecksumError naming the tensor/part."""
        self._open_reader().verify(name)
