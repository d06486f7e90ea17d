"""The threads of the CPU matmul (``qtensors.torch.cpu_pool``): torch's OpenMP team by default
where torch runs on OpenMP, rayon's pool otherwise or on request; the same bits on both, correct
results from several Python threads at once, and clean refusals. (From inside an OpenMP region,
which Python cannot open, ``rust/core/tests/openmp_pool.rs``.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import qtensors as qt
from qtensors import _core
from qtensors.errors import UnsupportedError
from qtensors.torch import QuantizedLinear, cpu_pool
from qtensors.torch import linear as linear_mod

HAVE_OPENMP = cpu_pool.openmp_library() is not None
needs_openmp = pytest.mark.skipif(not HAVE_OPENMP, reason="torch has no OpenMP runtime here")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_pool():
    kind, threads = cpu_pool.current(), torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    cpu_pool.use(kind)


def layer(n_out, n_in, enc, seed=0) -> QuantizedLinear:
    torch.manual_seed(seed)
    return QuantizedLinear.from_linear(nn.Linear(n_in, n_out), enc).requires_grad_(False)


# Calls the core splits across threads (>= 2^20 multiply-adds), on each of its kernels: (layer
# shape, encoding, batch, dtype, int8 activations). Batches of 40+ rows split the activations'
# quantize / widen passes too.
CALLS = [
    ((1100, 1024), qt.Affine(4, 64, axis=-1), 1, torch.float32, True),  # int8
    ((1100, 1024), qt.Affine(4, 64, axis=-1), 3, torch.float32, False),  # packed GEMV
    ((600, 1024), qt.NF4(64, axis=-1), 2, torch.bfloat16, True),  # packed GEMV, bf16
    ((700, 2048), qt.FLEXGEN, 1, torch.float32, True),  # outgroups
    ((300, 1024), qt.Affine(4, 64, axis=-1), 48, torch.float32, True),  # int8, quantize split
    ((300, 1024), qt.Symmetric(8, 32, axis=-1), 40, torch.bfloat16, False),  # bf16 tiles
    ((300, 512), qt.NF4(64, axis=-1), 70, torch.float16, True),  # fp32 tiles, widen split
]
IDS = [f"{c[0][0]}x{c[0][1]}-{c[1].name}-b{c[2]}-{str(c[3])[6:]}" for c in CALLS]


def call(q, x, int8, monkeypatch):
    monkeypatch.setattr(linear_mod, "CPU_INT8_ACTIVATIONS", int8)
    return q(x)


@needs_openmp
def test_default_is_torch_openmp_team():
    # a fresh process: what importing qtensors.torch picks, without QTENSORS_CPU_POOL
    env = {k: v for k, v in os.environ.items() if k != cpu_pool.ENV}
    env["PYTHONPATH"] = os.path.join(ROOT, "python")
    code = (
        "import torch, qtensors.torch; from qtensors import _core; "
        "torch.set_num_threads(3); print(*_core.cpu_pool(), _core.cpu_pool_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    kind, lib, threads = out.stdout.split()
    assert (kind, lib) == ("openmp", cpu_pool.openmp_library())
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    assert os.path.realpath(lib).startswith(torch_dir)  # the pip wheel's bundled libgomp
    assert int(threads) == 3  # torch.set_num_threads sets the matmul's threads too


@needs_openmp
def test_threads_follow_torch():
    assert cpu_pool.use("openmp") == "openmp"
    for n in (1, 2, 4):
        torch.set_num_threads(n)
        assert cpu_pool.threads() == n


@needs_openmp
@pytest.mark.parametrize(("shape", "enc", "batch", "dtype", "int8"), CALLS, ids=IDS)
def test_same_bits_on_both_pools(shape, enc, batch, dtype, int8, monkeypatch):
    torch.set_num_threads(2)
    q = layer(*shape, enc)
    x = torch.randn(batch, shape[1]).to(dtype)
    assert cpu_pool.use("openmp") == "openmp" and cpu_pool.threads() == 2
    on_openmp = call(q, x, int8, monkeypatch)
    assert cpu_pool.use("rayon") == "rayon"
    on_rayon = call(q, x, int8, monkeypatch)
    assert torch.equal(on_openmp, on_rayon)
    # and right: against the layer decoded (int8 activations: ~1% of the output's scale)
    want = torch.nn.functional.linear(x.float(), q.weight.dequantize(torch.float32), q.bias)
    err = (on_openmp.float() - want).norm() / want.norm()
    assert err < 0.03


@needs_openmp
def test_fresh_python_thread_gets_torchs_thread_count():
    # torch.set_num_threads sets the calling thread's OpenMP team size; other threads take it
    # from torch at their first parallel op, which the linear triggers before the core's call
    cpu_pool.use("openmp")
    torch.set_num_threads(1)
    q = layer(1100, 1024, qt.Affine(4, 64, axis=-1))
    x = torch.randn(1, 1024)
    seen = []

    def fresh():
        q(x)
        seen.append(cpu_pool.threads())

    t = threading.Thread(target=fresh)
    t.start()
    t.join()
    assert seen == [1]


@pytest.mark.parametrize("kind", ["openmp", "rayon"])
def test_several_python_threads_at_once(kind, monkeypatch):
    if kind == "openmp" and not HAVE_OPENMP:
        pytest.skip("torch has no OpenMP runtime here")
    torch.set_num_threads(2)
    layers = [layer(*c[0], c[1], seed=i) for i, c in enumerate(CALLS)]
    xs = [torch.randn(c[2], c[0][1]).to(c[3]) for c in CALLS]
    monkeypatch.setattr(linear_mod, "CPU_INT8_ACTIVATIONS", True)
    cpu_pool.use(kind)
    want = [q(x) for q, x in zip(layers, xs, strict=True)]

    def worker(i: int) -> bool:
        # each thread runs every call, in its own order
        order = [(i + j) % len(CALLS) for j in range(len(CALLS))] * 3
        return all(torch.equal(layers[k](xs[k]), want[k]) for k in order)

    with ThreadPoolExecutor(6) as ex:
        assert all(ex.map(worker, range(6)))


def test_refusals_leave_the_pool_as_it_was(monkeypatch):
    before = _core.cpu_pool()
    with pytest.raises(ValueError, match="expected one of"):
        cpu_pool.use("threads")
    with pytest.raises(ValueError, match="not loaded"):
        _core.set_cpu_pool("openmp", "/nonexistent/libgomp.so.1")
    with pytest.raises(UnsupportedError, match="GOMP_parallel"):
        _core.set_cpu_pool("openmp", "libc.so.6")  # loaded, but no OpenMP entry points
    with pytest.raises(ValueError, match="set_cpu_pool takes"):
        _core.set_cpu_pool("openmp")
    assert _core.cpu_pool() == before
    # no OpenMP runtime: "auto" falls back to rayon, "openmp" refuses
    monkeypatch.setattr(cpu_pool, "openmp_library", lambda: None)
    with pytest.raises(ValueError, match="no OpenMP runtime"):
        cpu_pool.use("openmp")
    assert cpu_pool.use("auto") == "rayon"


@pytest.mark.parametrize(
    ("value", "expected"), [("rayon", "rayon"), ("openmp", "openmp"), ("bogus", "ValueError")]
)
def test_environment_switch(value, expected):
    if expected == "openmp" and not HAVE_OPENMP:
        pytest.skip("torch has no OpenMP runtime here")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"), **{cpu_pool.ENV: value})
    code = "import qtensors.torch\nfrom qtensors.torch import cpu_pool\nprint(cpu_pool.current())\n"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if expected == "ValueError":
        assert out.returncode != 0
        assert f"ValueError: {cpu_pool.ENV}='bogus'" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == expected
