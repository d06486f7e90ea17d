"""Probe (H200): the Gluon W4A8 kernels (5-32 rows) with their scales read and carried as 32-bit
words (``launch.GLUON_SCALE_WORDS``, on by default) against the same kernels reading them as
16-bit values (or bytes), which ptxas repacked right after each load so that every loop
iteration ended waiting for its own scale loads (``gpu_gluon_tma_src_h200.txt``).

1. correctness, before any timing: outputs with and without the words bit for bit equal (the
   same values in the same arithmetic), for the TMA kernel and the register one (which the
   launcher now runs without the words: there its rows compare one path with itself), every
   encoding the kernels take, rows 5 / 8 / 16 / 17 / 32, a bias, a partial tile of features;
   and int4 affine / symmetric within the activations' rounding bound of the exact product;
2. the routed op (TMA kernel on sm_90), int4 affine g64, bf16 x, the issue's shapes, rows
   5 / 8 / 16 / 32: cuBLAS ``F.linear``, without the words, with them; ratios and the share of
   the HBM bound, CUDA-graph timed over enough weight copies to overflow the L2;
3. the other encodings at 16 rows on the three large shapes.

    OUT=DIR python3 benches/probe_gluon_scale_words.py [--quick] [--timings-only]

``--timings-only`` skips (1); each timed case still compares the two outputs first.
"""

from __future__ import annotations

import copy
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_mma_int8 as P  # noqa: E402
import torch  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

QUICK = "--quick" in sys.argv
T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"check": [], "table": [], "encodings": []}
C = L.MmaConfig


def run(x, w, words: bool, tma: bool = True, cfg=None, bias=None):
    """``mma_int8_linear`` through the Gluon kernel, the scales as words or not, the TMA
    kernel or the register one."""
    name, _bits, g = w.enc
    saved = L.GLUON_SCALE_WORDS, L.GLUON_TMA_STAGES
    L.GLUON_SCALE_WORDS = words
    L.GLUON_TMA_STAGES = saved[1] if tma else 0
    try:
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, bias, w.N, w.K, name, g, cfg, True)
    finally:
        L.GLUON_SCALE_WORDS, L.GLUON_TMA_STAGES = saved


def section_check() -> bool:
    say("## correctness: scales as words == as values (bit for bit); int4 within the bound")
    ok = True
    shapes = ((4096, 4096), (4000, 2048)) if QUICK else ((4096, 4096), (4000, 2048), (8192, 8192))
    for ename in S.ENCODINGS:
        for N, K in shapes:
            case = S.Case(ename, N, K)
            w0 = case.ws[0]
            for M in (5, 8, 16, 17, 32):
                for tma, bias in ((True, False), (True, True), (False, False)):
                    x = case.x(M)
                    b = torch.randn(N, device=x.device, dtype=S.DT) if bias else None
                    got = run(x, w0, True, tma, None, b)
                    ref = run(x, w0, False, tma, None, b)
                    same = torch.equal(got, ref)
                    exc = None
                    if ename in ("int4-affine-g64", "int4-sym-g64", "int4-affine-g128"):
                        exc = P.bound_excess(x, case.ref_w.double(), got, w0.enc[2], b)
                    good = same and (exc is None or exc <= 0)
                    ok &= good
                    tag = ("tma" if tma else "regs") + (" bias" if bias else "")
                    RESULTS["check"].append(dict(enc=ename, N=N, K=K, M=M, tag=tag, same=same,
                                                 excess=exc))  # fmt: skip
                    if not good or M == 16:
                        ex = "" if exc is None else f" excess {exc:+.1e}"
                        say(f"{ename:<17} {N:>5}x{K:<5} M={M:<3} {tag:<9} equal {same}{ex} "
                            f"{'ok' if good else 'FAIL'}")  # fmt: skip
            if ename == "int4-affine-g64" and N == 4096:  # bf16 scales and mins too
                wb = copy.copy(w0)
                wb.scales, wb.mins = w0.scales.bfloat16(), w0.mins.bfloat16()
                for M in (5, 16, 32):
                    for tma in (True, False):
                        x = case.x(M)
                        same = torch.equal(run(x, wb, True, tma), run(x, wb, False, tma))
                        ok &= same
                        tag = "tma" if tma else "regs"
                        RESULTS["check"].append(
                            dict(enc="int4-affine-g64 bf16 scales", N=N, K=K, M=M, tag=tag,
                                 same=same)
                        )  # fmt: skip
                        say(f"{'... bf16 scales':<17} {N:>5}x{K:<5} M={M:<3} {tag:<9} equal "
                            f"{same} {'ok' if same else 'FAIL'}")  # fmt: skip
            del case
            torch.cuda.empty_cache()
    say(f"check: {'all equal' if ok else 'FAILED'}")
    return ok


def section_table(gbps: float) -> None:
    say()
    say("## int4-affine-g64, bf16 x, the routed Gluon kernel: us per call (CUDA graph)")
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {'values':>7} {'words':>7} | {'x cub':>5} "
        f"{'words/values':>12} {'hbm':>4}")  # fmt: skip
    rows = (5, 16) if QUICK else (5, 16, 32)
    for N, K in S.SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in rows:
            x = case.x(M)
            if not torch.equal(run(x, case.ws[0], True), run(x, case.ws[0], False)):
                say(f"{N:>5}x{K:<5} {M:>3} | WRONG: words differ from values; not timed")
                continue
            cub = case.cublas_us(x, 8)
            old = case.time(lambda x_, w: run(x_, w, False), M)
            new = case.time(lambda x_, w: run(x_, w, True), M)
            bound = case.bound_us(M, gbps)
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {new:7.1f} | {cub / new:5.2f} "
                f"{old / new:12.2f} {bound / new:4.0%}")  # fmt: skip
            RESULTS["table"].append(dict(N=N, K=K, M=M, cublas=cub, values=old, words=new,
                                         bound=bound))  # fmt: skip
        del case
        torch.cuda.empty_cache()


def section_encodings() -> None:
    say()
    say("## every encoding at 16 rows, the large shapes: us per call (CUDA graph)")
    for ename in S.ENCODINGS:
        if ename == "int4-affine-g64":
            continue
        for N, K in S.SHAPES[:3]:
            case = S.Case(ename, N, K)
            x = case.x(16)
            if not torch.equal(run(x, case.ws[0], True), run(x, case.ws[0], False)):
                say(f"{ename:<17} {N:>5}x{K:<5} | WRONG: words differ from values; not timed")
                continue
            cub = case.cublas_us(x, 8)
            old = case.time(lambda x_, w: run(x_, w, False), 16)
            new = case.time(lambda x_, w: run(x_, w, True), 16)
            say(f"{ename:<17} {N:>5}x{K:<5} | cublas {cub:7.1f} values {old:7.1f} words "
                f"{new:7.1f} | x cub {cub / new:5.2f} words/values {old / new:5.2f}")  # fmt: skip
            RESULTS["encodings"].append(dict(enc=ename, N=N, K=K, cublas=cub, values=old,
                                             words=new))  # fmt: skip
            del case
            torch.cuda.empty_cache()


def main() -> int:
    gbps = S.copy_gbps()
    say(f"# probe_gluon_scale_words on {torch.cuda.get_device_name()}; torch {torch.__version__};"
        f" copy {gbps:.0f} GB/s")  # fmt: skip
    if "--timings-only" not in sys.argv and not section_check():
        say("correctness FAILED: no timings")
        S.REPORT.write("probe_gluon_scale_words", RESULTS)
        return 1
    section_table(gbps)
    if not QUICK:
        section_encodings()
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_gluon_scale_words", RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
