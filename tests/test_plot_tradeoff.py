"""benches/plot_tradeoff.py: how it reads the methods results files and its own table back."""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("transformers")
from qtensors.torch import linear as _linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benches"))
_spec = importlib.util.spec_from_file_location(
    "plot_tradeoff", os.path.join(ROOT, "benches", "plot_tradeoff.py")
)
pt = importlib.util.module_from_spec(_spec)
_int8 = _linear.CPU_INT8_ACTIVATIONS
_spec.loader.exec_module(pt)
_linear.CPU_INT8_ACTIVATIONS = _int8  # bench_methods turns it off for the whole process

HEAD = """$ python3 benches/bench_methods.py --samples 32
# torch, 2 threads, CPU

SmolLM2-135M-Instruct fp32: perplexity 14.260 on 8192 tokens
calibration: 32 x 256 tokens of the tutorial (seed 0)

config             method      ppl  x fp32  excess layer err  vs rtn  time s peak MiB
"""


def _results(tmp_path, monkeypatch, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(pt, "RESULTS", tmp_path)
    monkeypatch.setattr(pt, "SMOLLM2_RESULTS", tuple(files))


def test_later_files_supersede_and_stale_hqq_rows_drop(tmp_path, monkeypatch):
    old = HEAD + (
        "int4-g128-sym      gptq     16.658   1.168    0.33    0.0642    0.54   153.5      686\n"
        "int4-g128-sym      hqq      32.759   2.297    2.52    0.1259    1.06    23.7      424\n"
        "int4-g64-affine    hqq      18.209   1.277    0.85    0.0723    0.92    17.7      425\n"
    )
    # two runs in one file, the second without an RTN row (blank excess / vs rtn columns)
    new = (
        HEAD
        + "int4-g128-sym      rtn      21.589   1.514    1.00    0.1191    1.00    13.4     1368\n"
        + "\n"
        + HEAD
        + "int4-g128-sym      gptq     15.926   1.117            0.0591            84.7      434\n"
    )
    _results(tmp_path, monkeypatch, {"old.txt": old, "new.txt": new})
    rows, settings = pt.smollm2_rows()
    assert rows == {
        ("int4-g128-sym", "gptq"): (1.117, "new.txt"),
        ("int4-g128-sym", "rtn"): (1.514, "new.txt"),
        ("int4-g64-affine", "hqq"): (1.277, "old.txt"),  # HQQ on symmetric groups dropped
    }
    assert settings[0].startswith("SmolLM2-135M-Instruct fp32: perplexity 14.260")


def test_results_of_other_settings_are_refused(tmp_path, monkeypatch):
    other = HEAD.replace("on 8192 tokens", "on 4096 tokens")
    _results(tmp_path, monkeypatch, {"a.txt": HEAD, "b.txt": other})
    with pytest.raises(ValueError, match="other settings"):
        pt.smollm2_rows()


def test_committed_results_parse():
    rows, _ = pt.smollm2_rows()
    assert rows["int4-g64-affine", "gptq"] == (1.058, "methods_gptq_stages.txt")
    assert rows["mxfp4", "awq"] == (1.450, "methods_fp4_awq_mxfp4.txt")


def test_committed_table_reads_back():
    _, weight, cos = pt.read_minilm_section(pt.RESULTS / "tradeoff.txt")
    labels = [label for label, _, _ in pt.encoding_cases()]
    assert sorted(weight) == sorted(labels)
    assert weight["mxfp4"][0] == 4.25 and weight["nvfp4"][0] == 4.5
    for label in pt.METHOD_CASES:
        for method in ("rtn", *pt.METHODS):
            if method != "hqq" or label.startswith("affine"):
                assert 0 < cos[label, method] < 1, (label, method)


def test_equal_sizes_side_by_side():
    x = pt.spread({"a": 4.5, "b": 4.25, "c": 4.5, "d": 4.505}, 0.1)
    assert x["b"] == 4.25
    assert [round(x[k], 3) for k in ("a", "c", "d")] == [4.4, 4.5, 4.605]
