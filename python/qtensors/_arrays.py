"""Arrays in and out: numpy and torch tensors to contiguous bytes plus a dtype name, and buffers
back to arrays of either framework without copies."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_NP_BY_NAME: dict[str, Any] = {
    "bool": np.bool_,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
    "uint32": np.uint32,
    "int32": np.int32,
    "uint64": np.uint64,
    "int64": np.int64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}
#: Dtypes numpy lacks, as the unsigned integers of their bits.
_BITS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}
_NAME_BY_NP = {np.dtype(v): k for k, v in _NP_BY_NAME.items()}

FRAMEWORKS = {"np": "np", "numpy": "np", "pt": "pt", "torch": "pt"}


def normalize_framework(framework: str) -> str:
    try:
        return FRAMEWORKS[framework]
    except KeyError:
        raise ValueError(
            f"framework {framework!r} is not supported: use 'np' (numpy) or 'pt' (torch)"
        ) from None


def _torch():
    import torch

    return torch


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    torch = _torch()
    names = [*_NP_BY_NAME, "bfloat16", "float8_e4m3fn", "float8_e5m2"]
    return {n: getattr(torch, n) for n in names if n != "bool"} | {"bool": torch.bool}


def torch_dtype(name: str):
    """The torch dtype of a qtensors dtype name (every dtype of spec section 3)."""
    return _torch_dtypes()[name]


def itemsize(name: str) -> int:
    """Bytes per element of a qtensors dtype name (spec section 3)."""
    return np.dtype(_NP_BY_NAME.get(name) or _BITS[name]).itemsize


def numpy_dtype(name: str) -> np.dtype:
    if name not in _NP_BY_NAME:
        raise TypeError(
            f"numpy has no {name} dtype: open the file with framework='pt' to get torch tensors"
        )
    return np.dtype(_NP_BY_NAME[name])


def is_torch_tensor(x: Any) -> bool:
    t = type(x)
    return t.__module__.startswith("torch") and t.__name__ in ("Tensor", "Parameter")


def as_bytes(x: Any) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """A contiguous 1-D uint8 view of `x`'s values (copying only when `x` is not contiguous or
    not on the CPU), its dtype name and its shape."""
    if is_torch_tensor(x):
        torch = _torch()
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype).removeprefix("torch.")
        shape = tuple(t.shape)
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            flat = t.reshape(-1).view(torch.uint8 if t.element_size() == 1 else torch.int16)
            arr = flat.numpy()
        else:
            arr = t.reshape(-1).numpy()
        return arr.view(np.uint8).reshape(-1), name, shape
    arr = np.asarray(x)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    name = _NAME_BY_NP.get(arr.dtype)
    if name is None:
        raise TypeError(
            f"dtype {arr.dtype} is not supported: qtensors stores bool, (u)int8-64 and"
            " float16/32/64 numpy arrays, and bfloat16/float8 torch tensors"
        )
    shape = tuple(arr.shape)
    arr = np.ascontiguousarray(arr)
    return arr.reshape(-1).view(np.uint8), name, shape


def from_buffer(
    buf: Any,
    dtype: str,
    shape: tuple[int, ...],
    framework: str,
    offset: int = 0,
    writable: bool = True,
    bf16_bits: bool = False,
):
    """An array of `framework` viewing the bytes of `buf` at `offset` (no copy). With numpy,
    bfloat16 and float8 data come back as their raw bits (uint16, uint8) when `bf16_bits`, else
    raise TypeError."""
    n = 1
    for d in shape:
        n *= d
    if framework == "np":
        bits = _BITS.get(dtype) if bf16_bits else None
        dt = np.dtype(bits) if bits is not None else numpy_dtype(dtype)
        a = np.frombuffer(buf, dtype=dt, count=n, offset=offset).reshape(shape)
        if not writable:
            a.flags.writeable = False
        return a
    torch = _torch()
    tdt = torch_dtype(dtype)
    if n == 0:
        return torch.empty(shape, dtype=tdt)
    import warnings

    with warnings.catch_warnings():
        # The buffers we hand over are writable (private mappings); the warning is about others.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(buf, dtype=tdt, count=n, offset=offset)
    return t.reshape(shape)
