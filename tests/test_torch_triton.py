"""The Triton kernels on the CPU under ``TRITON_INTERPRET=1``, against the numpy reference.

The interpreter is chosen when Triton's ``jit`` decorates a kernel, so the kernels run in a child
process that sets the variable before importing them (this process may have compiled them for a
GPU already). Every launch path is covered: the 2-D kernel (any group size / axis) and the
grouped 3-D kernel (axis last and axis 0), codes read per element, as whole bytes (4-bit) or as
8-code words (any width), 32- or 64-bit indices, with the output poisoned with NaN first so that
any element left unwritten shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CHILD = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[1])
    import reference as R
    from qtensors.torch.kernels import dequant as tk

    SCALE_T = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    OUT_T = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float64": torch.float64}
    INT = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32), 8: (torch.int64, np.uint64)}

    def T(a, sd):
        if a is None:
            return None
        a = np.ascontiguousarray(a)
        if sd == "bfloat16":
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    cases = json.loads(sys.argv[2])
    configs = [
        None,
        tk.Config(1, 16, grouped=False, paired=False),
        tk.Config(4, 32, grouped=False, paired=True),
        tk.Config(2, 64, grouped=True, paired=False),
        tk.Config(16, 16, grouped=True, paired=True),
        tk.Config(8, 32, grouped=True, paired=False, num_stages=3),
    ]
    failures = []
    n = 0
    for i, (shape, kind, bits, g, axis, sd, out) in enumerate(cases):
        rng = np.random.default_rng(i)
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        enc = {"name": kind, "bits": bits, "group_size": g, "axis": axis, "scale_dtype": sd}
        if kind == "symmetric_full":  # decodes as symmetric; negative scales
            kind = enc["name"] = "symmetric"
            enc["levels"] = "full"
        parts = R.quantize(x, enc)
        want = np.ascontiguousarray(R.dequantize(parts, enc, shape, out))
        want = want.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize])
        codes = torch.from_numpy(parts["codes"].copy())
        s, m = T(parts["scales"], sd), T(parts["mins"], sd)
        a = R.normalize_axis(axis, len(shape))
        for j, cfg in enumerate(configs):
            o = torch.full(tuple(shape), float("nan"), dtype=OUT_T[out])
            tk.dequantize_triton(codes, s, m, list(shape), kind, bits, g, a, OUT_T[out],
                                 config=cfg, out=o, idx64=(i + j) % 4 == 0)
            ti, ni = INT[o.element_size()]
            got = o.view(ti).numpy().view(ni).reshape(want.shape)
            n += 1
            if not np.array_equal(got, want):
                bad = int((got != want).sum())
                what = f"{shape} {kind}{bits} g{g} ax{axis} {sd}->{out} {cfg}"
                failures.append(f"{what}: {bad} differ")
    print(json.dumps({"n": n, "failures": failures}))
    """
)

# (shape, encoding, bits, group size, axis, scale dtype, output dtype)
CASES = [
    ((7, 100), "affine", 4, 16, -1, "float16", "float32"),
    ((7, 100), "affine", 4, 16, 0, "bfloat16", "float16"),
    ((9, 70), "affine", 4, 64, 0, "float32", "bfloat16"),
    ((9, 70), "nf4", 4, 32, -1, "float16", "float16"),
    ((33, 65), "affine", 3, 8, -1, "float16", "float32"),
    ((5, 6, 9), "symmetric", 5, 4, 1, "float32", "float64"),
    ((130,), "nf4", 4, 64, 0, "bfloat16", "float32"),
    ((64, 64), "affine", 8, 64, 0, "float16", "float16"),
    ((40, 6), "symmetric", 8, 16, 0, "float16", "bfloat16"),
    ((3, 17), "affine", 1, 5, 1, "float32", "float32"),
    ((4, 10), "symmetric", 2, 3, 0, "float16", "float32"),
    ((12, 20), "affine", 7, 7, -1, "bfloat16", "float32"),
    ((2, 3, 4, 5), "affine", 6, 2, 2, "float16", "float16"),
    ((), "affine", 4, 3, 0, "float32", "float32"),
    ((3, 130), "affine", 4, 256, 1, "float16", "float32"),
    ((300, 3), "affine", 4, 128, 0, "float16", "float16"),
    ((5, 33), "affine", 4, 1, 1, "float32", "float32"),
    ((6, 34), "symmetric", 4, 1, 0, "float16", "float32"),
    ((17, 48), "affine", 2, 16, 0, "float16", "float16"),
    ((2, 8, 6), "symmetric", 3, 4, 0, "bfloat16", "bfloat16"),
    ((6, 64), "affine", 3, 16, -1, "float16", "float32"),
    ((5, 96), "affine", 3, 32, -1, "bfloat16", "float16"),
    ((64, 32), "symmetric", 3, 32, 0, "float16", "float16"),
    ((5, 40), "symmetric", 5, 8, -1, "float32", "float16"),
    ((4, 24), "affine", 1, 8, -1, "float16", "float32"),
    ((19, 32), "affine", 7, 32, 0, "bfloat16", "float32"),
    ((16, 32), "symmetric", 6, 8, -1, "float16", "bfloat16"),
    ((70, 16), "affine", 2, 64, 0, "float16", "float16"),
    ((9, 64), "symmetric_full", 4, 32, -1, "float16", "float32"),
    ((40, 6), "symmetric_full", 5, 8, 0, "bfloat16", "float16"),
]


def test_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, TESTS_DIR, json.dumps(CASES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == len(CASES) * 6
    assert not result["failures"], "\n".join(result["failures"])
