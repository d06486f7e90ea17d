"""Probe (H200): the encodings only the Gluon W4A8 kernels take (``mma_int8_gluon.py``): NF4
(``ENC`` 2: codes as their levels in int8 by ``prmt``), 8-bit symmetric codes (``ENC`` 3:
read as pairs of nibbles over twice K) and NVFP4 (``ENC`` 5: blocks of 16, two an MMA k-step,
each its own MMA), route "int8mma", and MXFP4 (``ENC`` 4: blocks of 32, each an MMA k-step;
through ``mma_linear``), at 5-32 rows, against what they ran there before (decode + cuBLAS;
MXFP4 ``mma.py``) and against cuBLAS on the bf16 weight; CUDA-graph timed
over enough weight copies to overflow the L2 cache. ``--ab``: int4 affine g64 on the weights
under ``INT8_MMA_MIN_ELEMENTS``, the Gluon TMA kernel against ``mma.py`` (their route) at 5-32
rows, same run. ``--narrow``: 8-row tiles (``launch.GLUON_TILE8_MAX_M``) against 16-row ones at 5
and 8 rows, each checked first, same run.

1. correctness, before any timing: the TMA and the register kernel, rows 5 / 16 / 17 / 32, a
   bias, a forced K-split, 4000 features (a partial tile), each within the rounding bound of
   the exact product of the weight the kernel multiplies (NF4's levels held as
   ``round(level * 127) / 127``; 8-bit codes exactly), the activations rounded per row and
   group (the bound of ``probe_gluon_tma.excess``); and how far that weight is from the
   encoding's own (NF4's levels' rounding: at most 0.4% of a group's absmax a weight);
2. ``linear`` as routed (the TMA kernel) on the issue's shapes at 5 / 16 / 32 rows: us, x
   cuBLAS bf16, x decode + cuBLAS.

    OUT=DIR python3 benches/probe_gluon_int8mma.py [--encodings nf4-g64,sym8-g128,mxfp4] [--ab]
        [--narrow]
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_mma_int8 as P  # noqa: E402
import torch  # noqa: E402

from qtensors.torch import linear as lin  # noqa: E402
from qtensors.torch._layout import E2M1_LEVELS, NF4_LEVELS  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

T0 = time.perf_counter()
say = S.REPORT.say
RESULTS: dict = {"check": [], "times": []}
C = L.MmaConfig
S.ENCODINGS.setdefault("sym8-g128", ("symmetric", 8, 128))
ARG = sys.argv[sys.argv.index("--encodings") + 1] if "--encodings" in sys.argv else ""
ENCS = ARG.split(",") if ARG else ["nf4-g64", "sym8-g128", "mxfp4", "nvfp4"]
#: the 1.1B's joined q/k/v and gate/up beside the issue's shapes under 32M elements
AB_SHAPES = [(4096, 4096), (11264, 2048), (5632, 2048), (2048, 5632), (2560, 2048), (2048, 2048)]


def run(x, w, stages: int, cfg=None, bias=None):
    name, bits, g = w.enc
    enc = L.gluon_only_shape(w.N, w.K, name, bits, g, 1) or name
    k, gs = (2 * w.K, 2 * g) if enc == "symmetric8" else (w.K, g)
    old = L.GLUON_TMA_STAGES
    L.GLUON_TMA_STAGES = stages
    try:
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, bias, w.N, k, enc, gs, cfg, True)
    finally:
        L.GLUON_TMA_STAGES = old


def held_weight(w) -> torch.Tensor:
    """The weight the kernel multiplies (float64, decoded here from the codes, not by
    qtensors): NF4 each code's level as ``round(level * 127) / 127``, 8-bit symmetric ``c -
    128``, MXFP4 / NVFP4 its E2M1 value (exact), times its group's scale (E8M0: ``2^(b -
    127)``; NVFP4: the E4M3 value times the tensor scale, rounded to fp32 once)."""
    name, bits, g = w.enc
    b = w.codes.reshape(w.N, w.K * bits // 8).to(torch.int64)
    if name == "mxfp4":
        s = torch.exp2(w.scales.double() - 127)
    elif name == "nvfp4":
        s = (w.scales.float() * w.mins.float()).double()
    else:
        s = w.scales.double()
    s = s.reshape(w.N, w.K // g).repeat_interleave(g, 1)
    if bits == 8:
        return (b - 128).double() * s
    if name in ("mxfp4", "nvfp4"):
        levels = torch.tensor(E2M1_LEVELS, dtype=torch.float64)
    else:
        levels = torch.tensor([round(v * 127) / 127 for v in NF4_LEVELS], dtype=torch.float64)
    codes = torch.stack((b & 15, b >> 4), -1).reshape(w.N, w.K)  # low nibble first
    return levels.to(codes.device)[codes] * s


def excess(x, held, got, bias, g: int) -> float:
    """The largest excess of ``got`` over the activations' rounding bound of the exact product
    with the held weight (<= 0: ok)."""
    return P.bound_excess(x, held, got, g, bias)


def section_check(ename: str) -> bool:
    say(f"## {ename} correctness: within the rounding bound of the held weight's exact product")
    ok = True
    for N, K in ((4096, 4096), (4000, 2048)):
        case = S.Case(ename, N, K)
        w0 = case.ws[0]
        held = held_weight(w0)
        own = case.ref_w.double()
        moved = ((held - own).abs().max() / own.abs().max()).item()
        say(f"{N}x{K}: the held weight against the encoding's own: max |diff| {moved:.2e} of "
            "max |W|")  # fmt: skip
        for M in (5, 16, 17, 32):
            for cfg, bias, stages in (
                (None, False, 3),
                (None, True, 0),
                (C(0, 64, 2, 4, 2, 1), False, 3),
                (C(0, 64, 2, 4, 2, 1), True, 0),
            ):
                x = case.x(M).to(S.DT)
                b = torch.randn(N, device=x.device, dtype=S.DT) if bias else None
                got = run(x, w0, stages, cfg, b)
                exc = excess(x, held, got, b, w0.enc[2])
                good = exc <= 0 and bool(torch.isfinite(got).all())
                ok &= good
                tag = ("TMA" if stages else "register") + (" bias" if bias else "")
                if cfg:
                    tag += f" k{cfg.split_k}"
                RESULTS["check"].append(dict(N=N, K=K, M=M, tag=tag, excess=exc))
                say(f"  M={M:<3} {tag:<20} excess {exc:+.1e} {'ok' if good else 'FAIL'}")
        routed = lin.linear(case.x(16).to(S.DT), w0.codes, w0.scales, w0.mins, None, [N, K],
                            w0.enc[0], w0.enc[1], w0.enc[2], 1)  # fmt: skip
        same = torch.equal(routed, run(case.x(16).to(S.DT), w0, L.GLUON_TMA_STAGES))
        ok &= same
        say(f"  linear() at 16 rows takes the TMA kernel's result: {same}")
        del case
    return ok


def routed(x, w):
    name, bits, g = w.enc
    return lin.linear(x, w.codes, w.scales, w.mins, None, [w.N, w.K], name, bits, g, 1)


def decoded(x, w):
    name, bits, g = w.enc
    return lin.linear_dequantize(x, w.codes, w.scales, w.mins, None, [w.N, w.K], name, bits, g, 1)


def mma_py(x, w):
    """``mma.py``, the fp16 / bf16 tensor-core kernel (``mma_linear`` with its int8 rows off)."""
    name, _bits, g = w.enc
    old = L.INT8_MMA_ROWS
    L.INT8_MMA_ROWS = None
    try:
        return L.mma_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g)
    finally:
        L.INT8_MMA_ROWS = old


def gluon_tma(x, w):
    name, _bits, g = w.enc
    return L.mma_int8_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, gluon=True)


def section_times(ename: str, gbps: float) -> None:
    before, bname = (mma_py, "mma.py") if ename == "mxfp4" else (decoded, "decode")
    say()
    say(f"## {ename}, bf16 x, us per call in a CUDA graph; x = speedup; hbm = share of the bound")
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {bname:>7} {'routed':>7} | x cuBLAS x {bname}"
        " hbm")  # fmt: skip
    for N, K in S.SHAPES:
        case = S.Case(ename, N, K)
        for M in (5, 16, 32):
            x = case.x(M)
            cub = case.cublas_us(x)
            dec = case.time(before, M)
            now = case.time(routed, M)
            share = case.bound_us(M, gbps) / now
            RESULTS["times"].append(
                dict(enc=ename, N=N, K=K, M=M, cublas=cub, decode=dec, routed=now)
            )
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {dec:7.1f} {now:7.1f} | {cub / now:8.2f} "
                f"{dec / now:8.2f} {share:4.0%}")  # fmt: skip
        del case
        torch.cuda.empty_cache()


def section_ab(gbps: float) -> bool:
    """int4 affine g64 under ``INT8_MMA_MIN_ELEMENTS``: the Gluon TMA kernel against ``mma.py``
    (checked first: the kernel within its rounding bound, mma.py within TOL of fp32)."""
    say()
    say("## int4-affine-g64 A/B, bf16 x, us in a CUDA graph: Gluon TMA (W4A8) vs mma.py")
    say(f"{'shape':>11} {'M':>3} | {'cublas':>7} {'mma.py':>7} {'gluon':>7} | gluon/mma x cuBLAS"
        " hbm  check")  # fmt: skip
    ok = True
    for N, K in AB_SHAPES:
        case = S.Case("int4-affine-g64", N, K)
        for M in (5, 8, 16, 32):
            x = case.x(M)
            exc = P.bound_excess(x, case.ref_w.double(), gluon_tma(x, case.ws[0]), 64)
            err = case.check(mma_py, M)
            good = exc <= 0 and err <= S.TOL
            ok &= good
            cub = case.cublas_us(x)
            old = case.time(mma_py, M)
            new = case.time(gluon_tma, M)
            share = case.bound_us(M, gbps) / new
            RESULTS["ab"].append(dict(N=N, K=K, M=M, cublas=cub, mma=old, gluon=new, excess=exc))
            say(f"{N:>5}x{K:<5} {M:>3} | {cub:7.1f} {old:7.1f} {new:7.1f} | {old / new:8.2f} "
                f"{cub / new:8.2f} {share:4.0%}  {'ok' if good else 'FAIL'}")  # fmt: skip
        del case
        torch.cuda.empty_cache()
    return ok


def with_narrow(rows: int):
    """The Gluon kernel as ``run`` with tiles of 8 rows up to ``rows`` (0: 16-row tiles)."""

    def fn(x, w, bias=None):
        old = L.GLUON_TILE8_MAX_M
        L.GLUON_TILE8_MAX_M = rows
        L._mma_int8_plan.cache_clear()
        try:
            return run(x, w, L.GLUON_TMA_STAGES, None, bias)
        finally:
            L.GLUON_TILE8_MAX_M = old
            L._mma_int8_plan.cache_clear()

    return fn


def section_narrow(gbps: float) -> bool:
    """8-row tiles against 16-row ones at 5 and 8 rows: checked (8-row tiles, with a bias),
    then timed in turn."""
    say()
    say("## 8-row tiles (GLUON_TILE8_MAX_M = 8) vs 16-row, bf16, us in a CUDA graph")
    say(f"{'encoding':<16} {'shape':>11} {'M':>3} | {'cublas':>7} {'m16':>7} {'m8':>7} | "
        "m16/m8 x cuBLAS check")  # fmt: skip
    ok = True
    narrow, wide = with_narrow(8), with_narrow(0)
    for ename in ["int4-affine-g64", *ENCS]:
        for N, K in S.SHAPES[:3] + S.SHAPES[4:5]:
            case = S.Case(ename, N, K)
            w0 = case.ws[0]
            held = case.ref_w.double() if w0.enc[0] == "affine" else held_weight(w0)
            for M in (5, 8):
                x = case.x(M)
                b = torch.randn(N, device=x.device, dtype=S.DT)
                exc = excess(x, held, narrow(x, w0, b), b, w0.enc[2])
                good = exc <= 0
                ok &= good
                cub = case.cublas_us(x)
                t16 = case.time(wide, M)
                t8 = case.time(narrow, M)
                RESULTS["narrow"].append(
                    dict(enc=ename, N=N, K=K, M=M, cublas=cub, m16=t16, m8=t8, excess=exc)
                )
                say(f"{ename:<16} {N:>5}x{K:<5} {M:>3} | {cub:7.1f} {t16:7.1f} {t8:7.1f} | "
                    f"{t16 / t8:6.2f} {cub / t8:8.2f} {'ok' if good else 'FAIL'}")  # fmt: skip
            del case
            torch.cuda.empty_cache()
    return ok


def main() -> int:
    gbps = S.copy_gbps()
    say(f"# probe_gluon_int8mma on {torch.cuda.get_device_name()}; copy {gbps:.0f} GB/s")
    ok = True
    RESULTS["ab"], RESULTS["narrow"] = [], []
    if "--ab" in sys.argv:
        ok &= section_ab(gbps)
    if "--narrow" in sys.argv:  # the encodings' own sections run without it
        ok &= section_narrow(gbps)
    for ename in [] if "--narrow" in sys.argv else ENCS:
        if section_check(ename):
            section_times(ename, gbps)
        else:
            ok = False
            say(f"{ename}: correctness FAILED, no timings")
    say(f"done in {time.perf_counter() - T0:.0f} s")
    S.REPORT.write("probe_gluon_int8mma", RESULTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
