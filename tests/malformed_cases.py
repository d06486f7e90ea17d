"""Crafted malformed files, one or more per rule of spec section 7.

Each case is a ``Case(id, rule, blob, error, mentions)``: ``blob`` the file bytes, ``error`` the
name of the qtensors exception class a reader must raise (``FormatError`` or a subclass),
``mentions`` words its message must contain (case-insensitive): the tensor, the part, or the
offending value.

The cases are built from one valid base file written by the reference writer; ``test_reference.py``
checks that the reference reader rejects every one of them (so each blob really breaks its rule) and
accepts the base file, and ``test_malformed.py`` runs them against qtensors.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field

import numpy as np
import reference as R


@dataclass
class Case:
    id: str
    rule: int
    blob: bytes
    error: str = "FormatError"
    mentions: list = field(default_factory=list)


def base_entries():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    s = rng.standard_normal((4, 6)).astype(np.float32)
    n = rng.standard_normal((2, 16)).astype(np.float32)
    return [
        R.make_entry(
            "blk.w",
            w,
            {"name": "affine", "bits": 4, "group_size": 4, "axis": 0, "scale_dtype": "float16"},
        ),
        R.make_entry(
            "blk.s",
            s,
            {"name": "symmetric", "bits": 8, "group_size": 3, "axis": 1, "scale_dtype": "bfloat16"},
        ),
        R.make_entry(
            "blk.n", n, {"name": "nf4", "group_size": 8, "axis": 1, "scale_dtype": "float16"}
        ),
        R.make_entry("blk.r", np.arange(5, dtype=np.int32), {"name": "raw"}),
    ]


BASE_METADATA = {"a": "b"}


def base() -> tuple[dict, bytes]:
    """(header dict, data section) of the valid base file."""
    return R.build(base_entries(), metadata=BASE_METADATA, alignment=64)


def base_blob() -> bytes:
    h, d = base()
    return R.assemble(h, d)


def _tensor(h: dict, name: str) -> dict:
    return next(t for t in h["tensors"] if t["name"] == name)


def _mut(fn):
    """Blob of the base file with ``fn(header)`` applied to a copy of its header."""
    h, d = base()
    h = copy.deepcopy(h)
    fn(h)
    return R.assemble(h, d)


def _set(path, value):
    """fn(header) setting h[path...] = value; path items are keys or tensor names (str starting
    'blk.')."""

    def fn(h):
        obj = h
        for k in path[:-1]:
            obj = _tensor(obj, k) if isinstance(k, str) and k.startswith("blk.") else obj[k]
        obj[path[-1]] = value

    return fn


def _del(path):
    def fn(h):
        obj = h
        for k in path[:-1]:
            obj = _tensor(obj, k) if isinstance(k, str) and k.startswith("blk.") else obj[k]
        del obj[path[-1]]

    return fn


def _text_file(text: bytes, data: bytes = b"", alignment: int = 64) -> bytes:
    return R.assemble(None, data, alignment=alignment, header_text=text)


def cases() -> list[Case]:
    h0, d0 = base()
    blob = R.assemble(h0, d0)
    hl = struct.unpack("<Q", blob[16:24])[0]
    out: list[Case] = []
    add = out.append

    # --- rule 1: size and magic -----------------------------------------------------------------
    add(Case("r1_empty_file", 1, b""))
    add(Case("r1_23_bytes", 1, blob[:23]))
    add(Case("r1_bad_magic", 1, b"QTENSORZ" + blob[8:]))
    add(Case("r1_lowercase_magic", 1, b"qtensors" + blob[8:]))

    # --- rule 2: versions and reserved ----------------------------------------------------------
    add(
        Case(
            "r2_major_2",
            2,
            R.assemble(h0, d0, major=2, minor=0),
            "UnsupportedError",
            ["2.0", "1.1"],
        )
    )
    add(Case("r2_minor_2", 2, R.assemble(h0, d0, minor=2), "UnsupportedError", ["version"]))
    add(
        Case(
            "r2_major_0", 2, R.assemble(h0, d0, major=0, minor=0), "FormatError", ["0.0", "invalid"]
        )
    )
    add(Case("r2_reserved", 2, R.assemble(h0, d0, reserved=1), "FormatError", ["reserved"]))

    # --- rule 3: header_len ---------------------------------------------------------------------
    add(Case("r3_header_len_over_100MiB", 3, R.assemble(h0, d0, header_len=100 * 1024 * 1024 + 64)))
    add(Case("r3_header_len_past_eof", 3, R.assemble(h0, d0, header_len=len(blob))))
    add(Case("r3_header_len_u64_max", 3, R.assemble(h0, d0, header_len=2**64 - 1)))
    add(Case("r3_header_len_shorter", 3, R.assemble(h0, d0, header_len=hl - 64)))

    # --- rule 4: UTF-8 JSON of the right shape --------------------------------------------------
    add(
        Case(
            "r4_not_utf8",
            4,
            _text_file(b'{"alignment":64,"metadata":{"k":"\xff\xfe"},"tensors":[]}'),
        )
    )
    add(Case("r4_not_json", 4, _text_file(b'{"alignment":64,"tensors":[')))
    add(Case("r4_top_level_array", 4, _text_file(b"[]")))
    add(Case("r4_nul_padding", 4, _text_file(b'{"alignment":64,"tensors":[]}' + b"\0" * 34)))
    add(
        Case(
            "r4_deeply_nested_tensors",
            4,
            _text_file(b'{"alignment":64,"tensors":' + b"[" * 100000 + b"]" * 100000 + b"}"),
        )
    )
    add(Case("r4_tensors_not_array", 4, _mut(_set(["tensors"], {}))))
    repeated = json.dumps(h0, separators=(",", ":")).replace(
        '"name":"blk.r"', '"name":"blk.r","name":"blk.q"'
    )
    add(Case("r4_repeated_key", 4, _text_file(repeated.encode(), d0), mentions=["name", "twice"]))
    repeated = json.dumps(h0, separators=(",", ":")).replace('"data":{', '"data":{"offset":0,', 1)
    add(
        Case(
            "r4_repeated_part_key",
            4,
            _text_file(repeated.encode(), d0),
            mentions=["offset", "twice"],
        )
    )
    add(Case("r4_tensors_missing", 4, _mut(_del(["tensors"]))))
    add(Case("r4_alignment_missing", 4, _mut(_del(["alignment"])), mentions=["alignment"]))
    add(Case("r4_alignment_string", 4, _mut(_set(["alignment"], "64")), mentions=["alignment"]))
    add(Case("r4_tensor_not_object", 4, _mut(lambda h: h["tensors"].append("blk.x"))))
    add(Case("r4_name_not_string", 4, _mut(_set(["tensors", 0, "name"], 42))))
    add(Case("r4_dtype_not_string", 4, _mut(_set(["blk.w", "dtype"], 3)), mentions=["blk.w"]))
    add(
        Case("r4_shape_string_dim", 4, _mut(_set(["blk.w", "shape"], ["8", 6])), mentions=["blk.w"])
    )
    add(Case("r4_shape_negative", 4, _mut(_set(["blk.w", "shape"], [-8, 6])), mentions=["blk.w"]))
    add(Case("r4_shape_not_u64", 4, _mut(_set(["blk.r", "shape"], [2**64])), mentions=["blk.r"]))
    add(Case("r4_shape_not_array", 4, _mut(_set(["blk.r", "shape"], 5)), mentions=["blk.r"]))
    add(
        Case(
            "r4_encoding_not_object",
            4,
            _mut(_set(["blk.w", "encoding"], "affine")),
            mentions=["blk.w"],
        )
    )
    add(Case("r4_parts_not_object", 4, _mut(_set(["blk.w", "parts"], [])), mentions=["blk.w"]))
    add(
        Case(
            "r4_offset_float",
            4,
            _mut(_set(["blk.w", "parts", "scales", "offset"], 64.5)),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r4_offset_string",
            4,
            _mut(_set(["blk.w", "parts", "scales", "offset"], "64")),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r4_offset_negative",
            4,
            _mut(_set(["blk.w", "parts", "scales", "offset"], -64)),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r4_length_not_u64",
            4,
            _mut(_set(["blk.w", "parts", "codes", "length"], 2**64)),
            mentions=["blk.w", "18446744073709551616"],
        )
    )
    add(
        Case(
            "r4_offset_2_64",
            4,
            _mut(_set(["blk.w", "parts", "codes", "offset"], 2**64)),
            mentions=["blk.w", "codes", "18446744073709551616"],
        )
    )
    add(
        Case(
            "r4_metadata_not_object", 4, _mut(_set(["metadata"], ["a", "b"])), mentions=["metadata"]
        )
    )

    # --- rule 5: alignment ----------------------------------------------------------------------
    for bad in (0, 32, 48, 96, 2**21):
        add(Case(f"r5_alignment_{bad}", 5, _mut(_set(["alignment"], bad)), mentions=["alignment"]))
    # alignment 128 declared, but data_start is only a multiple of 64
    h = copy.deepcopy(h0)
    h["alignment"] = 128
    text = json.dumps(h, separators=(",", ":")).encode()
    pad = R.align_up(24 + len(text), 64) - 24 - len(text)
    if (24 + len(text) + pad) % 128 == 0:
        pad += 64
    add(
        Case(
            "r5_data_start_unaligned",
            5,
            R.assemble(None, d0, alignment=1, header_text=text + b" " * pad),
        )
    )

    # --- rule 6: names, count, metadata values --------------------------------------------------
    add(Case("r6_empty_name", 6, _mut(_set(["blk.s", "name"], ""))))
    long_name = "é" * 513  # 513 characters but 1026 UTF-8 bytes
    add(Case("r6_name_over_1024_bytes", 6, _mut(_set(["blk.s", "name"], long_name))))
    add(Case("r6_duplicate_name", 6, _mut(_set(["blk.s", "name"], "blk.w")), mentions=["blk.w"]))
    add(Case("r6_metadata_value_int", 6, _mut(_set(["metadata", "a"], 1)), mentions=["metadata"]))
    add(
        Case(
            "r6_metadata_value_null", 6, _mut(_set(["metadata", "a"], None)), mentions=["metadata"]
        )
    )
    many = b'{"alignment":64,"tensors":[' + b",".join([b"{}"] * 1_000_001) + b"]}"
    add(Case("r6_too_many_tensors", 6, _text_file(many)))

    # --- rule 7: dtypes, rank, element count ----------------------------------------------------
    add(
        Case(
            "r7_unknown_dtype",
            7,
            _mut(_set(["blk.w", "dtype"], "float128")),
            mentions=["blk.w", "float128"],
        )
    )
    add(
        Case(
            "r7_unknown_part_dtype",
            7,
            _mut(_set(["blk.r", "parts", "data", "dtype"], "complex64")),
            mentions=["blk.r", "complex64"],
        )
    )

    def rank33(h):
        t = _tensor(h, "blk.r")
        t["shape"] = [1] * 33
        t["parts"]["data"]["shape"] = [1] * 33
        t["parts"]["data"]["length"] = 4
        t["parts"]["data"]["checksum"] = R.checksum_string(d0[t["parts"]["data"]["offset"] :][:4])

    add(Case("r7_rank_33", 7, _mut(rank33), mentions=["blk.r"]))

    def overflow(h):
        t = _tensor(h, "blk.r")
        t["shape"] = [2**32, 2**32, 2]
        t["parts"]["data"]["shape"] = [2**32, 2**32, 2]

    add(Case("r7_element_count_overflow", 7, _mut(overflow), mentions=["blk.r"]))

    # Rule 7 in any order of the dimensions: an empty tensor must still be creatable in numpy and
    # torch, so the non-zero dimensions times the item size must stay below 2^63.
    for dims in ([0, 2**63, 2**63], [2**63, 2**63, 0], [0, 2**63], [0, 2**62, 2**62], [0, 2**61]):

        def huge_empty(h, dims=dims):
            t = _tensor(h, "blk.r")  # int32: 4 bytes per element
            t["shape"] = dims
            t["parts"]["data"]["shape"] = dims
            t["parts"]["data"]["length"] = 0

        add(Case(f"r7_empty_shape_{dims}", 7, _mut(huge_empty), mentions=["blk.r", "shape"]))

    # --- rule 8: encoding and parameters --------------------------------------------------------
    add(
        Case(
            "r8_unknown_encoding",
            8,
            _mut(_set(["blk.w", "encoding", "name"], "mxfp6")),
            "UnsupportedError",
            ["blk.w", "mxfp6"],
        )
    )
    for bits in (0, 9, "4", None, 256, 2**64 - 1):
        add(
            Case(
                f"r8_affine_bits_{bits}",
                8,
                _mut(_set(["blk.w", "encoding", "bits"], bits)),
                mentions=["blk.w"] + ([str(bits)] if isinstance(bits, int) else []),
            )
        )
    add(
        Case(
            "r8_affine_bits_missing",
            8,
            _mut(_del(["blk.w", "encoding", "bits"])),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r8_symmetric_bits_1",
            8,
            _mut(_set(["blk.s", "encoding", "bits"], 1)),
            mentions=["blk.s"],
        )
    )
    add(Case("r8_nf4_bits_3", 8, _mut(_set(["blk.n", "encoding", "bits"], 3)), mentions=["blk.n"]))
    add(
        Case(
            "r8_group_size_0",
            8,
            _mut(_set(["blk.w", "encoding", "group_size"], 0)),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r8_group_size_missing",
            8,
            _mut(_del(["blk.n", "encoding", "group_size"])),
            mentions=["blk.n"],
        )
    )
    add(
        Case("r8_axis_eq_rank", 8, _mut(_set(["blk.w", "encoding", "axis"], 2)), mentions=["blk.w"])
    )
    add(
        Case(
            "r8_axis_negative", 8, _mut(_set(["blk.w", "encoding", "axis"], -1)), mentions=["blk.w"]
        )
    )
    add(Case("r8_axis_missing", 8, _mut(_del(["blk.s", "encoding", "axis"])), mentions=["blk.s"]))
    add(
        Case(
            "r8_scale_dtype_int8",
            8,
            _mut(_set(["blk.s", "encoding", "scale_dtype"], "int8")),
            mentions=["blk.s"],
        )
    )
    add(
        Case(
            "r8_scale_dtype_float64",
            8,
            _mut(_set(["blk.w", "encoding", "scale_dtype"], "float64")),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r8_scale_dtype_missing",
            8,
            _mut(_del(["blk.n", "encoding", "scale_dtype"])),
            mentions=["blk.n"],
        )
    )
    add(
        Case(
            "r8_logical_int32_affine",
            8,
            _mut(_set(["blk.w", "dtype"], "int32")),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r8_logical_float8_nf4",
            8,
            _mut(_set(["blk.n", "dtype"], "float8_e4m3fn")),
            mentions=["blk.n"],
        )
    )

    # --- rule 9: the parts ----------------------------------------------------------------------
    add(Case("r9_missing_mins", 9, _mut(_del(["blk.w", "parts", "mins"])), mentions=["blk.w"]))
    add(
        Case(
            "r9_extra_part",
            9,
            _mut(
                lambda h: _tensor(h, "blk.s")["parts"].__setitem__(
                    "zeros", dict(_tensor(h, "blk.s")["parts"]["scales"])
                )
            ),
            mentions=["blk.s"],
        )
    )
    add(
        Case(
            "r9_raw_part_named_codes",
            9,
            _mut(lambda h: _rename_part(h, "blk.r", "data", "codes")),
            mentions=["blk.r"],
        )
    )
    add(
        Case(
            "r9_codes_dtype_int8",
            9,
            _mut(_set(["blk.w", "parts", "codes", "dtype"], "int8")),
            mentions=["blk.w", "codes"],
        )
    )
    add(
        Case(
            "r9_scales_shape_transposed",
            9,
            _mut(_set(["blk.w", "parts", "scales", "shape"], [6, 2])),
            mentions=["blk.w", "scales"],
        )
    )
    add(
        Case(
            "r9_scales_dtype_mismatch",
            9,
            _mut(_set(["blk.w", "parts", "mins", "dtype"], "bfloat16")),
            mentions=["blk.w", "mins"],
        )
    )
    add(
        Case(
            "r9_codes_length_short",
            9,
            _mut(lambda h: _shrink(h, "blk.w", "codes")),
            mentions=["blk.w", "codes"],
        )
    )
    add(
        Case(
            "r9_raw_length",
            9,
            _mut(lambda h: _shrink(h, "blk.r", "data")),
            mentions=["blk.r", "data"],
        )
    )
    add(
        Case(
            "r9_raw_dtype_differs",
            9,
            _mut(_set(["blk.r", "parts", "data", "dtype"], "uint32")),
            mentions=["blk.r", "data"],
        )
    )
    add(
        Case(
            "r9_shape_changed_parts_not",
            9,
            _mut(_set(["blk.w", "shape"], [9, 6])),
            mentions=["blk.w"],
        )
    )

    def huge_codes(h):
        t = _tensor(h, "blk.n")
        t["shape"] = [2**62, 1]  # N*4 bits overflows u64 when computed in bits
        t["encoding"]["group_size"] = 1
        t["encoding"]["axis"] = 1

    add(Case("r9_codes_length_overflow", 9, _mut(huge_codes), mentions=["blk.n"]))
    add(
        Case(
            "r9_compression_zstd",
            9,
            _mut(_set(["blk.r", "parts", "data", "compression"], "zstd")),
            mentions=["blk.r", "compression"],
        )
    )

    # --- rule 10: offsets -----------------------------------------------------------------------
    add(
        Case(
            "r10_offset_unaligned",
            10,
            _mut(lambda h: _shift(h, "blk.s", "scales", 3)),
            mentions=["blk.s", "scales"],
        )
    )
    add(
        Case(
            "r10_offset_past_end",
            10,
            _mut(_set(["blk.r", "parts", "data", "offset"], R.align_up(len(d0), 64))),
            mentions=["blk.r", "data"],
        )
    )
    add(
        Case(
            "r10_end_past_data",
            10,
            _mut(lambda h: _shift(h, "blk.r", "data", 64)),
            mentions=["blk.r", "data"],
        )
    )
    add(
        Case(
            "r10_offset_overflow",
            10,
            _mut(_set(["blk.w", "parts", "codes", "offset"], 2**64 - 64)),
            mentions=["blk.w", "codes"],
        )
    )
    add(Case("r10_truncated_data", 10, blob[:-1], mentions=["blk.r"]))

    # --- rule 11: overlap -----------------------------------------------------------------------
    add(
        Case(
            "r11_overlap_same_tensor",
            11,
            _mut(lambda h: _alias(h, ("blk.w", "mins"), ("blk.w", "scales"))),
            mentions=["blk.w"],
        )
    )
    add(
        Case(
            "r11_overlap_across_tensors",
            11,
            _mut(lambda h: _alias(h, ("blk.n", "scales"), ("blk.s", "scales"))),
            mentions=["scales"],
        )
    )

    # --- rule 12: checksum strings --------------------------------------------------------------
    for cid, value in (
        ("short", "xxh3-64:123"),
        ("other_algo", "md5:0123456789abcdef"),
        ("not_hex", "xxh3-64:" + "g" * 16),
        ("17_digits", "xxh3-64:" + "0" * 17),
        ("int", 12345),
    ):
        add(
            Case(
                f"r12_checksum_{cid}",
                12,
                _mut(_set(["blk.s", "parts", "codes", "checksum"], value)),
                mentions=["blk.s", "codes"],
            )
        )
    add(
        Case(
            "r12_checksum_missing",
            12,
            _mut(_del(["blk.s", "parts", "codes", "checksum"])),
            mentions=["blk.s"],
        )
    )
    return out


def _rename_part(h, tname, old, new):
    parts = _tensor(h, tname)["parts"]
    parts[new] = parts.pop(old)


def _shrink(h, tname, part):
    rec = _tensor(h, tname)["parts"][part]
    rec["length"] -= 1


def _shift(h, tname, part, delta):
    rec = _tensor(h, tname)["parts"][part]
    rec["offset"] += delta


def _alias(h, a, b):
    """Point part a at the offset of part b (same length in the base file, so only overlap is
    wrong)."""
    ra = _tensor(h, a[0])["parts"][a[1]]
    rb = _tensor(h, b[0])["parts"][b[1]]
    ra["offset"] = rb["offset"]


def valid_variants() -> list[tuple[str, bytes]]:
    """Files that look unusual but are valid (a reader must accept them)."""
    h0, d0 = base()
    out = [("base", R.assemble(h0, d0))]

    def unknown_keys(h):
        h["future_top_level"] = {"x": [1, 2]}
        t = _tensor(h, "blk.w")
        t["future_tensor_key"] = True
        t["encoding"]["future_param"] = "ignored"
        t["parts"]["codes"]["future_part_key"] = 1

    out.append(("unknown_keys_ignored", _mut(unknown_keys)))
    out.append(("no_metadata", _mut(_del(["metadata"]))))
    out.append(("name_1024_bytes", _mut(_set(["blk.s", "name"], "é" * 512))))

    def parts_reordered(h):
        t = _tensor(h, "blk.w")
        t["parts"] = {k: t["parts"][k] for k in ("mins", "scales", "codes")}

    out.append(("parts_object_reordered", _mut(parts_reordered)))

    def explicit_nf4_bits(h):
        _tensor(h, "blk.n")["encoding"]["bits"] = 4

    out.append(("nf4_with_bits_4", _mut(explicit_nf4_bits)))
    # extra header padding: data_start two alignments further than needed
    text = json.dumps(h0, separators=(",", ":")).encode()
    pad = R.align_up(24 + len(text), 64) - 24 - len(text) + 128
    out.append(
        ("extra_header_padding", R.assemble(None, d0, alignment=1, header_text=text + b" " * pad))
    )
    out.append(
        (
            "pretty_printed_header",
            R.assemble(None, d0, header_text=json.dumps(h0, indent=2).encode()),
        )
    )
    return out


def huge_group_size_file() -> tuple[bytes, np.ndarray]:
    """A valid file whose group_size is u64::MAX (one group per axis); returns (blob, expected
    fp32)."""
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    enc = {
        "name": "affine",
        "bits": 4,
        "group_size": 2**64 - 1,
        "axis": 0,
        "scale_dtype": "float16",
    }
    entry = R.make_entry("huge.g", x, enc)
    blob = R.file_bytes([entry])
    expected = R.dequantize(
        {
            "codes": entry[4]["codes"][0],
            "scales": entry[4]["scales"][0],
            "mins": entry[4]["mins"][0],
        },
        enc,
        x.shape,
        "float32",
    )
    return blob, expected


def rank32_file() -> bytes:
    x = np.arange(2, dtype=np.int16).reshape([1] * 31 + [2])
    return R.file_bytes([R.make_entry("rank32", x, {"name": "raw"})])
