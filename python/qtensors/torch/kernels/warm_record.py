"""Which layer signatures this installation has already warmed, so a later load skips them.

``warmup`` runs each distinct quantized layer once during a load so that no kernel compiles in
the user's first forward. Once Triton's on-disk cache holds those kernels, running them again
only loads them, and loading every path's kernels (every batch size's) costs more than the few
a first forward needs: on the H200 the 1.1B Llama's warm-up took 0.41 s of a 0.90 s time to
first token against 0.77 s without it (``benches/bench_gpu_load.py``,
``benches/results/gpu_load_h200.txt``). So ``warmup`` records, per environment, the signatures it
ran, and skips those already recorded.

The environment key covers what decides whether Triton would compile again: Triton's own
installation (``startup.fingerprint``), qtensors' kernel sources (path, size and modification
time of each), torch's version, the GPU model and compute capability, and Triton's cache folder
(its path, inode and creation time: a deleted or replaced cache starts a new record). Any
error, or ``QTENSORS_WARMUP_RECORD=0``, means no record: every signature is warmed.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch

from . import startup

_FILE = "warmed.json"
#: signatures kept per environment at most (a record only ever lists a few dozen)
MAX_SIGNATURES = 4096


@functools.cache
def _kernel_sources() -> str:
    folder = os.path.dirname(os.path.abspath(__file__))
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(folder, name))
            entries.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(entries)


def _triton_cache_folder() -> str | None:
    try:
        import triton

        folder = triton.knobs.cache.dir
    except Exception:
        folder = os.environ.get("TRITON_CACHE_DIR")
    return folder or None


def environment_key(device: torch.device) -> str | None:
    """The key a record is kept under for kernels run on ``device`` (CUDA), or None where no
    record applies (turned off, no Triton cache folder yet, anything unexpected)."""
    if os.environ.get("QTENSORS_WARMUP_RECORD", "1") == "0" or device.type != "cuda":
        return None
    try:
        folder = _triton_cache_folder()
        if folder is None:
            return None
        st = os.stat(folder)
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        parts = [
            startup.fingerprint(),
            _kernel_sources(),
            torch.__version__,
            f"{props.name}:{props.major}.{props.minor}",
            f"{os.path.abspath(folder)}:{st.st_ino}:{st.st_ctime_ns}",
        ]
    except Exception:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def recorded(key: str | None) -> set[str]:
    """The signatures (as ``repr`` strings) recorded under ``key``."""
    if key is None:
        return set()
    stored = startup.read_json(os.path.join(startup.cache_dir(), _FILE))
    if not isinstance(stored, dict) or stored.get("key") != key:
        return set()
    sigs = stored.get("signatures")
    if not isinstance(sigs, list):
        return set()
    return {s for s in sigs[:MAX_SIGNATURES] if isinstance(s, str)}


def record(key: str | None, signatures: set[str]) -> None:
    """Add ``signatures`` to the record under ``key`` (a record under another key is
    replaced: one environment is kept, the current one)."""
    if key is None or not signatures:
        return
    merged = sorted(recorded(key) | signatures)[:MAX_SIGNATURES]
    path = os.path.join(startup.cache_dir(), _FILE)
    startup.write_json(path, {"key": key, "signatures": merged})
