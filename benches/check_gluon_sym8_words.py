"""Check (H200): 8-bit symmetric weights (run by the Gluon W4A8 kernels as 4-bit pairs over
twice K, "symmetric8") give the same bits with the scales read as words
(``launch.GLUON_SCALE_WORDS``) as without, and stay within 2% of decode + ``F.linear`` in fp32.

    python3 benches/check_gluon_sym8_words.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
)

import torch
import torch.nn.functional as F

from qtensors.torch.kernels import launch as L
from qtensors.torch.ops import dequantize


def main() -> int:
    ok, saved = True, L.GLUON_SCALE_WORDS
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K in ((4096, 4096), (4000, 2048)):
        codes = torch.randint(0, 256, (N * K,), dtype=torch.uint8, device="cuda", generator=g)
        scales = (torch.rand(N, K // 128, device="cuda", generator=g) * 0.01 + 1e-3).half()
        w = dequantize(codes, scales, None, [N, K], "symmetric", 8, 128, 1, torch.float32)
        for M in (5, 16, 32):
            x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
            outs = []
            for words in (True, False):
                L.GLUON_SCALE_WORDS = words
                outs.append(L.gluon_only_linear(x, codes, scales, None, None, N, K, "symmetric", 8,
                                                128))  # fmt: skip
            ref = F.linear(x.float(), w)
            err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
            same = torch.equal(outs[0], outs[1])
            good = same and err < 2e-2
            ok &= good
            print(f"symmetric 8-bit g128 {N}x{K} M={M}: words == values {same}, rel err {err:.2e}"
                  f" {'ok' if good else 'FAIL'}")  # fmt: skip
    L.GLUON_SCALE_WORDS = saved
    print("all ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
