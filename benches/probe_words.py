"""Probe (H200): the batch 1-4 ``words_kernel`` against a baseline copy of it and cuBLAS bf16,
CUDA-graph timed, over the issue's shapes; a few launch configurations of the current kernel;
``words_int8_kernel`` (int8 activations) beside them where it applies, checked first against its
own emulated ``dp4a`` (``EMULATE``: the same integers without inline assembly) on the GPU.

    OUT=DIR python3 benches/probe_words.py [--encodings a,b] [--batches 1,4] [--configs]
        [--variants MOD,...]    # other words_kernel versions: qtensors/torch/kernels/MOD.py
    ncu -k regex:words_kernel python3 benches/probe_words.py --ncu [--variants ...]  # 1 launch each
    python3 benches/probe_words.py --smoke    # CPU, TRITON_INTERPRET=1: the script's own check
        [--int8-configs]        # launch configurations of the int8 kernel
    OUT=DIR python3 benches/probe_words.py --int8-variants NAME,...|all [--encodings a,b]
        # the int8 kernel as routed against its variants (INT8_TOKENS joined by "+", e.g.
        # kspec+paired+pf; all: INT8_VARIANTS), side by side with cuBLAS; no float kernel

Prints per (encoding, shape, batch): cuBLAS bf16 ``F.linear``, then the current kernel and each
variant with the routed configuration (us; x = speedup over cuBLAS; hbm = share of the bound of
reading the packed weight once), then each extra configuration with ``--configs``.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import replace

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from _common import Report, cli_value  # noqa: E402
from bench_gpu_gemv_sweep import (  # noqa: E402
    ENCODINGS,
    SHAPES,
    SMOKE,
    TOL,
    Case,
    copy_gbps,
    graph_us,
    tiled,
)

from qtensors.torch.kernels import launch as L  # noqa: E402

REPORT = Report()
say = REPORT.say
ENCODINGS.setdefault("int8-sym-g128", ("symmetric", 8, 128))  # the int8 kernel's 8-bit path
EXTRA_CONFIGS = [  # (block_n, block_k, warps[, maxnreg])
    (4, 1024, 4),
    (8, 512, 2),
    (8, 1024, 4),
    (8, 2048, 4),
    (8, 2048, 8),
    (16, 1024, 4),
    (16, 2048, 8),
    (8, 2048, 4, 64),
    (8, 2048, 4, 80),
    (8, 2048, 4, 96),
    (8, 1024, 4, 64),
    (16, 1024, 4, 96),
]


def with_kernel(kernel):
    """``tiled``'s call with ``kernel`` as the launch module's words kernel."""

    def call(x, w, cfg):
        saved = L.words_kernel
        L.words_kernel = kernel
        L._tiled_plan.cache_clear()
        try:
            return tiled(x, w, cfg)
        finally:
            L.words_kernel = saved
            L._tiled_plan.cache_clear()

    return call


INT8_CONFIGS = [  # (block_n, block_k, warps, K-slices: 0 as launch.py picks)
    (8, 2048, 4, 0),
    (16, 2048, 4, 0),
    (4, 2048, 4, 0),
    (4, 2048, 4, 2),
    (4, 2048, 4, 3),
    (8, 2048, 4, 2),
    (8, 1024, 2, 0),
    (4, 1024, 2, 0),
    (16, 1024, 2, 0),
]


def emulated(x, w, cfg):
    """``tiled`` with the int8 kernel's ``dp4a`` emulated (``EMULATE``) on the GPU too."""
    plan = L._tiled_plan

    def patched(*args):
        kernel, grid, split, k_split, meta, _ = plan(*args)
        meta = dict(meta, EMULATE=True)
        return kernel, grid, split, k_split, meta, tuple(sorted(meta.items()))

    L._tiled_plan = patched
    try:
        return tiled(x, w, cfg)
    finally:
        L._tiled_plan = plan


def int8_cells(case: Case, M: int, cub: float, bound: float) -> list[str]:
    """The int8 kernel at its default configuration (and ``--int8-configs``' others), after the
    check that its inline ``dp4a`` gives the emulation's result."""
    name, bits, g = case.ws[0].enc
    if not L.int8_applies(M, case.K, name, bits, g, torch.bfloat16):
        return []
    x = case.x(M)
    cfg = L.int8_config(M, case.N, case.K, torch.cuda.current_device() if not SMOKE else -1)
    a, b = tiled(x, case.ws[0], cfg), emulated(x, case.ws[0], cfg)
    diff = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    if not diff <= 1e-6:
        return [f"int8 WRONG: dp4a vs emulation {diff:.1e}"]
    configs = [cfg] + [
        L.TiledConfig("words8", 0, bn, bk, split, w, 2)
        for bn, bk, w, split in (INT8_CONFIGS if "--int8-configs" in sys.argv else [])
    ]
    cells = []
    for c in configs:
        t = timed(case, lambda x, w, c=c: tiled(x, w, c), M)
        tag = f"int8 {c.block_n}/{c.block_k}/{c.num_warps}w/s{c.split_k}"
        ok = isinstance(t, float)
        cells.append(f"{tag} {t:6.1f} {cub / t:5.2f} {bound / t:4.0%}" if ok else f"{tag} {t}")
    if M >= 2 and L.mma_supported([case.N, case.K], name, bits, g, 1):
        t = timed(case, lambda x, w: L.mma_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K,
                                                  name, g), M)  # fmt: skip
        ok = isinstance(t, float)
        cells.append(f"mma (routed from {L.MMA_ROUTED.get(name)} rows) "
                     + (f"{t:6.1f} {cub / t:5.2f} {bound / t:4.0%}" if ok else t))  # fmt: skip
    return cells


#: ``words_int8_kernel``'s variant tokens, joined by "+" into a variant ("kspec+paired+pf"):
#: each changes the routed configuration, but "paired", which reads an affine weight's scales
#: and mins interleaved (``launch.paired_scales``; no change on other encodings)
INT8_TOKENS = {
    "paired": lambda c: c,
    "pf": lambda c: replace(c, prefetch=True),
    "kspec": lambda c: replace(c, kspec=True),
    "n4": lambda c: replace(c, block_n=4),
    "n8": lambda c: replace(c, block_n=8),
    "s2": lambda c: replace(c, split_k=2),
    "k4096": lambda c: replace(c, block_k=4096),
    "w2k1024": lambda c: replace(c, block_k=1024, num_warps=2),
    "w1k512": lambda c: replace(c, block_k=512, num_warps=1),
    "r56": lambda c: replace(c, maxnreg=56),
    "r64": lambda c: replace(c, maxnreg=64),
    "r80": lambda c: replace(c, maxnreg=80),
    "cg": lambda c: replace(c, stream=True),
    "cp2": lambda c: replace(c, pipeline=2),
    "cp3": lambda c: replace(c, pipeline=3),
    "l2a1": lambda c: replace(c, l2_ahead=1),
    "l2a2": lambda c: replace(c, l2_ahead=2),
}
#: ``--int8-variants all``
INT8_VARIANTS = [
    "paired",
    "kspec",
    "kspec+paired",
    "pf+paired",
    "kspec+pf+paired",
    "kspec+paired+l2a1",
    "kspec+paired+cp2",
    "kspec+paired+cp3",
    "kspec+paired+cg",
    "kspec+paired+n4",
    "kspec+paired+n8",
    "kspec+pf+paired+n8",
    "kspec+pf+paired+s2",
    "kspec+paired+w2k1024",
    "kspec+pf+paired+w2k1024",
]


def int8_variant(name: str, routed, affine: bool):
    """(configuration, paired) of the variant ``name`` of the routed configuration."""
    cfg = routed
    for token in name.split("+"):
        cfg = INT8_TOKENS[token](cfg)
    return cfg, affine and "paired" in name.split("+")


def _pairs(w) -> torch.Tensor | None:
    """The weight copy's interleaved affine scales and mins, made once (None: not affine)."""
    if w.enc[0] != "affine":
        return None
    if getattr(w, "pairs", None) is None:
        w.pairs = L.paired_scales(w.scales, w.mins)
    return w.pairs


def int8_variant_cells(case: Case, M: int, cub: float, bound: float, names: list[str]) -> list:
    """The int8 kernel as routed ("now"), then each variant: checked against the reference
    (``timed``), us, speedup over cuBLAS, share of the bound, and its time over the routed
    kernel's."""
    name, bits, g = case.ws[0].enc
    if not L.int8_applies(M, case.K, name, bits, g, torch.bfloat16):
        return []
    device = torch.cuda.current_device() if not SMOKE else -1
    routed = L.int8_config(M, case.N, case.K, device, bits)
    runs = {"now": (routed, False)}
    for v in names:
        run = int8_variant(v, routed, name == "affine")
        if run not in runs.values():  # the same kernel as an earlier one: timed once
            runs[v] = run
    cells, base = [], None
    for v, (cfg, paired) in runs.items():

        def call(x, w, cfg=cfg, paired=paired):
            n, b, gs = w.enc
            pairs = _pairs(w) if paired else None
            return L.tiled_linear(x, w.codes, w.scales, w.mins, None, w.N, w.K, n, b, gs, cfg,
                                  pairs=pairs)  # fmt: skip

        try:
            t = timed(case, call, M)
        except Exception as exc:  # a configuration the compiler refuses
            t = f"{type(exc).__name__}: {str(exc)[:60]}"
        tag = f"{v:<20} {cfg.block_n}/{cfg.block_k}/{cfg.num_warps}w/s{cfg.split_k}"
        tag += "/pf" if cfg.prefetch else ""
        tag += ("/ks" if cfg.kspec else "") + (f"/r{cfg.maxnreg}" if cfg.maxnreg else "")
        tag += f"/l2a{cfg.l2_ahead}" if cfg.l2_ahead else ""
        tag += (f"/cp{cfg.pipeline}" if cfg.pipeline else "") + ("/cg" if cfg.stream else "")
        if isinstance(t, float):
            base = base or t
            cells.append(f"int8 {tag:<40} {t:6.1f} {cub / t:5.2f} {bound / t:4.0%}"
                         f"  {t / base:5.3f} of now")  # fmt: skip
        else:
            cells.append(f"int8 {tag:<40} {t}")
    return cells


def timed(case: Case, fn, M: int) -> str:
    err = case.check(fn, M)
    if not err <= TOL:
        return f"WRONG {err:.1e}"
    return case.time(fn, M)


def main() -> None:
    encodings = cli_value("--encodings", "int4-affine-g64,int4-sym-g64,nf4-g64,mxfp4,nvfp4").split(
        ","
    )
    batches = [int(b) for b in cli_value("--batches", "1").split(",")]
    kernels = {"now": L.words_kernel}
    for name in filter(None, cli_value("--variants", "").split(",")):
        kernels[name] = importlib.import_module(f"qtensors.torch.kernels.{name}").words_kernel
    if "--ncu" in sys.argv:  # one launch of each kernel on the first shape, for ncu -k words_kernel
        case = Case(encodings[0], *SHAPES[0])
        cfg = L.tiled_config(batches[0], *SHAPES[0], 4, case.ws[0].enc[2])
        for name, kernel in kernels.items():
            print(name, case.check(lambda x, w, k=kernel: with_kernel(k)(x, w, cfg), batches[0]))
        return
    variants = cli_value("--int8-variants", "")
    if variants:
        names = INT8_VARIANTS if variants == "all" else variants.split(",")
        unknown = {t for v in names for t in v.split("+")} - set(INT8_TOKENS)
        if unknown:
            raise SystemExit(f"unknown --int8-variants tokens {unknown}: {list(INT8_TOKENS)}")
        return int8_variants_main(encodings, batches, names)
    gbps = copy_gbps()
    say(f"# words kernel probe on {'cpu (smoke)' if SMOKE else torch.cuda.get_device_name()}, "
        f"triton {triton.__version__}; copy {gbps:.0f} GB/s; us per call in a CUDA graph; "
        f"x: speedup over cuBLAS bf16; hbm: share of the bound")  # fmt: skip
    say(
        f"{'encoding':<16} {'shape':>11} M | {'cublas':>7} | "
        + " | ".join(f"{k:>12} {'x':>5} {'hbm':>4}" for k in kernels)
        + " | config"
    )
    for ename in encodings:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            for M in batches:
                x = case.x(M)
                cub = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
                cfg = L.tiled_config(M, N, K, 4, case.ws[0].enc[2])
                if cfg.kernel != "words":
                    cfg = L.WORDS_DEFAULT
                bound = case.bound_us(M, gbps)
                cells = []
                for kernel in kernels.values():
                    t = timed(case, lambda x, w, k=kernel, c=cfg: with_kernel(k)(x, w, c), M)
                    if isinstance(t, float):
                        cells.append(f"{t:12.1f} {cub / t:5.2f} {bound / t:4.0%}")
                    else:
                        cells.append(f"{t:>23}")
                say(f"{ename:<16} {N:>5}x{K:<5} {M} | {cub:7.1f} | " + " | ".join(cells)
                    + f" | {cfg.block_n}/{cfg.block_k}/{cfg.num_warps}w")  # fmt: skip
                for cell in int8_cells(case, M, cub, bound):
                    say(f"{'':<16} {'':>11}   | {'':>7} | {cell}")
                if "--configs" in sys.argv:
                    for bn, bk, warps, *regs in EXTRA_CONFIGS:
                        c2 = L.TiledConfig("words", 0, bn, bk, 0, warps, 2, *regs)
                        cells = []
                        for kernel in kernels.values():
                            t = timed(case, lambda x, w, k=kernel, c=c2: with_kernel(k)(x, w, c), M)
                            ok = isinstance(t, float)
                            cells.append(f"{t:12.1f} {cub / t:5.2f} {bound / t:4.0%}" if ok
                                         else f"{t:>23}")  # fmt: skip
                        tag = f"{bn:>4}/{bk:>4}/{warps}w" + (f"/{regs[0]}r" if regs else "    ")
                        say(f"{'':<16} {tag} | {'':>7} | " + " | ".join(cells))
            del case
            torch.cuda.empty_cache()
    REPORT.write("probe_words", {})


def int8_variants_main(encodings: list[str], batches: list[int], names: list[str]) -> None:
    """``--int8-variants``: per (encoding, shape, batch), cuBLAS bf16, then the int8 kernel as
    routed and each variant; ``$OUT/probe_words_int8_variants.txt`` rewritten after each shape
    (a run cut short keeps what it measured)."""
    start = time.perf_counter()

    gbps = copy_gbps()
    device = "cpu (smoke)" if SMOKE else torch.cuda.get_device_name()
    say(
        f"# int8 GEMV variants on {device}, triton {triton.__version__}; copy {gbps:.0f} GB/s;"
        " us per call in a CUDA graph; x: speedup over cuBLAS bf16; hbm: share of the bound"
    )
    say(
        f"{'encoding':<16} {'shape':>11} M | {'cublas':>7} | variant, config (features/codes/"
        "warps/K-slices[/pf][/ks][/rN][/l2aN][/cpN][/cg]), us, x, hbm, time over the routed one"
    )
    for ename in encodings:
        for N, K in SHAPES:
            case = Case(ename, N, K)
            for M in batches:
                x = case.x(M)
                cub = graph_us([lambda d=d, x=x: F.linear(x, d) for d in case.dense])
                bound = case.bound_us(M, gbps)
                say(f"{ename:<16} {N:>5}x{K:<5} {M} | {cub:7.1f} |")
                for cell in int8_variant_cells(case, M, cub, bound, names):
                    say(f"{'':<16} {'':>11}   | {'':>7} | {cell}")
            del case
            torch.cuda.empty_cache()
            REPORT.write("probe_words_int8_variants", {})
    say(f"# {time.perf_counter() - start:.0f} s")
    REPORT.write("probe_words_int8_variants", {})


if __name__ == "__main__":
    main()
