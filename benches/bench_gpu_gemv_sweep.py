"""One run that says which fused-linear kernel and launch configuration wins per shape and batch,
so that ``kernels/launch.py``'s dispatch (``FMA_MAX_M``, ``TILED_MAX_M``, ``TILED_TABLE``) can be
set from it. Self-contained, no network, < 5 minutes on an H200 (a time budget skips the last
config sweeps if compiles run long, and says so):

    python3 benches/bench_gpu_gemv_sweep.py            # tables to stdout; with OUT=DIR also files
    python3 benches/bench_gpu_gemv_sweep.py --smoke    # CPU, Triton interpreter, tiny shapes

Most of a first run is Triton compiling some 200 kernel variants; they land in Triton's on-disk
cache, so if the sweep reports "skipped (time budget)" a second run (or ``--budget 600``)
completes it.

1. copy bandwidth (1 GiB device-to-device): the bound every "hbm" share is measured against.
2. correctness, before any timing: for every encoding, shape and batch, the routed op
   (``linear``) against ``F.linear`` in fp32 of the decoded weight; each swept config is checked
   the same way on its first use and dropped (reported) if wrong.
3. main table, every encoding (int4 affine / symmetric g64, affine g128, NF4 g64, MXFP4, NVFP4),
   the issue-11 shapes, batches 1, 4, 16, 64, 256, bf16 activations, CUDA-graph timing (one replay
   runs the layer over enough weight copies to overflow the L2 cache; median per call): cuBLAS
   ``F.linear`` of a bf16 weight, decode + cuBLAS, the old kernels (``gemv.py`` / ``gemm.py``,
   where they apply), the routed op, and the tiled kernels' default config. Per row: us, share of
   the HBM bound (weight parts + x + y bytes / copy bandwidth), speedup over cuBLAS.
4. config sweep (int4 affine g64, then the other encodings on its top 3): ``fma_kernel``
   configs at batch 1 and 4, ``dot_kernel`` configs at every batch; the best per (shape, batch).
5. what to set: ``TILED_TABLE`` lines (where the best config beats the default by > 3%),
   ``FMA_MAX_M`` (largest batch where fma beats dot on every shape) and ``TILED_MAX_M`` (largest
   batch where the best tiled kernel is no slower than decode + cuBLAS on every shape).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Any

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import Report  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.linear import linear, linear_cuda  # noqa: E402
from qtensors.torch.ops import dequantize  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16
SHAPES = [(8192, 8192), (14336, 4096), (4096, 14336), (4096, 4096), (5632, 2048), (2048, 5632)]
BATCHES = [1, 4, 16, 64, 256]
ENCODINGS = {  # name: (encoding, bits, group size); groups along the input dim
    "int4-affine-g64": ("affine", 4, 64),
    "int4-sym-g64": ("symmetric", 4, 64),
    "int4-affine-g128": ("affine", 4, 128),
    "nf4-g64": ("nf4", 4, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "nvfp4": ("nvfp4", 4, 16),
}
MAIN = "int4-affine-g64"
FLUSH_BYTES = 256 << 20  # weight copies per timing: enough to overflow the L2 cache
# the config sweeps stop here (the tables before them always run); --budget S to change it
BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 240.0
OTHER_BATCHES = [1, 16, 256]  # the main table's batches for encodings other than MAIN
TOL = 2e-2  # bf16 activations and output
if SMOKE:
    SHAPES = [(48, 64), (40, 128)]
    BATCHES = [1, 4, 16]
    OTHER_BATCHES = [1, 16]
    FLUSH_BYTES = 1 << 12

T0 = time.perf_counter()
RESULTS: dict[str, Any] = {"device": "", "copy_gbps": 0.0, "check": [], "main": [], "sweep": []}
REPORT = Report()
say = REPORT.say


def fma_configs() -> list[L.TiledConfig]:
    """``fma_kernel``: ``block_k = 8 * 32 * warps`` keeps 8 activations per thread (the decoded
    words then need no layout conversion); the rest trade rows, stages and split-K."""
    if SMOKE:
        return [L.TiledConfig("fma", 0, 8, 64), L.TiledConfig("fma", 0, 16, 32, split_k=1)]
    c = L.TiledConfig
    return [
        c("fma", 0, 8, 1024, num_warps=4, num_stages=2),
        c("fma", 0, 4, 1024, num_warps=4, num_stages=2),
        c("fma", 0, 16, 1024, num_warps=4, num_stages=2),
        c("fma", 0, 8, 1024, num_warps=4, num_stages=3),
        c("fma", 0, 8, 1024, num_warps=4, num_stages=1),
        c("fma", 0, 8, 512, num_warps=2, num_stages=2),
        c("fma", 0, 16, 512, num_warps=2, num_stages=3),
        c("fma", 0, 8, 2048, num_warps=8, num_stages=2),
        c("fma", 0, 4, 2048, num_warps=8, num_stages=2),
        c("fma", 0, 16, 256, num_warps=4, num_stages=2),
        c("fma", 0, 8, 1024, split_k=1, num_warps=4, num_stages=2),
    ]


def dot_configs(M: int) -> list[L.TiledConfig]:
    c = L.TiledConfig
    if SMOKE:
        return [c("dot", 16, 16, 64), c("dot", 16, 32, 32, split_k=1)]
    if M <= 16:  # also batch 1: tensor cores on a padded x against the CUDA cores
        return [
            c("dot", 16, 64, 128, num_warps=4, num_stages=3),
            c("dot", 16, 32, 128, num_warps=4, num_stages=3),
            c("dot", 16, 64, 256, num_warps=4, num_stages=3),
            c("dot", 16, 128, 128, num_warps=4, num_stages=3),
            c("dot", 16, 64, 128, num_warps=4, num_stages=4),
            c("dot", 16, 32, 256, num_warps=4, num_stages=4),
        ]
    bm = 64 if M <= 64 else 128
    return [
        c("dot", bm, 64, 64, num_warps=4, num_stages=3),
        c("dot", bm, 128, 64, num_warps=4, num_stages=3),
        c("dot", bm, 128, 64, num_warps=8, num_stages=4),
        c("dot", bm, 128, 128, num_warps=8, num_stages=3),
        c("dot", bm, 256, 64, num_warps=8, num_stages=3),
        c("dot", 64, 128, 128, num_warps=4, num_stages=4),
    ]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


class Weight:
    """Random parts of a quantized [N, K] weight: every code value, scales of a realistic size
    in each encoding's stored format (E8M0 bytes, E4M3 with a tensor scale)."""

    def __init__(self, N: int, K: int, enc: tuple[str, int, int], seed: int) -> None:
        name, bits, g = enc
        gen = torch.Generator(device=DEV).manual_seed(seed)
        self.N, self.K, self.enc = N, K, enc
        G = -(-K // g)
        self.codes = torch.randint(
            0, 256, (N * K * bits // 8,), dtype=torch.uint8, device=DEV, generator=gen
        )
        s = torch.rand((N, G), device=DEV, generator=gen) * 0.02 + 0.002
        self.mins = None
        if name == "mxfp4":
            self.scales = torch.randint(118, 124, (N, G), device=DEV, generator=gen).to(torch.uint8)
        elif name == "nvfp4":
            self.scales = (s * 20000).to(torch.float8_e4m3fn)
            self.mins = torch.tensor([1e-5], device=DEV)
        else:
            self.scales = s.half()
            if name == "affine":
                self.mins = (-s * (1 << (bits - 1))).half()

    @property
    def args(self) -> tuple:
        name, bits, g = self.enc
        return (self.codes, self.scales, self.mins, [self.N, self.K], name, bits, g, 1)

    @property
    def nbytes(self) -> int:
        n = self.codes.numel() + self.scales.numel() * self.scales.element_size()
        return n + (0 if self.mins is None else self.mins.numel() * self.mins.element_size())

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(*self.args, dtype)


def routed(x, w: Weight):
    """The op as a model calls it (smoke: its CUDA routing on CPU tensors, not the Rust path)."""
    return (linear_cuda if SMOKE else linear)(x, *w.args[:3], None, *w.args[3:])


def tiled(x, w: Weight, cfg):
    name, bits, g = w.enc
    return L.tiled_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, bits, g, cfg)


def old(x, w: Weight):
    name, bits, g = w.enc
    return L.fused_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, bits, g, 1)


def copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(FLUSH_BYTES / max(nbytes, 1))))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------


def graph_us(calls: list, reps: int = 10) -> float:
    """Median time per call of ``calls`` run back to back inside one CUDA graph (the launch
    configuration is fixed before the capture: no autotuning inside it)."""
    if SMOKE:
        t = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t) * 1e6 / len(calls)
    for c in calls:  # compile, allocate, set up split-K counters: outside the capture
        c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    del graph
    return statistics.median(times)


def copy_gbps() -> float:
    n = (1 << 30) if not SMOKE else (1 << 16)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = graph_us([lambda: dst.copy_(src)] * 4)
    return 2 * n / us / 1e3


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------


class Case:
    """One (encoding, shape): the weight copies, their bf16 decodings, the reference."""

    def __init__(self, ename: str, N: int, K: int) -> None:
        enc = ENCODINGS[ename]
        self.ename, self.N, self.K = ename, N, K
        w0 = Weight(N, K, enc, seed=N + K)
        self.ws = [w0] + [Weight(N, K, enc, seed=N + K + i) for i in range(1, copies(w0.nbytes))]
        self.ref_w = w0.dense(torch.float32)
        self.dense = [w.dense(DT) for w in self.ws[: copies(N * K * 2)]]

    def x(self, M: int) -> torch.Tensor:
        g = torch.Generator(device=DEV).manual_seed(M)
        return torch.randn(M, self.K, device=DEV, generator=g).to(DT)

    def check(self, fn, M: int) -> float:
        x = self.x(M)
        return rel_err(fn(x, self.ws[0]), F.linear(x.float(), self.ref_w))

    def time(self, fn, M: int) -> float:
        x = self.x(M)
        return graph_us([lambda w=w: fn(x, w) for w in self.ws])

    def bound_us(self, M: int, gbps: float) -> float:
        return (self.ws[0].nbytes + (M * self.K + M * self.N) * 2) / gbps / 1e3


def old_applies(ename: str, M: int) -> bool:
    name, bits, g = ENCODINGS[ename]
    return L.supported([1, 64], name, bits, g, 1)


def section_check() -> bool:
    say("## correctness: routed op vs F.linear in fp32 of the decoded weight (bf16 x)")
    ok = True
    for ename in ENCODINGS:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            errs = [case.check(routed, M) for M in BATCHES]
            bad = [M for M, e in zip(BATCHES, errs, strict=True) if not e <= TOL]
            ok &= not bad
            RESULTS["check"].append(dict(enc=ename, N=N, K=K, errors=errs, bad=bad))
            say(
                f"{ename:<17} {N:>5}x{K:<5} max rel err {max(errs):.2e} "
                f"{'FAIL ' + str(bad) if bad else 'ok'}"
            )
            del case
    return ok


def section_main(gbps: float) -> None:
    say()
    say("## us per call, CUDA graph, bf16 x (hbm: share of the bound; x: speedup over cuBLAS)")
    say(
        f"{'encoding':<17} {'shape':>11} {'M':>4} | {'cublas':>7} {'dec+cb':>7} {'old':>7} "
        f"{'routed':>7} {'fma':>7} {'dot':>7} | {'bound':>6} {'hbm':>4} {'x':>5}"
    )
    for ename in ENCODINGS:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            for M in BATCHES if ename == MAIN else OTHER_BATCHES:
                t: dict[str, float | None] = {}
                x = case.x(M)
                t["cublas"] = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
                t["decode_cublas"] = case.time(lambda x, w: F.linear(x, w.dense(DT)), M)
                t["old"] = case.time(old, M) if old_applies(ename, M) else None
                t["routed"] = case.time(routed, M)
                for kind in ("fma", "dot"):
                    if kind == "fma" and M > 4:
                        t[kind] = None
                    else:
                        cfg = default_config(kind, M)
                        t[kind] = case.time(lambda x, w, c=cfg: tiled(x, w, c), M)
                bound = case.bound_us(M, gbps)
                share = bound / t["routed"]
                speed = t["cublas"] / t["routed"]
                RESULTS["main"].append(
                    dict(enc=ename, N=N, K=K, M=M, us=t, bound_us=bound, hbm_share=share)
                )

                def f(v):
                    return f"{v:7.1f}" if v is not None else f"{'-':>7}"

                say(
                    f"{ename:<17} {N:>5}x{K:<5} {M:>4} | {f(t['cublas'])} {f(t['decode_cublas'])} "
                    f"{f(t['old'])} {f(t['routed'])} {f(t['fma'])} {f(t['dot'])} | {bound:6.1f} "
                    f"{share:4.0%} {speed:5.2f}"
                )
            del case
            if not SMOKE:
                torch.cuda.empty_cache()


def sweep_one(case: Case, M: int, cfgs: list) -> list[tuple[float, L.TiledConfig, str]]:
    rows = []
    for cfg in cfgs:
        if time.perf_counter() - T0 > BUDGET_S:
            rows.append((float("inf"), cfg, "skipped (time budget)"))
            continue
        try:
            err = case.check(lambda x, w, c=cfg: tiled(x, w, c), M)
            if not err <= TOL:
                rows.append((float("inf"), cfg, f"WRONG (rel err {err:.2e})"))
                continue
            rows.append((case.time(lambda x, w, c=cfg: tiled(x, w, c), M), cfg, ""))
        except Exception as exc:  # a config the compiler refuses (shared memory, registers)
            rows.append((float("inf"), cfg, f"{type(exc).__name__}: {str(exc)[:80]}"))
    rows.sort(key=lambda r: r[0])
    return rows


def section_sweep(gbps: float) -> dict:
    """Best config per (encoding, shape, batch): every config for the main encoding, the main
    encoding's top 3 for the others (the same kernels, other decode arithmetic)."""
    say()
    say("## config sweep, bf16 x, CUDA graph: default (tiled_default) vs best per kernel")
    say(
        f"{'encoding':<17} {'shape':>11} {'M':>4} | {'default':>7} {'best':>7} {'hbm':>4}  "
        "best config"
    )
    best: dict = {}
    top: dict = {}
    for ename in ENCODINGS:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            for M in BATCHES if ename == MAIN else OTHER_BATCHES:
                for kind in ("fma", "dot"):
                    if kind == "fma" and M > 4:
                        continue
                    cfgs = fma_configs() if kind == "fma" else dot_configs(M)
                    default = default_config(kind, M)
                    if ename != MAIN:
                        cfgs = top.get((kind, N, K, M), [])
                    cfgs = [default] + [c for c in cfgs if c != default]
                    rows = sweep_one(case, M, cfgs)
                    if ename == MAIN:
                        top[(kind, N, K, M)] = [c for u, c, e in rows[:3] if not e]
                    us, cfg, err = rows[0]
                    d_us = next((u for u, c, e in rows if c == default), None)
                    share = case.bound_us(M, gbps) / us if us < float("inf") else 0.0
                    best[(ename, kind, N, K, M)] = (us, cfg)
                    RESULTS["sweep"].append(
                        dict(
                            enc=ename,
                            kind=kind,
                            N=N,
                            K=K,
                            M=M,
                            all=[dict(us=u, config=repr(c), error=e) for u, c, e in rows],
                        )
                    )
                    ds = f"{d_us:7.1f}" if d_us is not None else f"{'-':>7}"
                    say(
                        f"{ename:<17} {N:>5}x{K:<5} {M:>4} | {ds} {us:7.1f} {share:4.0%}  "
                        f"{cfg!r} {err}"
                    )
            del case
            if not SMOKE:
                torch.cuda.empty_cache()
    return best


def default_config(kind: str, M: int) -> L.TiledConfig:
    """``launch.tiled_default`` for this kernel at this batch."""
    g = ENCODINGS[MAIN][2]
    return L.tiled_default(1 if kind == "fma" else max(M, L.FMA_MAX_M + 1), 4, g)


def section_dispatch(best: dict) -> None:
    """The settings of ``kernels/launch.py`` the sweep supports (main encoding)."""
    say()
    say("## dispatch: paste into python/qtensors/torch/kernels/launch.py")
    main = {(r["N"], r["K"], r["M"]): r["us"] for r in RESULTS["main"] if r["enc"] == MAIN}

    def us(kind, N, K, M):
        return best.get((MAIN, kind, N, K, M), (math.inf,))[0]

    fma_max = 0  # batches from 1 up where fma beats dot on every shape
    for M in BATCHES:
        if not all(us("fma", N, K, M) <= us("dot", N, K, M) for N, K in SHAPES):
            break
        fma_max = M
    tiled_max = 0  # batches from 1 up where a tiled kernel beats decode + cuBLAS on every shape
    for M in BATCHES:
        if not all(
            min(us("fma", N, K, M), us("dot", N, K, M)) <= main[(N, K, M)]["decode_cublas"]
            for N, K in SHAPES
        ):
            break
        tiled_max = M
    say(f"routing: FMA_MAX_M = {fma_max}   (now {L.FMA_MAX_M})")
    say(f"routing: TILED_MAX_M = {tiled_max}   (now {L.TILED_MAX_M})")
    RESULTS["dispatch"] = dict(FMA_MAX_M=fma_max, TILED_MAX_M=tiled_max, table=[])
    for M in BATCHES:
        kind = "fma" if M <= fma_max else "dot"
        for N, K in SHAPES:
            t, cfg = best.get((MAIN, kind, N, K, M), (math.inf, None))
            if cfg is None or t == math.inf:
                continue
            default = default_config(kind, M)
            d_us = next(
                (
                    a["us"]
                    for r in RESULTS["sweep"]
                    if (r["enc"], r["kind"], r["N"], r["K"], r["M"]) == (MAIN, kind, N, K, M)
                    for a in r["all"]
                    if a["config"] == repr(default)
                ),
                math.inf,
            )
            if cfg != default and t < 0.97 * d_us:
                line = f"table: TILED_TABLE[({M}, {N}, {K})] = {cfg!r}"
                RESULTS["dispatch"]["table"].append(line)
                say(line)


def main() -> int:
    dev = "CPU (Triton interpreter, smoke)" if SMOKE else torch.cuda.get_device_name()
    import triton

    RESULTS["device"] = dev
    say(f"# fused linear sweep on {dev}; torch {torch.__version__}, triton {triton.__version__}")
    gbps = copy_gbps()
    RESULTS["copy_gbps"] = gbps
    say(f"copy bandwidth: {gbps:.0f} GB/s")
    ok = section_check()
    if not ok:
        say("correctness FAILED: no timings")
        REPORT.write("gpu_gemv_sweep", RESULTS)
        return 1
    section_main(gbps)
    best = section_sweep(gbps)
    section_dispatch(best)
    say(f"\nwall time {time.perf_counter() - T0:.0f} s")
    REPORT.write("gpu_gemv_sweep", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
