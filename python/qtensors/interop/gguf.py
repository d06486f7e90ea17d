"""Import llama.cpp GGUF files (read with the `gguf` package) into a transformers model folder.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks are 32 values along a row with an fp16 scale (and min),
which is exactly one of our groups of 32 along the last axis, so they are mapped code for code
without decoding:

    Q4_0  x = (q - 8) * d        -> symmetric 4-bit, levels "full"   (q = code)
    Q4_1  x = q * d + m          -> affine 4-bit                     (scale d, min m)
    Q5_0  x = (q - 16) * d       -> symmetric 5-bit, levels "full"
    Q5_1  x = q * d + m          -> affine 5-bit
    Q8_0  x = q * d, q int8      -> symmetric 8-bit                  (code = q + 128)

all with group size 32, axis -1, fp16 scales. Only the code order differs: a GGUF block keeps
element i in the low nibble of byte i and element i + 16 in the high nibble (Q5 types add the
fifth bits in a 32-bit word); our stream packs codes in element order. Two K-quants map too,
with fp32 scales (their products of an fp16 super-block scale and a 6- or 8-bit sub-block
scale need up to 19 significant bits, which fp16 does not have but fp32 holds exactly):

    Q4_K  x = d*sc_j * q - dmin*m_j  -> affine 4-bit, groups of 32  (scale d*sc, min -dmin*m)
    Q6_K  x = d*sc_j * (q - 32)      -> symmetric 6-bit, groups of 16 (scale d*sc)

gguf decodes these in fp32 with one rounding (the subtraction), as we do. Float tensors stay
raw. Other types (Q2_K, Q3_K, Q5_K, i-quants, ...) are decoded with `gguf` and quantized again
with the chosen encoding, and their error is reported.

The config and tokenizer come from transformers' own GGUF reader; tensor names go through a
fixed table for the plain decoders (llama, mistral, qwen2, qwen3), else through transformers'
GGUF name map on a meta model of the architecture; llama.cpp's Q/K row permutation
(LlamaTensorProcessor) is undone on the quantized rows, which is exact because groups run along
the rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .._progress import Progress, want_progress
from ..encodings import Affine, Encoding, Raw, Symmetric, as_encoding
from ..errors import ForeignFormatError
from .common import ImportReport, TensorReport, building_folder
from .gguf_file import GGUFFile, TensorInfo
from .intgroups import pack_codes

BLOCK = 32
#: Re-encoding of the types that do not map exactly, unless `quant` says otherwise.
DEFAULT_REENCODE: Encoding = Affine(bits=4, group_size=32, axis=-1)
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("importing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


# -- the exact block maps -----------------------------------------------------------------------


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes of GGUF nibbles -> (n, 16) bytes in our order: byte j of a block holds
    element 2j (low nibble) and 2j + 1 (high); GGUF holds element i and i + 16 in byte i."""
    even, odd = qs[:, 0::2], qs[:, 1::2]
    out = np.empty_like(qs)
    out[:, :8] = (even & 0x0F) | (odd << 4)
    out[:, 8:] = (even >> 4) | (odd & 0xF0)
    return out


def _join_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of `_split_nibbles`."""
    lo, hi = packed[:, :8], packed[:, 8:]
    out = np.empty_like(packed)
    out[:, 0::2] = (lo & 0x0F) | (hi << 4)
    out[:, 1::2] = (lo >> 4) | (hi & 0xF0)
    return out


def _five_bit_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """(n, 32) codes of Q5 blocks: low nibbles as Q4, bit 4 of element i is bit i of `qh`."""
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    high = np.unpackbits(qh, axis=1, bitorder="little")
    return low | (high << 4)


def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, 32) codes -> (n, 4 * bits) bytes of our LSB-first stream (spec 4.2)."""
    planes = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(len(codes), -1), axis=1, bitorder="little")


def _fp16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).reshape(-1)


@dataclass(frozen=True)
class BlockMap:
    """How one GGUF block type maps onto an encoding: bytes per block, the encoding, and the
    function from (n, block bytes) to (codes bytes, fp16 scales, fp16 mins or None)."""

    type_size: int
    encoding: Encoding
    parts: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    block: int = BLOCK  #: elements per GGUF block (256 for the K-quants)


def _q4_0(b: np.ndarray):
    return _split_nibbles(b[:, 2:]), _fp16(b[:, :2]), None


def _q4_1(b: np.ndarray):
    return _split_nibbles(b[:, 4:]), _fp16(b[:, :2]), _fp16(b[:, 2:4])


def _q5_0(b: np.ndarray):
    return _pack_bits(_five_bit_codes(b[:, 2:6], b[:, 6:]), 5), _fp16(b[:, :2]), None


def _q5_1(b: np.ndarray):
    codes = _five_bit_codes(b[:, 4:8], b[:, 8:])
    return _pack_bits(codes, 5), _fp16(b[:, :2]), _fp16(b[:, 2:4])


def _q8_0(b: np.ndarray):
    return b[:, 2:] ^ np.uint8(0x80), _fp16(b[:, :2]), None


QK_K = 256


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins per block: bytes 0-3 hold scales
    0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 likewise the mins; bytes 8-11
    the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _q4_k(b: np.ndarray):
    """x = d*sc_j * q - dmin*m_j per sub-block j of 32: affine with scale d*sc and min
    -dmin*m, both exact in fp32 (11 + 6 significant bits), and the same single rounding of
    the subtraction as gguf's fp32 decode."""
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1)  # chunk c: low nibbles elements 64c.., high 64c+32..
    return pack_codes(codes, 4), (d * sc).reshape(-1), (-(dmin * mn) + 0.0).reshape(-1)


def _q6_k(b: np.ndarray):
    """x = d*sc_j * (q - 32) per sub-block j of 16: symmetric 6-bit with scale d*sc (exact in
    fp32: 11 + 8 bits) and code q."""
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = lo.reshape(-1, QK_K) | (hi.reshape(-1, QK_K) << 4)
    return pack_codes(codes.reshape(-1), 6), (d * sc).reshape(-1), None


EXACT: dict[str, BlockMap] = {
    "Q4_0": BlockMap(18, Symmetric(bits=4, group_size=BLOCK, axis=-1, levels="full"), _q4_0),
    "Q4_1": BlockMap(20, Affine(bits=4, group_size=BLOCK, axis=-1), _q4_1),
    "Q5_0": BlockMap(22, Symmetric(bits=5, group_size=BLOCK, axis=-1, levels="full"), _q5_0),
    "Q5_1": BlockMap(24, Affine(bits=5, group_size=BLOCK, axis=-1), _q5_1),
    "Q8_0": BlockMap(34, Symmetric(bits=8, group_size=BLOCK, axis=-1), _q8_0),
    "Q4_K": BlockMap(
        144, Affine(bits=4, group_size=32, axis=-1, scale_dtype="float32"), _q4_k, QK_K
    ),
    "Q6_K": BlockMap(
        210,
        Symmetric(bits=6, group_size=16, axis=-1, scale_dtype="float32", levels="full"),
        _q6_k,
        QK_K,
    ),
}


def block_parts(
    type_name: str, data: np.ndarray, shape: Sequence[int], name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The parts (codes, scales, mins or None) of a GGUF tensor of an exactly mapped type, given
    its raw block bytes and its logical (numpy-order) shape; scales and mins have the shape
    with the last axis cut to its groups."""
    m = EXACT[type_name]
    shape = tuple(int(d) for d in shape)
    if not shape or shape[-1] % m.block:
        raise ForeignFormatError(
            f"GGUF tensor {name!r} ({type_name}): rows of {shape[-1] if shape else 0} elements "
            f"are not whole blocks of {m.block}"
        )
    n_blocks = int(np.prod(shape)) // m.block
    raw = np.asarray(data).reshape(-1)
    if raw.dtype != np.uint8 or raw.size != n_blocks * m.type_size:
        raise ForeignFormatError(
            f"GGUF tensor {name!r} ({type_name}): {raw.size} bytes of {raw.dtype} for "
            f"{n_blocks} blocks of {m.type_size} bytes (shape {list(shape)})"
        )
    codes, scales, mins = m.parts(raw.reshape(n_blocks, m.type_size))
    sshape = (*shape[:-1], shape[-1] // m.encoding.group_size)
    return (
        np.ascontiguousarray(codes).reshape(-1),
        scales.reshape(sshape),
        None if mins is None else mins.reshape(sshape),
    )


# -- transformers: config, tokenizer, names ------------------------------------------------------


@contextmanager
def _transformers_reads(f: GGUFFile) -> Iterator[None]:
    """transformers' GGUF config and tokenizer readers, fed our header instead of opening the
    file with gguf's slow GGUFReader (it reads only `fields` and the tensor names)."""
    gguf = _require_gguf()
    original = gguf.GGUFReader
    view = f.as_gguf_reader()
    gguf.GGUFReader = lambda path, *a, **k: view  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


#: GGUF name -> transformers name for the plain decoder architectures, so that importing them
#: needs neither transformers' model classes nor a model: importing `modeling_llama` alone takes
#: seconds, more than the rest of the import of a small model.
STANDARD_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
STANDARD_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
STANDARD_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _standard_name(gguf_name: str, layers: int) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < layers:
        hf = STANDARD_LAYER.get(parts[2])
        return None if hf is None else f"model.layers.{parts[1]}.{hf}.{suffix}"
    hf = STANDARD_TOP.get(base)
    return None if hf is None else f"{hf}.{suffix}"


def _transformers_side(f: GGUFFile) -> tuple[dict[str, Any], Any, dict[str, str], Any]:
    """Config (as a dict), tokenizer, the map from GGUF tensor names to the model's parameter
    names, and transformers' tensor processor for the architecture."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        load_gguf_checkpoint,
    )

    folder, file = os.path.split(os.path.abspath(f.path))
    arch = f.string("general.architecture") or "?"
    with _transformers_reads(f):
        try:
            config = dict(load_gguf_checkpoint(f.path, return_tensors=False)["config"])
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ForeignFormatError(
                f"GGUF {f.path}: transformers cannot build a config for architecture {arch!r}: {e}"
            ) from None
        standard = config.get("model_type") in STANDARD_ARCHS
        # AutoTokenizer picks TokenizersBackend for these too, but first imports the config
        # classes (seconds); the class itself reads the GGUF vocabulary the same way.
        if standard:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend as Tok
        else:
            Tok = transformers.AutoTokenizer
        try:
            tokenizer = Tok.from_pretrained(folder, gguf_file=file)
        except (ValueError, KeyError, NotImplementedError, OSError):
            tokenizer = None  # no tokenizer in the metadata: the folder gets none
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    layers = int(config.get("num_hidden_layers") or 0)
    if standard:
        names = {t.name: _standard_name(t.name, layers) for t in f.tensors}
        return config, tokenizer, {k: v for k, v in names.items() if v}, processor
    import torch

    with _transformers_reads(f):
        full = transformers.AutoConfig.from_pretrained(folder, gguf_file=file)
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(full)
        except ValueError:
            model = transformers.AutoModel.from_config(full)
    return full.to_dict(), tokenizer, _name_map(f, model, processor), processor


def _write_config(config: dict[str, Any], folder: str) -> None:
    """config.json: the config transformers reads from the GGUF metadata (the keys it does not
    set take its defaults when loaded, as they do for the GGUF itself)."""
    import transformers

    doc = {k: v for k, v in config.items() if not k.startswith("_")}
    doc.setdefault("transformers_version", transformers.__version__)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _name_map(f: GGUFFile, model: Any, processor: Any) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, by gguf's name table as transformers'
    `get_gguf_hf_weights_map` builds it, but with one table instead of one per submodule (that
    took 40 s): a name the table does not know is tried again without its leading module names,
    which is what the per-submodule tables matched."""
    import gguf

    arch_name = f.string("general.architecture") or ""
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    if arch is None:
        raise ForeignFormatError(f"GGUF {f.path}: gguf does not know architecture {arch_name!r}")
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    out: dict[str, str] = {}
    for hf_name in model.state_dict():
        key = processor.preprocess_name(hf_name)
        base, suffix = key, ""
        if key.endswith((".weight", ".bias")):
            base, suffix = key.rsplit(".", 1)
            suffix = "." + suffix
        parts = base.split(".")
        for i in range(len(parts)):
            g = table.get_name(".".join(parts[i:]))
            if g is not None:
                out.setdefault(g + suffix, hf_name)
                break
    return out


def _row_permutation(processor: Any, name: str, rows: int) -> np.ndarray | None:
    """The row order transformers' processor gives tensor `name`, if all it does is reorder
    rows (llama.cpp's Q/K permutation); None if it leaves the tensor alone."""
    probe = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    out = processor.process(weights=probe, name=name).weights
    out = np.asarray(out).reshape(-1)
    if out.shape == (rows,) and np.array_equal(out, probe.reshape(-1)):
        return None
    return out


# -- the import ----------------------------------------------------------------------------------


def _rel_rmse(want: np.ndarray, got: np.ndarray) -> float:
    w = want.astype(np.float64)
    den = float(np.sqrt(np.mean(w * w))) or 1.0
    return float(np.sqrt(np.mean((w - got.astype(np.float64)) ** 2))) / den


@dataclass
class _Planned:
    name: str
    dtype: str
    shape: list[int]
    encoding: dict[str, Any]
    nbytes: int  #: bytes of the source tensor, for the progress bar
    #: The parts' arrays, and the relative RMSE of a re-encoding (None when nothing was lost).
    make_parts: Callable[[], tuple[list[np.ndarray], float | None]]


def import_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    quant: Encoding | str | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> ImportReport:
    """Import the GGUF model `src` into the model folder `dst` (config.json, tokenizer files,
    model.qtensors); `qtensors.torch.from_pretrained(dst, AutoModelForCausalLM)` runs it.

    Exactly mapped types keep their codes; other quantized types are decoded and quantized
    again with `quant` (an encoding or preset; default affine 4-bit g32). Returns the report of
    what was exact, raw and re-encoded."""
    t0 = time.perf_counter()
    gguf = _require_gguf()
    src, dst = os.fspath(src), os.fspath(dst)
    reenc = as_encoding(quant) if quant is not None else DEFAULT_REENCODE
    reader = GGUFFile(src)
    config, tokenizer, name_map, processor = _transformers_side(reader)
    report = ImportReport(source=src, format="GGUF", dst=dst)
    plans: list[_Planned] = []
    for t in reader.tensors:
        if t.name not in name_map:
            report.skipped.append(t.name)
            continue
        plan, rep = _plan_tensor(gguf, t, name_map[t.name], processor, reenc)
        plans.append(plan)
        report.tensors.append(rep)

    with building_folder(dst, force) as tmp:
        _write_config(config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format": "pt", "source": os.path.basename(src), "imported_from": "gguf"}
        entries = [(p.name, p.dtype, p.shape, json.dumps(p.encoding)) for p in plans]
        writer = _core.Writer(os.path.join(tmp, "model.qtensors"), entries, meta, 64)
        try:
            by_name = {r.name: r for r in report.tensors}
            total = sum(p.nbytes for p in plans)
            with Progress(total, len(plans), "import GGUF", want_progress(progress)) as bar:
                for i, p in enumerate(plans):
                    parts, by_name[p.name].rel_rmse = p.make_parts()
                    writer.write_parts(i, [np.ascontiguousarray(a).view(np.uint8) for a in parts])
                    bar.update(p.nbytes)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    report.seconds = time.perf_counter() - t0
    return report


def _plan_tensor(
    gguf: Any, t: TensorInfo, hf_name: str, processor: Any, reenc: Encoding
) -> tuple[_Planned, TensorReport]:
    type_name = t.type_name
    shape = list(t.shape)
    exact = EXACT.get(type_name)
    if exact is not None and len(shape) >= 1:
        perm = _row_permutation(processor, t.name, shape[0]) if len(shape) == 2 else None

        def make_exact() -> tuple[list[np.ndarray], None]:
            codes, scales, mins = block_parts(type_name, t.data, shape, t.name)
            if perm is not None:
                codes = codes.reshape(shape[0], -1)[perm].reshape(-1)
                scales = scales[perm]
                mins = None if mins is None else mins[perm]
            return [codes, scales] + ([] if mins is None else [mins]), None

        enc = exact.encoding.to_dict(len(shape))
        plan = _Planned(hf_name, "float32", shape, enc, t.nbytes, make_exact)
        how = TensorReport(hf_name, t.name, type_name, "exact", _describe(exact.encoding))
        return plan, how

    def dense() -> np.ndarray:
        if type_name == "BF16":
            x = (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif type_name in FLOAT_TYPES:
            x = t.data.view(FLOAT_TYPES[type_name])
        else:
            rows = t.data.reshape(-1, t.nbytes // max(1, int(np.prod(shape[:-1]))))
            x = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(t.type_id))
        x = x.reshape(shape)
        return np.asarray(processor.process(weights=x, name=t.name).weights)

    if type_name in FLOAT_TYPES:
        dtype = FLOAT_TYPES[type_name]
        if dtype == "bfloat16":
            dtype = "float32"  # numpy has no bfloat16: gguf hands it out widened
        plan = _Planned(
            hf_name,
            dtype,
            shape,
            {"name": "raw"},
            t.nbytes,
            lambda: ([dense().astype(dtype)], None),
        )
        return plan, TensorReport(hf_name, t.name, type_name, "raw", "raw")

    enc = reenc if len(shape) >= 2 else Raw()

    def make_reencoded() -> tuple[list[np.ndarray], float | None]:
        from ..quantized import dequantize, quantize

        x = np.ascontiguousarray(dense(), dtype=np.float32)
        if isinstance(enc, Raw):
            return [x], None
        try:
            q = quantize(x, enc)
        except ValueError as e:
            raise ForeignFormatError(f"GGUF tensor {t.name!r} ({type_name}): {e}") from None
        return [np.asarray(a) for a in q.parts()], _rel_rmse(x, np.asarray(dequantize(q)))

    d = {"name": "raw"} if isinstance(enc, Raw) else enc.to_dict(len(shape))
    plan = _Planned(hf_name, "float32", shape, d, t.nbytes, make_reencoded)
    return plan, TensorReport(hf_name, t.name, type_name, "reencoded", _describe(enc))


def _describe(enc: Encoding) -> str:
    from ..convert import describe_encoding

    return describe_encoding(enc)
