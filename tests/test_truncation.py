"""Files changed under an open `safe_open`: every call that starts after a truncation (or an
in-place rewrite) raises a clean `FormatError` naming the file, never a SIGBUS.

Each case runs in a subprocess, since the failure it guards against kills the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qtensors as qt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CALLS = {
    "get_tensor_quantized": "f.get_tensor('w')",
    "get_tensor_raw": "f.get_tensor('b')",
    "get_quantized": "f.get_quantized('w').codes.sum()",
    "get_quantized_raw": "f.get_quantized('b').codes.sum()",
    "verify_all": "f.verify()",
    "verify_one": "f.verify('w')",
    "get_slice": "f.get_slice('w')[100:200]",
    "get_slice_raw": "f.get_slice('b')[-10:]",
}

# How the file changes after it is opened: cut into the data, cut to nothing, or cut and grown
# back to its size (the old pages are gone, the size is the same, the mtime moves).
CHANGES = {
    "truncated": "os.truncate(path, f._data_start + 100)",
    "emptied": "os.truncate(path, 0)",
    "regrown": (
        "size = os.path.getsize(path); os.truncate(path, 0); os.truncate(path, size); "
        "st = os.stat(path); os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))"
    ),
}

SCRIPT = """
import os, sys
import qtensors as qt
path, framework = sys.argv[1], sys.argv[2]
with qt.safe_open(path, framework=framework) as f:
    {change}
    try:
        {call}
    except qt.FormatError as e:
        print("FormatError:", e)
    else:
        print("no error")
"""


@pytest.fixture
def model_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((512, 256)).astype(np.float32),
        "b": rng.standard_normal(4096).astype(np.float32),
    }
    path = tmp_path / "m.qtensors"
    qt.save_file(tensors, path)
    return str(path)


def _run(path: str, change: str, call: str, framework: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(SCRIPT).format(change=change, call=call)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run(
        [sys.executable, "-c", code, path, framework],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("call", list(CALLS))
def test_call_after_change_raises_format_error(model_file, change, call):
    p = _run(model_file, CHANGES[change], CALLS[call], "np")
    assert p.returncode == 0, f"killed by signal {-p.returncode}" if p.returncode < 0 else p.stderr
    assert p.stdout.startswith("FormatError:"), p.stdout + p.stderr
    assert model_file in p.stdout
    word = "truncated" if change != "regrown" else "modified"
    assert word in p.stdout and "reopen" in p.stdout, p.stdout


@pytest.mark.parametrize("call", ["get_tensor_quantized", "get_quantized"])
def test_torch_views_after_truncation(model_file, call):
    pytest.importorskip("torch")
    p = _run(model_file, CHANGES["truncated"], CALLS[call], "pt")
    assert p.returncode == 0, f"killed by signal {-p.returncode}" if p.returncode < 0 else p.stderr
    assert p.stdout.startswith("FormatError:") and "truncated" in p.stdout, p.stdout + p.stderr


def test_unchanged_file_still_reads(model_file):
    # Touching nothing: the checks stay silent (and cost one fstat per call).
    p = _run(model_file, "pass", "f.verify(); f.get_tensor('w'); f.get_quantized('w')", "np")
    assert p.returncode == 0 and p.stdout.strip() == "no error", p.stdout + p.stderr
