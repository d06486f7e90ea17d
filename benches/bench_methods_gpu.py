"""Speed of the quantization methods on the GPU: RTN, HQQ, GPTQ and AWQ on the Llama-shaped 1.1B
model of ``_common.LLAMA_1B`` (random weights, random calibration tokens: speed only), time per
block and in total, each as a ratio to RTN's (the obvious alternative: no calibration at all).

    OUT=DIR python3 benches/bench_methods_gpu.py [--samples 128 --seq-len 512]
    python3 benches/bench_methods_gpu.py --dry        # the same on a tiny model, on the CPU

First a check, on a small model of the same architecture: GPTQ on the GPU is as good as on the
CPU (its logits' error against the float model within 10% of the CPU's; the codes themselves
differ where summation order flips a rounding, 67% of bytes equal on an H200), and each
method's quantized model gives finite logits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import LLAMA_1B, LLAMA_1B_DRY, Report

import qtensors as qt
from qtensors.methods import get_method, runner
from qtensors.torch import QuantizedLinear

REPORT = Report()
say = REPORT.say
METHODS = ("rtn", "hqq", "gptq", "awq")


def build(shape: dict, device: str, seed: int = 0, on_cpu_first: bool = False):
    """A random Llama; ``on_cpu_first``: drawn by the CPU's generator, then moved, so every
    device gets the same weights (CUDA's generator draws other numbers)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**shape)
    with torch.device("cpu" if on_cpu_first else device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, method: str, enc, windows, device: str, batch: int) -> dict:
    """Quantize every block with ``method``; seconds per block and in total."""
    m = get_method(method)
    times: list[float] = []
    last = [time.perf_counter()]

    def on_block(i, block):
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    last[0] = t0
    if m.needs_calibration:
        runner.quantize_blocks(
            model,
            enc,
            m,
            windows,
            device=device,
            batch_size=batch,
            progress=False,
            on_block=on_block,
        )
    else:  # weights only: each block's linears in turn, as convert does
        _, blocks = runner.find_blocks(model)
        for i, block in enumerate(blocks):
            runner.quantize_weights_only(
                torch.nn.ModuleList([block]), f"b{i}", enc, m, lambda *_: None, progress=False
            )
            on_block(i, block)
    sync(device)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {"total_s": total, "per_block_s": times, "peak_gib": peak}


def check(device: str, enc) -> dict:
    """GPTQ codes on ``device`` against the CPU's; finite logits for every method."""
    shape = dict(LLAMA_1B_DRY, hidden_size=256, intermediate_size=512)
    ids = torch.randint(0, shape["vocab_size"], (8, 64), generator=torch.Generator().manual_seed(1))
    got, err = {}, {}
    ref = build(shape, "cpu", on_cpu_first=True)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids[:2]).logits
    for dev in ("cpu", device):
        model = build(shape, dev, on_cpu_first=True)
        runner.quantize_blocks(model, enc, get_method("gptq"), ids, device=dev, progress=False)
        got[dev] = [m.weight.codes.cpu() for m in model.modules() if isinstance(m, QuantizedLinear)]
        with torch.no_grad():
            logits = model(input_ids=ids[:2].to(dev)).logits.float().cpu()
        err[dev] = float((logits - ref_logits).norm() / ref_logits.norm())
    same = sum(int((a == b).sum()) for a, b in zip(got["cpu"], got[device], strict=True))
    total = sum(a.numel() for a in got["cpu"])
    share = same / total
    # GPTQ feeds each column's rounding error forward, so summation-order differences flip
    # codes near a rounding boundary and the flips spread: the codes differ, the quality must not
    say(f"check: GPTQ codes on {device} equal to the CPU's for {share:.1%} of the bytes")
    say(f"check: GPTQ logits error vs float: cpu {err['cpu']:.4f}, {device} {err[device]:.4f}")
    finite = {}
    for method in METHODS:
        model = build(shape, device)
        run(model, method, enc, ids.to(device), device, 8)
        with torch.no_grad():
            logits = model(input_ids=ids[:2].to(device)).logits
        finite[method] = bool(torch.isfinite(logits).all())
        say(f"check: {method} logits finite: {finite[method]}")
    ok = err[device] <= 1.1 * err["cpu"] + 1e-3 and all(finite.values())
    if not ok:
        raise SystemExit("check failed")
    return {"gptq_same_codes": share, "gptq_logits_error": err, "finite": finite}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    device = "cpu" if args.dry else "cuda"
    shape = LLAMA_1B_DRY if args.dry else LLAMA_1B
    if args.dry:
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 64)
    # affine: the groups every method fills (HQQ fits zero points)
    enc = qt.Affine(bits=4, group_size=64 if args.dry else 128)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    say(f"# quantization methods, {name}, torch {torch.__version__}")
    results: dict = {"device": name, "check": check(device, enc)}
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=gen)
    say(
        f"\nLlama {shape['num_hidden_layers']} blocks, hidden {shape['hidden_size']}, "
        f"{enc.to_dict(2)['name']}{enc.bits} g{enc.group_size}; calibration {args.samples} x "
        f"{args.seq_len} random tokens"
    )
    say(f"{'method':6} {'total s':>9} {'per block s':>12} {'x rtn':>7} {'peak GiB':>9}")
    rows = {}
    for method in args.methods.split(","):
        model = build(shape, device)
        r = run(model, method, enc, windows.to(device), device, args.batch_size)
        rows[method] = r
        ratio = r["total_s"] / rows["rtn"]["total_s"] if "rtn" in rows else float("nan")
        say(
            f"{method:6} {r['total_s']:9.2f} {statistics.median(r['per_block_s']):12.3f} "
            f"{ratio:7.1f} {r['peak_gib']:9.2f}"
        )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    results["rows"] = rows
    REPORT.write("methods_gpu", results)


if __name__ == "__main__":
    main()
