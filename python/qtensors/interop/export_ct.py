"""Export a qtensors model folder as a compressed-tensors `pack-quantized` checkpoint, the format
vLLM serves int4/int8 weight-only models from.

compressed-tensors decodes a weight `(q - zp) * scale` per group of consecutive input columns,
q and zp signed, stored as `q + 2^(bits-1)` in dense int32 bit streams (see `packed_int`). So:

* `symmetric` groups along the last axis map exactly: the same codes, the scales as they are,
  no zero point (our code - 2^(bits-1) is their q).
* `affine` groups map exactly when every min is an integer multiple of its scale,
  m = -z * s with z in 0..2^bits - 1 (what GPTQ / AWQ / compressed-tensors imports hold):
  zp = z - 2^(bits-1). Other mins (min-max quantization) are not representable; with
  `lossy=True` the zero is rounded to the nearest integer and the error reported, else the
  export stops naming the tensor.
* The scales keep their dtype when it is the tensor's dtype (compressed-tensors computes in the
  scale dtype, rounding once, as we do); otherwise they are written as float32, in which the
  products are exact, so the decode rounds once to the tensor's dtype either way.
* Tensors of other encodings (nf4, fp4, groups along axis 0, groups not dividing the row),
  and quantized tensors of modules that are not linear layers, are decoded and written dense;
  their linear modules go to the `ignore` list.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._progress import Progress, want_progress
from ..errors import ForeignFormatError
from .common import ImportReport, TensorReport, building_folder
from .intgroups import as_dtype_bytes

FORMAT = "pack-quantized"


def dense_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) unsigned fields -> (rows, ceil(n * bits / 32)) int32: each row one dense
    little-endian bit stream (how compressed-tensors packs)."""
    rows, n = values.shape
    words = -(-n * bits // 32)
    planes = (values.astype(np.uint8)[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = np.zeros((rows, words * 32), np.uint8)
    stream[:, : n * bits] = planes.reshape(rows, n * bits)
    packed = np.packbits(stream, axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<i4").reshape(rows, words)


def unpack_stream(codes: np.ndarray, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """Our row-major LSB-first code stream -> (out, in) codes."""
    n = shape[0] * shape[1]
    if bits == 8:
        return codes[:n].reshape(shape)
    if bits == 4:
        return np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(-1)[:n].reshape(shape)
    stream = np.unpackbits(codes, bitorder="little")[: n * bits].reshape(n, bits)
    return (stream << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8).reshape(shape)


@dataclass
class _Linear:
    """A weight exported packed: its compressed-tensors tensors and scheme."""

    tensors: dict[str, Any]
    scheme: tuple[int, bool, str, int | None]  # bits, symmetric, strategy, group_size
    note: str
    rel_err: float | None = None


def _scale_values(scales: np.ndarray, dtype: str) -> np.ndarray:
    """Stored scales (bf16 as uint16 bits) -> exact float64 values."""
    if dtype == "bfloat16":
        return (scales.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return scales.astype(np.float64)


def _torch_tensor(a: np.ndarray, dtype: str):
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _pack_linear(q: Any, name: str, lossy: bool) -> _Linear | None:
    """The packed tensors of the quantized tensor `q`, or None when it cannot be packed (it is
    then written dense)."""
    enc = q.encoding
    if enc["name"] not in ("affine", "symmetric") or len(q.shape) != 2 or enc["axis"] != 1:
        return None
    out, cols = q.shape
    bits, gs = int(enc["bits"]), int(enc["group_size"])
    groups = -(-cols // gs)
    if groups > 1 and cols % gs:
        return None  # compressed-tensors needs whole groups
    strategy, ct_gs = ("channel", None) if groups == 1 else ("group", gs)
    sd = enc["scale_dtype"]
    scales = _scale_values(np.asarray(q.scales), sd).reshape(out, groups)
    codes = unpack_stream(np.asarray(q.codes), bits, (out, cols))
    out_sd = sd if sd == q.dtype else "float32"
    tensors: dict[str, Any] = {
        "weight_packed": dense_pack(codes, bits),
        "weight_shape": np.array([out, cols], np.int64),
    }
    note, rel_err = f"symmetric int{bits}", None
    if enc["name"] == "affine":
        mins = _scale_values(np.asarray(q.mins), sd).reshape(out, groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(scales != 0, -mins / scales, np.nan)
        zr = np.clip(np.nan_to_num(np.round(z), nan=0.0), 0, (1 << bits) - 1)
        exact = np.array_equal(-zr * scales + 0.0, mins + 0.0)
        if not exact and not lossy:
            raise ForeignFormatError(
                f"compressed-tensors export: tensor {name!r} ({enc['name']} {bits}-bit): its "
                "mins are not integer multiples of its scales, which compressed-tensors' "
                "(q - zero) * scale cannot hold; pass --lossy (lossy=True) to round the zero "
                "points, or quantize symmetric"
            )
        if not exact:
            want = codes * scales.repeat(gs, 1)[:, :cols] + mins.repeat(gs, 1)[:, :cols]
            got = (codes - zr.repeat(gs, 1)[:, :cols]) * scales.repeat(gs, 1)[:, :cols]
            den = float(np.sqrt(np.mean(want * want))) or 1.0
            rel_err = float(np.sqrt(np.mean((want - got) ** 2))) / den
        zp = zr.astype(np.int64)  # unsigned: their zp + 2^(bits-1)
        tensors["weight_zero_point"] = np.ascontiguousarray(dense_pack(zp.T, bits).T)
        note = f"asymmetric int{bits}" + ("" if exact else " (zero points rounded)")
    tensors["weight_scale"] = (as_dtype_bytes(scales, out_sd), out_sd)
    return _Linear(tensors, (bits, enc["name"] == "symmetric", strategy, ct_gs), note, rel_err)


def _linear_names(folder: str, weights: Iterable[str]) -> set[str]:
    """Module names of the model's linear layers (from its config on the meta device), else
    every module with a 2-D weight except embeddings."""
    try:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config)
            except ValueError:
                model = transformers.AutoModel.from_config(config)
        return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    except Exception:  # no transformers, or a config it cannot build: by the names
        return {w[: -len(".weight")] for w in weights if "embed" not in w and "wte" not in w}


def _scheme_json(scheme: tuple[int, bool, str, int | None], targets: list[str]) -> dict[str, Any]:
    bits, sym, strategy, gs = scheme
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": gs,
        "strategy": strategy,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "targets": targets,
        "weights": weights,
        "input_activations": None,
        "output_activations": None,
        "format": FORMAT,
    }


def quantization_config(schemes: dict[Any, list[str]], ignore: list[str]) -> dict[str, Any]:
    """The `quantization_config` vLLM and compressed-tensors read."""
    groups = {}
    for i, (scheme, modules) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
        targets = ["Linear"] if len(schemes) == 1 else sorted(modules)
        groups[f"group_{i}"] = _scheme_json(scheme, targets)
    qc: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    try:
        from importlib.metadata import version

        qc["version"] = version("compressed-tensors")
    except Exception:
        pass
    return qc


def _qtensors_files(src: str) -> list[str]:
    if os.path.isfile(src):
        raise ForeignFormatError(
            f"{src}: export needs a model folder (config.json and .qtensors files)"
        )
    files = sorted(f for f in os.listdir(src) if f.endswith(".qtensors") and f[0] != ".")
    if not files or not os.path.isfile(os.path.join(src, "config.json")):
        raise ForeignFormatError(f"{src}: not a qtensors model folder (config.json, *.qtensors)")
    return [os.path.join(src, f) for f in files]


def export_compressed_tensors(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    lossy: bool = False,
    force: bool = False,
    progress: bool | None = None,
) -> ImportReport:
    """Write the qtensors model folder `src` as a compressed-tensors checkpoint folder `dst`
    (config.json with its quantization_config, model.safetensors, the other files copied)."""
    from safetensors.torch import save_file

    import qtensors as qt

    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    files = _qtensors_files(src)
    names: dict[str, str] = {}
    for path in files:
        with qt.safe_open(path, framework="np") as f:
            names.update((k, path) for k in f.keys())
    linears = _linear_names(src, (n for n in names if n.endswith(".weight")))
    report = ImportReport(source=src, format="compressed-tensors", dst=dst)
    out: dict[str, Any] = {}
    schemes: dict[Any, list[str]] = {}
    dense_linears: list[str] = []
    with Progress(0, len(names), "export", want_progress(progress)) as bar:
        for path in files:
            with qt.safe_open(path, framework="np") as f, qt.safe_open(path, framework="pt") as g:
                for name in f.keys():
                    module = name[: -len(".weight")] if name.endswith(".weight") else None
                    enc = f.encoding(name)
                    packed = None
                    if module in linears and enc["name"] != "raw":
                        packed = _pack_linear(f.get_quantized(name), name, lossy)
                    if packed is not None:
                        for k, v in packed.tensors.items():
                            a, dt = v if isinstance(v, tuple) else (v, None)
                            out[f"{module}.{k}"] = _torch_tensor(a, dt or "")
                        schemes.setdefault(packed.scheme, []).append(str(module))
                        how = "exact" if packed.rel_err is None else "reencoded"
                        rep = TensorReport(name, name, enc["name"], how, packed.note)
                        rep.rel_rmse = packed.rel_err
                    else:
                        out[name] = g.get_tensor(name).contiguous()
                        if module in linears:
                            dense_linears.append(str(module))
                        how = "raw" if enc["name"] == "raw" else "dense"
                        rep = TensorReport(name, name, enc["name"], how, "dense")
                    report.tensors.append(rep)
                    bar.update(0)
    dense_linears += sorted(m for m in linears if m + ".weight" not in names)
    qc = quantization_config(schemes, [m for m in dense_linears if m in linears])
    with building_folder(dst, force) as tmp:
        _copy_with_config(src, tmp, qc)
        save_file(out, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    report.seconds = time.perf_counter() - t0
    return report


def _copy_with_config(src: str, dst: str, qc: dict[str, Any]) -> None:
    import shutil

    for fn in sorted(os.listdir(src)):
        path = os.path.join(src, fn)
        skip = fn.endswith((".qtensors", ".safetensors", ".safetensors.index.json"))
        if fn.startswith(".") or not os.path.isfile(path) or skip:
            continue
        if fn == "config.json":
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
            config["quantization_config"] = qc
            with open(os.path.join(dst, fn), "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2)
                fh.write("\n")
            continue
        shutil.copy2(path, os.path.join(dst, fn))
