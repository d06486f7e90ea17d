"""One run that says which fused-linear path wins per encoding, shape and batch, so that
``kernels/launch.py``'s dispatch (``TILED_MAX_M``, ``SMALL_M_KERNEL``, ``TILED_TABLE``) can be set
from it. Self-contained, no network, < 6 minutes on an H200 with Triton's compiles (a time budget
skips the last rows' kernel timings if compiles run long, and says so):

    python3 benches/bench_gpu_gemv_sweep.py            # tables to stdout; with OUT=DIR also files
    python3 benches/bench_gpu_gemv_sweep.py --smoke    # CPU, Triton interpreter, tiny shapes

1. copy bandwidth (1 GiB device-to-device, CUDA events, best of 10 after warm-up): the bound
   every "hbm" share is measured against (read + write bytes / time).
2. correctness, before any timing: for every encoding and shape, the routed op (``linear``) at
   every batch against ``F.linear`` in fp32 of the decoded weight; every kernel config is checked
   the same way on its first use in the table and dropped (reported) if wrong.
3. one table, every encoding (int4 affine / symmetric g64, affine g128, NF4 g64, MXFP4, NVFP4),
   the issue-11 shapes, batches 1, 2, 4, 8, 16, 256, bf16 activations, CUDA-graph timing (one
   replay runs the layer over enough weight copies to overflow the L2 cache; median per call):
   cuBLAS ``F.linear`` of a bf16 weight, decode + cuBLAS, the routed op as dispatched now, the
   old CUDA-core kernel (``tiled.fma_kernel``, batch <= 4), the words kernel
   (``words.words_kernel``, per-group accumulator, batch <= 4) in a few configs, the ``tl.dot``
   kernel (batch >= 8).
   Per row: the fastest, its share of the HBM bound (weight parts + x + y bytes / copy
   bandwidth), its speedup over cuBLAS, and eager (no graph) us per call of the routed op and of
   ``F.linear``: the host overhead shows where eager exceeds the graph time.
4. what to set: ``routing`` lines (``TILED_MAX_M``, ``FMA_MAX_M``, ``SMALL_M_KERNEL``,
   ``WORDS_DEFAULT``) and ``table`` lines
   (``TILED_TABLE`` entries, one per (batch bucket, N, K) where the winner across the encodings
   differs from the default).
"""

from __future__ import annotations

import math
import os
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
from _common import graph_us as _common_graph_us  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402
from qtensors.torch.linear import linear, linear_cuda  # noqa: E402
from qtensors.torch.ops import dequantize  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16
SHAPES = [(8192, 8192), (14336, 4096), (4096, 14336), (4096, 4096), (5632, 2048), (2048, 5632)]
BATCHES = [1, 2, 4, 8, 16, 256]
ENCODINGS = {  # name: (encoding, bits, group size); groups along the input dim
    "int4-affine-g64": ("affine", 4, 64),
    "int4-sym-g64": ("symmetric", 4, 64),
    "int4-affine-g128": ("affine", 4, 128),
    "nf4-g64": ("nf4", 4, 64),
    "mxfp4": ("mxfp4", 4, 32),
    "nvfp4": ("nvfp4", 4, 16),
}
FLUSH_BYTES = 256 << 20  # weight copies per timing: enough to overflow the L2 cache
# kernel timings stop here (cuBLAS, decode + cuBLAS and routed always run); --budget S
BUDGET_S = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else 300.0
TOL = 2e-2  # bf16 activations and output
if SMOKE:
    SHAPES = [(40, 128)]
    BATCHES = [1, 3, 8]
    FLUSH_BYTES = 1 << 12

T0 = time.perf_counter()
RESULTS: dict[str, Any] = {"device": "", "copy_gbps": 0.0, "check": [], "table": []}
REPORT = Report()
say = REPORT.say


def candidates(M: int) -> dict[str, L.TiledConfig]:
    """The kernel configs timed at batch ``M`` (labels are the table's columns)."""
    c = L.TiledConfig
    if SMOKE:
        if M <= 4:
            return {
                "fma": c("fma", 0, 8, 64),
                "w1": c("words", 0, 4, 64),
                "w2": c("words", 0, 8, 32),
            }
        return {"dot": c("dot", 16, 16, 64)}
    if M <= 4:
        return {
            # the old CUDA-core kernel as dispatched after run 1
            "fma": c("fma", 0, 8 if M == 1 else 4, 1024, num_warps=4, num_stages=2),
            # per-group accumulator, one word per thread: features x codes a step, warps,
            # stages (the probe's best: benches/results/gpu_gemv_probe_h200.txt)
            "w1": c("words", 0, 8, 1024, num_warps=4, num_stages=2),
            "w2": c("words", 0, 8, 2048, num_warps=8, num_stages=2),
            "w3": c("words", 0, 16, 1024, num_warps=4, num_stages=2),
        }
    if M <= 16:
        return {"dot": c("dot", 16, 64, 128, num_warps=4, num_stages=3)}
    return {"dot": c("dot", 128, 64, 64, num_warps=4, num_stages=3)}


KERNEL_COLS = ["fma", "w1", "w2", "w3", "dot"]


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


def copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(FLUSH_BYTES / max(nbytes, 1))))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------
# timers
# ------------------------------------------------------------------------------------------------


def graph_us(calls: list, reps: int = 10) -> float:
    """Median time per call of ``calls`` run back to back inside one CUDA graph (the launch
    configuration is fixed before the capture: no autotuning inside it): ``_common.graph_us``."""
    return _common_graph_us(calls, reps, dry=SMOKE)


def copy_gbps() -> float:
    """Device-to-device copy of 1 GiB, eagerly, CUDA events around each copy, best of 10 after
    3 warm-ups (read + write bytes)."""
    n = (1 << 30) if not SMOKE else (1 << 16)
    src = torch.ones(n // 4, dtype=torch.float32, device=DEV)
    dst = torch.empty_like(src)
    if SMOKE:
        t = time.perf_counter()
        dst.copy_(src)
        return 2 * n / max(time.perf_counter() - t, 1e-9) / 1e9
    for _ in range(3):
        dst.copy_(src)
    best = math.inf
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n / best / 1e9


def eager_us(fn, reps: int = 200) -> float:
    """Wall time per call of ``fn`` called back to back without a graph (the GPU time where the
    kernel is longer than the host work, the host work where shorter)."""
    fn()
    if not SMOKE:
        torch.cuda.synchronize()
    reps = 3 if SMOKE else reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if not SMOKE:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / reps


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

    def cublas_us(self, x: torch.Tensor, copies: int | None = None) -> float:
        """us per call of cuBLAS ``F.linear(x, W)`` on the bf16 decodings (the first ``copies``)
        in a CUDA graph."""
        return graph_us([lambda d=d: F.linear(x, d) for d in self.dense[:copies]])

    def bound_us(self, M: int, gbps: float) -> float:
        return (self.ws[0].nbytes + (M * self.K + M * self.N) * 2) / gbps / 1e3


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


def timed(case: Case, M: int, cfg: L.TiledConfig) -> tuple[float, str]:
    """us per call of one kernel config, after checking its result (inf and why if wrong or
    refused by the compiler)."""
    try:
        err = case.check(lambda x, w: tiled(x, w, cfg), M)
        if not err <= TOL:
            return math.inf, f"WRONG (rel err {err:.2e})"
        return case.time(lambda x, w: tiled(x, w, cfg), M), ""
    except Exception as exc:  # a config the compiler refuses (shared memory, registers)
        return math.inf, f"{type(exc).__name__}: {str(exc)[:80]}"


def fmt(v: float | None) -> str:
    return f"{v:7.1f}" if v is not None and v < math.inf else f"{'-':>7}"


def section_table(gbps: float) -> None:
    say()
    say(
        "## us per call, CUDA graph, bf16 x; best: fastest of decode+cuBLAS and the kernels (hbm: "
        "its share of the bound, x: speedup over cuBLAS); eager: us per call without a graph"
    )
    cols = " ".join(f"{c:>7}" for c in KERNEL_COLS)
    say(
        f"{'encoding':<17} {'shape':>11} {'M':>3} | {'cublas':>7} {'dec+cb':>7} {'routed':>7} | "
        f"{cols} | {'best':>6} {'bound':>6} {'hbm':>4} {'x':>5} | {'eager':>6} {'F.lin':>6}"
    )
    for ename in ENCODINGS:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            for M in BATCHES:
                x = case.x(M)
                t: dict[str, float | None] = {}
                t["cublas"] = case.cublas_us(x)
                t["decode"] = case.time(lambda x, w: F.linear(x, w.dense(DT)), M)
                t["routed"] = case.time(routed, M)
                notes = []
                cands = candidates(M)
                for label in KERNEL_COLS:
                    if label not in cands:
                        t[label] = None
                    elif time.perf_counter() - T0 > BUDGET_S:
                        t[label] = None
                        notes.append(f"{label}: skipped (time budget)")
                    else:
                        us, err = timed(case, M, cands[label])
                        t[label] = us
                        if err:
                            notes.append(f"{label}: {err}")
                eager = eager_us(lambda x=x, w=case.ws[0]: routed(x, w))
                eager_f = eager_us(lambda x=x, d=case.dense[0]: F.linear(x, d))
                paths = {k: v for k, v in t.items() if k not in ("cublas", "routed") and v}
                best = min(paths, key=lambda k: paths[k])
                bound = case.bound_us(M, gbps)
                RESULTS["table"].append(
                    dict(
                        enc=ename,
                        N=N,
                        K=K,
                        M=M,
                        us=t,
                        best=best,
                        bound_us=bound,
                        eager_us=eager,
                        eager_flinear_us=eager_f,
                        configs={k: repr(c) for k, c in cands.items()},
                        notes=notes,
                    )
                )
                ks = " ".join(fmt(t[c]) for c in KERNEL_COLS)
                say(
                    f"{ename:<17} {N:>5}x{K:<5} {M:>3} | {fmt(t['cublas'])} {fmt(t['decode'])} "
                    f"{fmt(t['routed'])} | {ks} | {best:>6} {bound:6.1f} "
                    f"{bound / paths[best]:4.0%} {t['cublas'] / paths[best]:5.2f} | "
                    f"{eager:6.1f} {eager_f:6.1f} {'; '.join(notes)}"
                )
            del case
            if not SMOKE:
                torch.cuda.empty_cache()
    say()
    say(
        "configs: " + "; ".join(f"{k}={c!r}" for k, c in {**candidates(1), **candidates(8)}.items())
    )
    say("         M > 16: " + "; ".join(f"{k}={c!r}" for k, c in candidates(256).items()))


def section_dispatch() -> None:
    """The settings of ``kernels/launch.py`` the table supports: per (batch, N, K) the path with
    the lowest sum over the encodings of its time relative to each encoding's fastest (NF4 on
    the dot kernel counts as decode + cuBLAS: ``route()`` never sends it there)."""
    say()
    say("## dispatch: paste into python/qtensors/torch/kernels/launch.py")
    rows = {(r["enc"], r["N"], r["K"], r["M"]): r for r in RESULTS["table"]}
    winner: dict[tuple[int, int, int], str] = {}
    for M in BATCHES:
        for N, K in SHAPES:
            score: dict[str, float] = {}
            for ename, (name, _, _) in ENCODINGS.items():
                r = rows[(ename, N, K, M)]["us"]
                t = {k: v for k, v in r.items() if k not in ("cublas", "routed")}
                if name == "nf4" and t.get("dot") is not None:
                    t["dot"] = t["decode"]
                fastest = min(v for v in t.values() if v)
                for k, v in t.items():
                    if k == "decode" or k in candidates(M):
                        score[k] = score.get(k, 0.0) + (v / fastest if v else math.inf)
            winner[(M, N, K)] = min(score, key=lambda k: score[k])
    small = [w for (M, _, _), w in winner.items() if M <= 4 and w != "decode"]
    words_wins = sum(w.startswith("w") for w in small)
    small_kernel = "words" if words_wins * 2 > len(small) else "fma"
    tiled_max = max([M for (M, _, _), w in winner.items() if w != "decode"], default=0)
    say(f'routing: SMALL_M_KERNEL = "{small_kernel}"   (now "{L.SMALL_M_KERNEL}")')
    say(f"routing: TILED_MAX_M = {tiled_max}   (now {L.TILED_MAX_M})")
    say(f"routing: FMA_MAX_M = {min(tiled_max, 4)}   (now {L.FMA_MAX_M})")
    # the words config that wins most (batch <= 4) becomes the default, the rest table entries
    words = [w for w in small if w.startswith("w")]
    top = max(set(words), key=words.count) if words else None
    words_default = candidates(1)[top] if top else L.WORDS_DEFAULT
    say(f"routing: WORDS_DEFAULT = {words_default!r}")
    saved = (L.SMALL_M_KERNEL, L.FMA_MAX_M, L.WORDS_DEFAULT)
    L.SMALL_M_KERNEL, L.FMA_MAX_M = small_kernel, min(tiled_max, 4)
    L.WORDS_DEFAULT = words_default
    table = []
    for (M, N, K), w in sorted(winner.items()):
        if M > tiled_max:
            continue
        cfg = L.TiledConfig("decode") if w == "decode" else candidates(M)[w]
        if cfg != L.tiled_default(M, 4, 64):
            bucket = next(b for b in L.BATCH_BUCKETS if M <= b)
            table.append(f"    ({bucket}, {N}, {K}): {cfg!r},")
    L.SMALL_M_KERNEL, L.FMA_MAX_M, L.WORDS_DEFAULT = saved
    say("table: TILED_TABLE = {   (replaces the whole dict)")
    for line in table:
        say("table:" + line)
    say("table: }")
    RESULTS["dispatch"] = dict(
        WORDS_DEFAULT=repr(words_default),
        SMALL_M_KERNEL=small_kernel,
        TILED_MAX_M=tiled_max,
        winner={f"{M},{N},{K}": w for (M, N, K), w in winner.items()},
        table=table,
    )


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
    section_table(gbps)
    section_dispatch()
    say(f"\nwall time {time.perf_counter() - T0:.0f} s")
    REPORT.write("gpu_gemv_sweep", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
