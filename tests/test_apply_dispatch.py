"""benches/apply_dispatch.py: the sweep's dispatch lines rewrite launch.py into valid Python
with the new settings, one-line and multi-line assignments alike."""

from __future__ import annotations

import ast
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    spec = importlib.util.spec_from_file_location(
        "apply_dispatch", os.path.join(ROOT, "benches", "apply_dispatch.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SWEEP = """\
## dispatch
routing: SMALL_M_KERNEL = "fma"   (now "words")
routing: TILED_MAX_M = 16   (now 4)
routing: WORDS_DEFAULT = TiledConfig(kernel='words', block_m=0, block_n=4, block_k=512, split_k=0, num_warps=2, num_stages=3)
table: TILED_TABLE = {   (replaces the whole dict)
table:    (1, 64, 128): TiledConfig(kernel='decode', block_m=0, block_n=16, block_k=256, split_k=0, num_warps=4, num_stages=2),
table: }
"""  # noqa: E501


def _assignments(source: str) -> dict[str, str]:
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if isinstance(target, ast.Name):
                out[target.id] = ast.unparse(node.value)
    return out


def test_rewrites_launch_py_into_valid_python():
    mod = _module()
    with open(os.path.join(ROOT, "python", "qtensors", "torch", "kernels", "launch.py")) as fh:
        source = fh.read()
    settings, table = mod.parse(SWEEP)
    new = mod.apply(source, settings, table)
    got = _assignments(new)  # raises SyntaxError if the rewrite broke the file
    assert got["SMALL_M_KERNEL"] == "'fma'"
    assert got["TILED_MAX_M"] == "16"
    assert "block_n=4" in got["WORDS_DEFAULT"] and "num_stages=3" in got["WORDS_DEFAULT"]
    table_src = got["TILED_TABLE"]
    assert "(1, 64, 128)" in table_src and table_src.count("TiledConfig(") == 1
    # everything else is untouched
    old = _assignments(source)
    for name in old.keys() - {"SMALL_M_KERNEL", "TILED_MAX_M", "WORDS_DEFAULT", "TILED_TABLE"}:
        assert got[name] == old[name], name
