"""MXFP4 / NVFP4 decoding on the GPU through ``torch.ops.qtensors.dequantize`` (the NF4 codebook
kernels with E2M1 values; the per-group fp32 scales computed by torch first, included in the
time), against NF4 g64 through the same op and a device copy of the output bytes:

    OUT=DIR python3 benches/bench_gpu_fp4.py

First a check: every CUDA result equals the Rust core's decoding of the same parts, bit for bit.
Bandwidth = (codes + scales + fp16 output bytes) / time, as a share of the copy's.
"""

from __future__ import annotations

import torch
import triton
from _common import Report

import qtensors as qt
import qtensors.torch  # registers torch.ops.qtensors

REPORT = Report()
say = REPORT.say
ENCODINGS = {"mxfp4": qt.MXFP4(), "nvfp4": qt.NVFP4(), "nf4 g64": qt.NF4(group_size=64)}


def parts(enc, shape, device):
    q = qt.quantize(torch.randn(*shape), enc)
    e = q.encoding
    p = [t.to(device) for t in q.parts()]
    mins = p[2] if len(p) > 2 else None
    bits = 4
    return q, (p[0], p[1], mins, list(shape), e["name"], bits, e["group_size"], e["axis"])


def main() -> None:
    results: dict = {"check": {}, "rows": []}
    say(f"# FP4 decode, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, enc in ENCODINGS.items():
        q, args = parts(enc, (96, 1000), "cuda")
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            got = torch.ops.qtensors.dequantize(*args, dt).cpu()
            same = torch.equal(got.float(), q.dequantize().to(dt).float())
            results["check"][f"{name} {dt}"] = same
            say(f"check {name:8} {dt!s:15} {'identical' if same else 'MISMATCH'}")
    say("\nencoding        shape   op us   GB/s  copy GB/s  vs copy")
    for size in (4096, 8192, 16384):
        shape = (size, size)
        out_bytes = size * size * 2
        src = torch.empty(shape, dtype=torch.float16, device="cuda").normal_()
        dst = torch.empty_like(src)
        cms = triton.testing.do_bench(lambda s=src, d=dst: d.copy_(s), return_mode="median")
        cbw = 2 * out_bytes / cms / 1e6
        for name, enc in ENCODINGS.items():
            _, args = parts(enc, shape, "cuda")
            ms = triton.testing.do_bench(
                lambda a=args: torch.ops.qtensors.dequantize(*a, torch.float16),
                return_mode="median",
            )
            nb = sum(t.numel() * t.element_size() for t in args[:3] if t is not None)
            bw = (nb + out_bytes) / ms / 1e6
            results["rows"].append(dict(enc=name, size=size, us=ms * 1e3, gbps=bw, copy=cbw))
            say(f"{name:10} {size:>6}^2 {ms * 1e3:7.1f} {bw:6.0f} {cbw:10.0f} {bw / cbw:7.1%}")
    REPORT.write("gpu_fp4", results)


if __name__ == "__main__":
    main()
