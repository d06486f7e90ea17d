"""`QuantizedTensor`: the parts of one encoded tensor, and `quantize` / `dequantize`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import _core
from ._arrays import as_bytes, from_buffer, normalize_framework
from .encodings import Encoding, Raw, as_encoding, from_dict

PART_NAMES = {
    "raw": ("data",),
    "affine": ("codes", "scales", "mins"),
    "symmetric": ("codes", "scales"),
    "nf4": ("codes", "scales"),
    "mxfp4": ("codes", "scales"),
    "nvfp4": ("codes", "scales", "tensor_scale"),
}


@dataclass
class QuantizedTensor:
    """A tensor in its stored form.

    `codes` is the packed code stream (uint8, 1-D); `scales` and `mins` have the shape of the
    tensor with the group axis cut to its number of groups (spec 4.1), in the scale dtype
    (numpy returns bfloat16 and float8 scales as their raw bits: uint16, uint8; mxfp4's E8M0
    scales are uint8 exponents). `mins` is None without mins, `tensor_scale` (fp32, shape [])
    None except for nvfp4. For raw tensors `codes` holds the data and `scales` is None.
    """

    codes: Any
    scales: Any
    mins: Any
    shape: tuple[int, ...]
    dtype: str
    encoding: dict[str, Any]
    framework: str = "np"
    _owner: Any = field(default=None, repr=False, compare=False)
    tensor_scale: Any = None

    @property
    def encoding_object(self) -> Encoding:
        return from_dict(self.encoding)

    def parts(self) -> list[Any]:
        """The parts in file order."""
        return [p for p in (self.codes, self.scales, self.mins, self.tensor_scale) if p is not None]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts())

    def dequantize(self, framework: str | None = None):
        return dequantize(self, framework=framework)


def _part_dtype(encoding: dict[str, Any], part: str, logical: str) -> str:
    if part == "codes":
        return "uint8"
    if part == "data":
        return logical
    if part == "tensor_scale":
        return "float32"
    return str(encoding["scale_dtype"])


def _part_shape(encoding: dict[str, Any], part: str, shape: tuple[int, ...], nbytes: int):
    if part in ("codes",):
        return (nbytes,)
    if part == "data":
        return shape
    if part == "tensor_scale":
        return ()
    if not shape:
        return (1,)
    s = list(shape)
    a = encoding["axis"]
    g = encoding["group_size"]
    s[a] = -(-s[a] // g)
    return tuple(s)


def wrap_parts(
    bufs: list[Any],
    offsets: list[int],
    lengths: list[int],
    shape: tuple[int, ...],
    dtype: str,
    encoding: dict[str, Any],
    framework: str,
    writable: bool,
    owner: Any = None,
) -> QuantizedTensor:
    """Build a QuantizedTensor whose parts view `bufs` (no copy)."""
    names = PART_NAMES[encoding["name"]]
    arrays: dict[str, Any] = {}
    for name, buf, off, ln in zip(names, bufs, offsets, lengths, strict=True):
        pdt = _part_dtype(encoding, name, dtype)
        pshape = _part_shape(encoding, name, shape, ln)
        arrays[name] = from_buffer(
            buf, pdt, pshape, framework, offset=off, writable=writable, bf16_bits=True
        )
    if encoding["name"] == "raw":
        return QuantizedTensor(arrays["data"], None, None, shape, dtype, encoding, framework, owner)
    return QuantizedTensor(
        arrays["codes"],
        arrays["scales"],
        arrays.get("mins"),
        shape,
        dtype,
        encoding,
        framework,
        owner,
        arrays.get("tensor_scale"),
    )


def quantize(x: Any, encoding: Encoding | str, framework: str | None = None) -> QuantizedTensor:
    """Encode a numpy array or torch tensor with an encoding or a preset name ("nf4", ...).
    `framework` of the parts defaults to the input's."""
    encoding = as_encoding(encoding, "encoding")
    data, dtype, shape = as_bytes(x)
    from ._arrays import is_torch_tensor

    fw = normalize_framework(framework) if framework else ("pt" if is_torch_tensor(x) else "np")
    enc = encoding.to_dict(len(shape)) if not isinstance(encoding, Raw) else {"name": "raw"}
    bufs = _core.encode(data, dtype, list(shape), json.dumps(enc))
    return wrap_parts(
        bufs,
        [0] * len(bufs),
        [len(b) for b in bufs],
        shape,
        dtype,
        enc,
        fw,
        writable=True,
    )


def dequantize(q: QuantizedTensor, framework: str | None = None):
    """Decode to the logical dtype, as numpy or torch (default: the tensor's framework)."""
    fw = normalize_framework(framework) if framework else q.framework
    parts = [as_bytes(p)[0] for p in q.parts()]
    buf = _core.decode(parts, q.dtype, list(q.shape), json.dumps(q.encoding))
    return from_buffer(buf, q.dtype, tuple(q.shape), fw)
