"""Probe (H200): batch-1 GEMV kernel variants for 4-bit groups along K, against the routed op and
cuBLAS, CUDA-graph timed; then the eager host overhead of each layer of the call.

    OUT=DIR python3 benches/probe_gemv_variants.py
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench_gpu_gemv_sweep import Case, copy_gbps, graph_us, routed  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.kernels.epilogue import store_result  # noqa: E402
from qtensors.torch.kernels.tiled import _interleave8  # noqa: E402

LINES: list[str] = []


def say(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


@triton.jit
def _f(c):
    # 1 + c / 16 from bits
    return ((c << 19) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M"])
def wx_kernel(
    x_ptr, words_ptr, scales_ptr, mins_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, row_words, G, k_split_w,
    ENC: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr, C1: tl.constexpr,
):  # fmt: skip
    WPG: tl.constexpr = GS // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
    kw_lo = pid_k * k_split_w
    kw_hi = tl.minimum(row_words, kw_lo + k_split_w)
    j8 = tl.arange(0, 8)
    for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        if C1:
            kw = tl.max_contiguous(kw, 1)
        kmask = kw < kw_hi
        m2 = rmask[:, None] & kmask[None, :]
        w = tl.load(words_ptr + rows[:, None] * row_words + kw[None, :], mask=m2, other=0)
        f = _f(_interleave8(w, 4).reshape(BLOCK_N, BLOCK_KW, 8))
        x = tl.load(x_ptr + kw[:, None] * 8 + j8[None, :], mask=kmask[:, None], other=0.0)
        x = x.to(tl.float32)
        d = tl.sum(f * x[None, :, :], axis=2)
        X = tl.sum(x, axis=1)
        sidx = rows[:, None] * G + (kw // WPG)[None, :]
        s = tl.load(scales_ptr + sidx, mask=m2, other=0.0).to(tl.float32) * 16.0
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=m2, other=0.0).to(tl.float32) - s
        else:
            off = -1.5 * s
        acc += d * s + off * X[None, :]
    m_ids = tl.arange(0, 1)
    part = tl.sum(acc, axis=1)[None, :]
    store_result(part, m_ids, rows, 1, N, out_ptr, 0, out_ptr, ws_ptr, lock_ptr, pid_n, pid_k,
                 False, SPLIT_K)  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def grp_kernel(
    x_ptr, words_ptr, scales_ptr, mins_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, row_words, G, k_split_w,
    ENC: tl.constexpr, GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SPLIT_K: tl.constexpr, C1: tl.constexpr,
):  # fmt: skip
    WPG: tl.constexpr = GS // 8
    NG: tl.constexpr = BLOCK_KW // WPG
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N, NG), tl.float32)
    kw_lo = pid_k * k_split_w
    kw_hi = tl.minimum(row_words, kw_lo + k_split_w)
    gi = tl.arange(0, NG)
    wi = tl.arange(0, WPG)
    j8 = tl.arange(0, 8)
    for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
        if C1:
            kw = tl.max_contiguous(kw0 + tl.arange(0, BLOCK_KW), 1).reshape(NG, WPG)
        else:
            kw = kw0 + gi[:, None] * WPG + wi[None, :]  # [NG, WPG]
        kmask = kw < kw_hi
        m3 = rmask[:, None, None] & kmask[None, :, :]
        w = tl.load(words_ptr + rows[:, None, None] * row_words + kw[None, :, :], mask=m3, other=0)
        f = _f(_interleave8(w, 4).reshape(BLOCK_N, NG, WPG, 8))
        xi = kw[:, :, None] * 8 + j8[None, None, :]
        x = tl.load(x_ptr + xi, mask=kmask[:, :, None], other=0.0).to(tl.float32)
        d = tl.sum(tl.sum(f * x[None, :, :, :], axis=3), axis=2)  # [BN, NG]
        X = tl.sum(tl.sum(x, axis=2), axis=1)  # [NG]
        gidx = kw0 // WPG + gi
        gmask = rmask[:, None] & (gidx * WPG < kw_hi)[None, :]
        sidx = rows[:, None] * G + gidx[None, :]
        s = tl.load(scales_ptr + sidx, mask=gmask, other=0.0).to(tl.float32) * 16.0
        if ENC == 0:
            off = tl.load(mins_ptr + sidx, mask=gmask, other=0.0).to(tl.float32) - s
        else:
            off = -1.5 * s
        acc += d * s + off * X[None, :]
    m_ids = tl.arange(0, 1)
    part = tl.sum(acc, axis=1)[None, :]
    store_result(part, m_ids, rows, 1, N, out_ptr, 0, out_ptr, ws_ptr, lock_ptr, pid_n, pid_k,
                 False, SPLIT_K)  # fmt: skip


KERNELS = {"wx": wx_kernel, "grp": grp_kernel}


def launch(kind, x, w, bn, kw_step, warps, stages, waves, c1=False):
    name, _bits, g = w.enc
    N, K = w.N, w.K
    row_words = K // 8
    n_tiles = -(-N // bn)
    steps = -(-row_words // kw_step)
    split = L._pick_split(n_tiles, steps, L._sm_count(0), waves)
    k_split_w = -(-steps // split) * kw_step
    split = -(-row_words // k_split_w)
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, 1, N), dtype=torch.float32, device=x.device) if split > 1 else out
    locks = L._locks(x.device)
    KERNELS[kind][(n_tiles, split)](
        x, w.codes.view(torch.int32), w.scales, w.scales if w.mins is None else w.mins,
        out, ws, locks, 1, N, row_words, -(-K // g), k_split_w,
        ENC=0 if name == "affine" else 1, GS=g, BLOCK_N=bn, BLOCK_KW=kw_step, SPLIT_K=split, C1=c1,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


VARIANTS = [
    ("grp", 8, 128, 4, 2, 4, True),
    ("grp", 4, 128, 4, 2, 4, True),
    ("grp", 16, 128, 4, 2, 4, True),
    ("grp", 8, 64, 2, 2, 4, True),
    ("grp", 8, 256, 8, 2, 4, True),
    ("grp", 8, 128, 4, 1, 4, True),
    ("grp", 8, 128, 4, 3, 8, True),
    ("wx", 8, 128, 4, 2, 4, True),
    ("wx", 4, 128, 4, 2, 4, True),
    ("wx", 16, 128, 4, 2, 4, True),
]
OLD = [
    ("wx", 8, 64, 4, 2, 4),
    ("wx", 8, 128, 4, 2, 4),
    ("wx", 16, 64, 4, 2, 4),
    ("wx", 4, 128, 4, 2, 4),
    ("wx", 8, 64, 4, 3, 8),
    ("wx", 16, 128, 8, 2, 4),
    ("wx", 32, 32, 4, 2, 4),
    ("grp", 8, 64, 4, 2, 4),
    ("grp", 16, 64, 4, 2, 4),
    ("grp", 8, 128, 4, 2, 4),
    ("grp", 32, 32, 4, 2, 4),
]


def main() -> None:
    gbps = copy_gbps()
    say(
        f"# probe on {torch.cuda.get_device_name()}, triton {triton.__version__}; "
        f"copy {gbps:.0f} GB/s"
    )
    say("enc               shape        cublas  routed  | variants (us; x vs cublas)")
    best_of: dict = {}
    for ename in ("int4-affine-g64", "int4-affine-g128"):
        for N, K in [(8192, 8192), (4096, 4096), (2048, 5632)]:
            if ename != "int4-affine-g64" and (N, K) not in ((8192, 8192),):
                continue
            case = Case(ename, N, K)
            x = case.x(1)
            cub = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
            rt = case.time(routed, 1)
            cells = []
            for v in VARIANTS:
                kind, bn, kws, warps, stages, waves = v[:6]
                kind += "1" if v[6:] and v[6] else ""
                if False:
                    continue
                try:
                    fn = lambda x, w, v=v: launch(v[0], x, w, *v[1:])  # noqa: E731
                    err = case.check(fn, 1)
                    if not err <= 2e-2:
                        cells.append(f"{v}: WRONG {err:.1e}")
                        continue
                    us = case.time(fn, 1)
                    cells.append(
                        f"{kind}/{bn}/{kws}/{warps}w/{stages}s/{waves}: {us:.1f} ({cub / us:.2f}x)"
                    )
                    best_of.setdefault((ename, N, K), []).append((us, v))
                except Exception as exc:
                    cells.append(f"{v}: {type(exc).__name__} {str(exc)[:100]}")
            bound = case.bound_us(1, gbps)
            say(
                f"{ename:<17} {N:>5}x{K:<5} {cub:7.1f} {rt:7.1f} (x{cub / rt:.2f}) "
                f"bound {bound:.1f}"
            )
            for c in cells:
                say("      " + c)
            del case
            torch.cuda.empty_cache()
    say()
    for k, lst in best_of.items():
        us, v = min(lst)
        say(f"best {k}: {v} {us:.1f} us")


def overhead() -> None:
    """Host time per call of each layer of an eager batch-1 call on a small layer."""
    from qtensors.torch.linear import check_linear_args, linear, linear_cuda

    say()
    say("## eager host overhead, 1 x 2048 -> 2048 int4-affine-g64 bf16 (us per call, 2000 calls)")
    case = Case("int4-affine-g64", 2048, 2048)
    w = case.ws[0]
    x = case.x(1)
    d = case.dense[0]
    name, bits, g = w.enc
    c, s, m = w.codes, w.scales, w.mins

    def t(fn, n=2000):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e6 / n

    rows = {}
    rows["F.linear bf16"] = t(lambda: F.linear(x, d))
    # what a model's forward calls: the modules, bf16 nn.Linear against its int4 QuantizedLinear
    import qtensors as qt
    from qtensors.torch import QuantizedLinear

    dense_mod = torch.nn.Linear(2048, 2048, bias=False, device=x.device, dtype=x.dtype)
    q_mod = QuantizedLinear.from_linear(dense_mod, qt.Affine(bits=4, group_size=64, axis=-1))
    from qtensors.torch import linear as lin

    with torch.inference_mode():
        # replays (linear.REPLAYS) against the full path, alternately, and their outputs
        same = []
        for rnd in range(2):
            for on in (False, True):
                lin.REPLAYS = on
                tag = "replay" if on else "full path"
                rows[f"QuantizedLinear module, {tag} (inference_mode) r{rnd}"] = t(lambda: q_mod(x))
            lin.REPLAYS = False
            want = q_mod(x)
            lin.REPLAYS = True
            same.append(all(torch.equal(q_mod(x), want) for _ in range(3)))
        say(f"  replayed outputs equal the full path's: {all(same)}")
        rows["nn.Linear module (inference_mode)"] = t(lambda: dense_mod(x))
        rows["QuantizedLinear module (inference_mode)"] = t(lambda: q_mod(x))
    rows["torch.empty(1,N)"] = t(lambda: torch.empty((1, 2048), dtype=x.dtype, device=x.device))
    rows["qtensors linear()"] = t(lambda: linear(x, c, s, m, None, [2048, 2048], name, bits, g, 1))
    rows["torch.ops.qtensors.linear"] = t(
        lambda: torch.ops.qtensors.linear(x, c, s, m, None, [2048, 2048], name, bits, g, 1)
    )
    rows["linear_cuda"] = t(lambda: linear_cuda(x, c, s, m, None, [2048, 2048], name, bits, g, 1))
    rows["check_linear_args"] = t(
        lambda: check_linear_args(x, c, s, m, None, [2048, 2048], name, bits, g, 1)
    )
    rows["route"] = t(lambda: L.route(1, 2048, 2048, name, bits, g, 1, L.words_aligned(c)))
    rows["tiled_linear"] = t(lambda: L.tiled_linear(x, c, s, m, None, 2048, 2048, name, bits, g))
    cfg = L.tiled_config(1, 2048, 2048, bits, g)
    kernel, grid, split, k_split, meta, _ = L._tiled_plan(
        1, 2048, 2048, name, bits, g, x.dtype, False, 0, None, True
    )
    out = torch.empty((1, 2048), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, 1, 2048), dtype=torch.float32, device=x.device) if split > 1 else out
    locks = L._locks(x.device)
    args = (x, c.view(torch.int32), s, m, s, s, out, ws, locks, 1, 2048, 2048, 2048 * bits // 32,
            2048 // g, x.stride(0), out.stride(0), k_split)  # fmt: skip
    rows["kernel[grid](...)"] = t(lambda: kernel[grid](*args, **meta))
    ck = kernel[grid](*args, **meta)
    # the compiled kernel's own launcher, every parameter in order (constexprs included)
    names = kernel.arg_names
    consts = {k: v for k, v in meta.items() if k in names}
    full = list(args) + [consts[n] for n in names[len(args) :]]
    stream = torch.cuda.current_stream().cuda_stream
    ck._init_handles()
    run = ck.run

    def direct():
        run(grid[0], grid[1], 1, stream, ck.function, ck.packed_metadata, None, None, None, *full)

    try:
        rows["CompiledKernel.run direct"] = t(direct)
        out_ref = out.clone()
        out.zero_()
        direct()
        torch.cuda.synchronize()
        say(f"  direct launch equals the JIT launch: {torch.equal(out, out_ref)} (cfg {cfg})")
    except Exception as exc:
        say(f"  direct launch failed: {type(exc).__name__}: {exc}")
    for k, v in rows.items():
        say(f"  {k:<28} {v:7.2f}")


def ncu_one() -> None:
    """One routed call and one wx call on 8192 x 8192 (for ncu's counters)."""
    case = Case("int4-affine-g64", 8192, 8192)
    x = case.x(1)
    for _ in range(2):
        launch("grp", x, case.ws[0], 8, 128, 4, 2, 4)
        launch("grp", x, case.ws[0], 8, 128, 4, 2, 4, True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    if "--overhead" in sys.argv:
        try:
            overhead()
        finally:
            if os.environ.get("OUT"):
                os.makedirs(os.environ["OUT"], exist_ok=True)
                with open(os.path.join(os.environ["OUT"], "overhead.txt"), "w") as fh:
                    fh.write("\n".join(LINES) + "\n")
        sys.exit(0)
    if "--ncu" in sys.argv:
        ncu_one()
        sys.exit(0)
    try:
        main()
    finally:
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "probe.txt"), "w") as fh:
                fh.write("\n".join(LINES) + "\n")
