"""The warm-up record (``kernels/warm_record.py``): what it keys on, what it keeps, and that
``warmup`` skips what an earlier warm-up in the same environment ran."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

import importlib  # noqa: E402

from qtensors.torch.kernels import warm_record  # noqa: E402

# the module (``qtensors.torch.warmup`` is also the function's name in the package)
warmup_mod = importlib.import_module("qtensors.torch.warmup")

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device's properties, a Triton cache folder and qtensors' cache folder in tmp."""
    props = SimpleNamespace(name="Fake GPU", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cache = tmp_path / "triton"
    cache.mkdir()
    monkeypatch.setattr(warm_record, "_triton_cache_folder", lambda: str(cache))
    monkeypatch.setenv("QTENSORS_CACHE_DIR", str(tmp_path / "qt"))
    monkeypatch.delenv("QTENSORS_WARMUP_RECORD", raising=False)
    return SimpleNamespace(props=props, cache=cache, folder=tmp_path / "qt")


def test_key_covers_the_gpu_and_the_triton_cache_folder(fake_gpu):
    a = warm_record.environment_key(CUDA0)
    assert a is not None and a == warm_record.environment_key(CUDA0)
    fake_gpu.props.minor = 1  # another compute capability
    assert warm_record.environment_key(CUDA0) not in (None, a)
    fake_gpu.props.minor = 0
    # a deleted and recreated Triton cache is a new environment
    os.rmdir(fake_gpu.cache)
    assert warm_record.environment_key(CUDA0) is None
    fake_gpu.cache.mkdir()
    b = warm_record.environment_key(CUDA0)
    assert b is not None


def test_no_key_on_cpu_or_when_turned_off(fake_gpu, monkeypatch):
    assert warm_record.environment_key(torch.device("cpu")) is None
    monkeypatch.setenv("QTENSORS_WARMUP_RECORD", "0")
    assert warm_record.environment_key(CUDA0) is None
    assert warm_record.recorded(None) == set()
    warm_record.record(None, {"x"})  # nothing to key it under: nothing written
    assert not (fake_gpu.folder / "warmed.json").exists()


def test_record_round_trip_and_replacement(fake_gpu):
    warm_record.record("k1", {"a", "b"})
    warm_record.record("k1", {"c"})
    assert warm_record.recorded("k1") == {"a", "b", "c"}
    assert warm_record.recorded("k2") == set()
    warm_record.record("k2", {"d"})  # one environment kept: the current one
    assert warm_record.recorded("k2") == {"d"}
    assert warm_record.recorded("k1") == set()


@pytest.mark.parametrize(
    "content", ["", "{", "[1]", '{"key": "k1"}', '{"key": "k1", "signatures": 3}', "\x00\xff"]
)
def test_damaged_record_reads_as_empty(fake_gpu, content):
    fake_gpu.folder.mkdir(parents=True, exist_ok=True)
    (fake_gpu.folder / "warmed.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    assert warm_record.recorded("k1") == set()
    warm_record.record("k1", {"a"})  # and is replaced whole
    assert warm_record.recorded("k1") == {"a"}


def test_warmup_skips_what_it_ran_before(fake_gpu):
    sig = ("linear", (64, 64), ("affine", 4, 64, 1, "float16"), True, torch.float16, "cuda:0", 1)
    first = warmup_mod._Record(remember=True)
    assert not first.skip(sig, CUDA0)
    first.save([sig])
    again = warmup_mod._Record(remember=True)
    assert again.skip(sig, CUDA0)
    assert not again.skip((*sig[:-1], 2), CUDA0)  # another batch size was never run
    assert not warmup_mod._Record(remember=False).skip(sig, CUDA0)
    # the CPU is never skipped nor recorded
    cpu = warmup_mod._Record(remember=True)
    cpu_sig = (*sig[:5], "cpu", 1)
    assert not cpu.skip(cpu_sig, torch.device("cpu"))
    cpu.save([cpu_sig])
    assert warm_record.recorded(warm_record.environment_key(CUDA0)) == {repr(sig)}


def test_saving_nothing_imports_nothing(monkeypatch, fake_gpu):
    # a CPU-only warm-up records nothing, so it must not need the kernels package (no Triton)
    import sys

    import qtensors.torch.kernels as kernels

    sig = ("linear", (64, 64), ("affine", 4, 64, 1, "float16"), True, torch.float16, "cuda:0", 1)
    rec = warmup_mod._Record(remember=True)
    assert not rec.skip(sig, CUDA0)  # the device's key looked up
    monkeypatch.delattr(kernels, "warm_record")
    monkeypatch.setitem(sys.modules, "qtensors.torch.kernels.warm_record", None)
    rec.save([(*sig[:5], "cpu", 1)])  # would raise ImportError if it imported warm_record
    with pytest.raises(ImportError):
        rec.save([sig])  # (the check above can fail: with something to save, it imports)


def test_default_rows_follow_the_gemm16_route(monkeypatch):
    """With the gemm16 route on (the default), the warm-up also runs a row count of its 256-row
    bucket and one past its last (decode + cuBLAS again), so a prompt of 129-256 rows compiles
    nothing; off, neither (its 128-row bucket starts at ``MMA_MAX_M + 1``, warmed either way)."""
    from qtensors.torch.kernels import launch
    from qtensors.torch.warmup import default_rows

    try:
        monkeypatch.setattr(launch, "GEMM16_ROWS", None)
        off = default_rows()
        assert launch.MMA_MAX_M + 1 in off and 129 not in off
        monkeypatch.setattr(launch, "GEMM16_ROWS", launch.GEMM16_ROWS_ON)
        on = default_rows()
        lo, hi = launch.GEMM16_ROWS_ON
        assert set(on) == set(off) | {129, hi + 1}
        launch.route.cache_clear()  # (routes are cached by shape)
        # a weight gemm16's tables have, at each of those row counts
        assert [launch.route(m, 14336, 4096, "affine", 4, 64, 1, True, True, False) for m in
                (lo, 129, hi, hi + 1)] == ["gemm16", "gemm16", "gemm16", "decode"]  # fmt: skip
    finally:
        monkeypatch.undo()
        launch.route.cache_clear()


def test_gemm16_rows_run_only_where_the_route_takes_them(monkeypatch):
    """The gemm16 route's own warm-up rows run only on an sm_90 device, for the weight shapes
    its tables have (elsewhere those rows decode, then cuBLAS, as ``MMA_MAX_M + 1`` rows did);
    every other row count runs for every weight. A CPU model's warm-up never runs them."""
    from qtensors.torch.kernels import launch
    from qtensors.torch.warmup import default_rows, gemm16_only_rows, gemm16_rows_due

    monkeypatch.setattr(launch, "GEMM16_ROWS", launch.GEMM16_ROWS_ON)
    only = gemm16_only_rows()
    assert only == {129, launch.GEMM16_ROWS_ON[1] + 1} and only <= set(default_rows())
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["v"])
    gpu, cpu = (SimpleNamespace(device=torch.device(d), dtype=torch.bfloat16) for d in
                ("cuda:0", "cpu"))  # fmt: skip
    tabled, other = (14336, 4096), (2048, 2048)
    assert gemm16_rows_due(129, gpu, tabled) and gemm16_rows_due(257, gpu, tabled)
    fp32 = SimpleNamespace(device=gpu.device, dtype=torch.float32)  # the route is fp16 / bf16's
    assert not gemm16_rows_due(129, fp32, tabled) and gemm16_rows_due(1, fp32, tabled)
    assert not gemm16_rows_due(129, gpu, other) and not gemm16_rows_due(129, cpu, tabled)
    assert gemm16_rows_due(launch.MMA_MAX_M + 1, gpu, other) and gemm16_rows_due(1, cpu, other)
    cap["v"] = (10, 0)  # no wgmma: the route decodes there
    assert not gemm16_rows_due(129, gpu, tabled)
    monkeypatch.setattr(launch, "GEMM16_ROWS", None)
    assert gemm16_only_rows() == frozenset() and gemm16_rows_due(129, cpu, other)

    # a CPU model whose weight shape the tables have: its warm-up runs none of those rows
    import qtensors as qt
    from qtensors.torch import quantize_model

    monkeypatch.setattr(launch, "GEMM16_ROWS", launch.GEMM16_ROWS_ON)
    monkeypatch.setitem(launch.GEMM16_TABLE, (256, 64, 128), launch.Gemm16Config())
    model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    ran = warmup_mod.warmup(model, remember=False)
    assert sorted(k[-1] for k in ran) == sorted(set(default_rows()) - only)
