"""GPU checks and benchmarks of qtensors.torch, in one run (device time is scarce).

    python3 benches/bench_gpu.py --out DIR [--sections check,sweep,kernels,load,minilm]

Sections:

* ``check``: the Triton kernel against the CPU op (Rust core) on random data of many shapes,
  encodings, bit widths, axes, scale and output dtypes (ragged groups included), outputs
  poisoned with NaN first; the plain-torch op on the GPU must match the CPU bit for bit. Large
  tensors (16384^2 and one past 2^31 elements) against plain torch on the GPU.
* ``sweep``: launch configurations of the kernel on 8192^2 for the main cases.
* ``kernels``: for 4096^2, 8192^2 and 16384^2 and each case, the kernel's time and bandwidth
  ((codes + scales + mins + output bytes) / time) against a device copy of the same output
  bytes (read + write) and against plain torch doing the same math (``dequantize_torch``).
* ``load``: time to load a 1.1B-parameter Llama-shaped model to the GPU from qtensors (4-bit,
  kept quantized / decoded on the GPU) against ``safetensors.torch.load_file(device=DEV)`` of
  the same weights in fp16, each in a fresh process, cold (page cache dropped) and warm.
* ``minilm``: the converted MiniLM folder carried in ``.devdata`` loaded on the GPU; sentence
  embeddings against those computed on the CPU here (fp32 and quantized).

Results go to ``DIR`` (text tables and a JSON of every number); the tables are printed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from _common import LLAMA_1B, drop_caches

RESULTS: dict[str, Any] = {}
LINES: list[str] = []
# QT_BENCH_DRY=1 (with TRITON_INTERPRET=1): a quick run of every code path on the CPU with tiny
# sizes, to check the script itself before spending device time.
DRY = os.environ.get("QT_BENCH_DRY") == "1"
DEV = "cpu" if DRY else "cuda"


def S(n: int) -> int:
    """A size, shrunk in a dry run."""
    return max(8, n // 128) if DRY else n


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def empty_cache() -> None:
    if not DRY:
        torch.cuda.empty_cache()


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

CASES = {
    # name: (encoding, bits, group_size, axis, scale dtype, out dtype)
    "int4-g64 ax-1": ("affine", 4, 64, -1, torch.float16, torch.float16),
    "int4-g64 ax0 (flexgen)": ("affine", 4, 64, 0, torch.float16, torch.float16),
    "int8 sym g128 ax-1": ("symmetric", 8, 128, -1, torch.float16, torch.float16),
    "nf4 g64 ax-1": ("nf4", 4, 64, -1, torch.float16, torch.float16),
    "int4-g128 ax-1": ("affine", 4, 128, -1, torch.float16, torch.float16),
    "int4-g64 ax-1 -> bf16": ("affine", 4, 64, -1, torch.bfloat16, torch.bfloat16),
    "int3-g64 ax-1": ("affine", 3, 64, -1, torch.float16, torch.float16),
    "int2-g64 ax0": ("affine", 2, 64, 0, torch.float16, torch.float16),
    # the FP4 formats: stored scales (E8M0 bytes; E4M3 with the fp32 tensor scale in ``mins``)
    "mxfp4 ax-1": ("mxfp4", 4, 32, -1, torch.uint8, torch.float16),
    "nvfp4 ax-1": ("nvfp4", 4, 16, -1, torch.float8_e4m3fn, torch.float16),
}
#: the encodings whose group size the format fixes
FIXED_GROUPS = {"mxfp4": 32, "nvfp4": 16}
MAIN_CASES = list(CASES)[:4]


def random_parts(shape, encoding, bits, group_size, axis, sdt, device, gen=None):
    from qtensors.torch._layout import codes_nbytes, scale_shape

    nb = codes_nbytes(shape, bits)
    codes = torch.randint(0, 256, (nb,), dtype=torch.uint8, device=device, generator=gen)
    ss = scale_shape(shape, axis, group_size)
    mins = None
    if encoding == "mxfp4":  # E8M0 exponents around 2^0
        scales = torch.randint(118, 131, ss, dtype=torch.uint8, device=device, generator=gen)
        return codes, scales, mins
    scales = (torch.rand(ss, device=device, generator=gen) * 0.1 + 0.001).to(sdt)
    if encoding == "nvfp4":  # E4M3 block scales up to 448, one fp32 tensor scale
        scales = (torch.rand(ss, device=device, generator=gen) * 440 + 0.01).to(sdt)
        mins = torch.rand((), device=device, generator=gen) * 1e-3 + 1e-5
    elif encoding == "affine":
        mins = (torch.randn(ss, device=device, generator=gen) * 0.05).to(sdt)
    return codes, scales, mins


def ulp_ok(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(every element within 1 ulp of the output dtype, fraction exactly equal, max ulps)."""
    g = got.double()
    r = ref.double()
    if torch.isnan(g).any():
        return False, 0.0, float("nan")
    fi = torch.finfo(dtype)
    ulp = torch.clamp(r.abs(), min=fi.tiny) * fi.eps
    # an fp32 fma differs by <= 1 fp32 ulp before rounding, so <= 1 ulp of the output after
    d = (g - r).abs() / ulp
    exact = (g == r).double().mean().item()
    mx = d.max().item() if d.numel() else 0.0
    return mx <= 1.0 + 1e-9, exact, mx


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------


def section_check() -> None:
    from qtensors.torch import ops
    from qtensors.torch._layout import normalize_axis
    from qtensors.torch.kernels import dequant as tk

    say("## check: Triton (CUDA) vs CPU op (Rust core); plain torch on CUDA vs CPU (bit-exact)")
    gen = torch.Generator(device="cpu").manual_seed(1234)
    shapes = [
        (1,),
        (7,),
        (3, 5),
        (17, 33),
        (64, 64),
        (100, 130),
        (255, 129),
        (4, 6, 10),
        (2, 3, 5, 7),
        (1, 4096),
        (4096, 3),
        (384, 1536),
        (1000, 1000),
    ]
    if DRY:
        shapes = [s for s in shapes if math.prod(s) <= 1000]
    encs = [("affine", b) for b in range(1, 9)] + [("symmetric", b) for b in range(2, 9)]
    encs += [("nf4", 4), ("mxfp4", 4), ("nvfp4", 4)]
    sdts = [torch.float16, torch.bfloat16, torch.float32]
    odts = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    cfgs = [
        None,
        tk.Config(1, 16, grouped=False, paired=False),
        tk.Config(8, 128, num_warps=8, persistent=2),
        tk.Config(2, 256, grouped=False),
    ]
    n = fails = 0
    min_exact = 1.0
    i = 0
    for ei, (encoding, bits) in enumerate(encs):
        for k in range(5):
            shape = shapes[(ei * 5 + k) % len(shapes)]
            i += 1
            rank = len(shape)
            axis = [-1, 0, rank // 2][i % 3] if rank > 1 else 0
            g = [1, 2, 3, 7, 16, 32, 64, 100, 128, 256][(i * 7) % 10]
            g = FIXED_GROUPS.get(encoding, g)
            sdt = {"nvfp4": torch.float8_e4m3fn}.get(encoding, sdts[i % 3])
            odt = odts[(i // 3) % 4]
            codes, scales, mins = random_parts(shape, encoding, bits, g, axis, sdt, "cpu", gen)
            ref = ops.dequantize_op(codes, scales, mins, list(shape), encoding, bits, g, axis, odt)
            cc, sc, mc = codes.to(DEV), scales.to(DEV), None if mins is None else mins.to(DEV)
            a = normalize_axis(axis, rank)
            tref = ops.dequantize_torch(cc, sc, mc, list(shape), encoding, bits, g, a, odt).cpu()
            n += 1
            if not torch.equal(tref, ref):
                fails += 1
                say(f"  FAIL torch-cuda {shape} {encoding}{bits} g{g} ax{axis} {sdt}->{odt}")
            for cfg in cfgs if i % 3 == 0 else cfgs[:1]:
                out = torch.full(shape, float("nan"), dtype=odt, device=DEV)
                tk.dequantize_triton(
                    cc, sc, mc, list(shape), encoding, bits, g, a, odt, config=cfg, out=out
                )
                ok, exact, mx = ulp_ok(out.cpu(), ref, odt)
                n += 1
                min_exact = min(min_exact, exact)
                if not ok or exact < 1.0:
                    fails += not ok
                    say(
                        f"  {'FAIL' if not ok else 'inexact'} triton {cfg} {shape} {encoding}{bits}"
                        f" g{g} ax{axis} {sdt}->{odt}: max {mx:.2f} ulp, exact {exact:.4f}"
                    )
    # through the op (dispatch to CUDA)
    codes, scales, mins = random_parts((300, 200), "affine", 4, 64, 0, torch.float16, DEV)
    a = ops.dequantize_op(codes, scales, mins, [300, 200], "affine", 4, 64, 0, torch.float16)
    b = ops.dequantize_op(
        codes.cpu(), scales.cpu(), mins.cpu(), [300, 200], "affine", 4, 64, 0, torch.float16
    )
    ok, _, _ = ulp_ok(a.cpu(), b, torch.float16)
    n += 1
    fails += not ok
    say(f"small cases: {n} comparisons, {fails} failures; min exact fraction {min_exact:.4f}")

    # large: 16384^2 for every case, vs plain torch on the GPU
    big_fail = 0
    for name, (encoding, bits, g, axis, sdt, odt) in CASES.items():
        shape = (S(16384), S(16384))
        codes, scales, mins = random_parts(shape, encoding, bits, g, axis, sdt, DEV)
        out = torch.full(shape, float("nan"), dtype=odt, device=DEV)
        a = normalize_axis(axis, 2)
        tk.dequantize_triton(codes, scales, mins, list(shape), encoding, bits, g, a, odt, out=out)
        ref = ops.dequantize_torch(codes, scales, mins, list(shape), encoding, bits, g, a, odt)
        ok, exact, mx = ulp_ok(out, ref, odt)
        big_fail += not ok
        say(f"  16384^2 {name}: ok={ok} exact={exact:.5f} max_ulp={mx:.2f}")
        del codes, scales, mins, out, ref
        empty_cache()

    # past 2^31 elements (64-bit indices): check the last rows against plain torch on a slice
    for axis in (-1, 0):
        R, C = S(524296 * 8) // 8, S(4096)  # 2^31 + 32768 elements, ragged last group along axis 0
        codes, scales, mins = random_parts((R, C), "affine", 4, 64, axis, torch.float16, DEV)
        out = torch.full((R, C), float("nan"), dtype=torch.float16, device=DEV)
        a = normalize_axis(axis, 2)
        tk.dequantize_triton(
            codes, scales, mins, [R, C], "affine", 4, 64, a, torch.float16, out=out
        )
        r0 = (R - 72) // 64 * 64  # a multiple of 64
        sub_codes = codes[r0 * C // 2 :]
        if a == 1:
            ss, sm = scales[r0:], mins[r0:]
        else:
            ss, sm = scales[r0 // 64 :], mins[r0 // 64 :]
        ref = ops.dequantize_torch(
            sub_codes, ss, sm, [R - r0, C], "affine", 4, 64, a, torch.float16
        )
        ok, exact, mx = ulp_ok(out[r0:], ref, torch.float16)
        nan_any = torch.isnan(out).any().item()
        big_fail += (not ok) or nan_any
        say(f"  [{R}, {C}] (2^31+ elements) axis {axis}: tail ok={ok} exact={exact:.5f}")
        say(f"    NaN left anywhere (unwritten output): {nan_any}")
        del codes, scales, mins, out
        empty_cache()
    RESULTS["check"] = {"comparisons": n, "failures": fails, "large_failures": big_fail}
    say(f"check: {'PASS' if fails == 0 and big_fail == 0 else 'FAIL'}")
    say()


# ------------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    import triton

    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_ms(nbytes: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=DEV).normal_()
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src))


def kernel_case_ms(shape, case, cfg=None, impl="triton"):
    from qtensors.torch import ops
    from qtensors.torch._layout import normalize_axis
    from qtensors.torch.kernels import dequant as tk

    encoding, bits, g, axis, sdt, odt = case
    codes, scales, mins = random_parts(shape, encoding, bits, g, axis, sdt, DEV)
    a = normalize_axis(axis, len(shape))
    out = torch.empty(shape, dtype=odt, device=DEV)
    if impl == "triton":

        def fn():
            tk.dequantize_triton(
                codes, scales, mins, list(shape), encoding, bits, g, a, odt, config=cfg, out=out
            )
    elif impl == "op":

        def fn():
            ops.dequantize_op(codes, scales, mins, list(shape), encoding, bits, g, axis, odt)
    else:

        def fn():
            ops.dequantize_torch(codes, scales, mins, list(shape), encoding, bits, g, a, odt)

    fn()
    sync()
    ms = bench_ms(fn)
    nbytes = codes.numel() + scales.numel() * scales.element_size()
    nbytes += 0 if mins is None else mins.numel() * mins.element_size()
    nbytes += out.numel() * out.element_size()
    return ms, nbytes


# ------------------------------------------------------------------------------------------------
# sweep
# ------------------------------------------------------------------------------------------------


def sweep_configs(lastaxis: bool, bits: int):
    from qtensors.torch.kernels.dequant import Config

    out = []
    bcs = (512, 1024, 2048, 4096) if lastaxis else (128, 256, 512, 1024)
    for bc in bcs:
        for tile in (4096, 8192, 16384):
            br = tile // bc
            if 1 <= br <= 64:
                for w in (4, 8):
                    out.append(Config(br, bc, num_warps=w))
    return out


def section_sweep(size: int = S(8192)) -> dict[str, Any]:

    say(f"## sweep: launch configurations on {size}x{size} (median ms; GB/s of bytes moved)")
    best: dict[str, Any] = {}
    for name in [*MAIN_CASES, "int3-g64 ax-1", "int2-g64 ax0", "mxfp4 ax-1", "nvfp4 ax-1"]:
        case = CASES[name]
        lastaxis = case[3] == -1
        shape = (size, size)
        rows = []
        stage1 = sweep_configs(lastaxis, case[1])
        if name in ("int3-g64 ax-1", "int2-g64 ax0"):
            stage1 = stage1[::3]
        for cfg in stage1:
            try:
                ms, nb = kernel_case_ms(shape, case, cfg)
            except Exception as exc:
                rows.append((cfg, float("inf"), 0, repr(exc)[:80]))
                continue
            rows.append((cfg, ms, nb / ms / 1e6, ""))
        top = min(rows, key=lambda r: r[1])[0]
        stage2 = [dataclasses.replace(top, fp_fusion=True)]
        for grouped in (True, False):
            for paired in (True, False) if case[1] == 4 else (True,):
                for pers in (0, 4):
                    stage2.append(
                        dataclasses.replace(top, persistent=pers, paired=paired, grouped=grouped)
                    )
        if case[1] != 8:
            stage2.append(dataclasses.replace(top, paired=False, octets=True))
            stage2.append(dataclasses.replace(top, paired=False, octets=False))
        for cfg in stage2:
            if cfg == top:
                continue
            try:
                ms, nb = kernel_case_ms(shape, case, cfg)
            except Exception as exc:
                rows.append((cfg, float("inf"), 0, repr(exc)[:80]))
                continue
            rows.append((cfg, ms, nb / ms / 1e6, ""))
        rows.sort(key=lambda r: r[1])
        dms, nb = kernel_case_ms(shape, case, None)
        say(f"### {name}: default config {dms * 1000:.1f} us ({nb / dms / 1e6:.0f} GB/s)")
        for cfg, ms, gbs, err in rows[:8]:
            say(f"  {ms * 1000:8.1f} us {gbs:7.0f} GB/s  {cfg} {err}")
        fails = [r for r in rows if r[3]]
        for cfg, _, _, err in fails[:3]:
            say(f"  FAILED {cfg}: {err}")
        say(f"  ({len(rows)} configs, {len(fails)} failed; slowest {rows[-1][1] * 1000:.1f} us)")
        best[name] = rows[0][0]
        RESULTS.setdefault("sweep", {})[name] = [
            {"config": str(c), "ms": ms, "GBps": g, "error": e} for c, ms, g, e in rows
        ]
    say()
    return best


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


def section_kernels(best: dict[str, Any], rounds: int = 3) -> None:
    from qtensors.torch import ops
    from qtensors.torch._layout import normalize_axis
    from qtensors.torch.kernels import dequant as tk

    say("## kernels: bandwidth = (codes + scales + mins + output bytes) / time")
    say(
        f"each time: the fastest of {rounds} interleaved rounds (kernel, plain torch, copy), each "
        "round the median of triton.testing.do_bench (L2 flushed before every call); spread = "
        "(slowest round - fastest) / fastest of the kernel"
    )
    big = S(1 << 30)
    peak = 2 * big / (copy_ms(big) / 1e3) / 1e9
    say(f"device copy of 1 GiB (read + write): {peak:.0f} GB/s")
    RESULTS["copy_1GiB_GBps"] = peak
    say(
        f"{'case':24} {'shape':>11} {'kernel us':>10} {'GB/s':>6} {'copy GB/s':>9} "
        f"{'vs copy':>7} {'torch us':>9} {'vs torch':>8} {'spread':>6} {'tuned us':>8}"
    )
    rows = []
    for name, case in CASES.items():
        encoding, bits, g, axis, sdt, odt = case
        for size in (S(4096), S(8192), S(16384)):
            shape = (size, size)
            codes, scales, mins = random_parts(shape, encoding, bits, g, axis, sdt, DEV)
            a = normalize_axis(axis, 2)
            out = torch.empty(shape, dtype=odt, device=DEV)
            src = torch.empty(shape, dtype=odt, device=DEV).normal_()
            dst = torch.empty_like(src)
            args = (codes, scales, mins, list(shape), encoding, bits, g, a, odt)

            def kern(cfg=None, args=args, out=out):
                tk.dequantize_triton(*args, config=cfg, out=out)

            def plain(args=args):
                ops.dequantize_torch(*args)

            def copy(src=src, dst=dst):
                dst.copy_(src)

            kern()
            plain()
            sync()
            ks, ts, cs = [], [], []
            for _ in range(rounds):
                ks.append(bench_ms(kern))
                ts.append(bench_ms(plain))
                cs.append(bench_ms(copy))
            ms, tms, cms = min(ks), min(ts), min(cs)
            nb = codes.numel() + scales.numel() * scales.element_size()
            nb += 0 if mins is None else mins.numel() * mins.element_size()
            out_bytes = out.numel() * out.element_size()
            nb += out_bytes
            cbw = 2 * out_bytes / cms / 1e6
            bw = nb / ms / 1e6
            spread = (max(ks) - ms) / ms
            tuned = ""
            if name in best:
                bms = min(bench_ms(lambda c=best[name]: kern(c)) for _ in range(rounds))
                tuned = f"{bms * 1000:8.1f}"
            rows.append(
                {
                    "case": name,
                    "shape": list(shape),
                    "kernel_ms": ms,
                    "kernel_ms_rounds": ks,
                    "bytes": nb,
                    "GBps": bw,
                    "copy_GBps": cbw,
                    "vs_copy": bw / cbw,
                    "torch_ms": tms,
                    "speedup_vs_torch": tms / ms,
                    "tuned": tuned.strip(),
                }
            )
            say(
                f"{name:24} {size:>5}^2     {ms * 1000:10.1f} {bw:6.0f} {cbw:9.0f} "
                f"{bw / cbw:7.1%} {tms * 1000:9.1f} {tms / ms:7.1f}x {spread:6.1%} {tuned:>8}"
            )
            del codes, scales, mins, out, src, dst, args
            empty_cache()
    RESULTS["kernels"] = rows
    worst = min(rows, key=lambda r: r["vs_copy"])
    say(f"lowest vs copy: {worst['case']} {worst['shape']}: {worst['vs_copy']:.1%}")

    # CPU cost of one call (what eager mode pays per quantized layer): tiny tensor, many calls
    codes, scales, mins = random_parts((64, 64), "affine", 4, 64, -1, torch.float16, DEV)
    w = __import__("qtensors.torch", fromlist=["QuantizedWeight"]).QuantizedWeight.from_parts(
        codes,
        scales,
        mins,
        (64, 64),
        {"name": "affine", "bits": 4, "group_size": 64, "axis": 1, "scale_dtype": "float16"},
        torch.float16,
    )
    calls = {
        "torch.ops.qtensors.dequantize": lambda: ops.dequantize_op(
            codes, scales, mins, [64, 64], "affine", 4, 64, -1, torch.float16
        ),
        "QuantizedWeight.dequantize (eager fast path)": w.dequantize,
        "kernels.dequant.dequantize_triton": lambda: tk.dequantize_triton(
            codes, scales, mins, [64, 64], "affine", 4, 64, 1, torch.float16
        ),
    }
    for label, fn in calls.items():
        for _ in range(50):
            fn()
        sync()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        us = (time.perf_counter() - t0) / n * 1e6
        RESULTS.setdefault("call_overhead_us", {})[label] = us
        say(f"CPU time per call, 64x64 tensor: {label}: {us:.1f} us")
    say()


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------

LLAMA = dict(LLAMA_1B)
if DRY:
    LLAMA.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=1000)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def load_one(method: str, st_path: str, qt_path: str) -> None:
    """Child process: one timed load; prints a JSON line."""
    import qtensors
    import qtensors.torch as qtt

    if not DRY:
        torch.cuda.init()
    torch.empty(1, device=DEV)
    sync()
    build = 0.0
    model = None
    if method.startswith("qt_model"):
        from transformers import LlamaConfig, LlamaForCausalLM

        t0 = time.perf_counter()
        with qtt.init_empty_weights():
            model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        build = time.perf_counter() - t0
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS mark
    except OSError:
        pass
    rss0 = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    if method == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(st_path, device=DEV)
        sync()
        n = len(sd)
    elif method == "qt_model_keep":
        r = qtt.load_model(model, qt_path, device=DEV, dtype=torch.float16)
        n = len(r.quantized_modules) + len(r.decoded)
    elif method == "qt_model_keep_stream":
        r = qtt.load_model(model, qt_path, device=DEV, dtype=torch.float16, io="stream")
        n = len(r.quantized_modules) + len(r.decoded)
    elif method == "qt_model_decode":
        r = qtt.load_model(model, qt_path, device=DEV, dtype=torch.float16, keep_quantized=False)
        n = len(r.decoded)
    elif method == "qt_load_file":
        sd = qtensors.load_file(qt_path, framework="pt", device=DEV)
        sync()
        n = len(sd)
    elif method == "qt_variants":
        load_variants(qt_path)
        return
    else:
        raise ValueError(method)
    secs = time.perf_counter() - t0
    hwm = _rss_kb("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "method": method,
                "seconds": secs,
                "build_seconds": build,
                "tensors": n,
                "rss_before_MB": rss0 / 1024,
                "rss_peak_MB": hwm / 1024,
                "gpu_MB": 0 if DRY else torch.cuda.memory_allocated() / 2**20,
            }
        ),
        flush=True,
    )


def load_variants(qt_path: str) -> None:
    """Warm, in one process: load_model with other reader settings, and decoding's first call
    (Triton kernels compiled or fetched from the disk cache) against a second one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qtensors.torch as qtt

    def one(**kw) -> float:
        with qtt.init_empty_weights():
            model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        t0 = time.perf_counter()
        qtt.load_model(model, qt_path, device=DEV, dtype=torch.float16, **kw)
        return time.perf_counter() - t0

    out = {}
    first = one(keep_quantized=False)
    out["decode first call in process"] = first
    out["decode second call"] = one(keep_quantized=False)
    for chunk, slots, threads in ((8, 8, 8), (16, 4, 4), (4, 16, 16), (32, 4, 4), (8, 8, 16)):
        key = f"keep chunk={chunk}MiB slots={slots} threads={threads}"
        out[key] = min(one(chunk_bytes=chunk << 20, slots=slots, threads=threads) for _ in range(2))
    out["keep io=stream"] = min(one(io="stream") for _ in range(2))
    out["keep io=stream threads=8"] = min(one(io="stream", threads=8) for _ in range(2))
    print("RESULT " + json.dumps({"method": "qt_variants", "variants": out}), flush=True)


def section_load(workdir: str, repeats: int = 2, only_variants: bool = False) -> None:
    from safetensors.torch import save_file as st_save
    from transformers import LlamaConfig, LlamaForCausalLM

    import qtensors
    import qtensors.torch as qtt

    say("## load: Llama-shaped model (TinyLlama-1.1B dims, random weights) to cuda")
    os.makedirs(workdir, exist_ok=True)
    st_path = os.path.join(workdir, "model.safetensors")
    qt_path = os.path.join(workdir, "model.qtensors")
    t0 = time.perf_counter()
    with qtt.init_empty_weights():
        meta = LlamaForCausalLM(LlamaConfig(**LLAMA))
    gen = torch.Generator(device=DEV).manual_seed(0)
    sd = {}
    for name, p in meta.state_dict().items():
        sd[name] = (torch.randn(p.shape, device=DEV, generator=gen) * 0.02).half().cpu()
    del meta
    nparams = sum(t.numel() for t in sd.values())
    st_save(sd, st_path)
    t1 = time.perf_counter()
    qtensors.save_file(sd, qt_path, quant=qtensors.PRESETS["int4-g64"])
    t2 = time.perf_counter()
    del sd
    st_mb = os.path.getsize(st_path) / 2**20
    qt_mb = os.path.getsize(qt_path) / 2**20
    say(
        f"{nparams / 1e9:.2f}B parameters; safetensors fp16 {st_mb:.0f} MiB, qtensors int4-g64 "
        f"{qt_mb:.0f} MiB (quantized + written in {t2 - t1:.1f} s; generation {t1 - t0:.1f} s)"
    )
    methods = {
        "safetensors": "safetensors.torch.load_file(fp16, device='cuda')",
        "qt_model_keep": "qtensors.torch.load_model(meta model, keep_quantized=True)",
        "qt_model_keep_stream": "same, io='stream' (through qtensors.stream)",
        "qt_model_decode": "qtensors.torch.load_model(meta model, keep_quantized=False) -> fp16",
        "qt_load_file": "qtensors.load_file(framework='pt', device='cuda') (CPU decode)",
    }
    res: dict[str, Any] = {}
    how = ""

    def child(method: str) -> dict[str, Any] | None:
        p = subprocess.run(
            [sys.executable, __file__, "--load-one", method, st_path, qt_path],
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            say(f"  {method}: FAILED rc={p.returncode}\n{p.stderr[-2000:]}")
            return None
        return json.loads(line[0][7:])

    if only_variants:
        methods = {}
    for method in methods:
        runs = []
        for kind in ["cold"] + ["warm"] * repeats:
            if kind == "cold":
                how = drop_caches([st_path, qt_path])
            r = child(method)
            if r is None:
                break
            r["kind"] = kind
            runs.append(r)
        res[method] = runs
    variants = child("qt_variants")
    RESULTS["load"] = {
        "params": nparams,
        "st_MiB": st_mb,
        "qt_MiB": qt_mb,
        "runs": res,
        "cold_by": how,
    }
    say(f"cold cache by {how}; warm = median of {repeats} runs; each run a fresh process")
    say(
        f"{'method':21} {'cold s':>7} {'warm s':>7} {'warm GB/s':>9} {'peak RSS+ MB':>12} "
        f"{'GPU MB':>7}  what"
    )
    base = None
    for method, runs in res.items():
        cold = [r["seconds"] for r in runs if r["kind"] == "cold"]
        warm = [r["seconds"] for r in runs if r["kind"] == "warm"]
        if not warm:
            continue
        w = statistics.median(warm)
        c = cold[0] if cold else math.nan
        size = st_mb if method == "safetensors" else qt_mb
        rss = max(r["rss_peak_MB"] - r["rss_before_MB"] for r in runs)
        gpu = runs[-1]["gpu_MB"]
        if method == "safetensors":
            base = (c, w)
        say(
            f"{method:21} {c:7.3f} {w:7.3f} {size / 1024 / w:9.2f} {rss:12.0f} {gpu:7.0f}  "
            f"{methods[method]}"
        )
    if base:
        for method, runs in res.items():
            warm = [r["seconds"] for r in runs if r["kind"] == "warm"]
            cold = [r["seconds"] for r in runs if r["kind"] == "cold"]
            if method != "safetensors" and warm and cold:
                say(
                    f"  {method}: {base[0] / cold[0]:.2f}x faster cold, "
                    f"{base[1] / statistics.median(warm):.2f}x faster warm than safetensors fp16"
                )
    if variants:
        RESULTS["load"]["variants"] = variants["variants"]
        say("warm, in one process (best of 2):")
        for k, v in variants["variants"].items():
            say(f"  {k:45} {v:.3f} s")
    say()


# ------------------------------------------------------------------------------------------------
# MiniLM on the GPU
# ------------------------------------------------------------------------------------------------


def section_minilm(devdata: str) -> None:
    from transformers import AutoTokenizer

    import qtensors.torch as qtt

    say("## minilm: converted MiniLM (int4-g64) on cuda vs the embeddings computed on the CPU")
    exp = torch.load(os.path.join(devdata, "minilm_expected.pt"))
    folder = os.path.join(devdata, "minilm-int4-g64")
    tok = AutoTokenizer.from_pretrained(folder)
    for keep in (True, False):
        t0 = time.perf_counter()
        model = qtt.from_pretrained(folder, device=DEV, keep_quantized=keep)
        t1 = time.perf_counter()
        emb = qtt.sentence_embeddings(model, tok, exp["sentences"]).cpu()
        vs_cpu = (emb * exp["quantized_cpu"]).sum(1)
        vs_fp32 = (emb * exp["fp32"]).sum(1)
        n = len(model.qtensors_load_result.quantized_modules)
        say(
            f"  keep_quantized={keep}: load {t1 - t0:.2f} s, {n} quantized modules; cosine vs "
            f"CPU quantized min {vs_cpu.min():.6f}; vs fp32 mean {vs_fp32.mean():.5f} "
            f"min {vs_fp32.min():.5f}"
        )
        RESULTS.setdefault("minilm", {})[f"keep_{keep}"] = {
            "vs_cpu_min": vs_cpu.min().item(),
            "vs_fp32_mean": vs_fp32.mean().item(),
            "vs_fp32_min": vs_fp32.min().item(),
        }
    # torch.compile (inductor) of a QuantizedLinear on CUDA: the op must trace and run
    try:
        lin = torch.nn.Linear(1024, 512, dtype=torch.float16, device=DEV)
        q = qtt.QuantizedLinear.from_linear(lin, __import__("qtensors").FLEXGEN)
        x = torch.randn(8, 1024, dtype=torch.float16, device=DEV)
        eager = q(x)
        t0 = time.perf_counter()
        compiled = torch.compile(q, fullgraph=True)(x)
        dt = time.perf_counter() - t0
        diff = (compiled - eager).abs().max().item()
        say(f"  torch.compile(QuantizedLinear, fullgraph=True) on cuda: max diff {diff:.3g}")
        say(f"    (compiled and ran in {dt:.1f} s)")
    except Exception as exc:
        say(f"  torch.compile on cuda FAILED: {exc!r}"[:400])
    say()


# ------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-one":
        load_one(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_gpu_out")
    ap.add_argument("--sections", default="check,sweep,kernels,load,minilm")
    ap.add_argument("--workdir", default="/tmp/qtensors_bench")
    ap.add_argument("--devdata", default=".devdata")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    import qtensors.torch as qtt

    props = (
        torch.cuda.get_device_properties(0)
        if not DRY
        else argparse.Namespace(name="dry", multi_processor_count=0)
    )
    say(f"# command: python3 {' '.join(sys.argv)}")
    say(
        f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}, qtensors.torch triton={qtt.HAVE_TRITON}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    say()
    sections = args.sections.split(",")
    best: dict[str, Any] = {}
    t_all = time.perf_counter()
    for sec in sections:
        t0 = time.perf_counter()
        try:
            if sec == "check":
                section_check()
            elif sec == "sweep":
                best = section_sweep()
            elif sec == "kernels":
                section_kernels(best)
            elif sec == "load":
                section_load(args.workdir)
            elif sec == "loadvariants":
                section_load(args.workdir, only_variants=True)
            elif sec == "minilm":
                section_minilm(args.devdata)
        except Exception as exc:
            import traceback

            say(f"SECTION {sec} FAILED: {exc!r}")
            say(traceback.format_exc()[-3000:])
        say(f"({sec}: {time.perf_counter() - t0:.1f} s)")
        with open(os.path.join(args.out, "gpu_bench.txt"), "w") as fh:
            fh.write("\n".join(LINES) + "\n")
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1, default=str)
    say(f"total {time.perf_counter() - t_all:.1f} s")
    with open(os.path.join(args.out, "gpu_bench.txt"), "w") as fh:
        fh.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
