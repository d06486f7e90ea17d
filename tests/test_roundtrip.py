"""save_file / load_file / safe_open round trips, policies, determinism, atomic writes, and files
crossing between qtensors and the independent reference reader/writer."""

from __future__ import annotations

import os

import helpers as H
import numpy as np
import pytest
import reference as R
import torch

import qtensors as qt

FLEXGEN = {"name": "affine", "bits": 4, "group_size": 64, "axis": 0, "scale_dtype": "float16"}


def rng(seed=0):
    return np.random.default_rng(seed)


def np_tensors() -> dict:
    g = rng(1)
    return {
        "w.f32": g.standard_normal((70, 24)).astype(np.float32),
        "w.f16": g.standard_normal((8, 130)).astype(np.float16),
        "w.f64": g.standard_normal((3, 5, 4)),
        "w.empty": np.zeros((0, 7), np.float32),
        "bias": g.standard_normal(24).astype(np.float32),
        "scalar": np.array(-1.25, np.float32),
        "nan_vec": np.array([np.nan, np.inf, -0.0, 1.0], np.float32),  # raw keeps every value
        "bool": np.array([[True, False], [False, True]]),
        "u8": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "i8": np.array([-128, 0, 127], np.int8),
        "u16": np.array([0, 65535], np.uint16),
        "i16": np.array([[-5, 6]], np.int16),
        "u32": np.array([2**32 - 1, 7], np.uint32),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(2, 2, 3),
        "u64": np.array([2**64 - 1, 0], np.uint64),
        "i64": np.arange(10, dtype=np.int64).reshape(2, 5),
        "empty_int": np.zeros((2, 0), np.int64),
    }


def default_is_quantized(x) -> bool:
    return np.issubdtype(x.dtype, np.floating) and x.ndim >= 2


def expected_value(x: np.ndarray, enc: dict | None, dtype: str | None = None):
    """The reference's decoded value of ``x`` stored with ``enc`` (None: raw)."""
    if enc is None or enc["name"] == "raw":
        return x
    dtype = dtype or str(x.dtype)
    d = dict(enc, axis=R.normalize_axis(enc["axis"], x.ndim))
    return R.dequantize(R.quantize(x, d, dtype=dtype), d, x.shape, dtype)


def assert_same_bits(got, want, what):
    got_b = H.torch_bits(got) if isinstance(got, torch.Tensor) else H.np_bits(np.asarray(got))
    want_b = H.np_bits(np.asarray(want))
    assert got_b.shape == want_b.shape, f"{what}: shape {got_b.shape} != {want_b.shape}"
    assert np.array_equal(got_b, want_b), f"{what}: values differ"


# ------------------------------------------------------------------------------------------------
# numpy and torch round trips
# ------------------------------------------------------------------------------------------------


def test_numpy_round_trip_default_policy(tmp_path):
    tensors = np_tensors()
    path = tmp_path / "np.qtensors"
    qt.save_file(tensors, path)
    loaded = qt.load_file(path, framework="np")
    assert set(loaded) == set(tensors)
    with qt.safe_open(path, framework="np") as f:
        for name, x in tensors.items():
            got = loaded[name]
            assert isinstance(got, np.ndarray) and got.dtype == x.dtype and got.shape == x.shape, (
                name
            )
            if default_is_quantized(x):
                assert f.encoding(name) == FLEXGEN, name
                assert_same_bits(got, expected_value(x, FLEXGEN), name)
            else:
                assert f.encoding(name) == {"name": "raw"}, name
                assert got.tobytes() == x.tobytes(), f"{name}: raw bytes changed"


def test_torch_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(96, 40, generator=g).bfloat16(),
        "w.f16": torch.randn(64, 16, generator=g).half(),
        "w.f32": torch.randn(5, 3, 70, generator=g),
        "b.bf16": torch.randn(40, generator=g).bfloat16(),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "ids": torch.arange(20, dtype=torch.int64).reshape(4, 5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([[1, 255]], dtype=torch.uint8),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i32": torch.tensor([[7]], dtype=torch.int32),
        "f64.vec": torch.randn(6, dtype=torch.float64, generator=g),
    }
    path = tmp_path / "pt.qtensors"
    qt.save_file(tensors, path)
    loaded = qt.load_file(path, framework="pt")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        got = loaded[name]
        assert isinstance(got, torch.Tensor) and got.dtype == t.dtype and got.shape == t.shape, name
        x, dtype = H.logical_of_torch(t)
        if t.is_floating_point() and t.dim() >= 2:
            assert_same_bits(got, expected_value(x, FLEXGEN, dtype), name)
        else:
            assert_same_bits(got, x, name)


def test_torch_float8_raw(tmp_path):
    bits = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tensors = {
        "e4m3": H.torch_from_bits(bits, "float8_e4m3fn"),
        "e5m2": H.torch_from_bits(bits[::-1].copy(), "float8_e5m2"),
    }
    path = tmp_path / "f8.qtensors"
    qt.save_file(tensors, path)  # float8 is not quantized by the default policy, only stored raw
    loaded = qt.load_file(path, framework="pt")
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert np.array_equal(H.torch_bits(loaded[name]), H.torch_bits(t)), name
    _, _, info = R.read_file(path)
    assert info["e4m3"]["dtype"] == "float8_e4m3fn" and info["e5m2"]["dtype"] == "float8_e5m2"


def test_numpy_and_torch_loads_agree(tmp_path):
    x = rng(5).standard_normal((80, 12)).astype(np.float32)
    path = tmp_path / "a.qtensors"
    qt.save_file({"x": x}, path)
    a = qt.load_file(path, framework="np")["x"]
    b = qt.load_file(path, framework="pt")["x"]
    assert np.array_equal(a, b.numpy())


def test_bf16_numpy_decode_raises_type_error(tmp_path):
    path = tmp_path / "bf.qtensors"
    qt.save_file({"w": torch.randn(8, 8).bfloat16()}, path)
    with qt.safe_open(path, framework="np") as f:
        q = f.get_quantized("w")
        with pytest.raises(TypeError):
            qt.dequantize(q)
    with qt.safe_open(path, framework="pt") as f:
        assert f.get_tensor("w").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# policies
# ------------------------------------------------------------------------------------------------


def policy_tensors():
    g = rng(2)
    return {
        "enc.0.weight": g.standard_normal((16, 40)).astype(np.float32),
        "enc.0.bias": g.standard_normal(40).astype(np.float32),
        "enc.0.norm.weight": g.standard_normal((2, 40)).astype(np.float32),
        "head.w": g.standard_normal((8, 32)).astype(np.float32),
        "vec.scale": g.standard_normal(24).astype(np.float32),
        "other.w": g.standard_normal((8, 8)).astype(np.float32),
        "ids": np.arange(16, dtype=np.int64).reshape(4, 4),
    }


SYM8 = {"name": "symmetric", "bits": 8, "group_size": 32, "axis": -1, "scale_dtype": "float16"}
NF4_16 = {"name": "nf4", "group_size": 16, "axis": -1, "scale_dtype": "float16"}
AFF4_8 = {"name": "affine", "bits": 4, "group_size": 8, "axis": 0, "scale_dtype": "bfloat16"}


def check_policy(path, tensors, want: dict):
    loaded = qt.load_file(path, framework="np")
    with qt.safe_open(path, framework="np") as f:
        for name, x in tensors.items():
            enc = want[name]
            if enc is None:
                assert f.encoding(name) == {"name": "raw"}, name
                assert loaded[name].tobytes() == x.tobytes(), name
            else:
                ref = H.ref_dict(
                    enc["name"],
                    enc.get("bits", 4),
                    enc["group_size"],
                    enc["axis"],
                    enc["scale_dtype"],
                    x.ndim,
                )
                assert H.same_encoding(f.encoding(name), ref), (name, f.encoding(name))
                assert_same_bits(loaded[name], expected_value(x, enc), name)


def q_of(d):
    return H.qt_encoding(d["name"], d.get("bits", 4), d["group_size"], d["axis"], d["scale_dtype"])


def test_pattern_policy_first_match_wins(tmp_path):
    tensors = policy_tensors()
    quant = {
        "*.bias": None,
        "*norm*": None,  # before "enc.*.weight": the norm weight stays raw although it is 2-D
        "enc.*.weight": q_of(SYM8),
        "head.*": q_of(NF4_16),
        "vec.scale": q_of(AFF4_8),  # explicit pattern: a 1-D tensor is quantized too
    }
    path = tmp_path / "p1.qtensors"
    qt.save_file(tensors, path, quant=quant)
    check_policy(
        path,
        tensors,
        {
            "enc.0.weight": SYM8,
            "enc.0.bias": None,
            "enc.0.norm.weight": None,
            "head.w": NF4_16,
            "vec.scale": AFF4_8,
            "other.w": FLEXGEN,  # unmatched: default policy
            "ids": None,
        },
    )
    # the other order: now "enc.*.weight" matches the norm weight first
    quant2 = {"enc.*.weight": q_of(SYM8), "*norm*": None, "*.bias": None}
    path2 = tmp_path / "p2.qtensors"
    qt.save_file(tensors, path2, quant=quant2)
    with qt.safe_open(path2, framework="np") as f:
        assert f.encoding("enc.0.norm.weight")["name"] == "symmetric"
        assert f.encoding("head.w") == R.encoding_params(FLEXGEN, 2)
        assert f.encoding("vec.scale") == {"name": "raw"}


def test_single_encoding_policy(tmp_path):
    tensors = policy_tensors()
    path = tmp_path / "s.qtensors"
    qt.save_file(tensors, path, quant=q_of(SYM8))
    want = {n: (SYM8 if default_is_quantized(x) else None) for n, x in tensors.items()}
    check_policy(path, tensors, want)


def test_raw_policy_is_byte_exact(tmp_path):
    tensors = np_tensors()
    path = tmp_path / "raw.qtensors"
    qt.save_file(tensors, path, quant=qt.Raw())
    loaded = qt.load_file(path)
    for name, x in tensors.items():
        assert loaded[name].dtype == x.dtype and loaded[name].tobytes() == x.tobytes(), name


def test_flexgen_is_the_default(tmp_path):
    x = rng(3).standard_normal((130, 10)).astype(np.float32)
    a, b = tmp_path / "a.qtensors", tmp_path / "b.qtensors"
    qt.save_file({"w": x}, a)
    qt.save_file({"w": x}, b, quant=qt.FLEXGEN)
    assert a.read_bytes() == b.read_bytes()
    with qt.safe_open(a) as f:
        assert f.encoding("w") == FLEXGEN


@pytest.mark.parametrize("preset", list(qt.PRESETS))
def test_preset_names_are_accepted_wherever_an_encoding_is(tmp_path, preset):
    x = rng(4).standard_normal((128, 64)).astype(np.float32)
    by_name, by_object = tmp_path / "n.qtensors", tmp_path / "o.qtensors"
    qt.save_file({"w": x, "v": x}, by_name, quant={"v": "raw", "*": preset})
    qt.save_file({"w": x, "v": x}, by_object, quant={"v": qt.Raw(), "*": qt.PRESETS[preset]})
    assert by_name.read_bytes() == by_object.read_bytes()
    qt.save_file({"w": x}, by_name, quant=preset)
    qt.save_file({"w": x}, by_object, quant=qt.PRESETS[preset])
    assert by_name.read_bytes() == by_object.read_bytes()
    assert qt.choose_encoding("w", "float32", (128, 64), preset) == qt.PRESETS[preset]


def test_raw_by_name_none_in_a_mapping_and_none_at_the_top(tmp_path):
    x = rng(5).standard_normal((64, 64)).astype(np.float32)
    shape = (64, 64)
    assert qt.choose_encoding("w", "float32", shape, "raw") == qt.Raw()
    assert qt.choose_encoding("w", "float32", shape, {"w": "raw"}) == qt.Raw()
    assert qt.choose_encoding("w", "float32", shape, {"w": None}) == qt.Raw()  # None = raw here
    assert qt.choose_encoding("w", "float32", shape, None) == qt.FLEXGEN  # and default here
    path = tmp_path / "r.qtensors"
    qt.save_file({"w": x}, path, quant="raw")
    assert qt.load_file(path)["w"].tobytes() == x.tobytes()


@pytest.mark.parametrize(
    ("quant", "error", "message"),
    [
        (123, TypeError, "must be an encoding .* or a preset name .*not int 123"),
        ("int3", ValueError, "unknown preset 'int3': choose one of raw, flexgen, int4-g64"),
        ({"*": 4}, TypeError, r"quant\['\*'\] must be an encoding"),
        ({"*": "nf5"}, ValueError, r"quant\['\*'\]: unknown preset 'nf5'"),
        ({1: "nf4"}, TypeError, "patterns must be str"),
        ({"w": "int8"}, ValueError, 'only float tensors can be quantized; map it to "raw"'),
    ],
)
def test_bad_quant_is_refused_with_what_is_accepted(tmp_path, quant, error, message):
    path = tmp_path / "bad.qtensors"
    with pytest.raises(error, match=message):
        qt.save_file({"w": np.arange(64 * 64, dtype=np.int32).reshape(64, 64)}, path, quant=quant)
    assert not path.exists()


# ------------------------------------------------------------------------------------------------
# metadata, alignment, determinism, atomicity
# ------------------------------------------------------------------------------------------------


def test_metadata(tmp_path):
    md = {"format": "pt", "source": "model.safetensors", "ünï": "cødé ✓", "empty": ""}
    path = tmp_path / "m.qtensors"
    qt.save_file({"x": np.ones((2, 2), np.float32)}, path, metadata=md)
    with qt.safe_open(path) as f:
        assert f.metadata() == md
    assert R.read_file(path)[1] == md
    path2 = tmp_path / "n.qtensors"
    qt.save_file({"x": np.ones((2, 2), np.float32)}, path2)
    with qt.safe_open(path2) as f:
        assert not f.metadata()


@pytest.mark.parametrize("metadata", [{"n": 1}, {1: "n"}, {"n": None}, {"n": b"x"}])
def test_metadata_must_be_str_to_str(tmp_path, metadata):
    path = tmp_path / "m.qtensors"
    with pytest.raises(TypeError, match="metadata keys and values must be str"):
        qt.save_file({"x": np.ones((2, 2), np.float32)}, path, metadata=metadata)
    assert not path.exists()


def test_missing_folder_is_named_not_the_temporary(tmp_path):
    path = tmp_path / "no" / "such" / "m.qtensors"
    with pytest.raises(FileNotFoundError) as e:
        qt.save_file({"x": np.ones((2, 2), np.float32)}, path)
    assert f"the folder '{tmp_path / 'no' / 'such'}' does not exist" in str(e.value)
    assert ".tmp" not in str(e.value)
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is not a folder") as e:
        qt.save_file({"x": np.ones((2, 2), np.float32)}, a_file / "m.qtensors")
    assert ".tmp" not in str(e.value)


@pytest.mark.parametrize("alignment", [64, 128, 4096])
def test_alignment(tmp_path, alignment):
    path = tmp_path / "al.qtensors"
    qt.save_file(np_tensors(), path, alignment=alignment)
    hdr = R.read_header(path)
    assert hdr["header"]["alignment"] == alignment
    assert hdr["data_start"] % alignment == 0
    for t in hdr["header"]["tensors"]:
        for rec in t["parts"].values():
            assert rec["offset"] % alignment == 0
    R.read_file(path, strict=True)


@pytest.mark.parametrize("alignment", [0, 32, 100, 2**21])
def test_bad_alignment_is_refused(tmp_path, alignment):
    path = tmp_path / "bad.qtensors"
    with pytest.raises((ValueError, qt.QtensorsError)):
        qt.save_file({"x": np.ones(3, np.float32)}, path, alignment=alignment)
    assert os.listdir(tmp_path) == []


def test_deterministic_bytes(tmp_path):
    tensors = np_tensors()
    a, b = tmp_path / "a.qtensors", tmp_path / "b.qtensors"
    qt.save_file(tensors, a, metadata={"k": "v"})
    qt.save_file({k: v.copy() for k, v in tensors.items()}, b, metadata={"k": "v"})
    assert a.read_bytes() == b.read_bytes()
    g = torch.Generator().manual_seed(9)
    t = {"w": torch.randn(70, 9, generator=g).bfloat16(), "b": torch.randn(9, generator=g)}
    qt.save_file(t, a)
    qt.save_file({k: v.clone() for k, v in t.items()}, b)
    assert a.read_bytes() == b.read_bytes()


def test_failed_save_is_atomic(tmp_path):
    good = rng(4).standard_normal((8, 8)).astype(np.float32)
    bad = good.copy()
    bad[3, 3] = np.nan
    target = tmp_path / "model.qtensors"
    # no file before: none after
    with pytest.raises(qt.QuantizationError) as ei:
        qt.save_file({"ok.weight": good, "bad.weight": bad}, target)
    assert "bad.weight" in str(ei.value)
    assert os.listdir(tmp_path) == []
    # an existing file is left untouched
    target.write_bytes(b"original contents")
    with pytest.raises(qt.QuantizationError):
        qt.save_file({"ok.weight": good, "bad.weight": bad}, target)
    assert target.read_bytes() == b"original contents"
    assert os.listdir(tmp_path) == ["model.qtensors"]
    # scale beyond fp16: also refused, naming the tensor
    with pytest.raises(qt.QuantizationError) as ei:
        qt.save_file(
            {"huge.weight": np.full((4, 4), 1e6, np.float32) * np.arange(16).reshape(4, 4)}, target
        )
    assert "huge.weight" in str(ei.value)
    assert target.read_bytes() == b"original contents"
    assert os.listdir(tmp_path) == ["model.qtensors"]


def test_overwrite_existing_file(tmp_path):
    target = tmp_path / "m.qtensors"
    target.write_bytes(b"old")
    qt.save_file({"x": np.arange(4, dtype=np.int32)}, target)
    assert qt.load_file(target)["x"].tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ["m.qtensors"]


# ------------------------------------------------------------------------------------------------
# safe_open views
# ------------------------------------------------------------------------------------------------


def test_safe_open_views_and_verify(tmp_path):
    tensors = policy_tensors()
    path = tmp_path / "v.qtensors"
    qt.save_file(tensors, path, quant={"head.*": q_of(NF4_16), "enc.*.weight": q_of(SYM8)})
    _, _, info = R.read_file(path)
    with qt.safe_open(path, framework="np", verify=True) as f:
        assert set(f.keys()) == set(tensors)
        f.verify()
        for name in ("enc.0.weight", "head.w", "other.w"):
            q = f.get_quantized(name)
            parts = info[name]["parts"]
            for pname in ("codes", "scales", "mins"):
                part = getattr(q, pname)
                if pname not in parts:
                    assert part is None
                    continue
                arr = np.asarray(part)
                assert not arr.flags.writeable, f"{name}/{pname} view must be read-only"
                assert arr.tobytes() == parts[pname].tobytes()
                with pytest.raises(ValueError):
                    arr[...] = 0
            assert np.array_equal(qt.dequantize(q), f.get_tensor(name))
            assert H.same_encoding(q.encoding, info[name]["encoding"])


def test_quantize_then_dequantize_equals_load(tmp_path):
    x = rng(6).standard_normal((64, 48)).astype(np.float32)
    enc = qt.Affine(bits=3, group_size=16, axis=-1, scale_dtype="bfloat16")
    q = qt.quantize(x, enc)
    path = tmp_path / "q.qtensors"
    qt.save_file({"x": x}, path, quant=enc)
    assert np.array_equal(qt.load_file(path)["x"], qt.dequantize(q))


# ------------------------------------------------------------------------------------------------
# qtensors <-> reference
# ------------------------------------------------------------------------------------------------


def test_files_written_by_qtensors_read_by_reference(tmp_path):
    tensors = policy_tensors() | np_tensors()
    quant = {"head.*": q_of(NF4_16), "enc.*.weight": q_of(SYM8), "vec.scale": q_of(AFF4_8)}
    path = tmp_path / "rust.qtensors"
    qt.save_file(tensors, path, quant=quant, metadata={"who": "qtensors"})
    # strict: spaces after the JSON, zero padding, no trailing bytes, checksums verified
    decoded, md, info = R.read_file(path, verify=True, strict=True)
    assert md == {"who": "qtensors"}
    loaded = qt.load_file(path)
    for name, x in tensors.items():
        assert info[name]["dtype"] == str(x.dtype) and info[name]["shape"] == x.shape
        assert_same_bits(loaded[name], decoded[name], name)
        enc = info[name]["encoding"]
        if enc["name"] != "raw":  # the stored parts are exactly the reference's quantization
            ref = R.quantize(x, enc)
            assert info[name]["parts"]["codes"].tobytes() == ref["codes"].tobytes(), name
            assert info[name]["parts"]["scales"].tobytes() == ref["scales"].tobytes(), name


def test_files_written_by_reference_read_by_qtensors(tmp_path):
    g = rng(8)
    x = g.standard_normal((33, 20)).astype(np.float32)
    bf = R.fp32_to_bf16_bits(g.standard_normal((6, 17)).astype(np.float32))
    entries = [
        R.make_entry(
            "a",
            x,
            {"name": "affine", "bits": 5, "group_size": 7, "axis": 0, "scale_dtype": "float32"},
        ),
        R.make_entry(
            "s",
            x,
            {"name": "symmetric", "bits": 3, "group_size": 6, "axis": 1, "scale_dtype": "bfloat16"},
        ),
        R.make_entry(
            "n", x.T.copy(), {"name": "nf4", "group_size": 8, "axis": 0, "scale_dtype": "float16"}
        ),
        R.make_entry(
            "bf",
            bf,
            {"name": "affine", "bits": 4, "group_size": 4, "axis": 1, "scale_dtype": "bfloat16"},
            "bfloat16",
        ),
        R.make_entry("raw", np.arange(7, dtype=np.uint16), {"name": "raw"}),
    ]
    path = tmp_path / "ref.qtensors"
    R.write_file(path, entries, metadata={"by": "reference"}, alignment=256)
    want, md, _ = R.read_file(path)
    with qt.safe_open(path, framework="pt", verify=True) as f:
        assert f.metadata() == md
        for name in ("a", "s", "n", "bf", "raw"):
            assert_same_bits(f.get_tensor(name), want[name], name)
    with qt.safe_open(path, framework="np") as f:
        for name in ("a", "s", "n", "raw"):
            assert_same_bits(f.get_tensor(name), want[name], name)


def test_quantized_tensor_can_be_saved_as_is(tmp_path):
    """A QuantizedTensor (from quantize or get_quantized) is written with its parts unchanged."""
    x = rng(9).standard_normal((20, 12)).astype(np.float32)
    q = qt.quantize(x, qt.Symmetric(bits=4, group_size=8, axis=0, scale_dtype="float16"))
    path = tmp_path / "q.qtensors"
    qt.save_file({"q": q}, path)
    _, _, info = R.read_file(path, strict=True)
    assert info["q"]["parts"]["codes"].tobytes() == H.as_np(q.codes).tobytes()
    assert np.array_equal(qt.load_file(path)["q"], qt.dequantize(q))


def test_stream_defaults_to_where_it_can_run(tmp_path, monkeypatch):
    # (a stream test kept here: qtensors.stream's default device)
    path = tmp_path / "s.qtensors"
    x = rng(6).standard_normal((64, 64)).astype(np.float32)
    qt.save_file({"w": x}, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    with qt.stream(path) as s:
        [(name, t)] = list(s)
    assert name == "w" and t.device.type == "cpu"
    torch.testing.assert_close(t, torch.from_numpy(qt.load_file(path)["w"]))
    with qt.stream(path, framework="np") as s:  # numpy: the CPU, with or without a device
        assert next(iter(s))[1].shape == (64, 64)


def test_quantize_takes_preset_names():
    x = rng(5).standard_normal((8, 64)).astype(np.float32)
    assert qt.quantize(x, "nf4").encoding == qt.quantize(x, qt.PRESETS["nf4"]).encoding
    with pytest.raises(ValueError, match="nf4"):
        qt.quantize(x, "int5-g7")
