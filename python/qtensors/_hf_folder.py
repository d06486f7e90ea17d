"""What a converted model folder tells Hugging Face transformers about itself.

`qtensors convert SRC_FOLDER DST_FOLDER` keeps a model folder a model folder. For transformers'
own loaders (`AutoModelForCausalLM.from_pretrained(DST_FOLDER)`, `pipeline`,
`SentenceTransformer`) it adds two things, the way quantized checkpoints of bitsandbytes, torchao
or compressed-tensors do:

* `config.json` gets a `quantization_config` with `quant_method: "qtensors"`: the encoding policy,
  the patterns kept raw, the modules whose weight was stored raw, and the qtensors index. With
  `import qtensors.torch`, transformers hands such a folder to qtensors' quantizer
  (`qtensors.torch.hf_quantizer`), which reads the `.qtensors` shards itself.
* `model.safetensors.index.json`, the file transformers looks for, maps every tensor to its
  `.qtensors` shard (`metadata.format = "qtensors"`). Without the quantizer registered,
  transformers fails on it loudly (the shards are no safetensors) instead of building a model of
  random weights from nothing; tools that read safetensors refuse it the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .encodings import FLEXGEN, Encoding, Raw

QUANT_METHOD = "qtensors"
#: The index transformers reads (it looks for this name before any other).
HF_INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def encoding_json(enc: Encoding | None) -> dict[str, Any] | str:
    """An encoding as JSON, its axis as given (-1 = the last axis of every tensor)."""
    if enc is None:
        enc = FLEXGEN
    if isinstance(enc, Raw):
        return "raw"
    d: dict[str, Any] = {"name": enc.name, "group_size": enc.group_size, "axis": enc.axis}
    if enc.name != "nf4":
        d["bits"] = enc.bits
    d["scale_dtype"] = enc.scale_dtype
    return d


def policy_json(quant: Encoding | Mapping[str, Encoding] | None) -> Any:
    if isinstance(quant, Mapping):
        return {pattern: encoding_json(e) for pattern, e in quant.items()}
    return encoding_json(quant)


def quantization_config(
    quant: Encoding | Mapping[str, Encoding] | None,
    keep: Iterable[str],
    tensors: Iterable[tuple[str, str, tuple[int, ...], dict[str, Any]]],
    weights: str,
) -> dict[str, Any]:
    """The `quantization_config` of a converted folder. `tensors`: (name, dtype, shape, stored
    encoding) of every tensor written."""
    raw_modules = sorted(
        name[: -len(".weight")]
        for name, dtype, shape, enc in tensors
        if name.endswith(".weight") and len(shape) >= 2 and dtype in FLOAT_DTYPES
        if enc["name"] == "raw"
    )
    return {
        "quant_method": QUANT_METHOD,
        "encoding": policy_json(quant),
        "keep": list(keep),
        "modules_not_quantized": raw_modules,
        "weights": weights,
    }


def add_quantization_config(config_path: str, qconfig: Mapping[str, Any]) -> str | None:
    """Write `qconfig` into the `config.json` at `config_path` (replacing any earlier one: the
    weights are qtensors' now). Returns a note when the file is no JSON object (left as is)."""
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        return f"config.json left without a quantization_config: {exc}"
    if not isinstance(config, dict):
        return "config.json left without a quantization_config: it is no JSON object"
    config["quantization_config"] = dict(qconfig)
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    return None


def write_hf_index(folder: str, weight_map: Mapping[str, str], metadata: Mapping[str, Any]) -> None:
    """`model.safetensors.index.json` in `folder`: every tensor to its `.qtensors` shard."""
    doc = {"metadata": {**metadata, "format": QUANT_METHOD}, "weight_map": dict(weight_map)}
    with open(os.path.join(folder, HF_INDEX), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def is_qtensors_index(path: str) -> bool:
    """Whether the `*.safetensors.index.json` at `path` is one `write_hf_index` wrote."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return isinstance(meta, dict) and meta.get("format") == QUANT_METHOD
