"""`qtensors inspect` and `qtensors verify`: list what a file holds, and check every byte of it.

Both take a `.qtensors` file or a folder of them (a converted model folder).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from ._progress import count
from ._source import ITEMSIZE, numel
from .convert import KNOWN_ENCODINGS, describe_encoding
from .errors import ChecksumError, FormatError

# -- helpers -----------------------------------------------------------------------------------


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def qtensors_files(path: str) -> list[str]:
    """`path` itself if it is a file, else every `.qtensors` file under the folder (sorted)."""
    if not os.path.isdir(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".qtensors")]
    if not out:
        raise FileNotFoundError(f"{path} holds no .qtensors file")
    return out


# -- inspect -----------------------------------------------------------------------------------


def inspect_file(path: str) -> dict[str, Any]:
    """Everything `qtensors inspect` shows about one file, as JSON-ready data.

    Newer files are listed too: the lenient reader accepts newer minor versions, unknown
    encodings and unknown dtypes (listed with `known: false`), and still checks the whole
    structure of the header. A file of another major version raises `UnsupportedError`: its
    layout is unknown, so nothing in it can be trusted or shown.
    """
    reader = _core.Reader(path, lenient=True)
    header = json.loads(reader.header_json())
    version = list(reader.version)
    data_start = reader.data_start
    file_bytes = os.path.getsize(path)
    rows = []
    for t in header["tensors"]:
        enc = t.get("encoding") or {}
        shape = [int(d) for d in t.get("shape", [])]
        dtype = str(t.get("dtype"))
        parts = t.get("parts") or {}
        stored = sum(int(p.get("length", 0)) for p in parts.values())
        item = ITEMSIZE.get(dtype)
        original = numel(shape) * item if item is not None else None
        known = enc.get("name") in KNOWN_ENCODINGS and item is not None
        part_rows = {name: _part_row(p) for name, p in parts.items()}
        packed = [p for p in part_rows.values() if "compression" in p]
        rows.append(
            {
                "name": t.get("name"),
                "shape": shape,
                "dtype": dtype,
                "encoding": enc,
                "known": known,
                "stored_bytes": stored,
                "original_bytes": original,
                "ratio": (stored / original) if original else None,
                "bits_per_element": (8 * stored / numel(shape)) if numel(shape) else None,
                "parts": part_rows,
                # Over the tensor's parts: stored bytes before compression, and that ratio.
                "compression": _compression_summary(part_rows.values()) if packed else None,
            }
        )
    quant = [r for r in rows if r["known"] and r["encoding"].get("name") != "raw"]
    original_total = sum(r["original_bytes"] or 0 for r in rows)
    stored_total = sum(r["stored_bytes"] for r in rows)
    q_elems = sum(numel(r["shape"]) for r in quant)
    unknown_dtypes = sorted({r["dtype"] for r in rows if r["dtype"] not in ITEMSIZE})
    all_parts = [p for r in rows for p in r["parts"].values()]
    info: dict[str, Any] = {
        "file": path,
        "version": version,
        "alignment": header.get("alignment"),
        "metadata": header.get("metadata", {}),
        "tensors": rows,
        "totals": {
            "tensors": len(rows),
            "quantized": len(quant),
            "raw": sum(1 for r in rows if r["encoding"].get("name") == "raw"),
            "unknown": sum(1 for r in rows if not r["known"]),
            "original_bytes": original_total,
            "stored_bytes": stored_total,
            "file_bytes": file_bytes,
            "header_bytes": data_start,
            "ratio": stored_total / original_total if original_total else None,
            "quantized_bits_per_element": (
                8 * sum(r["stored_bytes"] for r in quant) / q_elems if q_elems else None
            ),
            "compression": _compression_summary(all_parts),
        },
    }
    if unknown_dtypes:
        info["warning"] = (
            f"dtypes unknown to this qtensors: {', '.join(unknown_dtypes)}: such tensors are "
            "listed but cannot be loaded (upgrade qtensors)"
        )
    return info


def _part_row(p: dict[str, Any]) -> dict[str, Any]:
    """A part as listed: where it lies, and for a compressed part how (spec 2.1): codec, filter,
    level, chunk size and count (not the chunk table itself), decoded bytes and the ratio."""
    row = {k: p[k] for k in ("dtype", "shape", "offset", "length") if k in p}
    c = p.get("compression")
    if c is not None:
        item = ITEMSIZE.get(str(p.get("dtype")))
        decoded = numel(p.get("shape", [])) * item if item is not None else None
        row["compression"] = {
            "codec": c.get("codec"),
            "filter": c.get("filter"),
            "level": c.get("level"),
            "chunk_size": c.get("chunk_size"),
            "chunks": len(c.get("chunks", [])),
            "decoded_bytes": decoded,
            "ratio": decoded / row["length"] if decoded and row.get("length") else None,
        }
    return row


def _compression_summary(parts: Any) -> dict[str, Any]:
    """Compressed parts among `parts` (listed part rows): how many, which codecs, their decoded
    and stored bytes and the ratio (decoded / stored; > 1 is a saving)."""
    packed = [p["compression"] for p in parts if "compression" in p]
    lengths = [p.get("length", 0) for p in parts if "compression" in p]
    known = all(c["decoded_bytes"] is not None for c in packed)
    decoded = sum(c["decoded_bytes"] or 0 for c in packed) if known else None
    stored = sum(lengths)
    return {
        "parts": len(packed),
        "codecs": sorted({str(c["codec"]) for c in packed}),
        "decoded_bytes": decoded,
        "stored_bytes": stored,
        "ratio": decoded / stored if decoded and stored else None,
    }


def inspect_path(path: str) -> dict[str, Any]:
    """`inspect_file` of a file, or of every file of a folder with grand totals."""
    if not os.path.isdir(path):
        return inspect_file(path)
    files = [inspect_file(f) for f in qtensors_files(path)]
    keys = (
        "tensors",
        "quantized",
        "raw",
        "unknown",
        "original_bytes",
        "stored_bytes",
        "file_bytes",
    )
    totals = {k: sum(f["totals"][k] for f in files) for k in keys}
    totals["ratio"] = (
        totals["stored_bytes"] / totals["original_bytes"] if totals["original_bytes"] else None
    )
    totals["compression"] = _compression_summary(
        [p for f in files for r in f["tensors"] for p in r["parts"].values()]
    )
    return {"folder": path, "files": files, "totals": totals}


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def format_file(info: dict[str, Any]) -> str:
    rows = []
    packed = bool(info["totals"]["compression"]["parts"])
    for r in info["tensors"]:
        enc = describe_encoding(r["encoding"])
        if not r["known"]:
            unknown_encoding = r["encoding"].get("name") not in KNOWN_ENCODINGS
            enc = f"unknown: {enc}" if unknown_encoding else f"unknown dtype: {enc}"
        rows.append(
            [
                str(r["name"]),
                "[" + ", ".join(str(d) for d in r["shape"]) + "]",
                r["dtype"],
                enc,
                human_bytes(r["stored_bytes"]),
                _pct(r["ratio"]),
            ]
            + ([_compressed(r["compression"])] if packed else [])
        )
    t = info["totals"]
    v = info["version"]
    lines = [f"{info['file']}  (qtensors {v[0]}.{v[1]}, alignment {info['alignment']})"]
    if info.get("warning"):
        lines.append(f"warning: {info['warning']}")
    if info["metadata"]:
        lines.append(
            "metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(info["metadata"].items()))
        )
    lines.append("")
    headers = ["name", "shape", "dtype", "encoding", "stored", "ratio"]
    lines += _table(headers + (["compressed"] if packed else []), rows, {4, 5, 6})
    lines.append("")
    bpe = t["quantized_bits_per_element"]
    lines.append(
        f"{t['tensors']} tensors ({t['quantized']} quantized, {t['raw']} raw"
        + (f", {t['unknown']} unknown" if t["unknown"] else "")
        + f"): {human_bytes(t['original_bytes'])} of values stored in "
        f"{human_bytes(t['stored_bytes'])} ({_pct(t['ratio'])}); "
        f"file {human_bytes(t['file_bytes'])}"
        + (f"; quantized tensors at {bpe:.2f} bits per element" if bpe else "")
    )
    if t["compression"]["parts"]:
        lines.append(_compression_line(t["compression"]))
    return "\n".join(lines)


def _compression_line(c: dict[str, Any]) -> str:
    """The compressed parts of a file or folder in one line: codecs, bytes, ratio."""
    return (
        f"compression: {', '.join(c['codecs'])} on {count(c['parts'], 'part')}: "
        f"{human_bytes(c['decoded_bytes'])} stored in {human_bytes(c['stored_bytes'])} "
        f"({_times(c['ratio'])})"
    )


def _times(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}x"


def _compressed(c: dict[str, Any] | None) -> str:
    """A tensor's compression column: codec and ratio over its compressed parts."""
    if c is None:
        return "-"
    return f"{'+'.join(c['codecs'])} {_times(c['ratio'])} ({count(c['parts'], 'part')})"


def format_inspect(info: dict[str, Any]) -> str:
    if "files" not in info:
        return format_file(info)
    blocks = [format_file(f) for f in info["files"]]
    t = info["totals"]
    blocks.append(
        f"total: {count(len(info['files']), 'file')}, {count(t['tensors'], 'tensor')} "
        f"({t['quantized']} quantized): "
        f"{human_bytes(t['original_bytes'])} of values in {human_bytes(t['stored_bytes'])} "
        f"({_pct(t['ratio'])}); files {human_bytes(t['file_bytes'])}"
        + (f"\n{_compression_line(t['compression'])}" if t["compression"]["parts"] else "")
    )
    return "\n\n".join(blocks)


# -- verify ------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    path: str
    ok: bool = True
    tensors: int = 0
    parts: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _check_padding(reader: Any, header: dict[str, Any], data_start: int) -> list[str]:
    """Bytes between parts must be zero and nothing may follow the last part (spec section 1)."""
    buf = np.frombuffer(reader, dtype=np.uint8)
    spans = sorted(
        (p["offset"], p["offset"] + p["length"], t["name"], name)
        for t in header["tensors"]
        for name, p in t["parts"].items()
    )
    errors = []
    pos, after = 0, None
    for start, end, tname, pname in spans:
        if start > pos and np.any(buf[data_start + pos : data_start + start]):
            where = (
                f"after tensor '{after[0]}' part '{after[1]}'" if after else "before the first part"
            )
            errors.append(
                f"nonzero bytes in the padding {where} (file bytes {data_start + pos}.."
                f"{data_start + start}): the file is corrupted"
            )
        pos = max(pos, end)
        after = (tname, pname)
    if len(buf) > data_start + pos:
        errors.append(
            f"{len(buf) - data_start - pos} bytes follow the last part: the file is corrupted "
            "or was appended to"
        )
    return errors


def _check_compressed(reader: Any, header: dict[str, Any]) -> list[str]:
    """Decode every compressed part: a chunk whose checksum matches but whose frame does not
    decode to what the chunk table says (a writer's bug, or a crafted file) fails here rather
    than at load time. One part in memory at a time."""
    errors = []
    for t in header["tensors"]:
        for name, p in t["parts"].items():
            if "compression" in p:
                try:
                    reader.decode_part(t["name"], name)
                except FormatError as e:
                    errors.append(str(e))
    return errors


def verify_file(path: str) -> VerifyReport:
    """Structural validation (every rule of spec section 7), every checksum, zero padding, and
    that every compressed part decodes."""
    rep = VerifyReport(path)
    t0 = time.perf_counter()
    try:
        reader = _core.Reader(path)
    except (FormatError, OSError) as e:
        rep.ok = False
        rep.errors.append(str(e))
        rep.seconds = time.perf_counter() - t0
        return rep
    header = json.loads(reader.header_json())
    rep.tensors = len(header["tensors"])
    rep.parts = sum(len(t["parts"]) for t in header["tensors"])
    rep.bytes = len(reader)
    try:
        reader.verify()
    except ChecksumError:
        # Name every corrupted tensor, not only the first (the error names the part).
        for t in header["tensors"]:
            try:
                reader.verify(t["name"])
            except ChecksumError as e:
                rep.errors.append(str(e))
    rep.errors += _check_padding(reader, header, reader.data_start)
    if not rep.errors:
        rep.errors += _check_compressed(reader, header)
    rep.ok = not rep.errors
    rep.seconds = time.perf_counter() - t0
    return rep


def verify_path(path: str) -> list[VerifyReport]:
    """`verify_file` of a file, or of every file of a folder plus its `*.qtensors.index.json`."""
    reports = [verify_file(f) for f in qtensors_files(path)]
    if os.path.isdir(path):
        reports += _verify_indexes(path)
    return reports


def _verify_indexes(folder: str) -> list[VerifyReport]:
    reports = []
    for root, _dirs, files in os.walk(folder):
        for fn in sorted(files):
            if not fn.endswith(".qtensors.index.json"):
                continue
            full = os.path.join(root, fn)
            rep = VerifyReport(full)
            t0 = time.perf_counter()
            try:
                with open(full, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
                names_by_shard: dict[str, set[str]] = {}
                for name, shard in weight_map.items():
                    if shard not in names_by_shard:
                        try:
                            r = _core.Reader(os.path.join(root, shard), lenient=True)
                            names_by_shard[shard] = {
                                t["name"] for t in json.loads(r.header_json())["tensors"]
                            }
                        except (FormatError, OSError) as e:
                            rep.errors.append(f"shard {shard}: {e}")
                            names_by_shard[shard] = set()
                            continue
                    if names_by_shard[shard] and name not in names_by_shard[shard]:
                        rep.errors.append(f"tensor '{name}' is not in its shard {shard}")
                rep.tensors = len(weight_map)
            except (OSError, ValueError, KeyError, TypeError) as e:
                rep.errors.append(f"not a valid index: {e}")
            rep.ok = not rep.errors
            rep.seconds = time.perf_counter() - t0
            reports.append(rep)
    return reports
