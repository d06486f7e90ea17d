"""The `qtensors` command line, run as users run it: the installed entry point, in a subprocess.

convert (MiniLM, a sharded folder, overwrite protection, progress on a terminal only, Ctrl-C /
SIGTERM / SIGKILL in the middle), inspect (table, JSON, a file from a newer version), verify (a
flipped byte in every kind of part, padding, trailing and truncated files), diff, demo, help.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file as st_save
from test_convert import InterruptAfterPublishing, make_sharded_model, tree_digest

import qtensors as qt

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "qtensors")
ENTRY = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "qtensors"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(*args: str, ok: bool | None = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*ENTRY, *map(str, args)], capture_output=True, text=True, env=ENV, **kw)
    if ok is True:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    elif ok is False:
        assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    return p


def sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def minilm_q(bert_path, tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("cli") / "minilm.qtensors"
    p = cli("convert", bert_path, dst)
    assert "104 tensors, 40 quantized, 64 raw" in p.stdout
    assert "flexgen (affine 4b g64 ax0 f16)" in p.stdout
    assert "smaller" in p.stdout
    # The rate's unit depends on how fast the run was (kB/s .. GB/s): assert on the line's shape.
    assert re.search(r"^  time +[\d.]+ s \([\d.]+ [kMGT]?B/s\)$", p.stdout, re.M), p.stdout
    assert p.stderr == ""  # no progress bar when stderr is not a terminal
    return str(dst)


# -- help ------------------------------------------------------------------------------------------


def test_help_teaches():
    p = cli("--help")
    for cmd in ("convert", "inspect", "verify", "diff", "demo"):
        assert f"qtensors {cmd}" in p.stdout
    p = cli("convert", "--help")
    for text in (
        "presets",
        "flexgen",
        "int4-g128",
        "nf4",
        "int8",
        "--keep-embeddings",
        "examples:",
        "--force",
        "model.safetensors.index.json",
        ".tmp",
    ):
        assert text in p.stdout, text
    for cmd in ("inspect", "verify", "diff", "demo"):
        assert "examples:" in cli(cmd, "--help").stdout
    assert cli(ok=False).returncode == 2  # no command: usage
    assert cli("--version").stdout.startswith("qtensors ")
    p = subprocess.run(
        [sys.executable, "-m", "qtensors", "--version"], capture_output=True, text=True
    )
    assert p.returncode == 0 and p.stdout.startswith("qtensors ")


def test_errors_are_one_line(tmp_path):
    p = cli("convert", tmp_path / "missing.safetensors", ok=False)
    assert p.returncode == 1 and "error:" in p.stderr and "missing.safetensors" in p.stderr
    p = cli("inspect", tmp_path / "missing.qtensors", ok=False)
    assert p.returncode == 1
    p = cli("convert", "x.safetensors", "--preset", "int3", ok=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = cli("convert", tmp_path, "--bits", "3", "--preset", "nf4", ok=False)
    assert p.returncode == 1 and "4-bit only" in p.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--read-ahead", "-1"], "--read-ahead: -1 is out of range: must be >= 0"),
        (["--group-size", "100000"], "--group-size: 100000 is out of range: must be 1..65536"),
        (["--group-size", "0"], "--group-size: 0 is out of range"),
        (["--group-size", "x"], "--group-size: 'x' is not a whole number"),
        (["--bits", "9"], "--bits: 9 is out of range: must be 1..8"),
    ],
)
def test_convert_refuses_out_of_range_numbers(tmp_path, args, message):
    p = cli("convert", tmp_path / "m.safetensors", tmp_path / "m.qtensors", *args, ok=False)
    assert p.returncode == 2 and message in p.stderr
    assert os.listdir(tmp_path) == []


def test_a_single_file_output_needs_the_qtensors_suffix(tmp_path):
    src = tmp_path / "m.safetensors"
    st_save({"w": np.ones((64, 64), np.float32)}, str(src))
    p = cli("convert", src, tmp_path / "o.txt", ok=False)
    assert p.returncode == 1 and "o.txt must end in .qtensors" in p.stderr
    assert os.listdir(tmp_path) == ["m.safetensors"]
    p = cli("diff", src, src, "--top", "0", ok=False)
    assert p.returncode == 2 and "--top: 0 is out of range: must be >= 1" in p.stderr
    with pytest.raises(ValueError, match="read_ahead must be a whole number >= 0"):
        qt.convert(src, tmp_path / "m.qtensors", read_ahead=-1)
    assert "1..65536" in cli("convert", "--help").stdout


# -- convert, inspect, verify, diff on MiniLM ------------------------------------------------------


def test_inspect_table_and_json(minilm_q):
    p = cli("inspect", minilm_q)
    lines = p.stdout.splitlines()
    assert lines[0].startswith(minilm_q) and "qtensors 1.0" in lines[0]
    header = next(ln for ln in lines if ln.startswith("name"))
    assert header.split() == ["name", "shape", "dtype", "encoding", "stored", "ratio"]
    row = next(ln for ln in lines if ln.startswith("encoder.layer.0.attention.self.query.weight "))
    assert "[384, 384]" in row and "float32" in row and "affine 4b g64 ax0 f16" in row
    assert row.rstrip().endswith("%")
    assert "embeddings.position_ids" in p.stdout and " raw " in p.stdout
    assert lines[-1].startswith("104 tensors (40 quantized, 64 raw)")

    info = json.loads(cli("inspect", minilm_q, "--json").stdout)
    t = info["totals"]
    assert t["tensors"] == 104 and t["quantized"] == 40 and t["unknown"] == 0
    assert t["file_bytes"] == os.path.getsize(minilm_q)
    rows = {r["name"]: r for r in info["tensors"]}
    q = rows["encoder.layer.0.attention.self.query.weight"]
    assert q["original_bytes"] == 384 * 384 * 4
    # 4-bit codes + fp16 scale and min per 64 elements
    assert q["stored_bytes"] == 384 * 384 // 2 + 2 * (384 // 64) * 384 * 2
    assert q["ratio"] == pytest.approx(q["stored_bytes"] / q["original_bytes"])
    assert set(q["parts"]) == {"codes", "scales", "mins"}


def test_verify_and_diff(bert_path, minilm_q):
    p = cli("verify", minilm_q)
    assert p.stdout.startswith("OK") and "104 tensors" in p.stdout
    assert cli("verify", minilm_q, "--quiet").stdout == ""

    p = cli("diff", bert_path, minilm_q)
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "encoding", "SQNR", "dB"]
    sq = [float(ln.split()[6]) for ln in lines[2:] if " affine 4b g64 ax0 f16 " in ln]
    assert len(sq) == 40 and sq == sorted(sq)  # worst first
    assert lines[-1].startswith("104 tensors: 40 quantized, 64 raw (exact); SQNR worst")
    p = cli("diff", bert_path, minilm_q, "--json")
    rep = json.loads(p.stdout)
    assert rep["summary"]["quantized"] == 40 and len(rep["tensors"]) == 104
    assert rep["tensors"][-1]["sqnr_db"] == "inf"
    p = cli("diff", bert_path, minilm_q, "--top", "3")
    assert "101 more" in p.stdout
    p = cli("diff", bert_path, minilm_q, "--min-sqnr", "30", "-q", ok=False)
    assert p.returncode == 1 and "below 30.0 dB" in p.stderr
    assert p.stdout.startswith("104 tensors")


def test_refuses_to_overwrite(bert_path, minilm_q, tmp_path):
    before = sha256(minilm_q)
    p = cli("convert", bert_path, minilm_q, "--preset", "int8", ok=False)
    assert p.returncode == 1 and "--force" in p.stderr
    assert sha256(minilm_q) == before
    dst = tmp_path / "m.qtensors"
    shutil.copy(minilm_q, dst)
    cli("convert", bert_path, dst, "--preset", "int8", "--force", "-q")
    assert qt.safe_open(dst).encoding("encoder.layer.0.output.dense.weight")["name"] == "symmetric"


def test_options_reach_the_file(bert_path, tmp_path):
    dst = tmp_path / "o.qtensors"
    p = cli(
        "convert",
        bert_path,
        dst,
        "--bits",
        "3",
        "--group-size",
        "32",
        "--axis",
        "-1",
        "--scale-dtype",
        "float32",
        "--keep",
        "*.intermediate.*",
        "--keep-embeddings",
        "--alignment",
        "4096",
        "--json",
    )
    res = json.loads(p.stdout)
    assert res["tensors"] == 104 and res["quantized"] == 40 - 6 - 3
    with qt.safe_open(dst) as f:
        assert f.alignment == 4096
        assert f.encoding("encoder.layer.2.output.dense.weight") == {
            "name": "affine",
            "bits": 3,
            "group_size": 32,
            "axis": 1,
            "scale_dtype": "float32",
        }
        assert f.encoding("encoder.layer.2.intermediate.dense.weight")["name"] == "raw"
        assert f.encoding("embeddings.word_embeddings.weight")["name"] == "raw"
    cli("convert", bert_path, tmp_path / "s.qtensors", "--symmetric", "--bits", "8", "-q")
    assert qt.safe_open(tmp_path / "s.qtensors").encoding("pooler.dense.weight") == {
        "name": "symmetric",
        "bits": 8,
        "group_size": 64,
        "axis": 0,
        "scale_dtype": "float16",
    }


def test_progress_bar_only_on_a_terminal(bert_path, tmp_path):
    master, slave = pty.openpty()
    try:
        p = subprocess.run(
            [*ENTRY, "convert", bert_path, tmp_path / "a.qtensors"],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=ENV,
            timeout=120,
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        tty = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert p.returncode == 0
    assert "converting" in tty and re.search(r"\d+/104 tensors", tty) and "B/s" in tty
    assert "converting" not in p.stdout.decode()
    # --quiet: nothing at all, even on a terminal
    master, slave = pty.openpty()
    p = subprocess.run(
        [*ENTRY, "convert", bert_path, tmp_path / "b.qtensors", "-q"],
        stdout=slave,
        stderr=slave,
        env=ENV,
        timeout=120,
    )
    os.close(slave)
    try:
        out = os.read(master, 65536)
    except OSError:
        out = b""
    os.close(master)
    assert p.returncode == 0 and out == b""


# -- model folders ---------------------------------------------------------------------------------


def test_sharded_folder(tmp_path):
    src = make_sharded_model(str(tmp_path))
    before = tree_digest(src)
    dst = tmp_path / "out"
    p = cli("convert", src, dst)
    assert f"wrote {dst} (3 files)" in p.stdout and "copied  3 other files" in p.stdout
    assert "note: not copied: pytorch_model.bin" in p.stderr
    assert tree_digest(src) == before
    p = cli("verify", dst)
    assert p.stdout.count("OK") == 4  # three files and the index
    p = cli("inspect", dst)
    assert p.stdout.splitlines()[-1].startswith("total: 3 files, 13 tensors")
    p = cli("diff", src, dst, "-q")
    assert p.stdout.startswith("11 tensors: 7 quantized, 4 raw (exact)")
    # a broken index is caught
    ix = dst / "model.qtensors.index.json"
    doc = json.loads(ix.read_text())
    doc["weight_map"]["lm_head.weight"] = "model-00001-of-00002.qtensors"
    ix.write_text(json.dumps(doc))
    p = cli("verify", dst, ok=False)
    assert "tensor 'lm_head.weight' is not in its shard model-00001-of-00002.qtensors" in p.stdout


# -- interrupted conversions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> str:
    """~256 MB of fp16 that takes a few seconds to convert at 3 bits in groups of 7."""
    folder = tmp_path_factory.mktemp("slow") / "model"
    folder.mkdir()
    pool = np.random.default_rng(0).standard_normal(1 << 22).astype(np.float16)
    tensors = {f"layer.{i}.weight": np.roll(pool, i).reshape(2048, 2048) for i in range(32)}
    st_save(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return str(folder)


SLOW = ("--bits", "3", "--group-size", "7", "--scale-dtype", "float32")


# The CLI in a subprocess, with the writer paused after two tensors until a signal arrives: the
# signal lands mid-conversion however fast or slow the machine is (no race with a timer).
PAUSED_CLI = """
import sys, time
from qtensors import _core
from qtensors.cli import main

Writer = _core.Writer


class PausingWriter:
    def __init__(self, *args):
        self._w, self._n = Writer(*args), 0

    def write_tensor(self, *args):
        self._w.write_tensor(*args)
        self._n += 1
        if self._n == 2:
            print("PAUSED", flush=True)
            while True:
                time.sleep(0.01)

    def __getattr__(self, name):
        return getattr(self._w, name)


_core.Writer = PausingWriter
sys.exit(main(sys.argv[1:]))
"""


def start_and_interrupt(src: str, dst: str, sig: int) -> subprocess.Popen:
    """Start a conversion, wait until it has written two tensors (and stays there), send `sig`."""
    p = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CLI, "convert", src, dst, *SLOW],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "PYTHONFAULTHANDLER": "1"},
    )
    for line in p.stdout:
        if line.strip() == "PAUSED":
            break
    else:
        pytest.fail(f"the conversion ended before pausing:\n{p.communicate()}")
    p.send_signal(sig)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _out, err = p.communicate(timeout=30)
        pytest.fail(f"the conversion hung after signal {sig}:\n{err}")
    return p


@pytest.mark.parametrize(
    ("sig", "rc", "to"),
    [
        (signal.SIGINT, 130, "file"),
        (signal.SIGINT, 130, "folder"),
        (signal.SIGTERM, 143, "file"),
    ],
)
def test_interrupted_conversion_leaves_nothing(slow_model, tmp_path, sig, rc, to):
    src = slow_model if to == "folder" else os.path.join(slow_model, "model.safetensors")
    before = tree_digest(slow_model)
    dst = str(tmp_path / ("out" if to == "folder" else "out.qtensors"))
    p = start_and_interrupt(src, dst, sig)
    err = p.stderr.read()  # (`in` on the stream itself would consume it line by line)
    assert p.returncode == rc, err
    assert "Traceback" not in err
    if sig == signal.SIGINT:
        assert "interrupted: nothing was written" in err
    assert os.listdir(tmp_path) == []  # no output, no temporary
    assert tree_digest(slow_model) == before


def test_interrupt_after_the_rename_says_the_output_is_complete(tmp_path, monkeypatch, capsys):
    from qtensors.cli import main

    src = tmp_path / "m.safetensors"
    st_save({"w": np.ones((64, 64), np.float32)}, str(src))
    dst = tmp_path / "m.qtensors"
    InterruptAfterPublishing(monkeypatch, "file")
    assert main(["convert", str(src), str(dst), "-q"]) == 0
    assert f"interrupted after the output was written: {dst} is complete" in capsys.readouterr().err
    qt.safe_open(dst, verify=True).close()


def test_interrupt_while_planning_or_reporting(tmp_path, monkeypatch, capsys):
    from qtensors import _source, cli

    src = tmp_path / "m.safetensors"
    st_save({"w": np.ones((64, 64), np.float32)}, str(src))
    dst = tmp_path / "m.qtensors"

    def interrupt(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(_source, "list_file", interrupt)  # reading the headers
        assert cli.main(["convert", str(src), str(dst)]) == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err
    assert not dst.exists()
    with monkeypatch.context() as m:
        m.setattr(cli, "_report_conversion", interrupt)  # printing the summary
        assert cli.main(["convert", str(src), str(dst)]) == 0
    assert f"{dst} is complete" in capsys.readouterr().err
    qt.safe_open(dst, verify=True).close()


def test_killed_conversion_never_leaves_a_partial_output(slow_model, tmp_path):
    src = os.path.join(slow_model, "model.safetensors")
    before = tree_digest(slow_model)
    dst = str(tmp_path / "out.qtensors")
    p = start_and_interrupt(src, dst, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert "out.qtensors" not in left
    assert len(left) == 1 and left[0].startswith(".out.qtensors.") and left[0].endswith(".tmp")
    assert tree_digest(slow_model) == before
    # The next conversion leaves a young leftover alone (it may be a running conversion) ...
    p = cli("convert", src, dst, "-q")
    assert sorted(os.listdir(tmp_path)) == sorted([left[0], "out.qtensors"])
    p = cli("convert", src, dst, "--force")
    assert f"{left[0]} may belong to a conversion still running" in p.stderr
    # ... and removes an old one.
    old = time.time() - 3600
    os.utime(tmp_path / left[0], (old, old))
    p = cli("convert", src, dst, "--force")
    assert f"note: removed {tmp_path / left[0]}" in p.stderr
    assert os.listdir(tmp_path) == ["out.qtensors"]
    cli("verify", dst)


# -- verify catches corruption ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_part(tmp_path_factory) -> tuple[str, dict]:
    """A file with every kind of part: affine (codes, scales, mins), symmetric and nf4 (codes,
    scales), raw (data)."""
    rng = np.random.default_rng(3)
    tensors = {
        "affine.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "symmetric.weight": rng.standard_normal((64, 128)).astype(np.float16),
        "nf4.weight": rng.standard_normal((32, 256)).astype(np.float32),
        "odd.bias": rng.standard_normal(13).astype(np.float32),  # 52 bytes, then padding
        "raw.bias": rng.standard_normal(200).astype(np.float32),
    }
    quant = {"affine.*": qt.FLEXGEN, "symmetric.*": qt.Symmetric(8, 32), "nf4.*": qt.NF4(64)}
    path = tmp_path_factory.mktemp("parts") / "every.qtensors"
    qt.save_file(tensors, path, quant=quant)
    with qt.safe_open(path) as f:
        parts = {
            (name, pname): (f._data_start + p["offset"], p["length"])
            for name in f.keys()
            for pname, p in f.tensor_info(name)["parts"].items()
        }
    assert len(parts) == 9
    return str(path), parts


def flipped(src: str, dst, offset: int) -> str:
    data = bytearray(open(src, "rb").read())
    data[offset] ^= 0x10
    with open(dst, "wb") as fh:
        fh.write(data)
    return str(dst)


def test_verify_names_every_corrupted_part(every_part, tmp_path):
    path, parts = every_part
    cli("verify", path)
    for (name, pname), (start, length) in parts.items():
        bad = flipped(path, tmp_path / f"{name}.{pname}.qtensors", start + length // 2)
        p = cli("verify", bad, ok=False)
        assert p.returncode == 1
        assert p.stdout.startswith(f"FAILED  {bad}")
        assert f"tensor '{name}' part '{pname}': checksum mismatch" in p.stdout, p.stdout
        assert "1 of 1 file failed verification" in p.stderr
        rep = json.loads(cli("verify", bad, "--json", ok=False).stdout)
        assert rep["ok"] is False and len(rep["files"][0]["errors"]) == 1
    # two corrupted tensors: both are named
    two = flipped(path, tmp_path / "two.qtensors", parts[("affine.weight", "mins")][0])
    two = flipped(two, tmp_path / "two.qtensors", parts[("raw.bias", "data")][0])
    p = cli("verify", two, ok=False)
    assert "'affine.weight' part 'mins'" in p.stdout and "'raw.bias' part 'data'" in p.stdout


def test_diff_reports_corruption_and_the_argument_order(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "model"
    folder.mkdir()
    src = folder / "model.safetensors"
    st_save({n: rng.standard_normal((64, 64)).astype(np.float32) for n in ("a.w", "b.w")}, str(src))
    q = tmp_path / "model.qtensors"
    cli("convert", src, q, "-q")
    assert cli("diff", src, q).returncode == 0
    with qt.safe_open(q) as f:
        start = f._data_start + f.tensor_info("b.w")["parts"]["codes"]["offset"]
    bad = flipped(str(q), tmp_path / "bad.qtensors", start + 7)
    p = cli("diff", src, bad, ok=False)
    assert p.returncode == 1
    assert "CORRUPTED" in p.stdout and "1 PROBLEM;" in p.stdout
    assert "b.w: CORRUPTED: tensor 'b.w' part 'codes': checksum mismatch" in p.stderr
    order = "the order is `qtensors diff ORIGINAL.safetensors QUANTIZED.qtensors`"
    p = cli("diff", q, src, ok=False)
    assert p.returncode == 1 and order in p.stderr and str(q) in p.stderr
    cli("convert", folder, tmp_path / "model-q", "-q")
    p = cli("diff", tmp_path / "model-q", folder, ok=False)
    assert p.returncode == 1 and order in p.stderr


def test_plurals(tmp_path):
    src = tmp_path / "m" / "model.safetensors"
    src.parent.mkdir()
    st_save({"w": np.ones((64, 64), np.float32)}, str(src))
    (src.parent / "config.json").write_text("{}")
    p = cli("convert", src.parent, tmp_path / "out")
    assert "1 tensor, 1 quantized" in p.stdout and "copied  1 other file:" in p.stdout
    assert "(1 tensor, 3 parts," in cli("verify", tmp_path / "out" / "model.qtensors").stdout
    assert cli("diff", src, tmp_path / "out" / "model.qtensors", "-q").stdout.startswith(
        "1 tensor: 1 quantized, 0 raw"
    )


def test_verify_catches_padding_trailing_and_truncation(every_part, tmp_path):
    path, parts = every_part
    spans = sorted(parts.values())
    gap = next(s + n for (s, n), (t, _) in itertools.pairwise(spans) if s + n < t)
    p = cli("verify", flipped(path, tmp_path / "pad.qtensors", gap), ok=False)
    assert "nonzero bytes in the padding after tensor" in p.stdout
    data = open(path, "rb").read()
    (tmp_path / "long.qtensors").write_bytes(data + b"\0")
    p = cli("verify", tmp_path / "long.qtensors", ok=False)
    assert "1 bytes follow the last part" in p.stdout
    (tmp_path / "short.qtensors").write_bytes(data[:-10])
    p = cli("verify", tmp_path / "short.qtensors", ok=False)
    assert "FAILED" in p.stdout and "truncated" in p.stdout
    (tmp_path / "not.qtensors").write_bytes(b"hello")
    p = cli("verify", tmp_path / "not.qtensors", ok=False)
    assert "FAILED" in p.stdout


# -- inspect files from a newer qtensors -----------------------------------------------------------


def rewrite_header(src: str, dst, edit, minor: int = 2) -> str:
    """Copy `src` with its header JSON edited and the minor version set (data unchanged)."""
    data = open(src, "rb").read()
    (header_len,) = struct.unpack("<Q", data[16:24])
    header = json.loads(data[24 : 24 + header_len].decode().rstrip(" "))
    edit(header)
    text = json.dumps(header).encode()
    assert len(text) <= header_len, "no room in the header padding"
    out = data[:10] + struct.pack("<H", minor) + data[12:24] + text.ljust(header_len, b" ")
    with open(dst, "wb") as fh:
        fh.write(out + data[24 + header_len :])
    return str(dst)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> str:
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("newer") / "base.qtensors"
    qt.save_file(
        {
            "a.weight": rng.standard_normal((64, 64)).astype(np.float32),
            "b.bias": rng.standard_normal(64).astype(np.float32),
        },
        path,
        alignment=4096,
    )
    return str(path)


def test_inspect_lists_unknown_encodings(base_file, tmp_path):
    def to_mxfp6(h):  # an encoding this version does not know
        t = h["tensors"][0]
        t["encoding"] = {"name": "mxfp6", "group_size": 32}
        t["parts"] = {"codes": t["parts"]["codes"], "e8m0_scales": t["parts"]["scales"]}

    newer = rewrite_header(base_file, tmp_path / "newer.qtensors", to_mxfp6)
    p = cli("inspect", newer)
    assert "qtensors 1.2" in p.stdout
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("a.weight"))
    assert "unknown: mxfp6" in row and "group_size=32" in row
    assert "1 unknown" in p.stdout
    info = json.loads(cli("inspect", newer, "--json").stdout)
    a = info["tensors"][0]
    assert a["known"] is False and a["encoding"]["name"] == "mxfp6"
    assert set(a["parts"]) == {"codes", "e8m0_scales"}
    p = cli("verify", newer, ok=False)
    assert "FAILED" in p.stdout and "1.2" in p.stdout  # this reader knows 1.1


def test_inspect_survives_an_unknown_dtype(base_file, tmp_path):
    def to_fp4(h):
        t = h["tensors"][1]
        t["dtype"] = "float4_e2m1"
        t["parts"]["data"]["dtype"] = "float4_e2m1"

    newer = rewrite_header(base_file, tmp_path / "fp4.qtensors", to_fp4)
    p = cli("inspect", newer)
    assert "warning:" in p.stdout and "float4_e2m1" in p.stdout
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("b.bias"))
    assert "unknown dtype" in row


# -- demo ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo(tmp_path):
    out = tmp_path / "demo.qtensors"
    p = cli("demo", "--out", out)
    text = p.stdout
    for key in ("input", "policy", "output", "time", "error", "reopen", "model", "next:"):
        assert f"\n  {key} " in text or text.startswith(key) or f"\n{key}" in text, key
    assert "90.9 MB, 104 tensors" in text and "smaller than the input file" in text
    assert "SQNR worst" in text and "all checksums OK" in text and "cosine min 0.9" in text
    cli("verify", out)
