"""Helpers shared by the tests: input generation, dtype conversions, encoding constructors.

Nothing here imports qtensors at module level, so the reference-only tests run without it.
"""

from __future__ import annotations

import numpy as np
import reference as R
import torch
from hypothesis import strategies as st

NP_FLOAT = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
TORCH_DTYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# unsigned wide types exist in recent torch (limited ops, but storage/view works)
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        TORCH_DTYPES[_name] = getattr(torch, _name)
TORCH_TO_NAME = {v: k for k, v in TORCH_DTYPES.items()}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# ------------------------------------------------------------------------------------------------
# encodings
# ------------------------------------------------------------------------------------------------


def ref_dict(kind: str, bits: int, group_size: int, axis: int, scale_dtype: str, rank: int) -> dict:
    """The header encoding dict, built independently of qtensors (axis normalized)."""
    if kind == "raw":
        return {"name": "raw"}
    a = R.normalize_axis(axis, rank)
    if kind == "nf4":
        return {"name": "nf4", "group_size": group_size, "axis": a, "scale_dtype": scale_dtype}
    if kind == "symmetric_full":
        d = ref_dict("symmetric", bits, group_size, axis, scale_dtype, rank)
        return {**d, "levels": "full"}
    return {
        "name": kind,
        "bits": bits,
        "group_size": group_size,
        "axis": a,
        "scale_dtype": scale_dtype,
    }


def qt_encoding(kind: str, bits: int, group_size: int, axis: int, scale_dtype: str):
    import qtensors as qt

    if kind == "affine":
        return qt.Affine(bits=bits, group_size=group_size, axis=axis, scale_dtype=scale_dtype)
    if kind == "symmetric":
        return qt.Symmetric(bits=bits, group_size=group_size, axis=axis, scale_dtype=scale_dtype)
    if kind == "symmetric_full":
        return qt.Symmetric(
            bits=bits, group_size=group_size, axis=axis, scale_dtype=scale_dtype, levels="full"
        )
    if kind == "nf4":
        return qt.NF4(group_size=group_size, axis=axis, scale_dtype=scale_dtype)
    if kind == "raw":
        return qt.Raw()
    raise AssertionError(kind)


def same_encoding(got: dict, want: dict) -> bool:
    """Header encoding dicts equal; an nf4 dict may carry the implied ``bits: 4`` (or not)."""

    def norm(d):
        d = dict(d)
        if d.get("name") == "nf4" and d.get("bits") == 4:
            del d["bits"]
        return d

    return norm(got) == norm(want)


# ------------------------------------------------------------------------------------------------
# dtype plumbing
# ------------------------------------------------------------------------------------------------


def torch_from_bits(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """A torch tensor of ``dtype`` (bfloat16 / float8) from its raw bit patterns."""
    bits = np.array(bits, order="C")  # keeps 0-d shapes (ascontiguousarray would not)
    tdt = TORCH_DTYPES[dtype]
    size = torch.tensor([], dtype=tdt).element_size()
    carrier = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[size]
    return torch.from_numpy(bits.view(carrier).copy()).view(tdt)


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """Raw bit patterns of a torch tensor as unsigned numpy integers of the same width."""
    t = t.detach().cpu().contiguous()
    size = t.element_size()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy()
    return t.view(_SAME_SIZE_INT[size]).numpy().view(_NP_BITS[size])


def np_bits(a: np.ndarray) -> np.ndarray:
    a = np.array(a, order="C")
    if a.dtype == np.bool_:
        return a.view(np.uint8)
    return a.view(_NP_BITS[a.dtype.itemsize])


def to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    """Logical numpy value (bf16/float8 as bits) -> torch tensor."""
    if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return torch_from_bits(x, dtype)
    return torch.from_numpy(np.array(x, order="C"))


def logical_of_torch(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """torch tensor -> (reference logical value, dtype name)."""
    name = TORCH_TO_NAME[t.dtype]
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return torch_bits(t), name
    return t.detach().cpu().contiguous().numpy(), name


def as_np(part):
    """A part of a QuantizedTensor as numpy (torch parts: bf16 -> uint16 bits); None stays None."""
    if part is None:
        return None
    if isinstance(part, torch.Tensor):
        if part.dtype == torch.bfloat16:
            return torch_bits(part)
        return part.detach().cpu().contiguous().numpy()
    return np.asarray(part)


def scales_bits(arr: np.ndarray) -> np.ndarray:
    """Bit patterns of a stored scales/mins array (fp16/fp32 values, or bf16 already as uint16)."""
    return np_bits(np.asarray(arr))


def assert_stored_equal(got, want: np.ndarray, what: str, signed_zero_ok: bool = False):
    """A stored scale/min array equals the reference bit for bit (optionally +0.0 == -0.0)."""
    got = as_np(got)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.size == want.size, f"{what}: {got.size} elements, expected {want.size}"
    gb, wb = scales_bits(got).reshape(-1), scales_bits(want).reshape(-1)
    diff = gb != wb
    if signed_zero_ok:
        magnitude = np.array(
            (1 << (8 * want.dtype.itemsize - 1)) - 1, dtype=gb.dtype
        )  # all bits but the sign
        both_zero = ((gb & magnitude) == 0) & ((wb & magnitude) == 0)
        diff &= ~both_zero
    if diff.any():
        i = int(np.flatnonzero(diff)[0])
        raise AssertionError(
            f"{what}: element {i} differs: got {got.reshape(-1)[i]!r}, "
            f"expected {want.reshape(-1)[i]!r}"
        )


def fp32_spacing(v) -> np.ndarray:
    v = np.abs(np.asarray(v, dtype=np.float32))
    return np.spacing(v).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# the spec's error bounds
# ------------------------------------------------------------------------------------------------


def per_element_group_stats(x32: np.ndarray, shape, axis, g):
    """lo, hi, absmax of each element's group, as float64 arrays of the tensor's (P, L, Q)
    layout."""
    P, L, Q, G = R.group_layout(shape, axis, g)
    v = x32.astype(np.float64).reshape(P, L, Q)
    lo, hi, am = np.empty_like(v), np.empty_like(v), np.empty_like(v)
    for k in range(G):
        sl = slice(k * g, min((k + 1) * g, L))
        lo[:, sl, :] = v[:, sl, :].min(axis=1, keepdims=True)
        hi[:, sl, :] = v[:, sl, :].max(axis=1, keepdims=True)
        am[:, sl, :] = np.abs(v[:, sl, :]).max(axis=1, keepdims=True)
    return lo, hi, am


def expand(stored: np.ndarray, sd: str, shape, axis, g):
    P, L, Q, G = R.group_layout(shape, axis, g)
    return (
        R.storage_to_fp32(stored, sd).astype(np.float64).reshape(P, G, Q)[:, R.group_index(L, g), :]
    )


def spec_error_bound(kind, bits, x32, q, shape, axis, g, sd):
    """The spec's bound on |x - x_hat| per element (sections 4.5-4.7), plus fp32 rounding slack."""
    lo, hi, am = per_element_group_stats(x32, shape, axis, g)
    s = expand(q["scales"], sd, shape, axis, g)
    v = np.abs(x32.astype(np.float64).reshape(s.shape))
    eps = 2.0**-23
    if kind == "affine":
        qmax = 2**bits - 1
        m = expand(q["mins"], sd, shape, axis, g)
        bound = s / 2 + np.abs(lo - m) + qmax * np.abs(s - (hi - lo) / qmax)
        slack = 4 * eps * (v + np.abs(m) + qmax * s)
    elif kind == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        bound = s / 2 + qmax * np.abs(s - am / qmax)
        slack = 4 * eps * (v + qmax * s)
    elif kind == "symmetric_full":
        # a whole step on the side opposite the peak, which clamps to level zero - 1
        zero = 2 ** (bits - 1)
        s = np.abs(s)
        bound = s + zero * np.abs(s - am / zero)
        slack = 4 * eps * (v + zero * s)
    else:  # nf4: half the widest gap between levels, plus the rounding of the stored absmax
        bound = s * 0.152 + np.abs(am - s)
        slack = 4 * eps * (v + s)
    return bound + slack + 1e-45


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

MODES = ("normal", "uniform", "positive", "grid", "flat", "sparse", "outlier", "tiny")


def make_values(seed: int, shape, mode: str, mag: float) -> np.ndarray:
    """Deterministic float64 test values of ``shape``."""
    rng = np.random.default_rng(seed)
    n = R.prod(shape)
    if mode == "normal":
        v = rng.standard_normal(n) * mag
    elif mode == "uniform":
        v = rng.uniform(-mag, mag, n)
    elif mode == "positive":
        v = rng.uniform(0, mag, n) + mag
    elif mode == "grid":  # many repeated values and exact ties
        v = rng.integers(-8, 9, n) * (mag / 8)
    elif mode == "flat":
        v = np.full(n, rng.standard_normal() * mag)
    elif mode == "sparse":  # zeros of both signs
        v = rng.standard_normal(n) * mag * (rng.random(n) < 0.3)
    elif mode == "outlier":
        v = rng.standard_normal(n) * mag
        if n:
            v[rng.integers(0, n)] *= 40
    elif mode == "tiny":  # scales underflow in fp16 / bf16 subnormals
        v = rng.standard_normal(n) * 1e-7
    else:
        raise AssertionError(mode)
    return v.reshape(shape)


def logical_input(v64: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> the logical value of ``dtype`` (bf16 as uint16 bits)."""
    if dtype == "bfloat16":
        return R.fp32_to_bf16_bits(v64.astype(np.float32))
    with np.errstate(over="ignore"):
        return v64.astype(NP_FLOAT[dtype])


@st.composite
def shapes(draw, max_rank: int = 3, max_dim: int = 9):
    rank = draw(st.integers(0, max_rank))
    dims = draw(st.lists(st.integers(0, max_dim), min_size=rank, max_size=rank))
    if rank and draw(st.booleans()):
        # sometimes one longer axis so that group sizes of 32..128 matter
        i = draw(st.integers(0, rank - 1))
        dims[i] = draw(st.integers(10, 140))
    return tuple(dims)


group_sizes = st.one_of(
    st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128]), st.integers(1, 200)
)
scale_dtypes = st.sampled_from(["float16", "bfloat16", "float32"])
magnitudes = st.sampled_from([1e-3, 0.02, 1.0, 37.0, 1000.0])


@st.composite
def cases(
    draw,
    kinds=("affine", "symmetric", "symmetric_full", "nf4"),
    in_dtypes=("float32", "float16", "float64", "bfloat16"),
):
    """A quantization case: dict(kind, bits, group_size, axis, scale_dtype, shape, dtype,
    values)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "affine":
        bits = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    elif kind in ("symmetric", "symmetric_full"):
        bits = draw(st.sampled_from([2, 3, 4, 5, 8]))
    else:
        bits = 4
    shape = draw(shapes())
    r = max(len(shape), 1)
    axis = draw(st.integers(-r, r - 1))
    g = draw(group_sizes)
    sd = draw(scale_dtypes)
    dtype = draw(st.sampled_from(in_dtypes))
    mode = draw(st.sampled_from(MODES))
    mag = draw(magnitudes)
    seed = draw(st.integers(0, 2**32 - 1))
    values = logical_input(make_values(seed, shape, mode, mag), dtype)
    return dict(
        kind=kind,
        bits=bits,
        group_size=g,
        axis=axis,
        scale_dtype=sd,
        shape=shape,
        dtype=dtype,
        values=values,
    )


def tiny_bert(seed: int = 0):
    """A 2-layer random BERT (hidden 64) for the tests that run a real transformers model."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def sm90_sass(kernel) -> str:
    """The SASS of a kernel Triton compiled for sm_90 (on the CPU: Triton's bundled
    ``cuobjdump`` disassembles its cubin)."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


# opcodes whose first register operand is not written (stores, barriers, the products' own)
_SASS_NO_DEST = tuple(
    "ST BRA BAR HGMMA SYNCS RED EXIT RET WARPGROUP UTM MEMBAR FENCE NOP CALL BSYNC BSSY "
    "WARPSYNC DEPBAR CCTL ELECT YIELD".split()
)


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of each line of ``cuobjdump -sass``."""
    import re

    out = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), re.sub(r"^@!?U?P[T\d]+\s+", "", m.group(2))))
    return out


def _sass_written(ins: str) -> set[int]:
    """The registers an instruction writes (its first operand, widened by .64 / .128)."""
    import re

    op, _, rest = ins.partition(" ")
    m = re.match(r"R(\d+)\b", rest.strip())
    if op.startswith(_SASS_NO_DEST) or not m:
        return set()
    width = 4 if ".128" in op else 2 if (".64" in op or "WIDE" in op) else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def wgmma_operand_hazards(sass: str) -> list[tuple[str, str]]:
    """Instructions that write a register an ``HGMMA`` in flight reads as its A operand: the
    PTX manual makes that undefined (triton-lang/triton#9433). Walks the code in order, the
    loop holding the products twice (so a product issued at its end is in flight at its top);
    a group ends at the ``HGMMA`` marked ``gsb0`` and ``WARPGROUP.DEPBAR.LE gsb0, N`` retires
    all but the last N groups."""
    import re

    ins = _sass_instructions(sass)
    addrs = [a for a, _ in ins]
    products = [a for a, t in ins if t.startswith("HGMMA")]
    order = list(range(len(ins)))
    for a, t in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", t)
        start = int(m.group(1), 16) if m else a
        if start < a and any(start <= p <= a for p in products):
            top, end = addrs.index(start), addrs.index(a)
            order = list(range(end + 1)) + list(range(top, len(ins)))
            break
    found, in_flight, group = [], [], set()
    for k in order:
        a, t = ins[k]
        if t.startswith("WARPGROUP.DEPBAR"):
            keep = int(t.rsplit(",", 1)[1], 16)
            in_flight = in_flight[len(in_flight) - keep :] if keep else []
        elif t.startswith("HGMMA"):
            m = re.match(r"HGMMA\S*\s+R\d+,\s*R(\d+),", t)
            if m:  # A from registers: 4 of them a product
                group |= set(range(int(m.group(1)), int(m.group(1)) + 4))
            if "gsb0" in t:
                in_flight.append(group)
                group = set()
        elif _sass_written(t) & set().union(group, *in_flight):
            found.append((hex(a), t))
    return found


def imma_loop(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of the loop holding the most ``IMMA`` products: the longest
    backward branch that encloses one, conditional or not (ptxas may test at the top), but not
    the jump back from an out-of-line retry of a barrier wait (a conditional branch spinning on
    the wait just before it); empty without one."""
    import re

    ins = _sass_instructions(sass)
    loops = []
    spin = False  # the previous instruction: a conditional branch back to just before it
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?P\d+\s+)?(\S+)\s*([^;]*)", line)
        if not m:
            continue
        a, pred, op, rest = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
        t = re.match(r"(0x[0-9a-f]+)", rest) if op == "BRA" else None
        start = int(t.group(1), 16) if t else None
        if start is not None and start < a and not (pred is None and spin):
            if any(start <= b <= a and u.startswith("IMMA") for b, u in ins):
                loops.append((start, a))
        spin = pred is not None and start is not None and a - 0x20 <= start < a
    if not loops:
        return []
    top, end = max(loops, key=lambda se: se[1] - se[0])
    return [(a, t) for a, t in ins if top <= a <= end]


def loop_loads_read_in_loop(sass: str) -> list[tuple[str, str]]:
    """In the loop holding the most ``IMMA`` products (the longest backward branch that encloses
    one), the 32-bit global loads (``LDG.E R``, the Gluon W4A8 kernels' scale loads) whose
    register an instruction after them, before the back-edge, reads: the warp waits for that
    load there, in the iteration that issued it, however far ahead its value was wanted.
    Returns (load, reader) pairs."""
    import re

    body = imma_loop(sass)
    found = []
    for k, (_a, t) in enumerate(body):
        m = re.match(r"LDG\.E\s+R(\d+),", t)
        if not m:
            continue
        reg = re.compile(rf"\bR{m.group(1)}\b")
        for _b, u in body[k + 1 :]:
            sources = u.partition(" ")[2].partition(",")[2]
            if reg.search(sources):
                found.append((t, u))
                break
            if int(m.group(1)) in _sass_written(u):
                break  # overwritten unread
    return found
