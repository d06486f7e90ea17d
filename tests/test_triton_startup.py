"""``kernels/startup.py``: Triton's start-up hash kept on disk, handed back only while the
installation's fingerprint matches, and never in the way when anything is off."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton")

import triton.runtime.cache as triton_cache

from qtensors.torch.kernels import startup


@pytest.fixture
def fake_triton(monkeypatch, tmp_path):
    """A stand-in for Triton's ``triton_key`` that counts its calls, an empty cache folder,
    and Triton's attribute restored afterwards."""
    calls = []

    def original():
        calls.append(1)
        return "3.x-fake-key"

    monkeypatch.setattr(startup, "_ORIGINAL", original)
    monkeypatch.setattr(triton_cache, "triton_key", triton_cache.triton_key)
    monkeypatch.setenv("QTENSORS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QTENSORS_TRITON_KEY_CACHE", raising=False)
    return calls, tmp_path


def test_computed_once_then_stored(fake_triton):
    calls, folder = fake_triton
    assert startup.remember_triton_key() == "computing"
    assert triton_cache.triton_key() == "3.x-fake-key"
    assert calls == [1]
    stored = json.loads((folder / "triton_key.json").read_text())
    assert stored == {"fingerprint": startup.fingerprint(), "key": "3.x-fake-key"}
    # a later process: the stored value, Triton's hash not run
    assert startup.remember_triton_key() == "stored"
    assert triton_cache.triton_key() == "3.x-fake-key"
    assert calls == [1]
    assert not [p for p in os.listdir(folder) if p.startswith(".triton_key.")]  # no temp left


def test_changed_installation_recomputes(fake_triton, monkeypatch):
    calls, folder = fake_triton
    startup.remember_triton_key()
    triton_cache.triton_key()
    monkeypatch.setattr(startup, "fingerprint", lambda: "another installation")
    assert startup.remember_triton_key() == "computing"
    assert triton_cache.triton_key() == "3.x-fake-key"
    assert calls == [1, 1]
    assert json.loads((folder / "triton_key.json").read_text())["fingerprint"] == (
        "another installation"
    )


@pytest.mark.parametrize(
    "content", ["", "{", "[1, 2]", '{"fingerprint": 3}', '{"key": "k"}', "\x00\xff"]
)
def test_damaged_file_is_recomputed(fake_triton, content):
    calls, folder = fake_triton
    (folder / "triton_key.json").write_text(content, errors="surrogateescape")
    assert startup.remember_triton_key() == "computing"
    assert triton_cache.triton_key() == "3.x-fake-key" and calls == [1]


def test_unwritable_folder_still_works(fake_triton, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QTENSORS_CACHE_DIR", str(blocker / "sub"))
    assert startup.remember_triton_key() == "computing"
    assert triton_cache.triton_key() == "3.x-fake-key"
    assert startup.remember_triton_key() == "computing"  # nothing could be stored


def test_switched_off(fake_triton, monkeypatch):
    monkeypatch.setenv("QTENSORS_TRITON_KEY_CACHE", "0")
    before = triton_cache.triton_key
    assert startup.remember_triton_key() == "off"
    assert triton_cache.triton_key is before


def test_stored_value_is_tritons_own(monkeypatch, tmp_path):
    """With Triton's real function: what is stored and handed back is exactly its value."""
    monkeypatch.setattr(triton_cache, "triton_key", triton_cache.triton_key)
    monkeypatch.setenv("QTENSORS_CACHE_DIR", str(tmp_path))
    real = startup._ORIGINAL()
    assert startup.remember_triton_key() in ("computing", "stored")
    assert triton_cache.triton_key() == real
    assert startup.remember_triton_key() == "stored"
    assert triton_cache.triton_key() == real
    assert triton_cache.get_cache_key.__module__ == triton_cache.__name__  # where Triton reads it


def test_fingerprint_is_a_stat_of_the_installation():
    a = startup.fingerprint()
    assert a == startup.fingerprint() and len(a) == 64
