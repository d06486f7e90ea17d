"""What every importer shares: the report of what was exact and what was re-encoded, and the
output folder built beside its destination and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class TensorReport:
    """How one tensor came across: `exact` (mapped code for code, no decoding), `raw` (float
    values kept as they are), or `reencoded` (decoded, then quantized again: `rel_rmse` is the
    error against the source's own dequantized values)."""

    name: str
    source_name: str
    source_type: str
    how: str
    encoding: str
    rel_rmse: float | None = None


@dataclass
class ImportReport:
    source: str
    format: str
    dst: str
    tensors: list[TensorReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, how: str) -> int:
        return sum(t.how == how for t in self.tensors)

    def summary(self) -> str:
        lines = [
            f"{self.format} {self.source} -> {self.dst}: {len(self.tensors)} tensors in "
            f"{self.seconds:.2f} s: {self.count('exact')} exact, {self.count('raw')} raw, "
            f"{self.count('reencoded')} re-encoded"
        ]
        by_type: dict[tuple[str, str, str], int] = {}
        for t in self.tensors:
            key = (t.source_type, t.how, t.encoding)
            by_type[key] = by_type.get(key, 0) + 1
        for (src, how, enc), n in sorted(by_type.items()):
            lines.append(f"  {n:4d} x {src:9s} -> {how:9s} {enc}")
        worst = [t for t in self.tensors if t.rel_rmse is not None]
        if worst:
            t = max(worst, key=lambda t: t.rel_rmse or 0.0)
            mean = sum(t.rel_rmse or 0.0 for t in worst) / len(worst)
            lines.append(
                f"  re-encoding error (relative RMSE vs the source's dequantized values): "
                f"mean {mean:.4f}, worst {t.rel_rmse:.4f} ({t.name})"
            )
        if self.skipped:
            lines.append(f"  not imported (no parameter of the model): {', '.join(self.skipped)}")
        return "\n".join(lines)


@contextmanager
def building_folder(dst: str, force: bool) -> Iterator[str]:
    """A temporary folder beside `dst`, renamed to `dst` when the block succeeds (replacing it
    only with `force`); removed on any error, so no half-written output is left."""
    from ..convert import OutputExistsError, _publish_folder

    if os.path.lexists(dst) and not force:
        raise OutputExistsError(f"{dst} exists: pass force=True (--force) to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp: str | None = tempfile.mkdtemp(
        prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".tmp", dir=parent
    )
    try:
        yield tmp
        _publish_folder(tmp, dst, force)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
