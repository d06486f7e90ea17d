"""Probe (H200): the Gluon W4A8 kernel reading codes as stored against codes re-packed per program
tile (``mma_int8_gluon`` ``TILED``), batch 8 / 16, CUDA-graph timed over enough weight copies to
overflow the L2 cache, with cuBLAS bf16 in the same run.

As stored, a program's K step reads 64 bytes from each of its 64 rows (rows K / 2 bytes apart):
64 short runs a step. Re-packed as ``[N / 64, K / 128, 64, 64]`` bytes, a step is one contiguous
4 KiB block and a program's whole K slice one run. ``TILED`` 2 also interleaves a row's two
64-code chunks by pairs of words, so a thread's 16 bytes of a step are one load. Each variant is
checked against the as-stored kernel before it is timed (same arithmetic: equal outputs); the
re-pack's own time is reported (a one-off at load time, if it were adopted).

    OUT=DIR python3 benches/probe_gluon_tiled.py [--quick | --diag | --regs]
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
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

QUICK = "--quick" in sys.argv
BLOCK_N, STEP = 64, 128  # the routed default: 64 features, 2 groups of 64 a step
say = S.REPORT.say
RESULTS: dict = {"rows": []}


def repack(codes: torch.Tensor, mode: int) -> torch.Tensor:
    """``codes [N, K / 2]`` bytes as ``[N / 64, K / 128, 64, 64]`` (mode 2: each 64-byte row
    block's words reordered from (chunk, word pair, word) to (word pair, chunk, word))."""
    N, B = codes.shape
    t = codes.view(N // BLOCK_N, BLOCK_N, B // (STEP // 2), STEP // 2).permute(0, 2, 1, 3)
    if mode == 2:
        t = t.reshape(*t.shape[:3], 2, 4, 2, 4).permute(0, 1, 2, 4, 3, 5, 6)
    return t.contiguous().view(N, B)


class Tiled:
    """A weight's parts with its codes re-packed."""

    def __init__(self, w, mode: int) -> None:
        self.N, self.K, self.enc = w.N, w.K, w.enc
        self.scales, self.mins = w.scales, w.mins
        self.codes = repack(w.codes.view(torch.uint8).view(w.N, -1), mode).view(-1)


def run(x, w, mode: int, diag: int = 0, cfg=None):
    name, _bits, g = w.enc
    old = L.GLUON_TILED, L.GLUON_DIAG
    L.GLUON_TILED, L.GLUON_DIAG = mode, diag
    try:
        return L.mma_int8_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, name, g, cfg, True)
    finally:
        L.GLUON_TILED, L.GLUON_DIAG = old


def registers(gbps: float) -> None:
    """The kernel capped at 128 registers (8 programs of 2 warps an SM instead of 6), K split
    as routed or 8 ways, codes as stored or re-packed (``TILED`` 2); checked first."""
    say()
    say("## register cap, 16 rows: us (CUDA graph, pre-pass included); x: / as routed")
    say(f"{'encoding':<17} {'shape':>11} | {'routed':>6} | " + " ".join(
        f"{lab:>14}" for lab in ("r128", "r128/k8", "t2/r128", "t2/r128/k8", "t2/k8")))  # fmt: skip
    for ename in ("int4-affine-g64", "int4-sym-g64"):
        for N, K in S.SHAPES:
            case = S.Case(ename, N, K)
            x = case.x(16).to(S.DT)
            t2 = [Tiled(w, 2) for w in case.ws]
            ref = run(x, case.ws[0], 0)
            base = case.time(lambda x_, w: run(x_, w, 0), 16)
            cells = []
            for tiled, regs, split in [(0, 128, 0), (0, 128, 8), (2, 128, 0), (2, 128, 8),
                                       (2, 0, 8)]:  # fmt: skip
                cfg = L.MmaConfig(0, 64, 2, split, num_warps=2)
                ws = t2 if tiled else case.ws
                old = L.GLUON_MAXNREG
                L.GLUON_MAXNREG = regs
                try:
                    got = run(x, ws[0], tiled, 0, cfg)
                    if not torch.allclose(
                        got.float(), ref.float(), rtol=2e-2, atol=1e-2 * ref.abs().max().item()
                    ):
                        cells.append("differs")
                        continue
                    us = S.graph_us(
                        [lambda w=w, c=cfg, t=tiled, x=x: run(x, w, t, 0, c) for w in ws]
                    )
                finally:
                    L.GLUON_MAXNREG = old
                cells.append(f"{us:6.1f} {base / us:5.2f}x")
                RESULTS.setdefault("registers", []).append(
                    dict(enc=ename, N=N, K=K, tiled=tiled, maxnreg=regs, split=split, us=us,
                         routed=base)
                )  # fmt: skip
            say(f"{ename:<17} {N:>5}x{K:<5} | {base:6.1f} | " + " ".join(f"{c:>14}" for c in cells))
            del case, t2
            torch.cuda.empty_cache()


def diagnose(gbps: float) -> None:
    """What bounds the kernel: the full kernel, its loads alone (``GLUON_DIAG`` 1: no MMA, the
    loaded words xor-ed), its arithmetic alone (2: every step re-reads the slice's first two,
    cache hits), at 2 / 4 warps and K split 2-16 ways (results wrong by design: timing only)."""
    say()
    say("## diagnosis, int4-affine-g64, 16 rows, as stored: us (CUDA graph, pre-pass included)")
    say(f"{'shape':>11} {'config':>14} | {'full':>6} {'loads':>6} {'arith':>6} | hbm of loads")
    for N, K in [(8192, 8192), (4096, 4096), (14336, 4096)]:
        case = S.Case("int4-affine-g64", N, K)
        for warps, split in [(2, 0), (2, 8), (2, 16), (4, 0), (4, 8)]:
            cfg = L.MmaConfig(0, 64, 2, split, num_warps=warps)
            t = [case.time(lambda x_, w, d=d, c=cfg: run(x_, w, 0, d, c), 16) for d in (0, 1, 2)]
            bound = case.bound_us(16, gbps)
            say(f"{N:>5}x{K:<5} {f'{warps}w/k{split}':>14} | {t[0]:6.1f} {t[1]:6.1f} {t[2]:6.1f}"
                f" | {bound / t[1]:4.0%}")  # fmt: skip
            RESULTS.setdefault("diag", []).append(
                dict(N=N, K=K, warps=warps, split=split, full=t[0], loads=t[1], arith=t[2])
            )
        del case
        torch.cuda.empty_cache()


def main() -> int:
    t0 = time.perf_counter()
    gbps = S.copy_gbps()
    say(f"# probe_gluon_tiled on {torch.cuda.get_device_name()}; copy {gbps:.0f} GB/s")
    say(
        f"{'encoding':<17} {'shape':>11} {'M':>3} | {'cublas':>7} {'stored':>7} {'tiled':>7} "
        f"{'tiled16':>7} {'pre':>5} | {'x cub':>5} {'x stored':>8} {'hbm':>4} | repack us"
    )
    ok = True
    if "--diag" in sys.argv or "--regs" in sys.argv:
        (diagnose if "--diag" in sys.argv else registers)(gbps)
        S.REPORT.write("probe_gluon_tiled", RESULTS)
        return 0
    encs = ["int4-affine-g64"] if QUICK else ["int4-affine-g64", "int4-sym-g64"]
    for ename in encs:
        for N, K in S.SHAPES[:3] if QUICK else S.SHAPES:
            case = S.Case(ename, N, K)
            tiled = {m: [Tiled(w, m) for w in case.ws] for m in (1, 2)}
            w0 = case.ws[0].codes.view(torch.uint8).view(N, -1)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
            repack(w0, 2)
            ev[1].record()
            torch.cuda.synchronize()
            repack_us = ev[0].elapsed_time(ev[1]) * 1e3
            for M in (8, 16) if not QUICK else (16,):
                x = case.x(M).to(S.DT)
                ref = run(x, case.ws[0], 0)
                same = {m: torch.equal(run(x, tiled[m][0], m), ref) for m in (1, 2)}
                if not all(same.values()):
                    ok = False
                    say(f"{ename} {N}x{K} M={M}: re-packed output differs: {same}")
                    continue
                cub = S.graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense[:8]])
                us = {0: case.time(lambda x_, w: run(x_, w, 0), M)}
                for m in (1, 2):
                    us[m] = S.graph_us([lambda w=w, m=m, x=x: run(x, w, m) for w in tiled[m]])
                pre = P.prepass_us(case, M)
                best = min(us[1], us[2])
                bound = case.bound_us(M, gbps)
                say(
                    f"{ename:<17} {N:>5}x{K:<5} {M:>3} | {cub:7.1f} {us[0]:7.1f} {us[1]:7.1f} "
                    f"{us[2]:7.1f} {pre:5.1f} | {cub / best:5.2f} {us[0] / best:8.2f} "
                    f"{bound / best:4.0%} | {repack_us:.0f}"
                )
                RESULTS["rows"].append(
                    dict(enc=ename, N=N, K=K, M=M, cublas=cub, stored=us[0], tiled=us[1],
                         tiled16=us[2], prepass=pre, bound=bound, repack_us=repack_us)
                )  # fmt: skip
            del case, tiled
            torch.cuda.empty_cache()
    say(f"done in {time.perf_counter() - t0:.0f} s")
    S.REPORT.write("probe_gluon_tiled", RESULTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
