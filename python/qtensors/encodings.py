"""Encodings a tensor can be stored in, and the policy that picks one per tensor.

An encoding is a small frozen dataclass; `to_dict(rank)` gives the header form (spec section 4)
with the axis normalized for a tensor of that rank.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

SCALE_DTYPES = ("float16", "bfloat16", "float32")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _normalize_axis(axis: int, rank: int) -> int:
    r = max(rank, 1)
    if not -r <= axis < r:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % r


@dataclass(frozen=True)
class Raw:
    """Stored byte for byte (any dtype)."""

    name: ClassVar[str] = "raw"

    def to_dict(self, rank: int = 0) -> dict[str, Any]:
        return {"name": "raw"}


@dataclass(frozen=True)
class _Grouped:
    bits: int = 4
    group_size: int = 64
    axis: int = -1
    scale_dtype: str = "float16"

    name: ClassVar[str] = "?"
    _bits_range: ClassVar[tuple[int, int]] = (1, 8)

    def __post_init__(self) -> None:
        lo, hi = self._bits_range
        if not isinstance(self.bits, int) or not lo <= self.bits <= hi:
            raise ValueError(
                f"{self.name}: bits must be an integer in {lo}..{hi}, not {self.bits!r}"
            )
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"{self.name}: group_size must be a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"{self.name}: scale_dtype must be one of {SCALE_DTYPES}")

    def to_dict(self, rank: int = 2) -> dict[str, Any]:
        return {
            "name": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": _normalize_axis(self.axis, rank),
            "scale_dtype": self.scale_dtype,
        }


@dataclass(frozen=True)
class Affine(_Grouped):
    """Asymmetric min-max per group: x ≈ code * scale + min (FlexGen's scheme)."""

    name: ClassVar[str] = "affine"


LEVELS = ("balanced", "full")


@dataclass(frozen=True)
class Symmetric(_Grouped):
    """Absmax per group: x ≈ (code - 2^(bits-1)) * scale.

    `levels="balanced"` (default) uses the 2^bits - 1 codes symmetric around zero, scale =
    absmax / (2^(bits-1) - 1); `levels="full"` uses all 2^bits codes as llama.cpp's Q4_0 does:
    scale = (the value of largest magnitude) / -2^(bits-1), which may be negative (spec 4.6).
    """

    bits: int = 8
    group_size: int = 128
    levels: str = "balanced"
    name: ClassVar[str] = "symmetric"
    _bits_range: ClassVar[tuple[int, int]] = (2, 8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels not in LEVELS:
            raise ValueError(f"symmetric: levels must be one of {LEVELS}, not {self.levels!r}")

    def to_dict(self, rank: int = 2) -> dict[str, Any]:
        d = super().to_dict(rank)
        if self.levels == "full":
            d["levels"] = "full"
        return d


@dataclass(frozen=True)
class NF4:
    """bitsandbytes' NormalFloat-4 levels scaled by each group's absmax (always 4 bits)."""

    group_size: int = 64
    axis: int = -1
    scale_dtype: str = "float16"

    name: ClassVar[str] = "nf4"
    bits: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError("nf4: group_size must be a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"nf4: scale_dtype must be one of {SCALE_DTYPES}")

    def to_dict(self, rank: int = 2) -> dict[str, Any]:
        return {
            "name": "nf4",
            "bits": 4,
            "group_size": self.group_size,
            "axis": _normalize_axis(self.axis, rank),
            "scale_dtype": self.scale_dtype,
        }


@dataclass(frozen=True)
class _Fp4Block:
    """An FP4 block format: E2M1 elements, with the block size and scale type the format fixes;
    only the axis is free."""

    axis: int = -1

    name: ClassVar[str] = "?"
    bits: ClassVar[int] = 4
    group_size: ClassVar[int] = 0
    scale_dtype: ClassVar[str] = "?"

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int):
            raise ValueError(f"{self.name}: axis must be an integer, not {self.axis!r}")

    def to_dict(self, rank: int = 2) -> dict[str, Any]:
        # The fixed parameters are written too, so that headers describe themselves.
        return {
            "name": self.name,
            "bits": 4,
            "group_size": self.group_size,
            "axis": _normalize_axis(self.axis, rank),
            "scale_dtype": self.scale_dtype,
        }


@dataclass(frozen=True)
class MXFP4(_Fp4Block):
    """OCP Microscaling FP4: blocks of 32 E2M1 values sharing a power-of-two (E8M0) scale."""

    name: ClassVar[str] = "mxfp4"
    group_size: ClassVar[int] = 32
    scale_dtype: ClassVar[str] = "uint8"


@dataclass(frozen=True)
class NVFP4(_Fp4Block):
    """NVIDIA FP4: blocks of 16 E2M1 values with an E4M3 scale, times one fp32 tensor scale."""

    name: ClassVar[str] = "nvfp4"
    group_size: ClassVar[int] = 16
    scale_dtype: ClassVar[str] = "float8_e4m3fn"


Encoding = Raw | Affine | Symmetric | NF4 | MXFP4 | NVFP4

#: 4-bit, group 64 along axis 0, fp16 scale and min: how FlexLLMGen stores weights.
FLEXGEN = Affine(bits=4, group_size=64, axis=0)

PRESETS: dict[str, Encoding] = {
    "flexgen": FLEXGEN,
    "int4-g64": Affine(bits=4, group_size=64, axis=-1),
    "int4-g128": Affine(bits=4, group_size=128, axis=-1),
    "nf4": NF4(group_size=64, axis=-1),
    "int8": Symmetric(bits=8, group_size=128, axis=-1),
    "mxfp4": MXFP4(),
    "nvfp4": NVFP4(),
}


def from_dict(d: Mapping[str, Any]) -> Encoding:
    """The encoding object of a header `encoding` dict."""
    name = d.get("name")
    if name == "raw":
        return Raw()
    cls = {
        "affine": Affine,
        "symmetric": Symmetric,
        "nf4": NF4,
        "mxfp4": MXFP4,
        "nvfp4": NVFP4,
    }.get(str(name))
    if cls is None:
        from .errors import UnsupportedError

        raise UnsupportedError(f"unknown encoding {name!r}: this file needs a newer qtensors")
    if cls is MXFP4 or cls is NVFP4:
        return cls(axis=int(d["axis"]))
    common = {
        "group_size": int(d["group_size"]),
        "axis": int(d["axis"]),
        "scale_dtype": str(d["scale_dtype"]),
    }
    if cls is NF4:
        return NF4(**common)
    if cls is Symmetric:
        return Symmetric(bits=int(d["bits"]), levels=str(d.get("levels", "balanced")), **common)
    return cls(bits=int(d["bits"]), **common)


#: What `quant=` accepts: None (the default policy), an encoding or a preset name (under the
#: default policy), "raw", or a mapping of name patterns to any of those (there None means raw).
QuantSpec = Encoding | str | Mapping[str, Encoding | str | None] | None


def _accepted() -> str:
    return ", ".join(["raw", *PRESETS])


def as_encoding(spec: Encoding | str, what: str = "quant") -> Encoding:
    """The encoding of `spec`: an encoding object as it is, a preset name (`"nf4"`, ...) or
    `"raw"`. Anything else raises TypeError, an unknown name ValueError (both listing the
    accepted names); `what` names the argument in the message."""
    if isinstance(spec, (Raw, Affine, Symmetric, NF4, MXFP4, NVFP4)):
        return spec
    if isinstance(spec, str):
        if spec == "raw":
            return Raw()
        try:
            return PRESETS[spec]
        except KeyError:
            raise ValueError(
                f"{what}: unknown preset {spec!r}: choose one of {_accepted()}"
            ) from None
    raise TypeError(
        f"{what} must be an encoding (qt.Affine(...), qt.Symmetric(...), qt.NF4(...), qt.MXFP4(), "
        "qt.NVFP4(), qt.Raw()) "
        f"or a preset name ({_accepted()}), not {type(spec).__name__} {spec!r}"
    )


def normalize_quant(quant: QuantSpec) -> Encoding | dict[str, Encoding] | None:
    """`quant` with every preset name resolved and every value checked (see `choose_encoding`):
    None stays None (the default policy); in a mapping, None becomes `Raw()`."""
    if quant is None:
        return None
    if not isinstance(quant, Mapping):
        return as_encoding(quant)
    out: dict[str, Encoding] = {}
    for pattern, enc in quant.items():
        if not isinstance(pattern, str):
            raise TypeError(
                f"quant patterns must be str (fnmatch patterns), not {type(pattern).__name__} "
                f"{pattern!r}"
            )
        out[pattern] = Raw() if enc is None else as_encoding(enc, f"quant[{pattern!r}]")
    return out


def default_wants_quantization(dtype: str, shape: tuple[int, ...]) -> bool:
    """Floating tensors of rank >= 2 (linear, conv, embedding weights) are quantized; norms,
    biases, scalars and integer tensors stay raw."""
    return dtype in FLOAT_DTYPES and len(shape) >= 2


def choose_encoding(name: str, dtype: str, shape: tuple[int, ...], quant: QuantSpec) -> Encoding:
    """Pick the encoding of one tensor.

    `quant` is one of:

    * None: the default policy with the FLEXGEN preset: float tensors of rank >= 2 are
      quantized, the rest (norms, biases, scalars, integer tensors) stay raw;
    * an encoding (`qt.NF4()`) or a preset name (`"nf4"`, see `PRESETS`): the default policy
      with that encoding; `qt.Raw()` or `"raw"` stores everything raw;
    * a mapping from fnmatch patterns to encodings, preset names or `"raw"`: the first pattern
      matching `name` decides, even for tensors the default policy keeps raw; names no pattern
      matches follow the default policy. In a mapping None also means raw (as `"raw"` does).
    """
    q = normalize_quant(quant)
    if isinstance(q, Mapping):
        for pattern, enc in q.items():
            if fnmatch.fnmatchcase(name, pattern):
                if isinstance(enc, Raw):
                    return enc
                if dtype not in FLOAT_DTYPES:
                    raise ValueError(
                        f"tensor {name!r} matches pattern {pattern!r} but has dtype {dtype}: "
                        'only float tensors can be quantized; map it to "raw" to keep it raw'
                    )
                return enc
        enc: Encoding = FLEXGEN
    else:
        enc = FLEXGEN if q is None else q
    if isinstance(enc, Raw) or not default_wants_quantization(dtype, shape):
        return Raw()
    return enc
