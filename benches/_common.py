"""Helpers shared by the benchmark scripts (run as `python3 benches/NAME.py`, so this module is
importable as `_common`)."""

from __future__ import annotations

import os


def drop_caches(paths: list[str]) -> str:
    """Drop the page cache (all of it where permitted, else these files'); returns which way."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"
