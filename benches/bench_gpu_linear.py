"""Fused quantized linear (``torch.ops.qtensors.linear``) against cuBLAS bf16 / fp16 ``F.linear``
and the old decode-then-``F.linear`` path, on one GPU. Self-contained, no network:

    python3 benches/bench_gpu_linear.py            # tables to stdout; with OUT=DIR also files

1. copy bandwidth: a device-to-device copy of 1 GiB (read + write bytes / time), the bound
   every "HBM share" below is measured against.
2. correctness (before any timing): for every shape, batch and activation dtype, the fused op,
   the old path and cuBLAS against ``F.linear`` in fp32 of the decoded weight (relative error =
   max |diff| / max |reference|); the fused op called twice gives the same bits, and so does its
   replay in a CUDA graph (the split-K counters reset themselves).
3. main table, affine 4-bit g64 (groups along in): shapes (out, in) 4096x4096, 8192x8192,
   14336x4096, 4096x14336, 5632x2048, 2048x5632; batch 1, 16, 256; bf16 and fp16 activations.
   Each path timed inside a CUDA graph (one replay runs the layer over enough weight copies to
   overflow the L2 cache, as a model's layers do; median per call) and eagerly
   (``triton.testing.do_bench`` over the same copies, launch overhead included). HBM share =
   (codes + scales + mins + x + y bytes) / time / copy bandwidth.
4. config sweep (bf16, CUDA graph): launch configurations of both kernels per shape and batch,
   the best printed next to the shape-picked default (``kernels/launch.py``).
5. other encodings (flexgen axis 0, symmetric 4 / 8 bit, NF4, g128, MXFP4, NVFP4) on two
   shapes.
6. eager per-call CPU overhead on a small layer: the fused op through the eager fast path,
   through the dispatcher and as a ``QuantizedLinear``, against ``F.linear`` and the old path.

``--sections check,main,sweep,others,overhead`` (the default: all) runs those only; "check"
always runs first.

``QT_BENCH_DRY=1`` runs every section on the CPU under the Triton interpreter with tiny shapes
(checks the script, not the GPU).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from _common import Report
from _common import graph_us as _common_graph_us

DRY = os.environ.get("QT_BENCH_DRY") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors.torch import QuantizedLinear, QuantizedWeight  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.linear import linear, linear_op  # noqa: E402
from qtensors.torch.ops import dequantize  # noqa: E402

DEV = "cpu" if DRY else "cuda"
SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336), (5632, 2048), (2048, 5632)]
BATCHES = [1, 16, 256]
ACTS = [torch.bfloat16, torch.float16]
ACT_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}
MAIN = ("affine", 4, 64, 1)  # int4-g64, groups along in
OTHERS = {
    "flexgen (affine4 g64 ax0)": ("affine", 4, 64, 0),
    "symmetric4 g64": ("symmetric", 4, 64, 1),
    "nf4 g64": ("nf4", 4, 64, 1),
    "symmetric8 g128": ("symmetric", 8, 128, 1),
    "affine4 g128": ("affine", 4, 128, 1),
    "mxfp4": ("mxfp4", 4, 32, 1),
    "nvfp4": ("nvfp4", 4, 16, 1),
}
FLUSH_BYTES = 256 << 20  # weight copies per timing: enough to overflow the L2 cache
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
if DRY:
    SHAPES = [(48, 64), (32, 128)]
    BATCHES = [1, 16, 33]
    FLUSH_BYTES = 1 << 14

RESULTS: dict[str, Any] = {"device": "", "copy_gbps": 0.0, "check": [], "main": [], "sweep": []}
REPORT = Report()
say = REPORT.say


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


class Weight:
    """Random parts of a quantized [N, K] weight (every code value, small positive scales) and
    what the paths need: its decoded fp32 reference and argument tuples."""

    def __init__(self, N: int, K: int, enc: tuple[str, int, int, int], seed: int) -> None:
        name, bits, g, axis = enc
        gen = torch.Generator(device=DEV).manual_seed(seed)
        self.N, self.K, self.enc = N, K, enc
        sshape = (N, -(-K // g)) if axis == 1 else (-(-N // g), K)
        self.codes = torch.randint(
            0, 256, (N * K * bits // 8,), dtype=torch.uint8, device=DEV, generator=gen
        )
        s = torch.rand(sshape, device=DEV, generator=gen) * 0.02 + 0.002
        self.scales = s.half()
        self.mins = None
        if name == "affine":
            self.mins = (-s * (1 << (bits - 1))).half()
        elif name == "mxfp4":  # E8M0 bytes: 2^-9 .. 2^-4
            self.scales = torch.randint(118, 124, sshape, device=DEV, generator=gen).to(torch.uint8)
        elif name == "nvfp4":  # E4M3 block scales times an fp32 tensor scale
            self.scales = (s * 20000).to(torch.float8_e4m3fn)
            self.mins = torch.tensor([1e-5], device=DEV)

    @property
    def args(self) -> tuple:
        name, bits, g, axis = self.enc
        return (self.codes, self.scales, self.mins, [self.N, self.K], name, bits, g, axis)

    @property
    def nbytes(self) -> int:
        n = self.codes.numel() + self.scales.numel() * 2
        return n + (self.mins.numel() * 2 if self.mins is not None else 0)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(*self.args, dtype)


def fused(x: torch.Tensor, w: Weight, config=None) -> torch.Tensor:
    if config is None:
        return linear(x, *w.args[:3], None, *w.args[3:])
    name, bits, g, axis = w.enc
    return L.fused_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, bits, g, axis, config)


def old_path(x: torch.Tensor, w: Weight) -> torch.Tensor:
    return F.linear(x, w.dense(x.dtype))


def copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(FLUSH_BYTES / max(nbytes, 1))))


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------


def graph_us(calls: list, reps: int = 15) -> float:
    """Median time per call of ``calls`` run back to back inside one CUDA graph (the launch
    configuration is fixed before the capture: no autotuning inside it): ``_common.graph_us``."""
    return _common_graph_us(calls, reps, dry=DRY)


def eager_us(calls: list) -> float:
    """Time per call of ``calls`` launched eagerly one after another (launch overhead shows
    where it exceeds the kernel time)."""

    def run():
        for c in calls:
            c()

    if DRY:
        return graph_us(calls)
    import triton.testing

    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median") * 1000 / len(calls)


def copy_gbps() -> float:
    n = (1 << 30) if not DRY else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    if DRY:
        return 2 * n / graph_us([lambda: dst.copy_(src)]) / 1e3
    import triton.testing

    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def within_int8_bound(got, ref, x, ref_w, tol: float) -> bool:
    """Whether ``got`` is within what the int8-activation kernels' rounding allows (fp16 / bf16
    activations, ``launch.INT8_ACTIVATIONS``): each activation moves by at most half its
    block's step ``d = max|x| / 127``, so an output by at most ``sum_k |W_nk| d_k / 2``; taken
    per group of 64 (the W4A8 kernels' blocks; the batch 1-4 kernel's blocks of 16 have smaller
    steps), plus ``tol`` of the output's largest magnitude for the 16-bit output's rounding."""
    if not L.INT8_ACTIVATIONS or x.dtype == torch.float32:
        return False
    M, K = x.shape
    block = 64 if K % 64 == 0 else K
    d = x.float().abs().reshape(M, K // block, block).amax(-1) / 127
    bound = ref_w.abs() @ d.repeat_interleave(block, 1).T / 2  # [N, M]
    slack = tol * ref.abs().max()
    return bool(((got.float() - ref).abs() <= bound.T + slack).all())


def section_check(encs: dict[str, tuple]) -> bool:
    say("## correctness: relative error vs F.linear in fp32 of the decoded weight; the fused")
    say("## path within the tolerance, or with int8 activations within their rounding's bound")
    say(
        f"{'encoding':<26} {'shape':>11} {'batch':>5} {'act':>5} {'fused':>9} {'old':>9} "
        f"{'cublas':>9}  same-bits graph"
    )
    ok = True
    for ename, enc in encs.items():
        for si, (N, K) in enumerate(SHAPES):
            if ename != "main" and si > 1:
                continue
            w = Weight(N, K, enc, seed=si)
            ref_w = w.dense(torch.float32)
            for M in BATCHES:
                for dt in ACTS:
                    x = torch.randn(M, K, device=DEV, dtype=dt)
                    ref = F.linear(x.float(), ref_w)
                    a = fused(x, w)
                    b = fused(x, w)
                    same = torch.equal(a, b)
                    replay = same
                    if not DRY and M in (1, 16):
                        out = {}

                        def cap(x=x, w=w, out=out):
                            out["y"] = fused(x, w)

                        graph_us([cap], reps=1)  # captured then replayed: out holds the replay
                        replay = torch.equal(out["y"], a)
                    e_f = rel_err(a, ref)
                    e_o = rel_err(old_path(x, w), ref)
                    e_c = rel_err(F.linear(x, ref_w.to(dt)), ref)
                    within = e_f <= TOL[dt] or within_int8_bound(a, ref, x, ref_w, TOL[dt])
                    good = within and same and replay
                    ok &= good
                    RESULTS["check"].append(
                        dict(
                            enc=ename,
                            N=N,
                            K=K,
                            M=M,
                            act=str(dt),
                            fused=e_f,
                            old=e_o,
                            cublas=e_c,
                            same_bits=same,
                            graph_same=replay,
                            ok=good,
                        )
                    )
                    say(
                        f"{ename:<26} {N:>5}x{K:<5} {M:>5} {ACT_NAME[dt]:>5} {e_f:9.2e} "
                        f"{e_o:9.2e} {e_c:9.2e}  {same!s:>5} {replay!s:>5}"
                        + ("" if good else "  FAIL")
                    )
            del w, ref_w
    say(f"correctness: {'OK' if ok else 'FAILED'}")
    return ok


def section_main(gbps: float) -> None:
    say()
    say("## int4-g64 (affine, groups along in): time per call in us; x = speedup over cuBLAS;")
    say("## hbm = (codes+scales+mins+x+y bytes)/time as a share of the copy bandwidth")
    say(
        f"{'shape':>11} {'batch':>5} {'act':>4} | {'graph: fused':>12} {'cublas':>7} {'old':>7} "
        f"{'x':>5} {'hbm':>4} {'hbm-bf':>6} | {'eager: fused':>12} {'cublas':>7} {'old':>7} "
        f"{'x':>5}"
    )
    for N, K in SHAPES:
        w0 = Weight(N, K, MAIN, seed=100)
        ws = [w0] + [Weight(N, K, MAIN, seed=101 + i) for i in range(copies(w0.nbytes) - 1)]
        nq = len(ws)
        nd = copies(N * K * 2)
        dense = {dt: [ws[i % nq].dense(dt) for i in range(nd)] for dt in ACTS}
        for M in BATCHES:
            for dt in ACTS:
                x = torch.randn(M, K, device=DEV, dtype=dt)
                f_calls = [lambda w=w, x=x: fused(x, w) for w in ws]
                c_calls = [lambda d=d, x=x: F.linear(x, d) for d in dense[dt]]
                o_calls = [lambda w=w, x=x: old_path(x, w) for w in ws]
                t = {
                    k: graph_us(c)
                    for k, c in (("fused", f_calls), ("cublas", c_calls), ("old", o_calls))
                }
                e = {
                    k: eager_us(c)
                    for k, c in (("fused", f_calls), ("cublas", c_calls), ("old", o_calls))
                }
                io = (M * K + M * N) * 2
                q_bytes = ws[0].nbytes + io
                d_bytes = N * K * 2 + io
                share = q_bytes / (t["fused"] * 1e-6) / 1e9 / gbps
                share_bf = d_bytes / (t["cublas"] * 1e-6) / 1e9 / gbps
                row = dict(
                    N=N,
                    K=K,
                    M=M,
                    act=str(dt),
                    graph_us=t,
                    eager_us=e,
                    speedup_graph=t["cublas"] / t["fused"],
                    speedup_eager=e["cublas"] / e["fused"],
                    hbm_share_fused=share,
                    hbm_share_cublas=share_bf,
                    bound_us_fused=q_bytes / gbps / 1e3,
                    bound_us_cublas=d_bytes / gbps / 1e3,
                )
                RESULTS["main"].append(row)
                say(
                    f"{N:>5}x{K:<5} {M:>5} {ACT_NAME[dt]:>4} | {t['fused']:12.1f} "
                    f"{t['cublas']:7.1f} {t['old']:7.1f} {row['speedup_graph']:5.2f} "
                    f"{share:4.0%} {share_bf:6.0%} | {e['fused']:12.1f} {e['cublas']:7.1f} "
                    f"{e['old']:7.1f} {row['speedup_eager']:5.2f}"
                )
        del ws, dense
        if not DRY:
            torch.cuda.empty_cache()


def sweep_configs(M: int, enc: tuple) -> list:
    pack = 8 // enc[1]
    g = enc[2]
    gemv = [
        L.GemvConfig(8, 256 * pack),
        L.GemvConfig(8, 256 * pack, fast_cvt=False),
        L.GemvConfig(4, 256 * pack),
        L.GemvConfig(16, 256 * pack),
        L.GemvConfig(8, 512 * pack),
        L.GemvConfig(8, 512 * pack, num_warps=8),
        L.GemvConfig(16, 512 * pack, num_warps=8),
        L.GemvConfig(4, 512 * pack),
        L.GemvConfig(8, 128 * pack, num_warps=2),
        L.GemvConfig(32, 128 * pack),
        L.GemvConfig(8, 256 * pack, split_k=1),
        L.GemvConfig(8, 256 * pack, num_stages=2),
    ]
    bk = min(g, 64)
    gemm_small = [
        L.GemmConfig(16, 32, bk, num_warps=4, num_stages=3),
        L.GemmConfig(16, 64, bk, num_warps=4, num_stages=3),
        L.GemmConfig(16, 64, bk, num_warps=4, num_stages=4),
        L.GemmConfig(16, 128, bk, num_warps=4, num_stages=3),
        L.GemmConfig(16, 64, bk, num_warps=2, num_stages=3),
        L.GemmConfig(16, 32, bk, num_warps=2, num_stages=4),
        L.GemmConfig(16, 64, bk, split_k=1),
    ]
    gemm_big = [
        L.GemmConfig(64, 64, bk, num_warps=4, num_stages=3),
        L.GemmConfig(64, 128, bk, num_warps=4, num_stages=3),
        L.GemmConfig(128, 64, bk, num_warps=4, num_stages=3),
        L.GemmConfig(128, 128, bk, num_warps=8, num_stages=3),
        L.GemmConfig(64, 128, bk, num_warps=4, num_stages=4),
        L.GemmConfig(128, 128, bk, num_warps=8, num_stages=4),
        L.GemmConfig(128, 256, bk, num_warps=8, num_stages=3),
        L.GemmConfig(64, 256, bk, num_warps=8, num_stages=3),
    ]
    if DRY:
        gemv, gemm_small, gemm_big = (
            [L.GemvConfig(8, 16 * pack, 2)],
            [L.GemmConfig(16, 16, min(g, 16 * pack))],
            [L.GemmConfig(16, 32, min(g, 16 * pack))],
        )
    if M == 1:
        return gemv
    if M <= 16:
        return gemv[:6] + gemm_small
    return gemm_big


def section_sweep(gbps: float) -> None:
    say()
    say("## config sweep, int4-g64, bf16, CUDA graph: the default (shape-picked) against the best")
    say(f"{'shape':>11} {'batch':>5} | {'default us':>10} {'best us':>8} {'hbm':>4}  best config")
    dt = torch.bfloat16
    for N, K in SHAPES:
        w0 = Weight(N, K, MAIN, seed=100)
        ws = [w0] + [Weight(N, K, MAIN, seed=101 + i) for i in range(copies(w0.nbytes) - 1)]
        for M in BATCHES:
            x = torch.randn(M, K, device=DEV, dtype=dt)
            base = graph_us([lambda w=w, x=x: fused(x, w) for w in ws])
            rows = []
            for cfg in sweep_configs(M, MAIN):
                try:
                    us = graph_us([lambda w=w, c=cfg, x=x: fused(x, w, c) for w in ws])
                except Exception as exc:  # a config the compiler refuses (shared memory, ...)
                    rows.append((float("inf"), cfg, f"{type(exc).__name__}"))
                    continue
                rows.append((us, cfg, ""))
            rows.sort(key=lambda r: r[0])
            best_us, best_cfg, _ = rows[0]
            q_bytes = ws[0].nbytes + (M * K + M * N) * 2
            share = q_bytes / (best_us * 1e-6) / 1e9 / gbps
            RESULTS["sweep"].append(
                dict(
                    N=N,
                    K=K,
                    M=M,
                    default_us=base,
                    all=[dict(us=u, config=repr(c), error=err) for u, c, err in rows],
                )
            )
            say(f"{N:>5}x{K:<5} {M:>5} | {base:10.1f} {best_us:8.1f} {share:4.0%}  {best_cfg!r}")
        del ws
        if not DRY:
            torch.cuda.empty_cache()


def section_others(gbps: float) -> None:
    say()
    say("## other encodings, bf16, CUDA graph: us per call (x = speedup over cuBLAS bf16)")
    say(
        f"{'encoding':<26} {'shape':>11} {'batch':>5} | {'fused':>7} {'cublas':>7} {'x':>5} "
        f"{'hbm':>4}"
    )
    dt = torch.bfloat16
    RESULTS["others"] = []
    for ename, enc in OTHERS.items():
        for N, K in SHAPES[:1] + SHAPES[3:4]:
            w0 = Weight(N, K, enc, seed=1)
            nq = copies(w0.nbytes)
            ws = [w0] + [Weight(N, K, enc, seed=200 + i) for i in range(nq - 1)]
            nd = copies(N * K * 2)
            dense = [ws[i % nq].dense(dt) for i in range(nd)]
            for M in BATCHES:
                x = torch.randn(M, K, device=DEV, dtype=dt)
                tf = graph_us([lambda w=w, x=x: fused(x, w) for w in ws])
                tc = graph_us([lambda d=d, x=x: F.linear(x, d) for d in dense])
                share = (w0.nbytes + (M * K + M * N) * 2) / (tf * 1e-6) / 1e9 / gbps
                RESULTS["others"].append(dict(enc=ename, N=N, K=K, M=M, fused_us=tf, cublas_us=tc))
                say(
                    f"{ename:<26} {N:>5}x{K:<5} {M:>5} | {tf:7.1f} {tc:7.1f} {tc / tf:5.2f} "
                    f"{share:4.0%}"
                )
            del ws, dense
    if not DRY:
        torch.cuda.empty_cache()


def section_overhead() -> None:
    say()
    say("## eager CPU time per call, 512x512 int4-g64 layer, batch 1 bf16 (GPU idle between)")
    N = K = 512 if not DRY else 64
    dt = torch.bfloat16
    w = Weight(N, K, MAIN, seed=3)
    qw = QuantizedWeight.from_parts(
        w.codes,
        w.scales,
        w.mins,
        [N, K],
        dict(name="affine", bits=4, group_size=64, axis=1, scale_dtype="float16"),
        dtype=dt,
    )
    mod = QuantizedLinear.from_weight(qw)
    x = torch.randn(1, K, device=DEV, dtype=dt)
    d = w.dense(dt)
    a = w.args
    fns = {
        "fused, eager fast path (QuantizedLinear's)": lambda: linear(x, *a[:3], None, *a[3:]),
        "fused, torch.ops.qtensors.linear": lambda: linear_op(x, *a[:3], None, *a[3:]),
        "QuantizedLinear module": lambda: mod(x),
        "old: dequantize + F.linear": lambda: old_path(x, w),
        "cuBLAS F.linear": lambda: F.linear(x, d),
    }
    RESULTS["overhead_us"] = {}
    n = 2000 if not DRY else 5
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        cpu = (time.perf_counter() - t) * 1e6 / n
        sync()
        RESULTS["overhead_us"][name] = cpu
        say(f"{name:<44} {cpu:7.1f} us")


def main() -> None:
    t0 = time.time()
    name = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    RESULTS["device"] = name
    RESULTS["versions"] = dict(torch=torch.__version__, python=sys.version.split()[0])
    try:
        import triton

        RESULTS["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    say(f"# fused quantized linear, {name}, {RESULTS['versions']}")
    gbps = copy_gbps()
    RESULTS["copy_gbps"] = gbps
    say(f"device copy bandwidth (read + write): {gbps:.0f} GB/s")
    chosen = "check,main,sweep,others,overhead"
    if "--sections" in sys.argv:
        chosen = sys.argv[sys.argv.index("--sections") + 1]
    sections = set(chosen.split(","))
    ok = section_check({"main": MAIN, **OTHERS})
    RESULTS["correct"] = ok
    if "main" in sections:
        section_main(gbps)
    if "sweep" in sections:
        section_sweep(gbps)
    if "others" in sections:
        section_others(gbps)
    if "overhead" in sections:
        section_overhead()
    say(f"\ntotal {time.time() - t0:.0f} s")
    REPORT.write("bench_gpu_linear", RESULTS)


if __name__ == "__main__":
    main()
