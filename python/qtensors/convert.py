"""Convert safetensors models to qtensors: `qtensors.convert(src, dst)` and `qtensors convert`.

The input is one `.safetensors` file or a Hugging Face model folder (sharded files with a
`model.safetensors.index.json`, or single files); the safetensors package reads it. The output is
one `.qtensors` file, or a model folder where every `X.safetensors` became `X.qtensors`, every
`X.safetensors.index.json` became `X.qtensors.index.json`, and the other files (config,
tokenizer) were copied, so it stays a model folder. qtensors files and indexes already in the
input folder (an earlier conversion's) are not copied: a conversion never ships a stale output.

How it streams: the safetensors headers give every name, dtype and shape before any data is
read, so the whole output layout is planned up front (`_core.Writer`). Then tensors go one at a
time: read, encoded (in Rust, on every core, GIL released) and written at their planned offsets,
then dropped. A reader thread fetches the next tensor from disk while the current one encodes.
Memory therefore stays bounded by the largest tensors in flight (two at most), not the model.

Atomicity: a file is written under a hidden temporary name beside its final name
(`.NAME.XXXXXX.tmp`) and renamed into place only when complete; a folder is built in a hidden
temporary folder (`.NAME.XXXXXX.tmp`) and renamed into place at the end. An error or Ctrl-C removes
the temporary; a hard kill (SIGKILL, power loss) can leave one, never a partial file under the
final name. Such leftovers are removed by the next conversion to the same name once they are
older than ten minutes (younger ones might belong to a conversion still running). The input is
only ever opened for reading.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _core, _hf_folder, _source
from ._arrays import as_bytes
from ._progress import Progress
from .encodings import (
    FLEXGEN,
    MXFP4,
    NF4,
    NVFP4,
    PRESETS,
    SCALE_DTYPES,
    Affine,
    Encoding,
    QuantSpec,
    Raw,
    Symmetric,
    choose_encoding,
    normalize_quant,
)
from .errors import QtensorsError, QuantizationError

__all__ = [
    "ConversionInterrupted",
    "ConvertResult",
    "OutputExistsError",
    "Policy",
    "convert",
    "resolve_quant",
]

#: Patterns `keep_embeddings=True` keeps raw.
EMBEDDING_PATTERNS = ("*embed*", "*wte*", "*wpe*")
#: Other weight formats a model folder may carry beside its safetensors; not copied.
SKIPPED_WEIGHTS = (
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "tf_model*.h5",
    "tf_model*.h5.index.json",
    "flax_model*.msgpack",
    "flax_model*.msgpack.index.json",
    "*.ckpt",
    "*.gguf",
    "*.onnx",
    "*.onnx_data",
)
#: What a conversion itself writes: such files in an input folder are the outputs of an earlier
#: conversion (say of one of its files), never copied over this conversion's fresh ones.
OWN_OUTPUTS = ("*.qtensors", "*.qtensors.index.json")
#: Temporary files and folders older than this are leftovers of a killed conversion.
STALE_SECONDS = 600


class OutputExistsError(QtensorsError, FileExistsError):
    """The output exists and `force` was not given."""


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `convert`. `published` says whether it landed after the output had been
    renamed into place (then `dst` is complete) or before (then nothing was written)."""

    def __init__(self, dst: str, published: bool) -> None:
        super().__init__(dst, published)
        self.dst = dst
        self.published = published


# -- policy ------------------------------------------------------------------------------------


def resolve_quant(
    preset: str | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    axis: int | None = None,
    symmetric: bool | None = None,
    scale_dtype: str | None = None,
) -> Encoding:
    """The encoding of a preset name (default `flexgen`) with explicit parameters replacing the
    preset's: `resolve_quant("int4-g128", bits=3)`, `resolve_quant(symmetric=True, bits=8)`."""
    if preset is None:
        base: Encoding = FLEXGEN
    else:
        try:
            base = PRESETS[preset]
        except KeyError:
            raise ValueError(
                f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}"
            ) from None
    assert not isinstance(base, Raw)
    if isinstance(base, (MXFP4, NVFP4)):
        fixed = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        fixed["scale_dtype"] = scale_dtype
        given = [k for k, v in fixed.items() if v is not None]
        if given:
            raise ValueError(
                f"{base.name} fixes bits, group size and scale dtype: drop {', '.join(given)}"
            )
        return type(base)(axis=base.axis if axis is None else axis)
    if scale_dtype is not None and scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {', '.join(SCALE_DTYPES)}")
    cls: type = type(base)
    if symmetric is True:
        cls = Symmetric
    elif symmetric is False and cls is Symmetric:
        cls = Affine
    params: dict[str, Any] = {
        "group_size": base.group_size if group_size is None else group_size,
        "axis": base.axis if axis is None else axis,
        "scale_dtype": base.scale_dtype if scale_dtype is None else scale_dtype,
    }
    if cls is NF4:
        if bits is not None and bits != 4:
            raise ValueError("nf4 is 4-bit only: drop --bits or choose another preset")
        return NF4(**params)
    return cls(bits=base.bits if bits is None else bits, **params)


KNOWN_ENCODINGS = ("raw", "affine", "symmetric", "nf4", "mxfp4", "nvfp4")


def describe_encoding(enc: Mapping[str, Any] | Encoding) -> str:
    """A short human description: `affine 4b g64 ax0 f16`, `nf4 g64 ax-1 f16`, `raw`; an
    encoding this version does not know shows its name and parameters."""
    if isinstance(enc, Mapping):
        d = dict(enc)
    elif isinstance(enc, Raw):
        d = {"name": "raw"}
    else:  # an Encoding object: its axis as given (-1 = the last axis of every tensor)
        d = {
            "name": enc.name,
            "bits": enc.bits,
            "group_size": enc.group_size,
            "axis": enc.axis,
            "scale_dtype": enc.scale_dtype,
            "levels": getattr(enc, "levels", None),
        }
    name = str(d.get("name", "?"))
    if name == "raw":
        return "raw"
    if name not in KNOWN_ENCODINGS:
        params = " ".join(f"{k}={v}" for k, v in sorted(d.items()) if k != "name")
        return f"{name} {params}".strip()
    sd = {
        "float16": "f16",
        "bfloat16": "bf16",
        "float32": "f32",
        "uint8": "e8m0",  # mxfp4's scales are E8M0 exponents
        "float8_e4m3fn": "e4m3",
    }.get(str(d.get("scale_dtype")), str(d.get("scale_dtype")))
    bits = "" if name in ("nf4", "mxfp4", "nvfp4") else f" {d.get('bits')}b"
    full = " full" if d.get("levels") == "full" else ""  # all 2^b levels (spec 4.6)
    return f"{name}{bits}{full} g{d.get('group_size')} ax{d.get('axis')} {sd}"


def _enc_dict(enc: Encoding, rank: int) -> dict[str, Any]:
    return {"name": "raw"} if isinstance(enc, Raw) else enc.to_dict(rank)


class Policy:
    """Which encoding each tensor gets.

    Tensors whose name matches a `keep` pattern (fnmatch, e.g. `*embed*`, `lm_head.weight`) stay
    raw; the rest follow `quant` as in `save_file` (`qtensors.encodings.choose_encoding`): float
    tensors of rank >= 2 (linear and conv weights) are quantized, 1-D tensors (norms, biases),
    scalars and integer tensors stay raw. Preset names are accepted wherever an encoding is.
    """

    def __init__(
        self,
        quant: QuantSpec = None,
        keep: Iterable[str] = (),
        keep_embeddings: bool = False,
    ) -> None:
        self.quant = normalize_quant(quant)
        if isinstance(keep, str):  # a lone pattern, not its characters
            keep = (keep,)
        self.keep = tuple(keep) + (EMBEDDING_PATTERNS if keep_embeddings else ())

    def __call__(self, name: str, dtype: str, shape: tuple[int, ...]) -> Encoding:
        if any(fnmatch.fnmatchcase(name, p) for p in self.keep):
            return Raw()
        return choose_encoding(name, dtype, shape, self.quant)

    def describe(self) -> str:
        q = self.quant
        if q is None:
            text = f"flexgen ({describe_encoding(FLEXGEN)})"
        elif isinstance(q, Mapping):
            text = ", ".join(f"{p}: {describe_encoding(e)}" for p, e in q.items())
        else:
            names = [k for k, v in PRESETS.items() if v == q]
            text = f"{names[0]} ({describe_encoding(q)})" if names else describe_encoding(q)
        if self.keep:
            text += "; raw: " + " ".join(self.keep)
        return text


# -- planning ----------------------------------------------------------------------------------


@dataclass
class _Job:
    """One output qtensors file and the input tensors it gets."""

    out: str  # final path (file output) or path relative to the output folder
    entries: list[_source.Entry]
    encodings: list[dict[str, Any]]
    metadata: dict[str, str]
    stored_bytes: int = 0


@dataclass
class ConvertResult:
    """What `convert` did. Sizes in bytes; `input_bytes` counts tensor data only."""

    src: str
    dst: str
    files: list[str]
    tensors: int
    quantized: int
    input_bytes: int
    output_bytes: int
    seconds: float
    policy: str
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Input tensor bytes per output byte (how many times smaller)."""
        return self.input_bytes / self.output_bytes if self.output_bytes else float("inf")

    @property
    def throughput(self) -> float:
        """Input tensor bytes per second."""
        return self.input_bytes / self.seconds if self.seconds > 0 else float("inf")


def _plan_job(
    out: str, entries: list[_source.Entry], policy: Policy, metadata: dict[str, str]
) -> _Job:
    encs = []
    for e in entries:
        try:
            enc = policy(e.name, e.dtype, e.shape)
            encs.append(_enc_dict(enc, len(e.shape)))
        except ValueError as ex:
            raise ValueError(f"tensor {e.name!r} ({e.dtype}{list(e.shape)}): {ex}") from None
    return _Job(out, entries, encs, metadata)


def _job_metadata(
    st_meta: Mapping[str, str], source: str, extra: Mapping[str, str] | None
) -> dict[str, str]:
    from . import __version__

    meta = {str(k): str(v) for k, v in st_meta.items()}
    meta.setdefault("source", source)
    meta.setdefault("converted_by", f"qtensors {__version__}")
    meta.update(extra or {})
    return meta


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    """Keys and values must be str, as in `save_file` and safetensors."""
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata keys and values must be str, not {type(k).__name__}: "
                f"{type(v).__name__} ({k!r}: {v!r})"
            )


def _qtensors_name(rel: str) -> str:
    return rel[: -len(".safetensors")] + ".qtensors"


def _is_own_output(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(os.path.basename(rel), p) for p in OWN_OUTPUTS)


def _default_dst(src: str) -> str:
    s = src.rstrip("/\\") or src
    if os.path.isdir(s):
        return s + "-qtensors"
    base = s[: -len(".safetensors")] if s.endswith(".safetensors") else s
    return base + ".qtensors"


def _is_within(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


# -- stale temporaries -------------------------------------------------------------------------


def _leftovers(dst: str) -> list[str]:
    parent = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(os.path.abspath(dst))
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    prefix = f".{base}."
    return [
        os.path.join(parent, n)
        for n in names
        if n.startswith(prefix) and (n.endswith(".tmp") or n.endswith(".old"))
    ]


def _newest_mtime(path: str) -> float:
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, _dirs, files in os.walk(path):
            for n in files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
                except OSError:
                    pass
    return newest


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def clean_stale(dst: str, max_age: float = STALE_SECONDS) -> tuple[list[str], list[str]]:
    """Remove temporaries of `dst` left by killed conversions: returns (removed, kept young)."""
    removed, young = [], []
    now = time.time()
    for p in _leftovers(dst):
        try:
            age = now - _newest_mtime(p)
        except OSError:
            continue
        if age >= max_age:
            _remove(p)
            removed.append(p)
        else:
            young.append(p)
    return removed, young


# -- the tensor pipeline -----------------------------------------------------------------------


class _Fetcher:
    """Yields (entry, values) in order. With `ahead` >= 1 a thread reads up to `ahead` tensors
    beyond the one being encoded (faulting their pages in); with 0, reads happen inline."""

    _DONE = object()

    def __init__(self, entries: list[_source.Entry], ahead: int, framework: str) -> None:
        self._entries = entries
        self._ahead = ahead
        self._fw = framework
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if ahead > 0:
            self._q: queue.Queue = queue.Queue()
            self._slots = threading.Semaphore(ahead + 1)
            self._thread = threading.Thread(target=self._run, name="qtensors-read", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        reader = _source.TensorReader(self._fw)
        try:
            for e in self._entries:
                while not self._slots.acquire(timeout=0.05):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                x = reader.read(e)
                _source.touch(x)
                self._q.put((e, x))
                del x
            self._q.put(self._DONE)
        except BaseException as ex:  # handed to the consumer, which raises it
            self._q.put(ex)
        finally:
            reader.close()

    def __iter__(self):
        if self._thread is None:
            reader = _source.TensorReader(self._fw)
            try:
                for e in self._entries:
                    yield e, reader.read(e)
            finally:
                reader.close()
            return
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            self._slots.release()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Unblock a reader waiting for a slot; it then sees the stop flag.
            self._slots.release()
            self._thread.join(timeout=5)


def _write_job(
    job: _Job,
    path: str,
    items: Any,
    alignment: int,
    progress: Progress,
    compression: str | None = None,
) -> int:
    plans = [
        (e.name, e.dtype, list(e.shape), json.dumps(enc))
        for e, enc in zip(job.entries, job.encodings, strict=True)
    ]
    writer = _core.Writer(path, plans, job.metadata, alignment, compression)
    try:
        for i, enc in enumerate(job.encodings):
            entry, x = next(items)
            data, dtype, shape = as_bytes(x)
            if dtype != entry.dtype or tuple(shape) != entry.shape:
                raise QtensorsError(
                    f"tensor {entry.name!r}: read {dtype}{list(shape)}, "
                    f"header says {entry.dtype}{list(entry.shape)}"
                )
            try:
                if enc["name"] == "raw":
                    writer.write_parts(i, [data])
                else:
                    writer.write_tensor(i, data, dtype)
            except QuantizationError as ex:
                raise QuantizationError(
                    f"{ex} (keep it unquantized: --keep '{entry.name}' or keep=[{entry.name!r}])"
                ) from None
            del data, x
            progress.update(entry.nbytes)
        # Stored sizes are known once every part is in (compressed parts shrink).
        header = json.loads(writer.finish())
        stored = sum(p["length"] for t in header["tensors"] for p in t["parts"].values())
    except BaseException:
        writer.abort()
        raise
    return stored


# -- convert -----------------------------------------------------------------------------------


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    quant: QuantSpec = None,
    *,
    keep: Iterable[str] = (),
    keep_embeddings: bool = False,
    force: bool = False,
    alignment: int = 64,
    metadata: Mapping[str, str] | None = None,
    progress: bool | None = False,
    read_ahead: int = 1,
    compression: str | None = None,
    lossless: bool = False,
) -> ConvertResult:
    """Convert a safetensors file or model folder to qtensors, streaming tensor by tensor.

    * `src`: a `.safetensors` file, or a model folder (sharded with `*.safetensors.index.json`, or
      single-file).
    * `dst`: the output. From a file: a `.qtensors` file (default: beside the input; an existing
      folder receives `NAME.qtensors`). From a folder: a folder (default `SRC-qtensors`) with every
      safetensors file and index converted and the other files copied, or, if `dst` ends in
      `.qtensors`, one file holding all the model's tensors.
    * `quant`: a preset name (`flexgen`, `int4-g64`, `int4-g128`, `nf4`, `int8`), an encoding
      (`qt.Affine(bits=4, group_size=128)`), `"raw"`, or a mapping of name patterns to any of
      those, as in `save_file`. Default (None): `flexgen`. Float tensors of rank >= 2 are
      quantized; the rest stay raw.
    * `keep`: name patterns (fnmatch) kept raw; `keep_embeddings` adds `*embed*`, `*wte*`, `*wpe*`.
    * `metadata`: extra str -> str entries for every output file's header.
    * `force`: replace an existing output. `alignment`: 64, or 4096 for direct I/O.
    * `progress`: a progress bar on stderr (None: only on a terminal).
    * `read_ahead`: tensors read ahead of the one being encoded (0: read inline).
    * `compression="zstd"`: compress parts in 1 MiB chunks where it saves >= 5% (spec 2.1).
      `lossless=True`: every tensor raw and compressed (a smaller, bit-identical copy).

    Nothing appears under `dst` unless the conversion completes; the input is never modified.
    """
    t0 = time.perf_counter()
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} does not exist")
    src_is_dir = os.path.isdir(src)
    if dst is None:
        dst = _default_dst(src)
    dst = os.fspath(dst)
    if not src_is_dir and os.path.isdir(dst):
        name = os.path.basename(src)
        name = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        dst = os.path.join(dst, name + ".qtensors")
    to_folder = src_is_dir and not dst.endswith(".qtensors")

    if os.path.exists(dst) and os.path.realpath(dst) == os.path.realpath(src):
        raise ValueError(f"the output {dst} is the input")
    if not src_is_dir and not dst.endswith(".qtensors"):
        # Readers and `qtensors inspect FOLDER` find qtensors files by their suffix.
        raise ValueError(
            f"the output {dst} must end in .qtensors (or be an existing folder to write "
            "NAME.qtensors into)"
        )
    if to_folder and _is_within(dst, src):
        raise ValueError(f"the output folder {dst} must not be inside the input folder {src}")
    if src_is_dir and not to_folder and os.path.isdir(dst):
        raise ValueError(f"{dst} is a folder: cannot write a single file there")
    if os.path.lexists(dst) and not force:
        raise OutputExistsError(f"{dst} exists: pass force=True (--force) to replace it")
    if not (64 <= alignment <= 1 << 20 and alignment & (alignment - 1) == 0):
        raise ValueError(f"alignment {alignment} must be a power of two between 64 and 1 MiB")
    if not isinstance(read_ahead, int) or read_ahead < 0:
        raise ValueError(f"read_ahead must be a whole number >= 0, not {read_ahead!r}")

    from .files import _check_compression

    compression = _check_compression(compression, lossless, quant)
    if lossless:
        quant = "raw"
    policy = Policy(quant, keep, keep_embeddings)
    _check_metadata(metadata)
    options = _WriteOptions(alignment, read_ahead, progress, force, compression)
    notes: list[str] = []
    removed, young = clean_stale(dst)
    notes += [f"removed {p}, left by an interrupted conversion" for p in removed]
    notes += [
        f"{p} may belong to a conversion still running (or killed less than "
        f"{STALE_SECONDS // 60} minutes ago); delete it if none is"
        for p in young
    ]

    before = _identity(dst)
    try:
        jobs, copies, indexes = _plan(src, dst, src_is_dir, to_folder, policy, metadata, notes)
        files = _write_outputs(src, dst, to_folder, jobs, copies, indexes, options, policy, notes)
        all_entries = [e for j in jobs for e in j.entries]
        return ConvertResult(
            src=src,
            dst=dst,
            files=files,
            tensors=len(all_entries),
            quantized=sum(1 for j in jobs for enc in j.encodings if enc["name"] != "raw"),
            input_bytes=sum(e.nbytes for e in all_entries),
            output_bytes=sum(os.path.getsize(f) for f in files),
            seconds=time.perf_counter() - t0,
            policy=policy.describe(),
            copied=copies,
            notes=notes,
        )
    except KeyboardInterrupt:
        # Ctrl-C can land just after the rename that published the output: tell which it was.
        raise ConversionInterrupted(dst, published=_identity(dst) not in (None, before)) from None


def _plan(
    src: str,
    dst: str,
    src_is_dir: bool,
    to_folder: bool,
    policy: Policy,
    metadata: Mapping[str, str] | None,
    notes: list[str],
) -> tuple[list[_Job], list[str], list[_source.Index]]:
    """Every output file, from the safetensors headers alone; the files to copy and the
    indexes to rewrite (folder outputs). Appends what it leaves out to `notes`."""
    jobs: list[_Job] = []
    copies: list[str] = []
    indexes: list[_source.Index] = []
    if not src_is_dir:
        meta, entries = _source.list_file(src)
        jobs.append(
            _plan_job(dst, entries, policy, _job_metadata(meta, os.path.basename(src), metadata))
        )
    elif not to_folder:
        entries = []
        seen: dict[str, str] = {}
        meta = {}
        for rel in _source.model_weight_files(src):
            m, es = _source.list_file(os.path.join(src, rel))
            meta = meta or m
            for e in es:
                if e.name in seen:
                    raise _source.InputError(
                        f"tensor {e.name!r} is in both {seen[e.name]} and {rel}"
                    )
                seen[e.name] = rel
            entries += es
        jobs.append(
            _plan_job(dst, entries, policy, _job_metadata(meta, os.path.basename(src), metadata))
        )
    else:
        for rel in _source.walk_folder(src):
            full = os.path.join(src, rel)
            if rel.endswith(".safetensors"):
                meta, entries = _source.list_file(full)
                jobs.append(
                    _plan_job(
                        _qtensors_name(rel), entries, policy, _job_metadata(meta, rel, metadata)
                    )
                )
            elif rel.endswith(".safetensors.index.json"):
                if _hf_folder.is_qtensors_index(full):
                    notes.append(f"not copied: {rel} (the output of an earlier conversion)")
                else:
                    indexes.append(_source.read_index(src, rel))
            elif _is_own_output(rel):
                notes.append(f"not copied: {rel} (the output of an earlier conversion)")
            elif any(fnmatch.fnmatch(os.path.basename(rel), p) for p in SKIPPED_WEIGHTS):
                notes.append(f"not copied: {rel} (weights in another format)")
            else:
                copies.append(rel)
        if not jobs:
            raise _source.InputError(f"{src} holds no .safetensors file")

    return jobs, copies, indexes


@dataclass
class _WriteOptions:
    alignment: int
    read_ahead: int
    progress: bool | None
    force: bool
    compression: str | None = None


def _write_outputs(
    src: str,
    dst: str,
    to_folder: bool,
    jobs: list[_Job],
    copies: list[str],
    indexes: list[_source.Index],
    options: _WriteOptions,
    policy: Policy,
    notes: list[str],
) -> list[str]:
    """Read, encode and write every job (a reader thread fetching ahead); the output files."""
    all_entries = [e for j in jobs for e in j.entries]
    total_bytes = sum(e.nbytes for e in all_entries)
    framework = _source.framework_for(e.dtype for e in all_entries)
    fetcher = _Fetcher(all_entries, options.read_ahead, framework)
    bar = Progress(total_bytes, len(all_entries), "converting", _want(options.progress))
    try:
        items = iter(fetcher)
        if not to_folder:
            jobs[0].stored_bytes = _write_job(
                jobs[0], dst, items, options.alignment, bar, options.compression
            )
            return [dst]
        _write_folder(src, dst, jobs, copies, indexes, items, options, bar, policy, notes)
        return [os.path.join(dst, j.out) for j in jobs]
    finally:
        bar.close()
        fetcher.close()


def _identity(path: str) -> tuple[int, int] | None:
    """Which file or folder is at `path` now (None: nothing). A published output is a new one."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _write_folder(
    src: str,
    dst: str,
    jobs: list[_Job],
    copies: list[str],
    indexes: list[_source.Index],
    items: Any,
    options: _WriteOptions,
    bar: Progress,
    policy: Policy,
    notes: list[str],
) -> None:
    """Build the output folder in a hidden temporary beside `dst`, then rename it into place."""
    parent = os.path.dirname(os.path.abspath(dst))
    tmp_dir: str | None = tempfile.mkdtemp(
        prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".tmp", dir=parent
    )
    try:
        for job in jobs:
            out = os.path.join(tmp_dir, job.out)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            job.stored_bytes = _write_job(
                job, out, items, options.alignment, bar, options.compression
            )
        for rel in copies:
            out = os.path.join(tmp_dir, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            shutil.copy2(os.path.join(src, rel), out)
        stored_by_file = {j.out: j.stored_bytes for j in jobs}
        for ix in indexes:
            _write_index(tmp_dir, ix, stored_by_file)
        if "config.json" in copies:
            _describe_for_transformers(tmp_dir, jobs, indexes, policy, notes)
        _publish_folder(tmp_dir, dst, options.force)
        tmp_dir = None
    finally:
        if tmp_dir is not None:  # (once renamed, nothing is left under the temporary name)
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _describe_for_transformers(
    tmp_dir: str,
    jobs: list[_Job],
    indexes: list[_source.Index],
    policy: Policy,
    notes: list[str],
) -> None:
    """The model folder's `quantization_config` and transformers' index (`_hf_folder`), over
    the weight files at the folder's top (those transformers loads)."""
    top = [j for j in jobs if os.sep not in j.out and "/" not in j.out]
    if not top:
        return
    top_indexes = [ix for ix in indexes if "/" not in ix.path and os.sep not in ix.path]
    if top_indexes:
        weights = top_indexes[0].path[: -len(".safetensors.index.json")] + ".qtensors.index.json"
    else:
        weights = top[0].out
    tensors = [
        (e.name, e.dtype, tuple(e.shape), enc)
        for j in top
        for e, enc in zip(j.entries, j.encodings, strict=True)
    ]
    qconfig = _hf_folder.quantization_config(policy.quant, policy.keep, tensors, weights)
    note = _hf_folder.add_quantization_config(os.path.join(tmp_dir, "config.json"), qconfig)
    if note:
        notes.append(note)
    floats = [e.dtype for j in top for e in j.entries if e.dtype in _hf_folder.FLOAT_DTYPES]
    meta: dict[str, Any] = {"total_size": sum(j.stored_bytes for j in top), "qtensors": weights}
    if floats:
        meta["dtype"] = max(set(floats), key=floats.count)
    weight_map = {e.name: j.out for j in top for e in j.entries}
    _hf_folder.write_hf_index(tmp_dir, weight_map, meta)


def _want(progress: bool | None) -> bool:
    from ._progress import want_progress

    return want_progress(progress)


def _write_index(tmp_dir: str, ix: _source.Index, stored_by_file: Mapping[str, str]) -> None:
    base = os.path.dirname(ix.path)
    weight_map = {}
    shards = set()
    for name, shard in ix.weight_map.items():
        if not shard.endswith(".safetensors"):
            raise _source.InputError(f"{ix.path}: tensor {name!r} maps to {shard!r}")
        q = _qtensors_name(shard)
        weight_map[name] = q
        shards.add(os.path.normpath(os.path.join(base, q)).replace(os.sep, "/"))
    meta = dict(ix.metadata)
    meta["total_size"] = sum(int(stored_by_file.get(s, 0)) for s in shards)
    meta["format"] = "qtensors"
    doc = {"metadata": meta, **ix.extra, "weight_map": weight_map}
    out = os.path.join(tmp_dir, ix.path[: -len(".safetensors.index.json")] + ".qtensors.index.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")


def _publish_folder(tmp_dir: str, dst: str, force: bool) -> None:
    """Rename the finished folder into place (replacing `dst` only with `force`)."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp makes a 0700 folder
    if not os.path.lexists(dst):
        os.rename(tmp_dir, dst)
        return
    if not force:
        raise OutputExistsError(f"{dst} exists: pass force=True (--force) to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".old", dir=parent
    )
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(tmp_dir, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)
