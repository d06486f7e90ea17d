"""Which threads run the Rust core's CPU matmul (``torch.ops.qtensors.linear`` on CPU tensors).

* ``"openmp"`` (the default where torch runs its CPU ops on OpenMP, as its Linux builds do): the
  core runs its parallel work as an OpenMP region of the libgomp torch has loaded, from the thread
  that called it (``rust/core/src/matmul/pool.rs``). torch's OpenMP workers spin for a while after
  each torch op; on a machine with as many cores as threads, a spinning worker held the core that
  a rayon thread needed, and the matmul's second thread started late (MiniLM at batch 32 on 2
  cores: 0.74-0.80x the fp32 model). On torch's own team the spinning worker takes the work, and
  ``torch.set_num_threads`` sets the matmul's threads too.
* ``"rayon"``: rayon's pool (sized by ``RAYON_NUM_THREADS``), where torch has no OpenMP runtime.

``QTENSORS_CPU_POOL=rayon|openmp|auto`` picks at import (``auto`` as unset: OpenMP where
available, else rayon; ``openmp`` raises where it is not); ``use()`` switches at runtime.
"""

from __future__ import annotations

import functools
import os
import re

import torch

from .. import _core

ENV = "QTENSORS_CPU_POOL"
KINDS = ("auto", "openmp", "rayon")
# File names of OpenMP runtimes with libgomp's entry points (GNU, LLVM, Intel); wheels repaired
# by auditwheel add a hash: libgomp-a34b3233.so.1.
_OPENMP_NAME = re.compile(r"lib(gomp|omp|iomp5)([-.].*)?\.so(\..*)?$")


@functools.cache
def openmp_library() -> str | None:
    """The path of the OpenMP runtime torch runs its CPU ops on, as loaded in this process; None
    where torch's parallel backend is not OpenMP or the process's mappings are not readable
    (outside Linux). Among several loaded runtimes, the one in torch's own folders first.
    Cached: torch loads it with itself and never unloads it, and ``use`` is called per round
    by the benchmarks."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return None
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    names = ((f[5], os.path.basename(f[5])) for f in fields if len(f) == 6)
    # not libgomp's offloading plugins (libgomp-plugin-nvptx.so.1): no GOMP_parallel there
    paths = {p for p, n in names if _OPENMP_NAME.search(n) and "plugin" not in n}
    if not paths:
        return None
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    mine = (torch_dir + os.sep, torch_dir + ".libs" + os.sep)

    def rank(p: str) -> tuple[bool, bool, str]:
        return (not os.path.realpath(p).startswith(mine), "gomp" not in p, p)

    return min(paths, key=rank)


def use(kind: str) -> str:
    """Run the CPU matmul's parallel work on ``kind``'s threads: ``"openmp"`` (torch's team;
    ValueError where torch has no OpenMP runtime loaded, UnsupportedError where it lacks
    libgomp's entry points), ``"rayon"``, or ``"auto"`` (OpenMP where it attaches, else rayon).
    Returns the pool now in use."""
    if kind not in KINDS:
        raise ValueError(f"CPU pool {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "rayon":
        _core.set_cpu_pool("rayon")
        return current()
    lib = openmp_library()
    try:
        if lib is None:
            raise ValueError("torch has no OpenMP runtime loaded in this process")
        _core.set_cpu_pool("openmp", lib)
    except Exception:
        if kind == "openmp":
            raise
        _core.set_cpu_pool("rayon")
    return current()


def current() -> str:
    """The pool in use: ``"openmp"`` or ``"rayon"``."""
    return _core.cpu_pool()[0]


def threads() -> int:
    """Threads a large CPU matmul called from this thread is split across."""
    return _core.cpu_pool_threads()


def configure_from_env() -> str:
    """``use(QTENSORS_CPU_POOL)`` (``"auto"`` where unset); ValueError naming the variable for a
    value it does not know."""
    kind = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if kind not in KINDS:
        raise ValueError(f"{ENV}={kind!r}: expected one of {', '.join(KINDS)}")
    return use(kind)
