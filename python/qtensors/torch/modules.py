"""Modules whose weights stay quantized on the device and are decoded on the fly.

* ``QuantizedWeight``: the parts of one quantized tensor as buffers (``codes``, ``scales``,
  ``mins``) plus its encoding; ``dequantize()`` decodes it with ``torch.ops.qtensors.dequantize``.
* ``QuantizedLinear``: ``nn.Linear`` with a ``QuantizedWeight``; ``forward`` is one call of
  ``torch.ops.qtensors.linear`` (fused Triton kernels on CUDA that never build the weight; decode
  + ``F.linear`` elsewhere), in the input's dtype.
* ``QuantizedEmbedding``: ``nn.Embedding`` with a ``QuantizedWeight``; ``forward`` gathers and
  decodes only the rows it looks up (when each row's codes start on a byte).

Their ``state_dict`` holds ``weight.codes``, ``weight.scales``, ``weight.mins`` (affine only) and
``weight._extra_state`` (shape, dtype and encoding as a dict), plus ``bias``. ``save_model`` /
``load_model`` (``loading.py``) round-trip them through qtensors files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import quantized as _q
from .._arrays import torch_dtype as dtype_of_name
from ..encodings import Encoding, Raw, from_dict
from ..quantized import QuantizedTensor
from ._layout import codes_nbytes, normalize_axis, scale_shape
from .linear import linear
from .ops import OUT_DTYPES, dequantize

_TORCH_BY_NAME = {v: k for k, v in OUT_DTYPES.items()}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from its qtensors name (or itself)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _TORCH_BY_NAME[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a floating dtype") from None


def _encoding_dict(encoding: Encoding | dict[str, Any], rank: int) -> dict[str, Any]:
    if isinstance(encoding, dict):
        enc = dict(encoding)
        enc["axis"] = normalize_axis(int(enc["axis"]), rank)
        if enc["name"] == "nf4":
            enc.pop("bits", None)
        return enc
    if isinstance(encoding, Raw):
        raise ValueError("a QuantizedWeight needs a quantized encoding, not raw")
    enc = encoding.to_dict(rank)
    if enc["name"] == "nf4":
        enc.pop("bits", None)
    return enc


class QuantizedWeight(nn.Module):
    """One quantized tensor kept in its stored form: ``codes`` (uint8, packed), ``scales`` and
    ``mins`` (None unless affine), buffers that follow the module across devices. ``dtype`` is
    the dtype ``dequantize()`` returns by default; ``.half()`` and friends change it, never the
    stored scales."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    def __init__(
        self,
        shape: tuple[int, ...] | list[int] | torch.Size,
        encoding: Encoding | dict[str, Any],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._set_layout(shape, encoding)
        self.dtype = torch_dtype(dtype)
        e = self.encoding
        sdt = dtype_of_name(e["scale_dtype"])
        sshape = scale_shape(self.shape, e["axis"], e["group_size"])
        self.register_buffer(
            "codes",
            torch.zeros(codes_nbytes(self.shape, self.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.zeros(sshape, dtype=sdt, device=device))
        self.register_buffer("mins", _third_part(e, sshape, sdt, device))

    # -- properties --------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 4 if self.encoding["name"] == "nf4" else int(self.encoding["bits"])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def encoding_object(self) -> Encoding:
        return from_dict(self.encoding)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts())

    def numel(self) -> int:
        return self.shape.numel()

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def _parts(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scales, self.mins) if t is not None]

    def extra_repr(self) -> str:
        e = self.encoding
        return (
            f"shape={tuple(self.shape)}, {_short_name(e)} g{e['group_size']} axis={e['axis']}"
            f" scales={e['scale_dtype']}, dtype={str(self.dtype).removeprefix('torch.')}"
        )

    # -- decoding ----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The decoded tensor (on the buffers' device) in ``dtype`` (default ``self.dtype``)."""
        e = self.encoding
        return dequantize(
            self.codes,
            self.scales,
            self.mins,
            list(self.shape),
            e["name"],
            self.bits,
            int(e["group_size"]),
            int(e["axis"]),
            dtype or self.dtype,
        )

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        q: QuantizedTensor,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> QuantizedWeight:
        """Wrap a QuantizedTensor's parts (numpy or torch), copied to ``device``."""
        if q.encoding["name"] == "raw":
            raise ValueError("this tensor is stored raw, not quantized")
        parts = [
            _as_torch(p, n, q.encoding) for p, n in zip(q.parts(), ("c", "s", "m"), strict=False)
        ]
        return cls.from_parts(
            parts[0],
            parts[1],
            parts[2] if len(parts) > 2 else None,
            q.shape,
            q.encoding,
            dtype or torch_dtype(q.dtype),
            device=device,
        )

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        shape: tuple[int, ...] | list[int] | torch.Size,
        encoding: Encoding | dict[str, Any],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> QuantizedWeight:
        """A QuantizedWeight holding the given parts (moved to ``device`` when given; no copy
        otherwise). Checks that they fit the shape and encoding."""
        with torch.device("meta"):
            w = cls(shape, encoding, dtype)
        e = w.encoding
        dev = torch.device(device) if device is not None else codes.device
        sshape = scale_shape(w.shape, e["axis"], e["group_size"])
        w.codes = codes.reshape(-1).to(dev, non_blocking=True)
        w.scales = scales.reshape(sshape).to(dev, non_blocking=True)
        if mins is not None:
            mshape = () if e["name"] == "nvfp4" else sshape  # nvfp4: the tensor scale
            mins = mins.reshape(mshape).to(dev, non_blocking=True)
        w.mins = mins
        _check_parts(w)
        return w

    def to_quantized(self) -> QuantizedTensor:
        """The parts as a CPU QuantizedTensor (framework "pt"), e.g. for ``qtensors.save_file``."""
        codes, scales, third = (
            None if t is None else t.detach().cpu().contiguous()
            for t in (self.codes, self.scales, self.mins)
        )
        nvfp4 = self.encoding["name"] == "nvfp4"  # its third part is the tensor scale
        return QuantizedTensor(
            codes,
            scales,
            None if nvfp4 else third,
            tuple(self.shape),
            OUT_DTYPES[self.dtype],
            dict(self.encoding),
            "pt",
            None,
            third.reshape(()) if nvfp4 else None,
        )

    # -- nn.Module plumbing ------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": OUT_DTYPES[self.dtype],
            "encoding": dict(self.encoding),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._set_layout(state["shape"], dict(state["encoding"]))
        self.dtype = torch_dtype(state["dtype"])

    def _set_layout(self, shape: Any, encoding: Encoding | dict[str, Any]) -> None:
        """``shape``, ``encoding`` and ``op_args``: the op's static arguments (shape, encoding
        name, bits, group size, axis) as one tuple of constants, so that a compiled forward
        guards on one tuple per layer instead of a Size, a dict and a property (guard checks
        run before every compiled call: fewer is a shorter decode step)."""
        self.shape = torch.Size(int(d) for d in shape)
        self.encoding = e = _encoding_dict(encoding, len(self.shape))
        self.op_args = (
            tuple(self.shape),
            e["name"],
            self.bits,
            int(e["group_size"]),
            int(e["axis"]),
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The incoming parts may have another encoding (hence other sizes) than this module was
        # built with: apply the extra state first, then take the parts as they come.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        elif strict:
            missing_keys.append(prefix + "_extra_state")
        for name in ("codes", "scales", "mins"):
            key = prefix + name
            if key not in state_dict:
                if name != "mins" or _has_third_part(self.encoding):
                    missing_keys.append(key)
                continue
            src = state_dict[key]
            cur = getattr(self, name)
            if local_metadata.get("assign_to_params_buffers", False) or cur is None or cur.is_meta:
                dev = cur.device if cur is not None and not cur.is_meta else src.device
                setattr(self, name, src.detach().to(dev))
            elif cur.shape == src.shape and cur.dtype == src.dtype:
                with torch.no_grad():
                    cur.copy_(src)
            else:
                setattr(self, name, src.detach().to(cur.device))
        if not _has_third_part(self.encoding):
            self.mins = None
        try:
            _check_parts(self)
        except ValueError as exc:
            error_msgs.append(f"{prefix}: {exc}")

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> QuantizedWeight:
        # Follow device moves, never dtype changes of the stored parts (a .half() would round fp32
        # scales); a floating dtype change becomes the default decode dtype instead.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.codes.device))
        if probe.dtype in OUT_DTYPES:
            self.dtype = probe.dtype
        for name in ("codes", "scales", "mins"):
            t = self._buffers.get(name)
            if t is None:
                continue
            new = fn(t)
            if new.dtype != t.dtype:
                new = t.to(new.device)
            self._buffers[name] = new
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedWeight:
        new = QuantizedWeight.__new__(QuantizedWeight)
        memo[id(self)] = new
        new.__dict__ = copy.deepcopy(self.__dict__, memo)
        return new


def _check_parts(w: QuantizedWeight) -> None:
    e = w.encoding
    want_codes = codes_nbytes(w.shape, w.bits)
    if w.codes.dtype != torch.uint8 or w.codes.numel() != want_codes:
        raise ValueError(
            f"codes: {w.codes.numel()} {w.codes.dtype} values, {want_codes} uint8 expected"
        )
    sshape = torch.Size(scale_shape(w.shape, e["axis"], e["group_size"]))
    sdt = dtype_of_name(e["scale_dtype"])
    for name, t in (("scales", w.scales), ("mins", w.mins)):
        if t is None:
            if name == "scales" or _has_third_part(e):
                raise ValueError(f"{name} missing")
            continue
        if name == "mins" and e["name"] == "nvfp4":
            if t.numel() != 1 or t.dtype != torch.float32:
                raise ValueError(f"nvfp4 tensor scale: {list(t.shape)} {t.dtype}, one float32")
            continue
        if t.shape != sshape or t.dtype != sdt:
            raise ValueError(f"{name}: {list(t.shape)} {t.dtype}, {list(sshape)} {sdt} expected")


def _short_name(e: dict[str, Any]) -> str:
    """``affine4``, ``symmetric8``; ``nf4``, ``mxfp4``, ``nvfp4`` name their width already."""
    return e["name"] if e["name"] in ("nf4", "mxfp4", "nvfp4") else f"{e['name']}{e['bits']}"


def _has_third_part(e: dict[str, Any]) -> bool:
    """Affine groups have mins; NVFP4 keeps its per-tensor fp32 scale in the same slot (the
    ``mins`` argument of ``torch.ops.qtensors.dequantize``)."""
    return e["name"] in ("affine", "nvfp4")


def _third_part(
    e: dict[str, Any], sshape: Any, sdt: torch.dtype, device: torch.device | str | None
) -> torch.Tensor | None:
    if e["name"] == "affine":
        return torch.zeros(sshape, dtype=sdt, device=device)
    if e["name"] == "nvfp4":
        return torch.ones((), dtype=torch.float32, device=device)
    return None


def _as_torch(p: Any, part: str, encoding: dict[str, Any]) -> torch.Tensor:
    if isinstance(p, torch.Tensor):
        return p
    import numpy as np

    arr = np.ascontiguousarray(p)
    if part != "c" and encoding.get("scale_dtype") == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    if part == "s" and encoding.get("scale_dtype") == "float8_e4m3fn":  # raw E4M3 bytes
        return torch.from_numpy(arr.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(arr.copy())


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored quantized on the device, computed in the input's dtype
    by ``torch.ops.qtensors.linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        encoding: Encoding | dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from ..encodings import FLEXGEN

        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        self.weight = QuantizedWeight(
            (out_features, in_features), encoding or FLEXGEN, dtype=dtype, device=device
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_qt_siblings")  # fuse_siblings (siblings.py)
        if group is not None:
            # compiled: the group's multiply, narrowed (identical calls, merged by inductor)
            compiling = torch.compiler.is_compiling()
            out = group.traced(self, x) if compiling else group.call(self, x)
            if out is not None:
                return out
        # Read from the modules' dicts, not as attributes: nn.Module.__getattr__ costs ~0.5 us
        # each, 2.5 us of a call that takes ~10 us outside the matmul (benches/bench_cpu_matmul.py
        # --breakdown).
        w = self._modules["weight"]
        parts = w._buffers
        if x.dtype not in OUT_DTYPES:
            x = x.to(w.dtype)
        shape, name, bits, group_size, axis = w.op_args
        codes, scales, mins = parts["codes"], parts["scales"], parts["mins"]
        bias = self._parameters["bias"]
        return linear(x, codes, scales, mins, bias, shape, name, bits, group_size, axis)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        group = self.__dict__.get("_qt_siblings")  # a joined group moves its parts once
        if group is not None:
            return group.apply(self, fn, recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    @classmethod
    def from_weight(
        cls, weight: QuantizedWeight, bias: torch.Tensor | nn.Parameter | None = None
    ) -> QuantizedLinear:
        """Wrap an existing QuantizedWeight of shape ``[out, in]`` (and a bias)."""
        if len(weight.shape) != 2:
            raise ValueError(f"a linear weight is 2-D, not {list(weight.shape)}")
        out_f, in_f = weight.shape
        with torch.device("meta"):
            m = cls(in_f, out_f, bias=False, encoding=weight.encoding, dtype=weight.dtype)
        m.weight = weight
        if bias is not None:
            m.bias = (
                bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            )
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, encoding: Encoding) -> QuantizedLinear:
        """Quantize an ``nn.Linear`` (on the CPU, through the Rust core)."""
        w = linear.weight.detach()
        q = _q.quantize(w.cpu(), encoding, framework="pt")
        qw = QuantizedWeight.from_quantized(q, device=w.device, dtype=w.dtype)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        return cls.from_weight(qw, bias)


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with its table stored quantized; ``forward`` decodes only the looked-up
    rows (in ``weight.dtype``) when each row's codes start on a byte, else the whole table."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        encoding: Encoding | dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        from ..encodings import Affine

        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        self.weight = QuantizedWeight(
            (num_embeddings, embedding_dim),
            encoding or Affine(bits=4, group_size=64, axis=-1),
            dtype=dtype or torch.get_default_dtype(),
            device=device,
        )

    @classmethod
    def from_weight(
        cls, weight: QuantizedWeight, padding_idx: int | None = None
    ) -> QuantizedEmbedding:
        if len(weight.shape) != 2:
            raise ValueError(f"an embedding table is 2-D, not {list(weight.shape)}")
        with torch.device("meta"):
            m = cls(*weight.shape, padding_idx=padding_idx, encoding=weight.encoding)
        m.weight = weight
        return m

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, encoding: Encoding) -> QuantizedEmbedding:
        w = emb.weight.detach()
        q = _q.quantize(w.cpu(), encoding, framework="pt")
        qw = QuantizedWeight.from_quantized(q, device=w.device, dtype=w.dtype)
        return cls.from_weight(qw, emb.padding_idx)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        e = w.encoding
        V, D = w.shape
        row_bits = D * w.bits
        fp4 = e["name"] in ("mxfp4", "nvfp4")  # fixed block sizes: only row-wise blocks gather
        if row_bits % 8 or ids.numel() >= V or (fp4 and e["axis"] != 1):
            return F.embedding(ids, w.dequantize(), self.padding_idx)
        flat = ids.reshape(-1)
        codes = w.codes.view(V, row_bits // 8).index_select(0, flat).reshape(-1)
        g = int(e["group_size"])
        if e["axis"] == 1:
            scales = w.scales.index_select(0, flat)
            if e["name"] == "nvfp4":
                mins = w.mins  # the tensor scale, shared by every row
            else:
                mins = None if w.mins is None else w.mins.index_select(0, flat)
            gs, axis = g, 1
        else:  # groups along the vocabulary: row i uses scale row i // g; decode with g = 1
            grp = torch.div(flat, g, rounding_mode="floor")
            scales = w.scales.index_select(0, grp)
            mins = None if w.mins is None else w.mins.index_select(0, grp)
            gs, axis = 1, 0
        out = dequantize(
            codes, scales, mins, [flat.numel(), D], e["name"], w.bits, gs, axis, w.dtype
        )
        return out.reshape(*ids.shape, D)
