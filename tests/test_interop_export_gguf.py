"""Export to GGUF (qtensors.interop.export_gguf), read back by the gguf package's own reader and
dequantizer, by transformers' GGUF loader, and by our GGUF import (byte-exact round trip)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from test_interop_packed import tiny_llama  # noqa: E402

import qtensors as qt  # noqa: E402
from qtensors.errors import ForeignFormatError  # noqa: E402
from qtensors.interop import import_model  # noqa: E402
from qtensors.interop.export_gguf import _qk_permutation, export_gguf  # noqa: E402

POLICY = {
    "*q_proj.weight": qt.Symmetric(bits=4, group_size=32),  # Q4_0
    "*k_proj.weight": qt.Symmetric(bits=4, group_size=32, levels="full"),  # Q4_0
    "*v_proj.weight": qt.Affine(bits=5, group_size=32),  # Q5_1
    "*o_proj.weight": qt.Symmetric(bits=5, group_size=32, levels="full"),  # Q5_0
    "*gate_proj.weight": qt.Affine(bits=4, group_size=32),  # Q4_1
    "*up_proj.weight": qt.Affine(bits=4, group_size=32),  # Q4_1
    "*down_proj.weight": qt.Symmetric(bits=8, group_size=32),  # Q8_0
    "lm_head.weight": qt.NF4(group_size=32),  # no GGUF twin: written F32
    "*": "raw",
}
TYPES = {"q_proj": "Q4_0", "k_proj": "Q4_0", "v_proj": "Q5_1", "o_proj": "Q5_0"}
TYPES.update(gate_proj="Q4_1", up_proj="Q4_1", down_proj="Q8_0")


@pytest.fixture
def exported(tmp_path):
    hf = tmp_path / "hf"
    tiny_llama(hf, torch.float32)
    q = tmp_path / "q"
    qt.convert(str(hf), str(q), POLICY)
    out = tmp_path / "g" / "model.gguf"
    out.parent.mkdir()
    report = export_gguf(q, out)
    return q, out, report


def ours(folder):
    with qt.safe_open(str(folder / "model.qtensors"), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_gguf_reader_dequantizes_to_our_values(exported):
    q, out, report = exported
    mine = ours(q)
    reader = gguf.GGUFReader(str(out))
    by_name = {t.name: t for t in reader.tensors}
    hows = {t.name: (t.how, t.encoding) for t in report.tensors}
    n_head, n_kv = 4, 2
    for name, x in mine.items():
        g = next(r for r in report.tensors if r.name == name).source_name
        t = by_name[g]
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
        if "q_proj" in name:
            x = x[_qk_permutation(x.shape[0], n_head)]
        if "k_proj" in name:
            x = x[_qk_permutation(x.shape[0], n_kv)]
        kind = name.split(".")[-2]
        if kind in TYPES:
            assert t.tensor_type.name == TYPES[kind] and hows[name] == ("exact", TYPES[kind])
        assert deq.astype(np.float32).tobytes() == x.astype(np.float32).tobytes(), name
    assert hows["lm_head.weight"] == ("dense", "F32")


def test_round_trip_through_gguf_is_byte_exact(exported, tmp_path):
    q, out, _ = exported
    back = tmp_path / "back"
    report = import_model(out, back)
    assert report.count("reencoded") == 0
    with (
        qt.safe_open(str(q / "model.qtensors"), framework="np") as a,
        qt.safe_open(str(back / "model.qtensors"), framework="np") as b,
    ):
        for name in a.keys():
            if a.encoding(name)["name"] in ("raw", "nf4"):
                continue
            qa, qb = a.get_quantized(name), b.get_quantized(name)
            assert qa.encoding["name"] == qb.encoding["name"], name
            assert np.array_equal(qa.codes, qb.codes), name
            assert np.array_equal(qa.scales, qb.scales), name
            if qa.mins is not None:
                assert np.array_equal(qa.mins, qb.mins), name


def test_transformers_loads_the_gguf(exported):
    q, out, _ = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name)
    sd = model.state_dict()
    for name, x in ours(q).items():
        assert torch.equal(sd[name], torch.from_numpy(x.astype(np.float32))), name


def test_unsupported_architecture_is_named(tmp_path, exported):
    q, _, _ = exported
    cfg = (q / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "bert"')
    (q / "config.json").write_text(cfg)
    with pytest.raises(ForeignFormatError, match="model_type = 'bert'"):
        export_gguf(q, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf(exported, tmp_path, capsys):
    from qtensors.cli import main

    q, _, _ = exported
    out = tmp_path / "cli.gguf"
    assert main(["export", str(q), str(out), "--to", "gguf"]) == 0
    assert "Q4_0" in capsys.readouterr().out and out.exists()
    assert main(["export", str(q), str(out), "--to", "gguf"]) == 1
    assert "exists" in capsys.readouterr().err
