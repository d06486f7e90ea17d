"""Triton's once-per-process start-up cost, paid once per installation instead.

The first time a process compiles a kernel, or loads one from Triton's on-disk cache, Triton
computes ``triton_key()``: a sha256 over its own sources and its ~500 MB ``libtriton``. On the
H200 machine that was 0.44 s of the 0.67 s a fresh process's first quantized forward took
(``benches/probe_triton_first_use.py``, ``benches/results/gpu_triton_first_use_h200.txt``), paid
again by every process although the value only changes when the installation does.

``remember_triton_key()`` keeps the value on disk beside a fingerprint of the files it hashes
(path, size and modification time of each: a ``stat``, no reading). When the fingerprint
matches, Triton gets the stored value instead of recomputing it; otherwise Triton computes it
as before, on first use, and it is stored. The value is Triton's own string, so which kernels
hit or miss Triton's cache is unchanged. Anything unexpected (another Triton layout, an
unwritable cache folder) leaves Triton as it is. ``QTENSORS_TRITON_KEY_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile

import triton
import triton.runtime.cache as triton_cache

_FILE = "triton_key.json"
#: Triton's own function, kept to compute the value when the stored one does not apply (a
#: wrapper of this module's, after a reload, carries it)
_ORIGINAL = getattr(triton_cache, "triton_key", None)
_ORIGINAL = getattr(_ORIGINAL, "qtensors_original", _ORIGINAL)


def cache_dir() -> str:
    """``$QTENSORS_CACHE_DIR``, else ``$XDG_CACHE_HOME/qtensors``, else ``~/.cache/qtensors``."""
    explicit = os.environ.get("QTENSORS_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qtensors")


@functools.cache
def fingerprint() -> str:
    """A digest of the version and of every file ``triton_key`` reads: Triton's Python sources
    under ``compiler/``, ``backends/``, ``language/`` and ``runtime/``, and ``_C/`` (libtriton)."""
    root = os.path.dirname(os.path.abspath(triton.__file__))
    entries = [triton.__version__, root]
    for sub in ("compiler", "backends", "language", "runtime", "_C"):
        for folder, dirs, files in os.walk(os.path.join(root, sub)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith((".py", ".so", ".pyd")):
                    st = os.stat(os.path.join(folder, name))
                    entries.append(f"{folder}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def read_json(path: str) -> object:
    """The JSON at ``path``, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: object) -> None:
    """Atomically (a temporary file renamed over the final name); errors ignored: the files
    this module keeps only save time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _read(path: str, fp: str) -> str | None:
    stored = read_json(path)
    if not isinstance(stored, dict) or stored.get("fingerprint") != fp:
        return None
    key = stored.get("key")
    return key if isinstance(key, str) and key else None


def remember_triton_key() -> str:
    """Install the stored key into Triton, or a wrapper that stores it once computed. Returns
    "stored" (the stored value is in use), "computing" (Triton computes it on first use, then
    it is stored) or "off" (left to Triton: disabled, or not the layout this module knows)."""
    if os.environ.get("QTENSORS_TRITON_KEY_CACHE", "1") == "0" or not callable(_ORIGINAL):
        return "off"
    try:
        fp = fingerprint()
    except OSError:
        return "off"
    path = os.path.join(cache_dir(), _FILE)
    key = _read(path, fp)
    if key is not None:

        def stored() -> str:
            return key

        stored.qtensors_original = _ORIGINAL  # type: ignore[attr-defined]
        triton_cache.triton_key = stored
        return "stored"

    def computing() -> str:
        value = _ORIGINAL()
        write_json(path, {"fingerprint": fp, "key": value})
        triton_cache.triton_key = _ORIGINAL  # lru-cached from now on
        return value

    computing.qtensors_original = _ORIGINAL  # type: ignore[attr-defined]
    triton_cache.triton_key = computing
    return "computing"
