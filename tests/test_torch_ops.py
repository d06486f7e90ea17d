"""``torch.ops.qtensors.dequantize`` on the CPU (Rust core), plain torch, meta / fake tensors and
``torch.compile``, against the numpy reference of the spec (``tests/reference.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
import torch

from qtensors.torch import ops
from qtensors.torch._layout import normalize_axis

SCALE_T = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OUT_T = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
INT_OF = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def part_to_torch(arr: np.ndarray | None, sd: str) -> torch.Tensor | None:
    """A stored scale / min array of the reference (bf16 as uint16 bits) as a torch tensor."""
    if arr is None:
        return None
    arr = np.ascontiguousarray(arr)
    if sd == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def bits_of(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of a float tensor (exact comparison, signed zeros included)."""
    t = t.detach().cpu().contiguous()
    size = t.element_size()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.view(ints).numpy().view(INT_OF[size])


def ref_bits(parts: dict, enc: dict, shape, out: str) -> np.ndarray:
    v = R.dequantize(parts, enc, shape, out)
    v = np.ascontiguousarray(v)
    return v.view(INT_OF[v.dtype.itemsize])


def make_case(seed: int, shape, kind: str, bits: int, g: int, axis: int, sd: str, random_parts):
    """(parts as the reference holds them, encoding dict). ``random_parts``: random code bytes
    and scales instead of quantizing data (every code value, any scale sign)."""
    rng = np.random.default_rng(seed)
    rank = len(shape)
    enc = {"name": kind, "bits": bits, "group_size": g, "axis": axis, "scale_dtype": sd}
    if kind == "nf4":
        enc["bits"] = 4
    if not random_parts:
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32)
        return R.quantize(x, enc), enc
    n = R.prod(shape)
    codes = rng.integers(0, 256, R.codes_length(n, bits), dtype=np.uint8)
    a = R.normalize_axis(axis, rank)
    ss = R.scale_shape(shape, a, g)
    s = R.scales_to_storage(R.st(rng.standard_normal(ss).astype(np.float32), sd), sd)
    m = R.scales_to_storage(R.st(rng.standard_normal(ss).astype(np.float32), sd), sd)
    return {"codes": codes, "scales": s, "mins": m if kind == "affine" else None}, enc


# deterministic coverage: every bit width of every encoding, ragged groups, ranks 0..4, every
# axis position, every scale and output dtype
SHAPES = [(), (1,), (13,), (5, 7), (16, 64), (33, 20), (3, 4, 5), (2, 3, 4, 5), (64, 3), (1, 130)]
ENCS = [("affine", b) for b in range(1, 9)] + [("symmetric", b) for b in range(2, 9)]
ENCS.append(("nf4", 4))
GROUPS = [1, 2, 3, 5, 8, 16, 64, 100]
CASES = []
for _i in range(96):
    kind, bits = ENCS[_i % len(ENCS)]
    shape = SHAPES[(_i * 7) % len(SHAPES)]
    rank = len(shape)
    axis = (_i % max(rank, 1)) - (1 if _i % 2 and rank else 0)
    CASES.append(
        (
            _i,
            shape,
            kind,
            bits,
            GROUPS[(_i * 5) % len(GROUPS)],
            axis,
            ("float16", "bfloat16", "float32")[_i % 3],
            ("float16", "bfloat16", "float32", "float64")[(_i // 3) % 4],
            bool(_i % 2),
        )
    )


def run_impls(parts, enc, shape, out):
    sd = enc["scale_dtype"]
    codes = torch.from_numpy(np.ascontiguousarray(parts["codes"]).copy())
    scales = part_to_torch(parts["scales"], sd)
    mins = part_to_torch(parts["mins"], sd)
    args = (codes, scales, mins, list(shape), enc["name"], enc["bits"], enc["group_size"])
    a = normalize_axis(enc["axis"], len(shape))
    return {
        "op-cpu": ops.dequantize_op(*args, enc["axis"], OUT_T[out]),
        "torch": ops.dequantize_torch(*args, a, OUT_T[out]),
    }


@pytest.mark.parametrize("i,shape,kind,bits,g,axis,sd,out,random_parts", CASES)
def test_matches_reference(i, shape, kind, bits, g, axis, sd, out, random_parts):
    parts, enc = make_case(i, shape, kind, bits, g, axis, sd, random_parts)
    want = ref_bits(parts, enc, shape, out)
    for name, got in run_impls(parts, enc, shape, out).items():
        assert tuple(got.shape) == tuple(shape), name
        assert got.dtype == OUT_T[out], name
        np.testing.assert_array_equal(bits_of(got).reshape(want.shape), want, err_msg=name)


def test_spec_vectors(vectors_dir, manifest):
    """Every quantized tensor of the spec's test vectors decodes to the expected values."""
    import os

    import qtensors as qt

    n = 0
    for entry in manifest["vectors"]:
        path = os.path.join(vectors_dir, entry["file"])
        expected = np.load(os.path.join(vectors_dir, entry["expected"]))
        with qt.safe_open(path, framework="pt") as f:
            for key in f.keys():
                enc = f.encoding(key)
                if enc["name"] == "raw" or key not in expected.files:
                    continue
                if enc["name"] in ("mxfp4", "nvfp4"):  # not covered by the torch op yet
                    continue
                q = f.get_quantized(key)
                bits = 4 if enc["name"] == "nf4" else enc["bits"]
                dt = f.dtype(key)
                got = ops.dequantize_op(
                    q.codes,
                    q.scales,
                    q.mins,
                    list(q.shape),
                    enc["name"],
                    bits,
                    enc["group_size"],
                    enc["axis"],
                    OUT_T[dt],
                )
                want = np.ascontiguousarray(expected[key])
                np.testing.assert_array_equal(
                    bits_of(got).reshape(want.shape), want.view(INT_OF[want.dtype.itemsize])
                )
                n += 1
    assert n > 0, "no quantized tensor found in the spec vectors"


def _args(shape=(6, 8), kind="affine", bits=4, g=4, axis=-1):
    parts, _ = make_case(0, shape, kind, bits, g, axis, "float16", True)
    codes = torch.from_numpy(parts["codes"].copy())
    s = part_to_torch(parts["scales"], "float16")
    m = part_to_torch(parts["mins"], "float16")
    return [codes, s, m, list(shape), kind, bits, g, axis, torch.float32]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.__setitem__(0, a[0][:-1]), "codes has"),
        (lambda a: a.__setitem__(0, a[0].to(torch.int16)), "uint8"),
        (lambda a: a.__setitem__(1, a[1][:-1]), "scales has"),
        (lambda a: a.__setitem__(1, a[1].to(torch.int16)), "scales must be"),
        (lambda a: a.__setitem__(2, None), "affine needs mins"),
        (lambda a: a.__setitem__(4, "nf5"), "unknown encoding"),
        (lambda a: a.__setitem__(5, 9), "bits"),
        (lambda a: a.__setitem__(6, 0), "group_size"),
        (lambda a: a.__setitem__(7, 2), "axis"),
        (lambda a: a.__setitem__(8, torch.int32), "out_dtype"),
    ],
)
def test_bad_arguments(change, message):
    args = _args()
    change(args)
    with pytest.raises((ValueError, RuntimeError), match=message):
        ops.dequantize_op(*args)


def test_symmetric_rejects_mins():
    args = _args(kind="symmetric")
    args[2] = args[1].clone()
    with pytest.raises((ValueError, RuntimeError), match="no mins"):
        ops.dequantize_op(*args)


def test_meta_and_fake():
    args = _args()
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    out = ops.dequantize_op(*meta)
    assert out.device.type == "meta" and tuple(out.shape) == (6, 8) and out.dtype == torch.float32


def test_opcheck():
    """Schema, fake tensor and AOT dispatch checks of torch.library."""
    for kind, bits, axis in (("affine", 4, -1), ("symmetric", 8, 0), ("nf4", 4, 1)):
        args = _args(kind=kind, bits=bits, axis=axis)
        if kind != "affine":
            args[2] = None
        torch.library.opcheck(torch.ops.qtensors.dequantize.default, tuple(args))


def test_torch_compile_fullgraph():
    args = _args(shape=(12, 16), g=8, axis=0)
    eager = ops.dequantize_op(*args)

    def f(codes, scales, mins, x):
        w = torch.ops.qtensors.dequantize(
            codes, scales, mins, [12, 16], "affine", 4, 8, 0, torch.float32
        )
        return x @ w.t()

    x = torch.randn(3, 16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(args[0], args[1], args[2], x), x @ eager.t())


def test_empty_and_scalar():
    for shape in [(0,), (3, 0), (0, 5)]:
        args = _args(shape=shape, g=2, axis=0)
        out = ops.dequantize_op(*args)
        assert tuple(out.shape) == shape
        out2 = ops.dequantize_torch(*args[:7], 0, torch.float32)
        assert tuple(out2.shape) == shape


def test_unpack_codes_every_width():
    rng = np.random.default_rng(3)
    for bits in range(1, 9):
        for n in (1, 7, 8, 9, 63, 64, 65):
            codes = rng.integers(0, 1 << bits, n)
            packed = R.pack_codes(codes, bits)
            got = ops.unpack_codes_torch(torch.from_numpy(packed), bits, n)
            np.testing.assert_array_equal(got.numpy().astype(np.int64), codes)


def test_decoded_products_take_rows_whatever_the_strides(monkeypatch):
    """The decode + ``F.linear`` paths (``linear_dequantize``, the CUDA route's decode) multiply
    one 2-D matrix of x's rows, for a strided 3-D x too (the last position of each sequence, as
    a batch's prefill hands the LM head): torch 2.11 would not fold such an x and ran a batched
    product with the weight expanded per sequence (60 ms against 0.36 for an 8B LM head at 256
    sequences on the H200). Also an x that ``is_contiguous`` but whose size-1 dim has an odd
    stride (a compiled decode step's ``(batch, 1, hidden)``: matmul's fold checks that stride);
    a truly contiguous 3-D x goes to ``F.linear`` as is. Results equal ``F.linear`` on the
    decoded weight; the backward's product too."""
    import torch.nn.functional as F

    from qtensors.torch import linear as lin

    L = pytest.importorskip("qtensors.torch.kernels.launch")
    torch.manual_seed(0)
    N, K, g = 48, 128, 64
    codes = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8)
    scales = torch.rand(N, K // g) * 0.1
    mins = -torch.rand(N, K // g) * 0.5
    bias = torch.randn(N)
    args = (codes, scales, mins, bias, [N, K], "affine", 4, g, 1)
    w = lin.dequantize(codes, scales, mins, [N, K], "affine", 4, g, 1, torch.float32)
    x = torch.randn(6, 5, K)[:, -1:, :]  # strides (5K, K, 1)
    want = F.linear(x.contiguous(), w, bias)
    shapes = []
    real = F.linear

    def noted(a, *rest):
        shapes.append(tuple(a.shape))
        return real(a, *rest)

    monkeypatch.setattr(lin.F, "linear", noted)
    torch.testing.assert_close(lin.linear_dequantize(x, *args), want)
    monkeypatch.setattr(L, "route", lambda *a: "decode")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA
    torch.testing.assert_close(lin.linear_cuda(x, *args), want)
    assert shapes == [(6, K), (6, K)]
    odd = torch.randn(6 * K * 2).as_strided((6, 1, K), (K, 7, 1))  # is_contiguous(), 7 on the 1
    assert odd.is_contiguous() and not lin.rows_fold(odd)
    for given, passed in ((odd, (6, K)), (odd.view(6, 1, K), (6, 1, K))):  # view: (K, K, 1)
        shapes.clear()
        want = real(given.contiguous(), w, bias)
        torch.testing.assert_close(lin.linear_dequantize(given, *args), want)
        torch.testing.assert_close(lin.linear_cuda(given, *args), want)
        assert shapes == [passed, passed]
    monkeypatch.setattr(lin.F, "linear", real)
    xg = x.clone().requires_grad_(True)
    torch.ops.qtensors.linear(xg, *args).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(6, 1, K))
