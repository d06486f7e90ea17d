"""Export a qtensors model folder of the llama architecture as a GGUF file (written with the
`gguf` package's GGUFWriter), mapping our groups onto llama.cpp's blocks exactly where they
agree: groups of 32 along the rows with fp16 scales.

    symmetric 4-bit  -> Q4_0      affine 4-bit -> Q4_1
    symmetric 5-bit  -> Q5_0      affine 5-bit -> Q5_1
    symmetric 8-bit  -> Q8_0

(the symmetric decode (code - 2^(bits-1)) * d is Q4_0/Q5_0/Q8_0's for either `levels`). Block
layout is the inverse of `gguf.py`'s import. Raw float tensors stay F32/F16/BF16; tensors of
other encodings are decoded and written F32 (exact, larger) and reported. llama.cpp's Q/K row
permutation is applied to the quantized rows, which is exact because groups run along rows.
The tokenizer is written for byte-level BPE tokenizers (tokenizer.json of type BPE); others
are left out and reported.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from ..errors import ForeignFormatError
from .common import ImportReport, TensorReport
from .export_ct import _qtensors_files, unpack_stream
from .gguf import BLOCK, _require_gguf

#: (encoding name, bits) -> GGUF type, for groups of 32 along the rows with fp16 scales.
TYPES = {
    ("symmetric", 4): "Q4_0",
    ("affine", 4): "Q4_1",
    ("symmetric", 5): "Q5_0",
    ("affine", 5): "Q5_1",
    ("symmetric", 8): "Q8_0",
}
ARCHS = {"llama": "llama", "mistral": "llama"}


def gguf_type(encoding: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """The GGUF block type a tensor of this encoding and shape maps onto exactly, or None."""
    t = TYPES.get((encoding.get("name"), encoding.get("bits")))
    if t is None or len(shape) < 1 or shape[-1] % BLOCK:
        return None
    ok = encoding["group_size"] == BLOCK and encoding["axis"] == len(shape) - 1
    return t if ok and encoding["scale_dtype"] == "float16" else None


def blocks(type_name: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None):
    """(n, 32) codes, n fp16 scales (and mins) -> (n, type size) GGUF block bytes."""
    d = np.ascontiguousarray(scales.reshape(-1, 1).astype(np.float16)).view(np.uint8)
    head = [d]
    if mins is not None:
        head.append(np.ascontiguousarray(mins.reshape(-1, 1).astype(np.float16)).view(np.uint8))
    if type_name == "Q8_0":
        return np.concatenate([*head, codes ^ np.uint8(0x80)], axis=1)
    low = codes & 0x0F
    qs = low[:, :16] | (low[:, 16:] << 4)  # element i low nibble, i + 16 high nibble of byte i
    if type_name in ("Q4_0", "Q4_1"):
        return np.concatenate([*head, qs], axis=1)
    qh = np.packbits((codes >> 4) & 1, axis=1, bitorder="little")  # bit i: element i's bit 4
    return np.concatenate([*head, qh, qs], axis=1)


def _qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q/K (convert_hf_to_gguf's permute), as indices."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _gguf_name(table: Any, name: str) -> str | None:
    return table.get_name(name, try_suffixes=(".weight", ".bias"))


def _add_config(w: Any, cfg: dict[str, Any]) -> None:
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])


def _add_tokenizer(w: Any, folder: str) -> str:
    """Byte-level BPE vocabulary, merges and special tokens; returns what was done."""
    gguf = _require_gguf()
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as fh:
            tok = json.load(fh)
    except (OSError, ValueError):
        return "no tokenizer.json: tokenizer not written"
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        return f"tokenizer type {model.get('type')!r} is not written (only BPE)"
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special = set()
    for a in tok.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["id"])
    size = max(vocab.values(), default=-1) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)
    return f"BPE tokenizer of {size} tokens"


def export_gguf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, force: bool = False
) -> ImportReport:
    """Write the qtensors model folder `src` (llama architecture) as the GGUF file `dst`."""
    import qtensors as qt

    from ..convert import OutputExistsError

    gguf = _require_gguf()
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.lexists(dst) and not force:
        raise OutputExistsError(f"{dst} exists: pass force=True (--force) to replace it")
    files = _qtensors_files(src)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    arch = ARCHS.get(cfg.get("model_type"))
    if arch is None:
        raise ForeignFormatError(
            f"GGUF export: config.json model_type = {cfg.get('model_type')!r} is not supported "
            f"(supported: {', '.join(ARCHS)})"
        )
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(arch_id, cfg["num_hidden_layers"])
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    report = ImportReport(source=src, format="GGUF", dst=dst)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(dst)}.",
        suffix=".tmp",
        dir=os.path.dirname(os.path.abspath(dst)),
    )
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.basename(os.path.abspath(src)))
        _add_config(w, cfg)
        note = _add_tokenizer(w, src)
        for path in files:
            with qt.safe_open(path, framework="np") as f:
                for name in f.keys():
                    g_name = _gguf_name(table, name)
                    if g_name is None:
                        report.skipped.append(name)
                        continue
                    heads = {"attn_q": n_head, "attn_k": n_kv}.get(g_name.split(".")[-2])
                    rep = _add_tensor(w, f, path, name, g_name, heads, gguf)
                    report.tensors.append(rep)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, dst)
        tmp = ""
    finally:
        if tmp:
            os.unlink(tmp)
    report.skipped.append(f"(tokenizer: {note})")
    report.seconds = time.perf_counter() - t0
    return report


def _add_tensor(
    w: Any, f: Any, path: str, name: str, g_name: str, heads: int | None, gguf: Any
) -> TensorReport:
    enc = f.encoding(name)
    shape = tuple(f.shape(name))
    perm = _qk_permutation(shape[0], heads) if heads and len(shape) == 2 else None
    t = gguf_type(enc, shape)
    if t is not None:
        q = f.get_quantized(name)
        rows = int(np.prod(shape[:-1]))
        codes = unpack_stream(np.asarray(q.codes), enc["bits"], (rows, shape[-1]))
        scales = np.asarray(q.scales).reshape(rows, -1)
        mins = None if q.mins is None else np.asarray(q.mins).reshape(rows, -1)
        if perm is not None:
            codes, scales = codes[perm], scales[perm]
            mins = None if mins is None else mins[perm]
        b = blocks(t, codes.reshape(-1, BLOCK), scales, mins).reshape(rows, -1)
        w.add_tensor(g_name, b, raw_shape=b.shape, raw_dtype=gguf.GGMLQuantizationType[t])
        return TensorReport(name, g_name, enc["name"], "exact", t)
    dtype = f.dtype(name)
    if enc["name"] == "raw" and dtype == "bfloat16":
        x = np.asarray(f.get_quantized(name).codes).view(np.uint16).reshape(shape)
        if perm is not None:
            x = x[perm]
        w.add_tensor(g_name, x, raw_shape=x.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        return TensorReport(name, g_name, "bfloat16", "raw", "BF16")
    x = _dense(f, path, name)
    if perm is not None:
        x = x[perm]
    keep16 = enc["name"] == "raw" and dtype == "float16"
    x = x.astype(np.float16 if keep16 else np.float32)
    w.add_tensor(g_name, x)
    how = "raw" if enc["name"] == "raw" else "dense"
    return TensorReport(name, g_name, f"{enc['name']}", how, "F16" if keep16 else "F32")


def _dense(f: Any, path: str, name: str) -> np.ndarray:
    """The decoded tensor as numpy (bfloat16 widened to float32 through torch)."""
    if f.dtype(name) != "bfloat16":
        return np.asarray(f.get_tensor(name))
    import qtensors as qt

    with qt.safe_open(path, framework="pt") as g:
        return g.get_tensor(name).float().numpy()
