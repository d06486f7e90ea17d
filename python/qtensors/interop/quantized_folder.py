"""Import a Hugging Face model folder quantized by GPTQ, AWQ (GEMM) or compressed-tensors
(`pack-quantized`) into a qtensors model folder, without loss.

The format comes from config.json's `quantization_config` (`quant_method`, and for GPTQ also a
`quantize_config.json`). Every quantized linear is unpacked (`packed_int`) and mapped onto our
symmetric or affine groups (`intgroups`), decoding bit for bit as the source decodes; every
other tensor is copied raw. The output folder holds config.json without the foreign
`quantization_config`, the tokenizer and other files, and one `model.qtensors`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._progress import Progress, want_progress
from .._source import Entry, TensorReader, list_file, model_weight_files
from ..errors import ForeignFormatError
from . import packed_int as P
from .common import ImportReport, TensorReport, building_folder
from .intgroups import IntGroups, Mapped, codes_part, map_exact

FORMATS = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors"}
#: Tensors of a quantized linear besides its `.bias`, by format: the first one marks the module.
SUFFIXES = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": (
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
    ),
}
#: Files of the source folder not copied: the weights, and the foreign quantizer's own config.
NOT_COPIED = re.compile(r".*\.safetensors$|.*\.safetensors\.index\.json$|quantize_config\.json$")


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def quantization_config(folder: str) -> tuple[str, dict[str, Any]] | None:
    """(format key, its quantization config) of a model folder quantized by a format we import,
    else None."""
    config = _load_json(os.path.join(folder, "config.json"))
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        qc = _load_json(os.path.join(folder, "quantize_config.json"))  # AutoGPTQ's own file
        if isinstance(qc, dict) and "bits" in qc:
            return "gptq", {"quant_method": "gptq", **qc}
        return None
    method = str(qc.get("quant_method", "")).lower()
    return (method, qc) if method in FORMATS else None


def _field(qc: dict[str, Any], fmt: str, key: str, default: Any = None, *alts: str) -> Any:
    for k in (key, *alts):
        if k in qc:
            return qc[k]
    if default is None:
        raise ForeignFormatError(f"{fmt}: quantization_config has no {key!r}")
    return default


def _unsupported(fmt: str, key: str, value: Any, supported: str) -> ForeignFormatError:
    return ForeignFormatError(
        f"{fmt}: quantization_config {key} = {value!r} is not supported ({supported})"
    )


# -- reading a module's tensors ------------------------------------------------------------------


def _numpy(t: Any) -> tuple[np.ndarray, str]:
    """A torch tensor -> numpy, and its dtype name; bf16 widened to float32 (exactly)."""
    import torch

    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32), name
    return t.numpy(), name


def _scales(a: np.ndarray, dtype: str, fmt: str, name: str) -> tuple[np.ndarray, str]:
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ForeignFormatError(f"{fmt} tensor {name!r}: scales of dtype {dtype}")
    return a.astype(np.float64), dtype


@dataclass
class _Module:
    """A quantized linear: its tensors by suffix, and how to read them."""

    prefix: str
    entries: dict[str, Entry]
    read: Callable[[Entry], Any]

    def get(self, suffix: str) -> tuple[np.ndarray, str] | None:
        e = self.entries.get(suffix)
        return None if e is None else _numpy(self.read(e))

    def need(self, suffix: str, fmt: str) -> tuple[np.ndarray, str]:
        got = self.get(suffix)
        if got is None:
            raise ForeignFormatError(f"{fmt} module {self.prefix!r}: no {suffix} tensor")
        return got


class _Format:
    """One foreign format's settings: `groups(module)` reads the small tensors (scales, zeros,
    g_idx) as IntGroups, `codes(module, groups)` the (out, in) codes."""

    name = "?"

    def groups(self, m: _Module) -> IntGroups:
        raise NotImplementedError

    def codes(self, m: _Module, g: IntGroups) -> np.ndarray:
        raise NotImplementedError

    def describe(self, g: IntGroups) -> str:
        return f"{self.name.lower()}-int{g.bits}"


class _Gptq(_Format):
    name = "GPTQ"

    def __init__(self, qc: dict[str, Any]) -> None:
        self.bits = int(_field(qc, "GPTQ", "bits"))
        P._whole_words(self.bits, "GPTQ")
        self.group_size = int(_field(qc, "GPTQ", "group_size", -1))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise _unsupported("GPTQ", "checkpoint_format", fmt, '"gptq" (v1) or "gptq_v2"')
        self.v1 = fmt == "gptq"

    def codes(self, m: _Module, g: IntGroups) -> np.ndarray:
        return P.gptq_codes(m.need("qweight", "GPTQ")[0], self.bits, m.prefix + ".qweight")

    def groups(self, m: _Module) -> IntGroups:
        e = m.entries["qweight"]
        if len(e.shape) != 2:
            raise ForeignFormatError(f"GPTQ tensor {e.name!r}: shape {list(e.shape)} is not 2-D")
        cols, out = e.shape[0] * 32 // self.bits, e.shape[1]
        scales, sd = _scales(*m.need("scales", "GPTQ"), "GPTQ", m.prefix + ".scales")
        zeros = P.gptq_zeros(m.need("qzeros", "GPTQ")[0], self.bits, out, self.v1, m.prefix)
        gs = cols if self.group_size <= 0 else self.group_size
        g_idx = m.get("g_idx")
        if scales.ndim != 2 or scales.shape[1] != out:
            raise ForeignFormatError(
                f"GPTQ tensor {m.prefix + '.scales'!r}: shape {list(scales.shape)}, expected "
                f"[groups, {out}]"
            )
        return IntGroups((out, cols), scales.T, sd, zeros, self.bits, gs, _g(g_idx))


class _Awq(_Format):
    name = "AWQ"

    def __init__(self, qc: dict[str, Any]) -> None:
        self.bits = int(_field(qc, "AWQ", "bits", None, "w_bit"))
        if self.bits != 4:
            raise _unsupported("AWQ", "bits", self.bits, "AWQ's packing order is for 4 bits")
        self.group_size = int(_field(qc, "AWQ", "group_size", None, "q_group_size"))
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _unsupported("AWQ", "version", version, '"gemm"')
        if qc.get("zero_point", True) is False:
            raise _unsupported("AWQ", "zero_point", False, "zero points are required")

    def codes(self, m: _Module, g: IntGroups) -> np.ndarray:
        q = P.awq_unpack(m.need("qweight", "AWQ")[0], g.shape[0], m.prefix + ".qweight")
        return np.ascontiguousarray(q.T)

    def groups(self, m: _Module) -> IntGroups:
        e = m.entries["qweight"]
        if len(e.shape) != 2:
            raise ForeignFormatError(f"AWQ tensor {e.name!r}: shape {list(e.shape)} is not 2-D")
        cols, out = e.shape[0], e.shape[1] * 8
        scales, sd = _scales(*m.need("scales", "AWQ"), "AWQ", m.prefix + ".scales")
        if scales.ndim != 2 or scales.shape[1] != out:
            raise ForeignFormatError(
                f"AWQ tensor {m.prefix + '.scales'!r}: shape {list(scales.shape)}, expected "
                f"[groups, {out}]"
            )
        zeros = P.awq_unpack(m.need("qzeros", "AWQ")[0], out, m.prefix + ".qzeros")
        gs = cols if self.group_size <= 0 else self.group_size
        return IntGroups((out, cols), scales.T, sd, zeros.T.astype(np.int64), 4, gs)


class _CompressedTensors(_Format):
    name = "compressed-tensors"

    def __init__(self, qc: dict[str, Any]) -> None:
        fmt = qc.get("format")
        if fmt not in ("pack-quantized", "mixed-precision"):
            raise _unsupported(self.name, "format", fmt, '"pack-quantized"')
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ForeignFormatError(f"{self.name}: quantization_config has no config_groups")
        self.schemes: list[tuple[list[str], dict[str, Any]]] = []
        for key, scheme in groups.items():
            w = scheme.get("weights") or {}
            where = f"config_groups.{key}"
            if scheme.get("input_activations") or scheme.get("output_activations"):
                raise _unsupported(
                    self.name,
                    f"{where}.input_activations",
                    scheme.get("input_activations"),
                    "weight-only quantization",
                )
            # "mixed-precision" at the top names each group's format; else groups inherit it
            if (scheme.get("format") or fmt) != "pack-quantized":
                raise _unsupported(self.name, f"{where}.format", scheme["format"], "pack-quantized")
            if w.get("type", "int") != "int":
                raise _unsupported(self.name, f"{where}.weights.type", w.get("type"), '"int"')
            if w.get("strategy") not in ("group", "channel", "tensor"):
                raise _unsupported(
                    self.name,
                    f"{where}.weights.strategy",
                    w.get("strategy"),
                    "group, channel or tensor",
                )
            bits = w.get("num_bits")
            if not isinstance(bits, int) or not 1 <= bits <= 8:
                raise _unsupported(self.name, f"{where}.weights.num_bits", bits, "1..8")
            self.schemes.append((list(scheme.get("targets") or []), w))

    def _scheme(self, prefix: str) -> dict[str, Any]:
        for targets, w in self.schemes:
            for t in targets:
                if t.startswith("re:"):
                    if re.match(t[3:], prefix):
                        return w
                elif t == "Linear" or prefix == t or prefix.endswith("." + t):
                    return w
        if len(self.schemes) == 1:
            return self.schemes[0][1]
        raise ForeignFormatError(f"{self.name} module {prefix!r}: no config group targets it")

    def groups(self, m: _Module) -> IntGroups:
        w = self._scheme(m.prefix)
        bits = int(w["num_bits"])
        shape = m.need("weight_shape", self.name)[0].reshape(-1).astype(np.int64)
        if shape.shape != (2,) or np.any(shape < 0):
            raise ForeignFormatError(
                f"{self.name} tensor {m.prefix + '.weight_shape'!r}: {shape.tolist()} is not "
                "the shape of a 2-D weight"
            )
        out, cols = int(shape[0]), int(shape[1])
        name = m.prefix + ".weight_scale"
        scales, sd = _scales(*m.need("weight_scale", self.name), self.name, name)
        if w["strategy"] == "tensor" and scales.size == 1:
            scales = np.full((out, 1), scales.reshape(-1)[0])
        elif scales.ndim == 1 and scales.size == out:  # per channel, saved 1-D
            scales = scales.reshape(out, 1)
        gs = int(w.get("group_size") or 0) if w["strategy"] == "group" else cols
        groups = -(-cols // gs) if gs > 0 else 0
        if gs <= 0 or scales.shape != (out, groups):
            raise ForeignFormatError(
                f"{self.name} tensor {name!r}: shape {list(scales.shape)} does not fit a weight "
                f"{[out, cols]} in groups of {gs}"
            )
        half = 1 << (bits - 1)
        zeros = None
        zp = m.get("weight_zero_point")
        if zp is not None:
            z, _ = zp
            if z.dtype == np.int32 and z.ndim == 2 and z.shape[1] == groups:  # packed down columns
                zs = P.dense_unpack(z.T, bits, out, self.name, m.prefix + ".weight_zero_point")
                zeros = zs.T.astype(np.int64)  # unsigned: zp + 2^(bits-1)
            elif z.size == out * groups:
                zeros = z.reshape(out, groups).astype(np.int64) + half
            else:
                raise ForeignFormatError(
                    f"{self.name} tensor {m.prefix + '.weight_zero_point'!r}: shape "
                    f"{list(z.shape)} does not fit {out} outputs in {groups} groups"
                )
        elif not w.get("symmetric", True):
            raise ForeignFormatError(
                f"{self.name} module {m.prefix!r}: asymmetric, but no weight_zero_point"
            )
        g_idx = m.get("weight_g_idx")
        return IntGroups((out, cols), scales, sd, zeros, bits, gs, _g(g_idx))

    def codes(self, m: _Module, g: IntGroups) -> np.ndarray:
        words = m.need("weight_packed", self.name)[0]
        name = m.prefix + ".weight_packed"
        if words.ndim != 2 or words.shape[0] != g.shape[0]:
            raise ForeignFormatError(
                f"{self.name} tensor {name!r}: shape {list(words.shape)} for a weight "
                f"{list(g.shape)}"
            )
        return P.dense_unpack(words, g.bits, g.shape[1], self.name, name)

    def describe(self, g: IntGroups) -> str:
        return f"ct-int{g.bits}"


def _g(got: tuple[np.ndarray, str] | None) -> np.ndarray | None:
    return None if got is None else got[0].astype(np.int64).reshape(-1)


def _format(key: str, qc: dict[str, Any]) -> _Format:
    return {"gptq": _Gptq, "awq": _Awq, "compressed-tensors": _CompressedTensors}[key](qc)


# -- the import ----------------------------------------------------------------------------------


def import_quantized_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool | None = None,
) -> ImportReport:
    """Import the GPTQ / AWQ / compressed-tensors model folder `src` into the qtensors model
    folder `dst`; every quantized linear maps exactly (see `intgroups`), the rest is copied."""
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    found = quantization_config(src)
    if found is None:
        raise ForeignFormatError(
            f"{src}: config.json has no quantization_config with quant_method gptq, awq or "
            "compressed-tensors"
        )
    key, qc = found
    fmt = _format(key, qc)
    entries: list[Entry] = []
    for shard in model_weight_files(src):
        entries.extend(list_file(os.path.join(src, shard))[1])
    marker = SUFFIXES[key][0]
    modules: dict[str, dict[str, Entry]] = {}
    for e in entries:
        prefix, _, suffix = e.name.rpartition(".")
        if suffix == marker:
            modules[prefix] = {}
    plain: list[Entry] = []
    for e in entries:
        prefix, _, suffix = e.name.rpartition(".")
        if prefix in modules and suffix in SUFFIXES[key]:
            modules[prefix][suffix] = e
        else:
            plain.append(e)

    reader = TensorReader("pt")
    report = ImportReport(source=src, format=fmt.name, dst=dst)
    plans: list[tuple[str, str, list[int], Any, Any]] = []  # name, dtype, shape, enc, job
    for prefix, ents in modules.items():
        m = _Module(prefix, ents, reader.read)
        g = fmt.groups(m)
        mapped = map_exact(g, fmt.name, prefix)
        enc = mapped.encoding.to_dict(2)
        name = prefix + ".weight"
        plans.append((name, mapped.dtype, list(g.shape), enc, (m, g, mapped)))
        report.tensors.append(
            TensorReport(name, ents[marker].name, fmt.describe(g), "exact", _describe(mapped), None)
        )
    for e in plain:
        plans.append((e.name, e.dtype, list(e.shape), {"name": "raw"}, e))
        report.tensors.append(TensorReport(e.name, e.name, e.dtype, "raw", "raw"))

    total = sum(e.nbytes for e in entries)
    with building_folder(dst, force) as tmp:
        _copy_side_files(src, tmp)
        meta = {"format": "pt", "imported_from": key}
        header = [(n, d, s, json.dumps(enc)) for n, d, s, enc, _ in plans]
        writer = _core.Writer(os.path.join(tmp, "model.qtensors"), header, meta, 64)
        try:
            with Progress(total, len(plans), f"import {fmt.name}", want_progress(progress)) as bar:
                for i, (*_, job) in enumerate(plans):
                    if isinstance(job, Entry):
                        from .._arrays import as_bytes

                        data, dtype, _ = as_bytes(reader.read(job))
                        writer.write_tensor(i, data, dtype)
                        bar.update(job.nbytes)
                        continue
                    m, g, mapped = job
                    codes = codes_part(fmt.codes(m, g), g.bits, g.shape, fmt.name, m.prefix)
                    parts = [codes, *mapped.scale_parts]
                    writer.write_parts(i, [np.ascontiguousarray(p).view(np.uint8) for p in parts])
                    bar.update(sum(e.nbytes for e in m.entries.values()))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
    report.seconds = time.perf_counter() - t0
    return report


def _describe(mapped: Mapped) -> str:
    from ..convert import describe_encoding

    return f"{describe_encoding(mapped.encoding)} ({mapped.note})"


def _copy_side_files(src: str, dst: str) -> None:
    """Everything of the source folder but the weights, with config.json's quantization_config
    removed: the weights are qtensors' now."""
    for fn in sorted(os.listdir(src)):
        path = os.path.join(src, fn)
        if fn.startswith(".") or not os.path.isfile(path) or NOT_COPIED.fullmatch(fn):
            continue
        if fn == "config.json":
            config = _load_json(path)
            if isinstance(config, dict):
                config.pop("quantization_config", None)
                with open(os.path.join(dst, fn), "w", encoding="utf-8") as fh:
                    json.dump(config, fh, indent=2)
                    fh.write("\n")
                continue
        shutil.copy2(path, os.path.join(dst, fn))
