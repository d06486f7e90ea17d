"""Export to compressed-tensors (qtensors.interop.export_ct), checked by compressed-tensors' own
decompressor and by re-importing: qtensors -> compressed-tensors -> qtensors is byte-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.base import (  # noqa: E402
    PackedQuantizationCompressor as PQC,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_interop_packed import LAYERS, LINEARS, gptq_folder, tiny_llama  # noqa: E402

import qtensors as qt  # noqa: E402
from qtensors.errors import ForeignFormatError  # noqa: E402
from qtensors.interop import import_model  # noqa: E402
from qtensors.interop.export_ct import dense_pack, export_compressed_tensors  # noqa: E402
from qtensors.interop.packed_int import dense_unpack  # noqa: E402


def quantized_folder(tmp_path, enc, dtype=torch.bfloat16):
    """A tiny llama converted here, its linears in `enc`, everything else raw."""
    src = tmp_path / "hf"
    tiny_llama(src, dtype)
    dst = tmp_path / "q"
    qt.convert(str(src), str(dst), {"*_proj.weight": enc, "*": "raw"})
    return dst


def ct_decoded(folder):
    """Every weight of a compressed-tensors folder, decompressed by compressed-tensors."""
    qc = QuantizationConfig.model_validate(
        json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    sd = load_file(str(folder / "model.safetensors"))
    out = {}
    for name in [k for k in sd if k.endswith(".weight_packed")]:
        prefix = name[: -len(".weight_packed")]
        (scheme,) = [s for s in qc.config_groups.values() if {"Linear", prefix} & set(s.targets)]
        local = {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        out[prefix + ".weight"] = PQC.decompress(local, scheme)["weight"]
    return out, qc


def ours(folder):
    with qt.safe_open(str(folder / "model.qtensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_dense_pack_inverts_dense_unpack():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        v = rng.integers(0, 1 << bits, (3, 37), dtype=np.uint8)
        words = dense_pack(v, bits)
        assert words.shape == (3, -(-37 * bits // 32)) and words.dtype == np.int32
        assert np.array_equal(dense_unpack(words, bits, 37, "t", "v"), v)


@pytest.mark.parametrize(
    "enc",
    [
        qt.Symmetric(bits=4, group_size=32, scale_dtype="bfloat16"),
        qt.Symmetric(bits=8, group_size=64, scale_dtype="float16"),  # scales -> fp32
        qt.Symmetric(bits=4, group_size=128, scale_dtype="bfloat16", levels="full"),  # channel
    ],
)
def test_symmetric_exports_exactly(tmp_path, enc):
    src = quantized_folder(tmp_path, enc)
    dst = tmp_path / "ct"
    report = export_compressed_tensors(src, dst)
    theirs, qc = ct_decoded(dst)
    mine = ours(src)
    assert len(theirs) == LAYERS * len(LINEARS) == report.count("exact")
    for name, w in theirs.items():
        want = mine[name]
        assert torch.equal(w.to(want.dtype).view(torch.int16), want.view(torch.int16)), name
    assert qc.format == "pack-quantized" and "lm_head" in qc.ignore
    back = import_model(dst, tmp_path / "back")
    assert back.count("exact") == len(theirs)
    with (
        qt.safe_open(str(src / "model.qtensors"), framework="np") as a,
        qt.safe_open(str(tmp_path / "back" / "model.qtensors"), framework="np") as b,
    ):
        for name in theirs:
            qa, qb = a.get_quantized(name), b.get_quantized(name)
            assert np.array_equal(qa.codes, qb.codes), name
            if qa.encoding["scale_dtype"] == qb.encoding["scale_dtype"]:
                assert np.array_equal(qa.scales, qb.scales), name


def test_gptq_import_round_trips_through_compressed_tensors(tmp_path):
    src, _, refs = gptq_folder(tmp_path, 4, 32, False, False)  # asymmetric, fp32 mins
    q = tmp_path / "q"
    import_model(src, q)
    ct = tmp_path / "ct"
    report = export_compressed_tensors(q, ct)
    assert report.count("exact") == len(refs)
    theirs, qc = ct_decoded(ct)
    assert not next(iter(qc.config_groups.values())).weights.symmetric
    for name, ref in refs.items():
        assert torch.equal(theirs[name].to(ref.dtype), ref), name
    import_model(ct, tmp_path / "back")
    with (
        qt.safe_open(str(q / "model.qtensors"), framework="np") as a,
        qt.safe_open(str(tmp_path / "back" / "model.qtensors"), framework="np") as b,
    ):
        for name in refs:
            qa, qb = a.get_quantized(name), b.get_quantized(name)
            assert np.array_equal(qa.codes, qb.codes)
            assert np.array_equal(qa.scales, qb.scales) and np.array_equal(qa.mins, qb.mins)


def test_minmax_affine_needs_lossy(tmp_path):
    src = quantized_folder(tmp_path, qt.Affine(bits=4, group_size=32), torch.float16)
    with pytest.raises(ForeignFormatError, match=r"tensor .model.layers.0.*_proj.weight.*--lossy"):
        export_compressed_tensors(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    report = export_compressed_tensors(src, tmp_path / "ct", lossy=True)
    assert report.count("reencoded") == LAYERS * len(LINEARS)
    assert all(0 < t.rel_rmse < 0.2 for t in report.tensors if t.how == "reencoded")


def test_transformers_loads_the_export(tmp_path):
    import qtensors.torch as qtt

    src = quantized_folder(tmp_path, qt.Symmetric(bits=4, group_size=32, scale_dtype="bfloat16"))
    dst = tmp_path / "ct"
    export_compressed_tensors(src, dst)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
    assert "model.layers.1.mlp.down_proj.weight_packed" in theirs.state_dict()  # kept packed
    mine = qtt.from_pretrained(src, transformers.AutoModelForCausalLM, keep_quantized=False)
    x = torch.tensor([[1, 5, 9, 2, 40]])
    with torch.inference_mode():
        a, b = theirs(x).logits.float(), mine(x).logits.float()
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-2, rtol=1e-2)


def test_cli_export(tmp_path, capsys):
    from qtensors.cli import main

    src = quantized_folder(tmp_path, qt.Affine(bits=4, group_size=32), torch.float16)
    args = ["export", str(src), str(tmp_path / "ct"), "--to", "compressed-tensors"]
    assert main(args) == 1
    assert "--lossy" in capsys.readouterr().err and not (tmp_path / "ct").exists()
    assert main([*args, "--lossy"]) == 0
    assert "re-encoded" in capsys.readouterr().out
    assert (tmp_path / "ct" / "model.safetensors").exists()
