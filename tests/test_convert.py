"""`qtensors.convert` (the Python API behind `qtensors convert`), `qtensors.diff` and the demo's
numpy BERT: the real MiniLM file, a synthetic sharded model folder, policies and presets,
atomicity (errors, interrupts, leftovers), and determinism."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open as st_open
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save
from safetensors.torch import save_file as st_save_torch

import qtensors as qt
from qtensors import _source
from qtensors.convert import (
    EMBEDDING_PATTERNS,
    STALE_SECONDS,
    ConversionInterrupted,
    OutputExistsError,
    Policy,
    resolve_quant,
)
from qtensors.diff import diff


def tree_digest(folder: str) -> dict[str, str]:
    """sha256 and mtime of every file under `folder` (to prove an input was not touched)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                h = hashlib.sha256(fh.read()).hexdigest()
            out[os.path.relpath(p, folder)] = f"{h}:{os.stat(p).st_mtime_ns}"
    return out


def hidden_leftovers(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def make_sharded_model(root: str) -> str:
    """A small Hugging Face style folder: two shards with an index, mixed dtypes, config and
    tokenizer files, a nested module with its own safetensors, and a redundant .bin."""
    folder = os.path.join(root, "tiny-llm")
    os.makedirs(os.path.join(folder, "2_Dense"))
    os.makedirs(os.path.join(folder, "1_Pooling"))
    g = torch.Generator().manual_seed(0)

    def w(*shape, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    shard1 = {
        "model.embed_tokens.weight": w(96, 64, dtype=torch.float16),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "model.layers.0.self_attn.q_proj.weight": w(64, 64, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": w(64),
        "model.layers.0.mlp.up_proj.weight": w(128, 64),
        "model.position_ids": torch.arange(32, dtype=torch.int64).reshape(1, 32),
    }
    shard2 = {
        "model.layers.1.self_attn.q_proj.weight": w(64, 64, dtype=torch.bfloat16),
        "model.layers.1.mlp.down_proj.weight": w(64, 128),
        "model.layers.1.conv.weight": w(8, 4, 3, 3),
        "model.norm.weight": torch.ones(64),
        "lm_head.weight": w(96, 64, dtype=torch.float16),
    }
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    st_save_torch(shard1, os.path.join(folder, names[0]), metadata={"format": "pt"})
    st_save_torch(shard2, os.path.join(folder, names[1]), metadata={"format": "pt"})
    weight_map = {k: names[0] for k in shard1} | {k: names[1] for k in shard2}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": 12345}, "weight_map": weight_map}, fh)
    st_save_torch(
        {"linear.weight": w(32, 64), "linear.bias": w(32)},
        os.path.join(folder, "2_Dense", "model.safetensors"),
    )
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 64}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}),
        "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": True}),
        "pytorch_model.bin": "not really torch weights",
    }
    for rel, text in files.items():
        with open(os.path.join(folder, rel), "w") as fh:
            fh.write(text)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    return make_sharded_model(str(tmp_path_factory.mktemp("sharded")))


@pytest.fixture(scope="module")
def minilm_converted(bert_path, tmp_path_factory) -> tuple[str, qt.convert]:
    dst = str(tmp_path_factory.mktemp("minilm") / "minilm.qtensors")
    return dst, qt.convert(bert_path, dst)


# -- the real MiniLM file --------------------------------------------------------------------------


def test_minilm_conversion_matches_the_library_encoder(bert_path, minilm_converted):
    dst, res = minilm_converted
    original = st_load(bert_path)
    with st_open(bert_path, framework="np") as f:
        order = f.offset_keys()
    assert res.files == [dst] and res.tensors == len(original) == 104
    assert res.output_bytes == os.path.getsize(dst)
    assert res.input_bytes == sum(a.nbytes for a in original.values())
    assert res.ratio > 6.5  # 90.9 MB of fp32 -> ~12.9 MB
    quantized = 0
    with qt.safe_open(dst) as f:
        assert f.keys() == order  # the input's file order
        meta = f.metadata()
        assert meta["format"] == "pt" and meta["source"] == "model.safetensors"
        for name, x in original.items():
            enc = f.encoding(name)
            wants = x.dtype.kind == "f" and x.ndim >= 2
            if not wants:
                assert enc == {"name": "raw"}, name
                np.testing.assert_array_equal(f.get_tensor(name), x)
                continue
            quantized += 1
            assert enc == qt.FLEXGEN.to_dict(x.ndim), name
            # Streaming conversion stores exactly what the in-memory encoder produces.
            want = qt.quantize(x, qt.FLEXGEN)
            got = f.get_quantized(name)
            for a, b in zip(got.parts(), want.parts(), strict=True):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), name
    assert quantized == res.quantized == 40
    assert qt.safe_open(dst, verify=True)


def test_minilm_diff(bert_path, minilm_converted):
    dst, _ = minilm_converted
    rep = diff(bert_path, dst)
    s = rep.summary()
    assert s["tensors"] == 104 and s["quantized"] == 40 and s["raw"] == 64
    assert s["raw_exact"] == 64 and s["problems"] == 0
    # 4-bit min-max quantization of these weights: about 20 dB (6 dB per bit, minus outliers).
    assert 15 < s["worst_sqnr_db"] <= s["median_sqnr_db"] < 25
    sq = [r.sqnr_db for r in rep.rows]
    assert sq == sorted(sq)  # worst first; exact (inf) last
    assert all(r.exact for r in rep.rows if not r.quantized)
    # One row against a direct numpy computation.
    row = next(r for r in rep.rows if r.name == "encoder.layer.3.intermediate.dense.weight")
    x = st_load(bert_path)[row.name].astype(np.float64)
    y = qt.load_file(dst)[row.name].astype(np.float64)
    e = y - x
    assert row.sqnr_db == pytest.approx(10 * math.log10((x * x).sum() / (e * e).sum()), rel=1e-9)
    assert row.rel_rmse == pytest.approx(math.sqrt((e * e).sum() / (x * x).sum()), rel=1e-9)
    assert row.max_abs_err == pytest.approx(np.abs(e).max(), rel=1e-12)


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_read_ahead_does_not_change_the_bytes(bert_path, minilm_converted, tmp_path, read_ahead):
    dst, _ = minilm_converted
    other = tmp_path / "again.qtensors"
    qt.convert(bert_path, other, read_ahead=read_ahead)
    with open(dst, "rb") as a, open(other, "rb") as b:
        assert a.read() == b.read()


# -- policy and presets ----------------------------------------------------------------------------


def test_resolve_quant():
    assert resolve_quant() == qt.FLEXGEN
    for name, enc in qt.PRESETS.items():
        assert resolve_quant(name) == enc
    assert resolve_quant("int4-g128", bits=3) == qt.Affine(3, 128, axis=-1)
    assert resolve_quant(symmetric=True, bits=8) == qt.Symmetric(8, 64, axis=0)
    assert resolve_quant("int8", symmetric=False) == qt.Affine(8, 128, axis=-1)
    assert resolve_quant("nf4", group_size=32, scale_dtype="bfloat16") == qt.NF4(
        32, axis=-1, scale_dtype="bfloat16"
    )
    with pytest.raises(ValueError, match="4-bit only"):
        resolve_quant("nf4", bits=3)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_quant("int3")
    with pytest.raises(ValueError, match="bits"):
        resolve_quant(bits=9)


def test_policy():
    p = Policy()
    assert p("fc.weight", "float32", (4, 8)) == qt.FLEXGEN
    assert p("conv.weight", "float16", (4, 3, 3, 3)) == qt.FLEXGEN
    assert p("fc.bias", "float32", (4,)) == qt.Raw()
    assert p("ln.weight", "bfloat16", (4,)) == qt.Raw()
    assert p("position_ids", "int64", (1, 512)) == qt.Raw()
    assert p("scale", "float32", ()) == qt.Raw()
    p = Policy("int8", keep=["lm_head.*"], keep_embeddings=True)
    assert p("lm_head.weight", "float32", (4, 8)) == qt.Raw()
    assert p("model.embed_tokens.weight", "float32", (4, 8)) == qt.Raw()
    assert p("transformer.wte.weight", "float32", (4, 8)) == qt.Raw()
    assert p("mlp.weight", "float32", (4, 8)) == qt.PRESETS["int8"]
    assert "*embed*" in EMBEDDING_PATTERNS
    assert "int8" in p.describe() and "lm_head.*" in p.describe()


def test_policy_takes_names_in_mappings_and_refuses_what_is_no_encoding(bert_path, tmp_path):
    p = Policy({"*embed*": "raw", "head.*": None, "*": "nf4"}, keep="lm_head.weight")
    assert p("model.embed_tokens.weight", "float32", (4, 8)) == qt.Raw()
    assert p("head.w", "float32", (4, 8)) == qt.Raw()
    assert p("lm_head.weight", "float32", (4, 8)) == qt.Raw()  # a lone pattern, not its letters
    assert p("mlp.weight", "float32", (4, 8)) == qt.PRESETS["nf4"]
    assert "*embed*: raw" in p.describe() and "*: nf4 g64" in p.describe()
    with pytest.raises(TypeError, match="not int 123"):
        qt.convert(bert_path, tmp_path / "x.qtensors", 123)
    with pytest.raises(ValueError, match="choose one of raw, flexgen"):
        qt.convert(bert_path, tmp_path / "x.qtensors", {"*": "int2"})
    with pytest.raises(TypeError, match="metadata keys and values must be str"):
        qt.convert(bert_path, tmp_path / "x.qtensors", metadata={"n": 1})
    assert os.listdir(tmp_path) == []


def test_keep_and_preset_options(bert_path, tmp_path):
    dst = tmp_path / "int8.qtensors"
    res = qt.convert(
        bert_path, dst, "int8", keep=["*.attention.self.query.weight"], keep_embeddings=True
    )
    with qt.safe_open(dst) as f:
        for name in f.keys():
            enc = f.encoding(name)
            if "embeddings" in name or name.endswith("attention.self.query.weight"):
                assert enc["name"] == "raw", name
            elif len(f.shape(name)) >= 2 and f.dtype(name) == "float32":
                assert enc == qt.PRESETS["int8"].to_dict(2), name
    assert res.quantized == 40 - 6 - 3  # 6 query weights and 3 2-D embedding tables kept raw


def test_mapping_quant(bert_path, tmp_path):
    dst = tmp_path / "mixed.qtensors"
    quant = {"*intermediate*": qt.NF4(group_size=32), "*embeddings*": None}
    qt.convert(bert_path, dst, quant)
    with qt.safe_open(dst) as f:
        assert f.encoding("encoder.layer.0.intermediate.dense.weight")["name"] == "nf4"
        assert f.encoding("embeddings.word_embeddings.weight")["name"] == "raw"
        # names no pattern matches follow the default policy (FLEXGEN)
        assert f.encoding("encoder.layer.0.output.dense.weight") == qt.FLEXGEN.to_dict(2)


def test_bad_axis_names_the_tensor(bert_path, tmp_path):
    with pytest.raises(ValueError, match=r"embeddings\.position_embeddings\.weight.*axis 2"):
        qt.convert(bert_path, tmp_path / "x.qtensors", qt.Affine(4, 64, axis=2))
    assert os.listdir(tmp_path) == []


# -- model folders ---------------------------------------------------------------------------------


def test_sharded_folder(sharded, tmp_path):
    before = tree_digest(sharded)
    dst = str(tmp_path / "out")
    res = qt.convert(sharded, dst)
    assert tree_digest(sharded) == before  # the input is untouched

    assert sorted(os.path.relpath(f, dst) for f in res.files) == [
        "2_Dense/model.qtensors",
        "model-00001-of-00002.qtensors",
        "model-00002-of-00002.qtensors",
    ]
    listing = sorted(
        os.path.relpath(os.path.join(r, f), dst) for r, _d, fs in os.walk(dst) for f in fs
    )
    assert listing == [
        "1_Pooling/config.json",
        "2_Dense/model.qtensors",
        "config.json",
        "model-00001-of-00002.qtensors",
        "model-00002-of-00002.qtensors",
        "model.qtensors.index.json",
        "model.safetensors.index.json",  # for transformers' loaders (qtensors._hf_folder)
        "tokenizer.json",
    ]
    assert any("pytorch_model.bin" in n for n in res.notes)
    for rel in ("tokenizer.json", "1_Pooling/config.json"):
        with open(os.path.join(sharded, rel), "rb") as a, open(os.path.join(dst, rel), "rb") as b:
            assert a.read() == b.read()
    # config.json: the same, plus the quantization_config transformers reads
    with (
        open(os.path.join(sharded, "config.json")) as a,
        open(os.path.join(dst, "config.json")) as b,
    ):
        src_cfg, dst_cfg = json.load(a), json.load(b)
    qc = dst_cfg.pop("quantization_config")
    assert dst_cfg == src_cfg
    assert qc["quant_method"] == "qtensors" and qc["weights"] == "model.qtensors.index.json"
    with open(os.path.join(dst, "model.safetensors.index.json")) as fh:
        hf_index = json.load(fh)
    with open(os.path.join(dst, "model.qtensors.index.json")) as fh:
        # the top-level shards only (2_Dense is a sentence-transformers module of its own)
        assert hf_index["weight_map"] == json.load(fh)["weight_map"]
    assert oct(os.stat(dst).st_mode & 0o777) != oct(0o700)

    with open(os.path.join(dst, "model.qtensors.index.json")) as fh:
        index = json.load(fh)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as fh:
        src_index = json.load(fh)
    assert set(index["weight_map"]) == set(src_index["weight_map"])
    stored = 0
    for shard in set(index["weight_map"].values()):
        with qt.safe_open(os.path.join(dst, shard)) as f:
            names = {n for n, s in index["weight_map"].items() if s == shard}
            assert set(f.keys()) == names
            stored += sum(p["length"] for n in f.keys() for p in f.tensor_info(n)["parts"].values())
    assert index["metadata"]["total_size"] == stored

    rep = diff(sharded, dst)
    s = rep.summary()
    assert s["problems"] == 0 and s["tensors"] == 11
    assert s["raw"] == s["raw_exact"] == 4  # norms, a bias, position ids
    assert s["quantized"] == 7 and s["worst_sqnr_db"] > 15
    with qt.safe_open(os.path.join(dst, "model-00001-of-00002.qtensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.position_ids").dtype == torch.int64
    with qt.safe_open(os.path.join(dst, "2_Dense", "model.qtensors")) as f:
        assert f.encoding("linear.weight")["name"] == "affine"


def test_folder_to_one_file(sharded, tmp_path):
    dst = tmp_path / "whole.qtensors"
    res = qt.convert(sharded, dst, "int4-g64")
    assert res.files == [str(dst)]
    with qt.safe_open(dst) as f:
        with open(os.path.join(sharded, "model.safetensors.index.json")) as fh:
            assert set(f.keys()) == set(json.load(fh)["weight_map"])  # not 2_Dense's tensors
        assert f.encoding("model.layers.1.mlp.down_proj.weight") == qt.PRESETS["int4-g64"].to_dict(
            2
        )


def test_single_file_folder_and_default_names(bert_path, tmp_path):
    # A model folder without an index (like MiniLM's): X.safetensors -> X.qtensors
    src = tmp_path / "m"
    src.mkdir()
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    st_save({"w": x, "b": x[0]}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    res = qt.convert(src)
    assert res.dst == str(src) + "-qtensors"
    assert sorted(os.listdir(res.dst)) == [
        "config.json",
        "model.qtensors",
        "model.safetensors.index.json",
    ]
    # file -> file beside it; file into an existing folder
    res = qt.convert(src / "model.safetensors")
    assert res.dst == str(src / "model.qtensors")
    os.remove(res.dst)
    out = tmp_path / "into"
    out.mkdir()
    res = qt.convert(src / "model.safetensors", out)
    assert res.files == [str(out / "model.qtensors")]


def test_folder_never_ships_an_older_output_of_itself(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    x = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    st_save({"w": x}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    qt.convert(src / "model.safetensors", quant="nf4")  # leaves src/model.qtensors behind
    (src / "old.qtensors.index.json").write_text("{}")  # an index of earlier qtensors shards
    res = qt.convert(src, tmp_path / "out", "int8")
    assert res.copied == ["config.json"]
    assert sorted(os.listdir(tmp_path / "out")) == [
        "config.json",
        "model.qtensors",
        "model.safetensors.index.json",
    ]
    with qt.safe_open(tmp_path / "out" / "model.qtensors") as f:
        assert f.encoding("w")["name"] == "symmetric"  # the fresh int8, not the stale nf4
    assert any("model.qtensors" in n and "earlier conversion" in n for n in res.notes)
    assert any("old.qtensors.index.json" in n for n in res.notes)


def test_refuses_to_overwrite_without_force(sharded, bert_path, tmp_path):
    dst = tmp_path / "x.qtensors"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="force"):
        qt.convert(bert_path, dst)
    assert dst.read_bytes() == b"precious"
    qt.convert(bert_path, dst, force=True)
    assert qt.safe_open(dst, verify=True)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        qt.convert(sharded, folder)
    assert os.listdir(folder) == ["keep.txt"]
    qt.convert(sharded, folder, force=True)
    assert "keep.txt" not in os.listdir(folder)
    assert "model.qtensors.index.json" in os.listdir(folder)
    assert hidden_leftovers(tmp_path) == []


def test_refuses_output_inside_input(sharded):
    with pytest.raises(ValueError, match="inside the input"):
        qt.convert(sharded, os.path.join(sharded, "converted"))
    with pytest.raises(ValueError, match="is the input"):
        qt.convert(
            os.path.join(sharded, "model-00001-of-00002.safetensors"),
            os.path.join(sharded, "model-00001-of-00002.safetensors"),
            force=True,
        )


# -- atomicity -------------------------------------------------------------------------------------


def test_nan_fails_cleanly_and_names_the_tensor(tmp_path):
    src = tmp_path / "nan.safetensors"
    bad = np.ones((8, 64), np.float32)
    bad[3, 5] = np.nan
    st_save({"a.weight": np.ones((8, 64), np.float32), "bad.weight": bad}, str(src))
    dst = tmp_path / "out.qtensors"
    with pytest.raises(qt.QuantizationError, match=r"bad\.weight.*--keep 'bad\.weight'"):
        qt.convert(src, dst)
    assert sorted(os.listdir(tmp_path)) == ["nan.safetensors"]
    qt.convert(src, dst, keep=["bad.weight"])
    np.testing.assert_array_equal(qt.load_file(dst)["bad.weight"], bad)


class Interrupt:
    """Makes the n-th tensor read raise KeyboardInterrupt (as Ctrl-C would, in any thread)."""

    def __init__(self, monkeypatch, n: int) -> None:
        self.calls = 0
        original = _source.TensorReader.read

        def read(reader, entry):
            self.calls += 1
            if self.calls == n:
                raise KeyboardInterrupt
            return original(reader, entry)

        monkeypatch.setattr(_source.TensorReader, "read", read)


@pytest.mark.parametrize("read_ahead", [0, 1])
@pytest.mark.parametrize("to", ["file", "folder"])
def test_interrupt_leaves_nothing(sharded, tmp_path, monkeypatch, read_ahead, to):
    before = tree_digest(sharded)
    Interrupt(monkeypatch, 7)
    dst = tmp_path / ("out.qtensors" if to == "file" else "out")
    with pytest.raises(KeyboardInterrupt):
        qt.convert(sharded, dst, read_ahead=read_ahead)
    assert os.listdir(tmp_path) == []
    assert tree_digest(sharded) == before


class InterruptAfterPublishing:
    """Raises KeyboardInterrupt just after the output was renamed into place (as a Ctrl-C that
    lands during the rename does, at the next Python instruction)."""

    def __init__(self, monkeypatch, to: str) -> None:
        import importlib

        from qtensors import _core

        convert_mod = importlib.import_module("qtensors.convert")  # the function shadows it

        class Writer:
            def __init__(self, *args):
                self._inner = _core.Writer(*args)

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def finish(self):
                self._inner.finish()
                raise KeyboardInterrupt

        publish = convert_mod._publish_folder

        def publish_then_interrupt(*args):
            publish(*args)
            raise KeyboardInterrupt

        if to == "file":  # the writer renames the file into place as it finishes
            monkeypatch.setattr(convert_mod, "_core", type("core", (), {"Writer": Writer}))
        else:  # the shards finish inside the temporary folder, renamed into place at the end
            monkeypatch.setattr(convert_mod, "_publish_folder", publish_then_interrupt)


@pytest.mark.parametrize("to", ["file", "folder"])
def test_interrupt_says_whether_the_output_was_published(sharded, tmp_path, monkeypatch, to):
    dst = tmp_path / ("out.qtensors" if to == "file" else "out")
    with monkeypatch.context() as m:
        Interrupt(m, 3)
        with pytest.raises(ConversionInterrupted) as before:
            qt.convert(sharded, dst)
    assert not before.value.published and not dst.exists()
    for force in (False, True):  # a new output, then one replacing an older one
        with monkeypatch.context() as m:
            InterruptAfterPublishing(m, to)
            with pytest.raises(KeyboardInterrupt) as after:
                qt.convert(sharded, dst, force=force)
        assert isinstance(after.value, ConversionInterrupted)
        assert after.value.published and after.value.dst == str(dst)
        for f in [dst] if to == "file" else sorted(dst.rglob("*.qtensors")):
            qt.safe_open(f, verify=True).close()
    assert os.listdir(tmp_path) == [dst.name]


def test_stale_temporaries_are_removed(bert_path, tmp_path):
    dst = tmp_path / "m.qtensors"
    old_file = tmp_path / ".m.qtensors.a1b2c3.tmp"
    old_file.write_bytes(b"x" * 100)
    old_dir = tmp_path / ".m.qtensors.d4e5f6.tmp"
    old_dir.mkdir()
    (old_dir / "shard.qtensors").write_bytes(b"y")
    young = tmp_path / ".m.qtensors.g7h8i9.tmp"
    young.write_bytes(b"z")
    unrelated = tmp_path / ".other.qtensors.j0k1l2.tmp"
    unrelated.write_bytes(b"w")
    past = time.time() - STALE_SECONDS - 60
    for p in (old_file, old_dir / "shard.qtensors", old_dir):
        os.utime(p, (past, past))
    os.utime(unrelated, (past, past))
    res = qt.convert(bert_path, dst)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.qtensors", young.name, unrelated.name])
    assert sum("removed" in n for n in res.notes) == 2
    assert any(young.name in n and "still running" in n for n in res.notes)


# -- dtypes ----------------------------------------------------------------------------------------


def test_dtypes_and_frameworks(tmp_path):
    src = tmp_path / "dtypes.safetensors"
    g = torch.Generator().manual_seed(1)
    tensors = {
        "bf16.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "f16.weight": torch.randn(64, 32, generator=g).to(torch.float16),
        "f64.weight": torch.randn(64, 32, generator=g).to(torch.float64),
        "f8.weight": torch.randn(64, 32, generator=g).to(torch.float8_e4m3fn),
        "bool.mask": torch.rand(4, 4, generator=g) > 0.5,
        "u8.codes": torch.randint(0, 255, (16, 16), dtype=torch.uint8, generator=g),
    }
    st_save_torch(tensors, str(src))
    assert _source.framework_for(e.dtype for e in _source.list_file(str(src))[1]) == "pt"
    dst = tmp_path / "dtypes.qtensors"
    res = qt.convert(src, dst)
    assert res.quantized == 3
    with qt.safe_open(dst, framework="pt") as f:
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            if name in ("f8.weight", "bool.mask", "u8.codes"):
                assert f.encoding(name)["name"] == "raw"
                assert torch.equal(got.view(torch.uint8), t.view(torch.uint8))
            else:
                err = (got.double() - t.double()).abs().max().item()
                assert 0 < err < 0.5, name
    rep = diff(src, dst)
    assert rep.summary()["problems"] == 0 and rep.summary()["quantized"] == 3
    # numpy suffices (no torch import) when no tensor needs torch
    only_np = tmp_path / "np.safetensors"
    st_save({"w": np.ones((4, 4), np.float16)}, str(only_np))
    assert _source.framework_for(e.dtype for e in _source.list_file(str(only_np))[1]) == "np"


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(_source.InputError, match="cannot read"):
        qt.convert(bad, tmp_path / "x.qtensors")
    with pytest.raises(FileNotFoundError):
        qt.convert(tmp_path / "missing.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(_source.InputError, match=r"no \.safetensors"):
        qt.convert(empty, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "empty"]


# -- the demo's numpy BERT -------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_bert_matches_transformers(bert_path):
    transformers = pytest.importorskip("transformers")
    from qtensors.demo import SENTENCES, bert_embed, model_dir, tokenize

    folder = model_dir()
    model = transformers.BertModel.from_pretrained(folder).eval()
    weights = st_load(bert_path)
    for ids in tokenize(folder, SENTENCES):
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0].mean(0)
        want = (h / h.norm()).numpy()
        np.testing.assert_allclose(bert_embed(weights, ids), want, atol=2e-6)
