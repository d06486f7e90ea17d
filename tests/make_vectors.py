"""Generate the spec's test vectors (spec/vectors/) with the independent reference writer.

    python tests/make_vectors.py [OUT_DIR]     # default: spec/vectors next to this repo's tests/

Every vector is deterministic (seeded), so running this again reproduces identical bytes.
For each NAME it writes NAME.qtensors, NAME.expected.npz (the decoded value of every tensor) and one
MANIFEST.json for all of them. In the .npz, bfloat16 values are stored as their uint16 bit patterns
and float8 values as their uint8 bit patterns (numpy has no such dtypes); raw tensors must match bit
for bit (they may hold NaN).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "spec", "vectors")


def affine(bits, g, axis, sd="float16"):
    return {"name": "affine", "bits": bits, "group_size": g, "axis": axis, "scale_dtype": sd}


def symmetric(bits, g, axis, sd="float16"):
    return {"name": "symmetric", "bits": bits, "group_size": g, "axis": axis, "scale_dtype": sd}


def symmetric_full(bits, g, axis, sd="float16"):
    return {**symmetric(bits, g, axis, sd), "levels": "full"}


def nf4(g, axis, sd="float16"):
    return {"name": "nf4", "group_size": g, "axis": axis, "scale_dtype": sd}


def fp4(name, axis):
    """mxfp4 / nvfp4 with their fixed parameters written out, as writers write them."""
    fixed = {"mxfp4": (32, "uint8"), "nvfp4": (16, "float8_e4m3fn")}[name]
    return {"name": name, "bits": 4, "group_size": fixed[0], "axis": axis, "scale_dtype": fixed[1]}


RAW = {"name": "raw"}


def rng_for(name: str):
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def normal(name, shape, scale=1.0, dtype=np.float32):
    return (rng_for(name).standard_normal(shape) * scale).astype(dtype)


def bf16(values):
    return R.fp32_to_bf16_bits(np.asarray(values, dtype=np.float32))


# Each vector: (name, description, [(tensor_name, value, encoding, dtype_or_None)], metadata,
# alignment)
def vectors():
    out = []

    specials32 = np.array(
        [0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38], np.float32
    )
    specials16 = np.array([[0.0, -0.0, 65504.0], [6e-8, np.inf, np.nan]], np.float16)
    out.append(
        (
            "raw_dtypes",
            "raw encoding of every numpy-representable dtype, bfloat16 as raw bits; "
            "values kept bit for bit",
            [
                ("bool", np.array([True, False, False, True, True]), RAW, None),
                ("uint8", np.array([[0, 1, 255], [128, 7, 64]], np.uint8), RAW, None),
                ("int8", np.array([-128, -1, 0, 127], np.int8), RAW, None),
                ("uint16", np.array([0, 1, 65535], np.uint16), RAW, None),
                ("int16", np.array([[-32768, 2], [3, 32767]], np.int16), RAW, None),
                ("uint32", np.array([0, 4294967295, 123456789], np.uint32), RAW, None),
                (
                    "int32",
                    np.array([[-2147483648, -5, 0], [1, 2, 2147483647]], np.int32),
                    RAW,
                    None,
                ),
                ("uint64", np.array([0, 18446744073709551615], np.uint64), RAW, None),
                (
                    "int64",
                    np.array([-9223372036854775808, -1, 9223372036854775807], np.int64),
                    RAW,
                    None,
                ),
                ("float16", specials16, RAW, None),
                ("float32", specials32, RAW, None),
                ("float64", np.array([np.pi, -0.0, 1e300, np.nan], np.float64), RAW, None),
                (
                    "bfloat16",
                    bf16([[1.0, -2.5, 3.140625, 0.0], [1e30, -1e-30, np.inf, 0.5]]),
                    RAW,
                    "bfloat16",
                ),
                ("empty_i32", np.zeros((0, 3), np.int32), RAW, None),
                ("scalar", np.array(2.5, np.float32), RAW, None),
            ],
            None,
            64,
        )
    )
    out.append(
        (
            "raw_float8",
            "raw float8_e4m3fn / float8_e5m2 tensors (expected values are the uint8 bit patterns)",
            [
                (
                    "e4m3",
                    np.array([0x00, 0x38, 0xB8, 0x7E, 0x01, 0x80, 0x40, 0x7F], np.uint8),
                    RAW,
                    "float8_e4m3fn",
                ),
                (
                    "e5m2",
                    np.array([0x00, 0x3C, 0xBC, 0x7B, 0x7C, 0x01, 0x80, 0x7F], np.uint8),
                    RAW,
                    "float8_e5m2",
                ),
            ],
            None,
            64,
        )
    )
    w = normal("affine_bits.w", (10, 6))
    out.append(
        (
            "affine_bits",
            "affine bits 2,3,4,8 on [10,6] grouped along axis 0 with g=4 (ragged last group of "
            "2), fp16 scales",
            [(f"w.b{b}", w, affine(b, 4, 0), None) for b in (2, 3, 4, 8)],
            None,
            64,
        )
    )
    w = normal("affine_odd_bits.w", (5, 7), scale=3.0)
    out.append(
        (
            "affine_odd_bits",
            "affine bits 1,5,6,7 on [5,7] along the last axis, g=3 (codes cross byte boundaries)",
            [(f"w.b{b}", w, affine(b, 3, 1), None) for b in (1, 5, 6, 7)],
            None,
            64,
        )
    )
    out.append(
        (
            "affine_axes",
            "affine 4-bit: last axis ragged, 3-D with the middle axis, 3-D first and last axes",
            [
                ("last", normal("affine_axes.last", (6, 10)), affine(4, 4, 1), None),
                ("mid", normal("affine_axes.mid", (3, 7, 4)), affine(4, 3, 1), None),
                ("first3d", normal("affine_axes.first3d", (5, 2, 3)), affine(3, 2, 0), None),
                ("last3d", normal("affine_axes.last3d", (2, 3, 9)), affine(4, 4, 2), None),
                ("vec", normal("affine_axes.vec", (13,)), affine(4, 5, 0), None),
            ],
            None,
            64,
        )
    )
    w = normal("scale_dtypes.w", (8, 12), scale=0.02)
    out.append(
        (
            "scale_dtypes",
            "the same tensor with float16, bfloat16 and float32 scales (affine 4-bit; symmetric "
            "8-bit)",
            [
                ("aff.f16", w, affine(4, 4, 1, "float16"), None),
                ("aff.bf16", w, affine(4, 4, 1, "bfloat16"), None),
                ("aff.f32", w, affine(4, 4, 1, "float32"), None),
                ("sym.bf16", w, symmetric(8, 5, 0, "bfloat16"), None),
                ("sym.f32", w, symmetric(8, 5, 0, "float32"), None),
            ],
            None,
            64,
        )
    )
    w = normal("symmetric.w", (9, 8))
    out.append(
        (
            "symmetric",
            "symmetric (absmax) 2, 4 and 8 bits along axis 0 (ragged) and the last axis",
            [
                ("s2.ax0", w, symmetric(2, 4, 0), None),
                ("s4.ax0", w, symmetric(4, 4, 0), None),
                ("s4.ax1", w, symmetric(4, 3, 1), None),
                ("s8.ax1", w, symmetric(8, 8, 1), None),
            ],
            None,
            64,
        )
    )
    mids = R.NF4_MIDS
    ties = np.concatenate([mids, [1.0]]).astype(np.float32)  # absmax 1 -> s = 1: t = x exactly
    above = np.nextafter(mids, np.float32(np.inf)).astype(np.float32)
    w = normal("nf4.w", (12, 16))
    out.append(
        (
            "nf4",
            "nf4 along the last axis (g=16) and axis 0 (g=5, ragged); values exactly on the fp32 "
            "midpoints "
            "take the lower level, the next float above takes the upper one",
            [
                ("last", w, nf4(16, 1), None),
                ("first", w, nf4(5, 0), None),
                ("ties", ties, nf4(16, 0), None),
                ("above_ties", np.concatenate([above, [1.0]]).astype(np.float32), nf4(16, 0), None),
                ("bf16_scales", w, nf4(8, 1, "bfloat16"), None),
            ],
            None,
            64,
        )
    )
    # amax 6 -> X = 1 (mxfp4); every E2M1 midpoint and its neighbours, both signs, and -0.0.
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    near = np.concatenate(
        [mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(9))]
    )
    mx_ties = np.concatenate([[6.0], near, -near, [-0.0, -0.1, 7.9]]).astype(np.float32)
    mx_ties = np.concatenate([mx_ties, np.zeros(64 - mx_ties.size, np.float32)])
    # nvfp4: amax 2688 -> g = 1 exactly; the second block (amax 6) gets s = 1, so t = x.
    nv_ties = np.concatenate([[2688.0], np.zeros(15), mx_ties[:16], mx_ties[16:32]]).astype(
        np.float32
    )
    scaled = (
        normal("fp4.scaled", (6, 40)) * np.exp2(np.arange(-40, 20, 10, dtype=np.float32))[:, None]
    )
    tiny = np.zeros((2, 16), np.float32)
    tiny[0, 0], tiny[1, :3] = 1.0, [1e-6, -2e-7, 3e-9]  # block scales below 2^-9 clamp up to it
    out.append(
        (
            "fp4",
            "mxfp4 and nvfp4: E2M1 ties (round to the even code) with a unit scale, ragged "
            "last blocks along the last axis and along axis 0, rows over 60 binades, an all-zero "
            "tensor, a block far below the tensor's amax (nvfp4 scale clamped to 2^-9), "
            "bfloat16 values",
            [
                ("mxfp4.ties", mx_ties, fp4("mxfp4", 0), None),
                ("mxfp4.ragged", normal("fp4.mx", (3, 40)), fp4("mxfp4", 1), None),
                ("mxfp4.axis0", normal("fp4.mx0", (37, 3)), fp4("mxfp4", 0), None),
                ("mxfp4.binades", scaled, fp4("mxfp4", 1), None),
                ("mxfp4.zeros", np.zeros((2, 32), np.float32), fp4("mxfp4", 1), None),
                ("mxfp4.bf16", bf16(normal("fp4.mxbf", (4, 32))), fp4("mxfp4", 1), "bfloat16"),
                ("nvfp4.ties", nv_ties, fp4("nvfp4", 0), None),
                ("nvfp4.ragged", normal("fp4.nv", (3, 40)), fp4("nvfp4", 1), None),
                ("nvfp4.axis0", normal("fp4.nv0", (37, 3)), fp4("nvfp4", 0), None),
                ("nvfp4.tiny_block", tiny, fp4("nvfp4", 1), None),
                ("nvfp4.zeros", np.zeros((2, 16), np.float32), fp4("nvfp4", 1), None),
                (
                    "nvfp4.f16",
                    normal("fp4.nvf16", (4, 32), dtype=np.float16),
                    fp4("nvfp4", 1),
                    None,
                ),
            ],
            None,
            64,
        )
    )
    flat = np.repeat(
        np.array([[0.1, -3.0, 7.25]], np.float32), 4, axis=0
    )  # each column is constant
    out.append(
        (
            "edge",
            "flat groups (s = 0 decodes to the min), all-zero groups, a 0-d tensor, one element, "
            "group_size "
            "larger than the axis, empty tensors between non-empty ones",
            [
                ("flat", flat, affine(4, 4, 0), None),
                ("zeros.sym", np.zeros((3, 4), np.float32), symmetric(4, 2, 1), None),
                ("zeros.nf4", np.zeros((3, 4), np.float32), nf4(2, 1), None),
                ("scalar", np.array(-1.75, np.float32), affine(4, 64, 0), None),
                ("one", np.array([3.3], np.float32), affine(8, 64, 0), None),
                ("empty.a", np.zeros((0, 5), np.float32), affine(4, 4, 1), None),
                ("big_group", normal("edge.big_group", (3, 5)), affine(4, 1000, 0), None),
                ("empty.b", np.zeros((4, 0), np.float32), symmetric(8, 4, 0), None),
                ("empty.raw", np.zeros((0,), np.float32), RAW, None),
                ("group1", normal("edge.group1", (2, 3)), affine(2, 1, 1), None),
                ("tail", normal("edge.tail", (7,)), symmetric(4, 3, 0), None),
            ],
            None,
            64,
        )
    )
    # lo = 0, hi = 3 in every row-group: s = 1, m = 0, so x - m = k + 0.5 are exact ties
    grid_a = np.array([[0.0, 3.0, 0.5, 1.5, 2.5, 1.0], [3.0, 0.0, 2.5, 0.5, 1.5, 2.0]], np.float32)
    grid_s = np.array(
        [[7.0, -0.5, 0.5, 1.5, -2.5, 6.5, -6.5, 2.5]], np.float32
    )  # absmax 7 -> s = 1
    out.append(
        (
            "ties",
            "round-half-even ties: affine 2-bit with s = 1 (x - m = k + 0.5), symmetric 4-bit "
            "with s = 1",
            [
                ("affine", grid_a, affine(2, 6, 1), None),
                ("symmetric", grid_s, symmetric(4, 8, 1), None),
            ],
            None,
            64,
        )
    )
    out.append(
        (
            "logical_dtypes",
            "quantized tensors whose logical dtype is float16, bfloat16 (expected as uint16 bits) "
            "and float64",
            [
                ("f16", normal("logical.f16", (6, 5), dtype=np.float16), affine(4, 4, 0), None),
                (
                    "bf16",
                    bf16(normal("logical.bf16", (6, 5))),
                    affine(4, 4, 1, "bfloat16"),
                    "bfloat16",
                ),
                (
                    "f64",
                    normal("logical.f64", (4, 6), dtype=np.float64),
                    symmetric(8, 4, 1, "float32"),
                    None,
                ),
                ("f16.nf4", normal("logical.f16nf4", (4, 8), dtype=np.float16), nf4(4, 1), None),
            ],
            None,
            64,
        )
    )
    out.append(
        (
            "flexgen",
            "the flexgen preset (affine 4-bit, g=64, axis 0, fp16 scales) on a [130,20] weight, "
            "with a raw "
            "bias and an int64 tensor, as save_file's default policy would store them",
            [
                (
                    "layer.weight",
                    normal("flexgen.w", (130, 20), scale=0.05),
                    affine(4, 64, 0),
                    None,
                ),
                ("layer.bias", normal("flexgen.b", (20,)), RAW, None),
                ("position_ids", np.arange(12, dtype=np.int64).reshape(1, 12), RAW, None),
            ],
            {"format": "pt", "source": "make_vectors.py", "note": "ünïcødé ✓"},
            64,
        )
    )
    out.append(
        (
            "align4096",
            "alignment 4096 (every part offset and data_start are multiples of 4096)",
            [
                ("a", normal("align4096.a", (4, 8)), affine(4, 4, 0), None),
                ("b", np.arange(5, dtype=np.int16), RAW, None),
            ],
            None,
            4096,
        )
    )
    out.append(("no_tensors", "a file without tensors, only metadata", [], {"k": "v"}, 64))
    w = normal("symmetric_full.w", (9, 8))
    # peak +8 (a tie with -8: the positive one wins) -> s = -1, t = -x: half-way ties round to
    # even, and -8 clamps to level 7 (decodes to -7)
    tie = np.array([[8.0, -8.0, 0.5, 1.5, -2.5, 3.5, -7.5, 6.5]], np.float32)
    neg = np.array([[-4.0, 1.0, 3.0, -0.25]], np.float32)  # peak -4: s = +0.5
    out.append(
        (
            "symmetric_full",
            'symmetric with levels "full" (all 2^b codes, llama.cpp Q4_0 / Q5_0): 4, 5 and 8 '
            "bits along both axes (ragged), a +/- peak tie, a negative peak, round-half-even "
            "ties, an all-zero group, bfloat16 scales",
            [
                ("f4.ax1", w, symmetric_full(4, 4, 1), None),
                ("f4.ax0", w, symmetric_full(4, 4, 0), None),
                ("f5.ax1", w, symmetric_full(5, 3, 1), None),
                ("f8.ax1", w, symmetric_full(8, 8, 1, "float32"), None),
                ("tie", tie, symmetric_full(4, 8, 1), None),
                ("neg", neg, symmetric_full(4, 4, 1), None),
                ("zeros", np.zeros((2, 4), np.float32), symmetric_full(4, 2, 1), None),
                ("bf16", w, symmetric_full(4, 8, 1, "bfloat16"), None),
            ],
            None,
            64,
        )
    )
    return out


def write_npz(path: str, arrays: dict):
    """Deterministic .npz (fixed zip timestamps), readable by np.load."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.array(arr, order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(2024, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    with open(path, "wb") as fh:
        fh.write(buf.getvalue())


def storage_note(dtype: str) -> str | None:
    if dtype == "bfloat16":
        return "uint16 bit patterns of the bfloat16 values"
    if dtype.startswith("float8"):
        return "uint8 bit patterns of the float8 values"
    return None


def main(out_dir: str = DEFAULT_OUT):
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "format_version": "1.0",
        "generator": "tests/make_vectors.py (independent numpy reference, tests/reference.py)",
        "notes": [
            "NAME.expected.npz holds the decoded value of every tensor of NAME.qtensors, "
            "keyed by tensor name.",
            "bfloat16 values are stored as uint16 bit patterns, float8 values as uint8 bit "
            "patterns.",
            "Compare bit for bit: raw tensors may hold NaN, -0.0 and Inf.",
        ],
        "vectors": [],
    }
    total = 0
    for name, desc, tensors, metadata, alignment in vectors():
        entries = [R.make_entry(tname, x, enc, dtype) for tname, x, enc, dtype in tensors]
        path = os.path.join(out_dir, f"{name}.qtensors")
        R.write_file(path, entries, metadata=metadata, alignment=alignment)
        decoded, md, _ = R.read_file(path, verify=True, strict=True)
        assert md == metadata
        # the raw values must survive bit for bit; the reference decode is the expectation
        expected = {}
        listing = []
        for (tname, x, enc, _dt), (ename, edtype, eshape, eenc, _) in zip(
            tensors, entries, strict=True
        ):
            assert tname == ename
            value = decoded[tname]
            if enc["name"] == "raw":
                assert value.tobytes() == np.ascontiguousarray(x).tobytes()
            expected[tname] = value
            record = {
                "name": tname,
                "dtype": edtype,
                "shape": list(eshape),
                "encoding": eenc,
                "expected_npz_dtype": str(value.dtype),
            }
            if storage_note(edtype):
                record["expected_storage"] = storage_note(edtype)
            listing.append(record)
        npz = os.path.join(out_dir, f"{name}.expected.npz")
        write_npz(npz, expected)
        with open(path, "rb") as fh:
            blob = fh.read()
        total += len(blob) + os.path.getsize(npz)
        manifest["vectors"].append(
            {
                "name": name,
                "file": f"{name}.qtensors",
                "expected": f"{name}.expected.npz",
                "description": desc,
                "alignment": alignment,
                "metadata": metadata,
                "sha256": hashlib.sha256(blob).hexdigest(),
                "tensors": listing,
            }
        )
    with open(os.path.join(out_dir, "MANIFEST.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return total


if __name__ == "__main__":
    total = main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
    print(f"wrote vectors: {total} bytes")
