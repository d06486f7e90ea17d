"""Prompt caches on disk: ``save_kv_cache`` / ``load_kv_cache``.

    qtt.save_kv_cache(cache, "prompt.qtensors", config=model.config)   # after a long prompt
    cache = qtt.load_kv_cache("prompt.qtensors", device="cuda", config=model.config)

A cache file is an ordinary qtensors file: per layer ``i`` the quantized tokens as
``layers.i.keys`` / ``layers.i.values`` (affine, groups along the head dimension: the bytes the
cache holds) and the exact window as ``layers.i.keys.window`` / ``layers.i.values.window`` (raw),
with the cache's settings, its token count and the model's identity (layers, kv heads, head
dims, dtype, and with a config its architecture fields and their hash) in the metadata. Loading
reads it with ``safe_open`` and refuses a file that does not fit the model it is loaded for; a
reloaded cache continues exactly as the saved one would have.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from ..errors import FormatError, QuantizationError
from ..files import safe_open, save_file
from ..quantized import QuantizedTensor
from .kv_cache import BITS, QuantizedKVCache
from .ops import OUT_DTYPES, SCALE_DTYPES

KIND = "qtensors.kv_cache"
VERSION = "1"
# the fields of a transformers config that fix the shape of its KV cache and what it means
IDENTITY_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope_theta",
)
_SCALE_BY_NAME = {v: k for k, v in SCALE_DTYPES.items()}
_DTYPE_BY_NAME = {v: k for k, v in OUT_DTYPES.items()}


def model_identity(config: Any) -> dict[str, Any]:
    """The identity fields of a transformers config (its text part), those it has."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    out = {}
    for f in IDENTITY_FIELDS:
        v = getattr(config, f, None)
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            out[f] = v
    return out


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def save_kv_cache(
    cache: QuantizedKVCache, path: str | os.PathLike[str], config: Any = None
) -> None:
    """Write ``cache`` to ``path`` (atomically: nothing is left under ``path`` on error).
    ``config`` (default: the cache's own) records the model's identity."""
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"save_kv_cache takes a QuantizedKVCache, not {type(cache).__name__}")
    layers = cache.layers
    if not layers or any(not layer.is_initialized or not layer.tokens for layer in layers):
        raise ValueError("this cache holds no tokens (run the model with it first)")
    first = layers[0]
    assert first.shape is not None and first.dtype is not None
    B, H, Dk, Dv = first.shape
    tokens, tq = first.tokens, first.quantized_tokens
    for i, layer in enumerate(layers):
        if layer.shape != first.shape or layer.dtype != first.dtype or layer.tokens != tokens:
            raise ValueError(
                f"layer {i} holds {layer.tokens} tokens of shape {layer.shape}, layer 0 "
                f"{tokens} of {first.shape}: only caches whose layers agree can be saved"
            )
    dtype = OUT_DTYPES[first.dtype]
    meta = {
        "kind": KIND,
        "version": VERSION,
        "layers": str(len(layers)),
        "batch": str(B),
        "kv_heads": str(H),
        "head_dim": str(Dk),
        "value_head_dim": str(Dv),
        "dtype": dtype,
        "tokens": str(tokens),
        "quantized_tokens": str(tq),
        "bits": str(cache.bits),
        "group_size": str(cache.group_size),
        "residual_length": str(cache.residual_length),
        "scale_dtype": SCALE_DTYPES[cache.scale_dtype],
    }
    config = config if config is not None else cache.config
    if config is not None:
        ident = model_identity(config)
        meta["model"] = json.dumps(ident, sort_keys=True)
        meta["model_sha256"] = _identity_hash(ident)
    enc = {
        "name": "affine",
        "bits": cache.bits,
        "group_size": cache.group_size,
        "axis": 3,
        "scale_dtype": SCALE_DTYPES[cache.scale_dtype],
    }
    tensors: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        for what, store, D in (("keys", layer.k, Dk), ("values", layer.v, Dv)):
            assert store is not None
            codes, scales, mins = (p.cpu() for p in store.quantized(tq))
            for part, p in (("scales", scales), ("mins", mins)):
                if not bool(torch.isfinite(p).all()):
                    raise QuantizationError(
                        f"layer {i} {what}: {part} are not finite in {enc['scale_dtype']} "
                        "(values beyond its range, or NaN / Inf in the states)"
                    )
            tensors[f"layers.{i}.{what}"] = QuantizedTensor(
                codes, scales, mins, (B, H, tq, D), dtype, dict(enc), "pt"
            )
            window = store.res[store.cur][:, :, : tokens - tq]
            tensors[f"layers.{i}.{what}.window"] = window.cpu().contiguous()
    save_file(tensors, path, quant="raw", metadata=meta)


def _meta_int(meta: dict[str, str], key: str, path: Any) -> int:
    try:
        v = int(meta[key])
    except (KeyError, ValueError):
        raise FormatError(f"{path}: KV cache metadata {key!r} is missing or not an int") from None
    if v < 0:
        raise FormatError(f"{path}: KV cache metadata {key!r} is negative ({v})")
    return v


def _check_model(meta: dict[str, str], config: Any, path: Any) -> None:
    """Refuse a cache made for another model than ``config``'s."""
    want = model_identity(config)
    n_layers = want.get("num_hidden_layers")
    if n_layers is not None and n_layers != int(meta["layers"]):
        raise ValueError(
            f"{path} is a KV cache of a {meta['layers']}-layer model; this model has "
            f"{n_layers} layers"
        )
    kv_heads = want.get("num_key_value_heads", want.get("num_attention_heads"))
    if kv_heads is not None and kv_heads != int(meta["kv_heads"]):
        raise ValueError(
            f"{path} is a KV cache of a model with {meta['kv_heads']} kv heads; this model has "
            f"{kv_heads}"
        )
    if "model" not in meta:
        return
    try:
        saved = json.loads(meta["model"])
    except ValueError:
        raise FormatError(f"{path}: KV cache metadata 'model' is not JSON") from None
    if not isinstance(saved, dict):
        raise FormatError(f"{path}: KV cache metadata 'model' is not an object")
    diff = {k: (saved[k], want[k]) for k in saved.keys() & want.keys() if saved[k] != want[k]}
    if diff:
        what = ", ".join(f"{k} {a!r} (file) vs {b!r} (model)" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"{path} is a KV cache of another model: {what}")


def _check_tensors(f: safe_open, name: str, enc: dict, dims: tuple, meta: dict, path: Any):
    """The quantized tokens and the window of one K or V must be what the metadata says."""
    B, H, tq, tw, D = dims
    window = name + ".window"
    for nm in (name, window):
        if nm not in f:
            raise FormatError(f"{path}: KV cache tensor {nm!r} is missing")
        if f.dtype(nm) != meta["dtype"]:
            raise FormatError(f"{path}: {nm} is {f.dtype(nm)}, not {meta['dtype']}")
    if f.encoding(name) != enc or f.shape(name) != (B, H, tq, D):
        raise FormatError(
            f"{path}: {name} is {list(f.shape(name))} {f.encoding(name)}; the metadata says "
            f"{[B, H, tq, D]} {enc}"
        )
    if f.encoding(window) != {"name": "raw"} or f.shape(window) != (B, H, tw, D):
        raise FormatError(f"{path}: {window} is not raw {[B, H, tw, D]}")


def load_kv_cache(
    path: str | os.PathLike[str], device: Any = "cpu", config: Any = None
) -> QuantizedKVCache:
    """The cache saved in ``path``, on ``device``. With ``config`` (the model's), a cache made
    for another model is refused here; without, at the first update with states of another
    shape. Raises ``FormatError`` for a file that is not a well-formed KV cache."""
    device = torch.device(device)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        if meta.get("kind") != KIND:
            raise FormatError(f"{path} is not a qtensors KV cache (metadata kind {KIND!r})")
        if meta.get("version") != VERSION:
            raise FormatError(f"{path}: KV cache version {meta.get('version')!r} is not {VERSION}")
        n = {
            k: _meta_int(meta, k, path)
            for k in (
                "layers",
                "batch",
                "kv_heads",
                "head_dim",
                "value_head_dim",
                "tokens",
                "quantized_tokens",
                "bits",
                "group_size",
                "residual_length",
            )
        }
        dtype = _DTYPE_BY_NAME.get(meta.get("dtype", ""))
        scale_dtype = _SCALE_BY_NAME.get(meta.get("scale_dtype", ""))
        if dtype is None or scale_dtype is None or n["bits"] not in BITS:
            raise FormatError(f"{path}: KV cache metadata dtype / scale_dtype / bits is invalid")
        if n["quantized_tokens"] != max(0, n["tokens"] - n["residual_length"]):
            raise FormatError(
                f"{path}: {n['quantized_tokens']} quantized tokens of {n['tokens']} do not match "
                f"a window of {n['residual_length']}"
            )
        if n["tokens"] < 1:
            raise FormatError(f"{path}: a KV cache file holds at least one token")
        if config is not None:
            _check_model(meta, config, path)
        try:
            cache = QuantizedKVCache(
                n["bits"], n["group_size"], n["residual_length"], scale_dtype, config=config
            )
        except ValueError as e:
            raise FormatError(f"{path}: KV cache settings: {e}") from None
        B, H, Dk, Dv = n["batch"], n["kv_heads"], n["head_dim"], n["value_head_dim"]
        T, tq = n["tokens"], n["quantized_tokens"]
        enc = {
            "name": "affine",
            "bits": n["bits"],
            "group_size": n["group_size"],
            "axis": 3,
            "scale_dtype": meta["scale_dtype"],
        }
        for i in range(n["layers"]):
            for what, D in (("keys", Dk), ("values", Dv)):
                _check_tensors(f, f"layers.{i}.{what}", enc, (B, H, tq, T - tq, D), meta, path)
        for i in range(n["layers"]):
            layer = cache.new_layer()
            try:
                layer.lazy_initialization(
                    torch.empty((B, H, 0, Dk), dtype=dtype, device=device),
                    torch.empty((B, H, 0, Dv), dtype=dtype, device=device),
                )
            except ValueError as e:
                raise FormatError(f"{path}: {e}") from None
            for what, store in (("keys", layer.k), ("values", layer.v)):
                assert store is not None
                name = f"layers.{i}.{what}"
                q = f.get_quantized(name)
                store.reserve(0, tq, exact=True)
                store.reserve_window(0, T - tq, exact=True)
                store.codes[:, :, :tq] = q.codes.reshape(store.codes[:, :, :tq].shape).to(device)
                store.scales[:, :, :tq] = q.scales.to(device)
                store.mins[:, :, :tq] = q.mins.to(device)
                store.res[store.cur][:, :, : T - tq] = f.get_tensor(name + ".window").to(device)
            layer.tokens, layer.quantized_tokens = T, tq
            cache.layers.append(layer)
        cache._num_layers = n["layers"]
    return cache
