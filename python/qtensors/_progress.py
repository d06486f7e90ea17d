"""A byte-and-tensor progress bar (tqdm) that stays quiet when it should."""

from __future__ import annotations

import os
import sys
from typing import Any


def want_progress(progress: bool | None, stream: Any = None) -> bool:
    """`progress=None` means: only when the stream (stderr) is a terminal."""
    if progress is not None:
        return bool(progress)
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Bytes done of `total_bytes` with rate and ETA, and tensors done of `total_tensors`."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool) -> None:
        self.total_tensors = total_tensors
        self.tensors = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            try:
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                cols = 0
            # tqdm draws nothing on a terminal that reports no size (a fresh pty): assume one.
            size: dict = {"dynamic_ncols": True} if cols > 0 else {"ncols": 100, "nrows": 24}
            self._bar = tqdm(
                total=total_bytes,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                **size,
                leave=False,
                file=sys.stderr,
                postfix=self._tensors_text(),
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B "
                "[{elapsed}<{remaining}, {rate_fmt}]{postfix}",
            )

    def _tensors_text(self) -> str:
        return f"{self.tensors}/{self.total_tensors} tensors"

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        if self._bar is not None:
            self._bar.set_postfix_str(self._tensors_text(), refresh=False)
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 file`, `2 files`, `0 tensors`: a number with its noun, plural when it is not 1."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
