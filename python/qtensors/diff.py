"""`qtensors diff ORIGINAL CONVERTED`: the quantization error of every tensor.

For each tensor present in both, with x the original values and e = x̂ − x the error of the
decoded values (sums over all elements, in float64):

* SQNR (dB) = 10·log10(Σx² / Σe²): signal to quantization noise; +inf when exact.
* relative RMSE = sqrt(Σe² / Σx²) = RMS error over RMS value.
* max abs error = max |e|.

Tensors are streamed one at a time (memory bounded by the largest tensor).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _source
from ._arrays import as_bytes
from ._progress import Progress, count, want_progress
from .convert import describe_encoding
from .errors import ChecksumError
from .files import safe_open
from .inspect import qtensors_files

FLOATS = ("float16", "bfloat16", "float32", "float64")
_CHUNK = 1 << 20  # elements per float64 chunk (8 MiB, reused: no page faults per chunk)


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    dtype: str
    encoding: str
    quantized: bool = False  # stored with a quantized encoding (not raw)
    exact: bool = False  # decodes to the original bits
    sqnr_db: float | None = None
    rel_rmse: float | None = None
    max_abs_err: float | None = None
    signal: float = 0.0  # Σx²
    noise: float = 0.0  # Σe²
    problem: str | None = None  # missing, shape or dtype mismatch, integer values differ

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("sqnr_db", "rel_rmse", "max_abs_err"):
            if isinstance(d[k], float) and math.isinf(d[k]):
                d[k] = "inf" if d[k] > 0 else "-inf"
        return d


@dataclass
class DiffReport:
    original: str
    converted: str
    rows: list[TensorDiff] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def problems(self) -> list[TensorDiff]:
        return [r for r in self.rows if r.problem]

    @property
    def quantized(self) -> list[TensorDiff]:
        return [r for r in self.rows if not r.problem and r.quantized]

    @property
    def raw(self) -> list[TensorDiff]:
        return [r for r in self.rows if not r.problem and not r.quantized]

    def summary(self) -> dict[str, Any]:
        lossy = self.quantized
        signal = sum(r.signal for r in lossy)
        noise = sum(r.noise for r in lossy)
        out: dict[str, Any] = {
            "tensors": len(self.rows),
            "quantized": len(lossy),
            "raw": len(self.raw),
            "raw_exact": sum(1 for r in self.raw if r.exact),
            "problems": len(self.problems),
        }
        if lossy:
            sq = [r.sqnr_db for r in lossy if r.sqnr_db is not None]
            worst = min(lossy, key=lambda r: _sort_sqnr(r.sqnr_db))
            out.update(
                worst_sqnr_db=worst.sqnr_db,
                worst_tensor=worst.name,
                median_sqnr_db=statistics.median(sq) if sq else None,
                overall_sqnr_db=_sqnr(signal, noise),
                max_rel_rmse=max(r.rel_rmse or 0.0 for r in lossy),
                max_abs_err=max(r.max_abs_err or 0.0 for r in lossy),
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        s = self.summary()
        for k, v in list(s.items()):
            if isinstance(v, float) and math.isinf(v):
                s[k] = "inf" if v > 0 else "-inf"
        return {
            "original": self.original,
            "converted": self.converted,
            "seconds": self.seconds,
            "summary": s,
            "tensors": [r.as_dict() for r in self.rows],
        }


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def _sort_sqnr(v: float | None) -> float:
    return -math.inf if v is None else v


#: The first bytes of every qtensors file (spec section 1).
MAGIC = b"QTENSORS"


def _original_entries(path: str) -> list[_source.Entry]:
    if not os.path.isdir(path):
        return _source.list_file(path)[1]
    out = []
    for rel in _source.model_weight_files(path):
        out += _source.list_file(os.path.join(path, rel))[1]
    return out


def _converted_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    top = [
        os.path.join(path, f)
        for f in sorted(os.listdir(path))
        if f.endswith(".qtensors") and not f.startswith(".")
    ]
    return top or qtensors_files(path)


def _is_qtensors(path: str) -> bool:
    """A qtensors file (by its magic bytes), or a folder of them holding no safetensors."""
    if os.path.isdir(path):
        names = os.listdir(path)
        return any(n.endswith(".qtensors") for n in names) and not any(
            n.endswith(".safetensors") for n in names
        )
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _checksum_problem(h: safe_open, name: str) -> str | None:
    """None when every part of `name` matches its checksum, else what is wrong."""
    try:
        h.verify(name)
    except ChecksumError as e:
        return f"CORRUPTED: {e}"
    return None


def _into_f64(x: Any, start: int, stop: int, buf: np.ndarray) -> np.ndarray:
    """Elements [start, stop) of `x` (numpy or torch, any float dtype) widened into `buf`."""
    flat = x.reshape(-1)[start:stop]
    out = buf[: stop - start] if stop - start < buf.size else buf
    out = out[: flat.shape[0]]
    if hasattr(flat, "untyped_storage"):  # torch: bfloat16 and friends
        import torch

        torch.from_numpy(out).copy_(flat)
    else:
        np.copyto(out, flat, casting="unsafe")
    return out


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.size != b.size:
        return False
    step = 64 << 20
    return all(np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, a.size, step))


def compare(
    name: str, x: Any, y: Any, dtype: str, shape: list[int], encoding: str, quantized: bool
) -> TensorDiff:
    """The error of decoded `y` against original `x` (numpy arrays or torch tensors)."""
    row = TensorDiff(name, shape, dtype, encoding, quantized)
    xb, _, _ = as_bytes(x)
    yb, _, _ = as_bytes(y)
    row.exact = _bytes_equal(xb, yb)
    if row.exact and not quantized:
        row.sqnr_db, row.rel_rmse, row.max_abs_err = math.inf, 0.0, 0.0
        return row
    if dtype not in FLOATS:
        n = int(np.count_nonzero(xb != yb))
        row.problem = f"{dtype} values differ ({n} bytes)"
        return row
    signal = noise = 0.0
    max_abs = 0.0
    n = _source.numel(shape)
    abuf = np.empty(min(n, _CHUNK), np.float64)
    ebuf = np.empty_like(abuf)
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(0, n, _CHUNK):
            a = _into_f64(x, i, i + _CHUNK, abuf)
            e = _into_f64(y, i, i + _CHUNK, ebuf)
            np.subtract(e, a, out=e)
            # einsum, not BLAS: OpenBLAS threads fight the encoder's idle-spinning thread pool
            signal += float(np.einsum("i,i->", a, a))
            noise += float(np.einsum("i,i->", e, e))
            max_abs = max(max_abs, float(e.max()), -float(e.min()))
    row.signal, row.noise = signal, noise
    row.sqnr_db = _sqnr(signal, noise)
    if noise == 0:
        row.rel_rmse = 0.0
    else:
        row.rel_rmse = math.sqrt(noise / signal) if signal > 0 else math.inf
    row.max_abs_err = max_abs
    return row


def diff(
    original: str | os.PathLike[str],
    converted: str | os.PathLike[str],
    progress: bool | None = False,
) -> DiffReport:
    """Compare a safetensors file or model folder with its qtensors conversion, tensor by tensor.
    Rows come worst first: problems, then by rising SQNR (exact tensors last)."""
    t0 = time.perf_counter()
    original, converted = os.fspath(original), os.fspath(converted)
    if _is_qtensors(original):
        raise _source.InputError(
            f"{original} is the quantized one: the order is "
            "`qtensors diff ORIGINAL.safetensors QUANTIZED.qtensors` (original first)"
        )
    entries = {e.name: e for e in _original_entries(original)}
    fw = _source.framework_for(e.dtype for e in entries.values())
    rep = DiffReport(original, converted)
    seen: set[str] = set()
    handles = [safe_open(f, framework=fw) for f in _converted_files(converted)]
    reader = _source.TensorReader(fw)
    total = sum(e.nbytes for e in entries.values())
    bar = Progress(total, len(entries), "comparing", want_progress(progress))
    try:
        for h in handles:
            for name in h.keys():
                enc_dict = h.encoding(name)
                enc = describe_encoding(enc_dict)
                shape, dtype = list(h.shape(name)), h.dtype(name)
                e = entries.get(name)
                if e is None:
                    rep.rows.append(
                        TensorDiff(name, shape, dtype, enc, problem="not in the original")
                    )
                    continue
                seen.add(name)
                if list(e.shape) != shape or e.dtype != dtype:
                    rep.rows.append(
                        TensorDiff(
                            name,
                            shape,
                            dtype,
                            enc,
                            problem=f"original is {e.dtype}{list(e.shape)}",
                        )
                    )
                    bar.update(e.nbytes)
                    continue
                corrupted = _checksum_problem(h, name)
                if corrupted:  # its decoded values would be garbage: report, do not compare
                    rep.rows.append(TensorDiff(name, shape, dtype, enc, problem=corrupted))
                    bar.update(e.nbytes)
                    continue
                x = reader.read(e)
                y = h.get_tensor(name)
                rep.rows.append(compare(name, x, y, dtype, shape, enc, enc_dict["name"] != "raw"))
                del x, y
                bar.update(e.nbytes)
    finally:
        bar.close()
        reader.close()
        for h in handles:
            h.close()
    for name, e in entries.items():
        if name not in seen:
            rep.rows.append(
                TensorDiff(name, list(e.shape), e.dtype, "-", problem="not in the converted file")
            )
    rep.rows.sort(key=lambda r: (r.problem is None, _sort_sqnr(r.sqnr_db), not r.quantized))
    rep.seconds = time.perf_counter() - t0
    return rep


def _num(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return format(v, fmt)


def _db(v: float | None) -> str:
    text = _num(v, ".2f")
    return text if text in ("exact", "-") else f"{text} dB"


def summary_line(rep: DiffReport) -> str:
    s = rep.summary()
    raw = f"{s['raw']} raw"
    if s["raw"]:
        raw += " (exact)" if s["raw_exact"] == s["raw"] else f" ({s['raw_exact']} exact)"
    text = f"{count(s['tensors'], 'tensor')}: {s['quantized']} quantized, {raw}"
    if s["problems"]:
        text += f", {count(s['problems'], 'PROBLEM')}"
    if s["quantized"]:
        text += (
            f"; SQNR worst {_db(s['worst_sqnr_db'])} ({s['worst_tensor']}), "
            f"median {_db(s['median_sqnr_db'])}, overall {_db(s['overall_sqnr_db'])}; "
            f"max relative RMSE {_num(s['max_rel_rmse'], '.4f')}, "
            f"max abs error {_num(s['max_abs_err'], '.3g')}"
        )
    return text


def format_diff(rep: DiffReport, top: int | None = None) -> str:
    from .inspect import _table

    rows = rep.rows if top is None else rep.rows[:top]
    cells = [
        [
            r.name,
            r.encoding,
            _num(r.sqnr_db, ".2f") if not r.problem else "-",
            _num(r.rel_rmse, ".4f") if not r.problem else "-",
            _num(r.max_abs_err, ".3g") if not r.problem else "-",
            r.problem or "",
        ]
        for r in rows
    ]
    lines = _table(["name", "encoding", "SQNR dB", "rel RMSE", "max abs err", ""], cells, {2, 3, 4})
    if top is not None and len(rep.rows) > top:
        lines.append(f"... {count(len(rep.rows) - top, 'more (better) tensor')}")
    lines.append("")
    lines.append(summary_line(rep))
    return "\n".join(lines)
