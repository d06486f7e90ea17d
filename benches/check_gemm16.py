"""GPU check (sm_90+) of ``kernels/gemm16_gluon.py``, which Triton's interpreter cannot run: every
candidate configuration of ``probe_gemm16.py`` on small and odd shapes, and the op as routed
(``gemm16`` on the table's weights) with and without a bias, against decode + ``F.linear`` in
fp32. Exits non-zero on any relative error of 2e-2 or more (bf16 output).

    python3 benches/check_gemm16.py
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import probe_gemm16 as P  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

#: (encoding, N, K, rows): odd rows and features, groups of 64 and 128, both encodings, one
#: K slice shorter than the others (K / 64 = 9 steps split in 2)
SMALL = [("int4-affine-g64", 200, 576, 70), ("int4-sym-g64", 256, 512, 130),
         ("int4-affine-g128", 2048, 2048, 256), ("int4-sym-g64", 72, 1024, 97)]  # fmt: skip


def main() -> int:
    bad = 0
    for enc, N, K, M in SMALL:
        case = S.Case(enc, N, K)
        x = case.x(M)
        ref = F.linear(x.float(), case.ref_w)
        for c in P.ALL:
            err = S.rel_err(P.gemm16(c)(x, case.ws[0]), ref)
            bad += err >= S.TOL
            print(f"{enc} {N}x{K} M{M} {P.label(c)}: rel err {err:.2e}", flush=True)
    for (bucket, N, K), cfg in L.GEMM16_TABLE.items():
        case = S.Case("int4-affine-g64", N, K)
        bias = torch.randn(N, device="cuda", dtype=S.DT)
        for M in (bucket - 27, bucket):
            x = case.x(M)
            assert L.route(M, N, K, "affine", 4, 64, 1, True, True, False) == "gemm16"
            w = case.ws[0]
            for b in (None, bias):
                got = torch.ops.qtensors.linear(x, *w.args[:3], b, *w.args[3:])
                ref = F.linear(x.float(), case.ref_w, None if b is None else b.float())
                err = S.rel_err(got, ref)
                bad += err >= S.TOL
                tag = "bias" if b is not None else "no bias"
                print(f"routed {N}x{K} M{M} {P.label(cfg)} {tag}: rel err {err:.2e}", flush=True)
    print("FAILED" if bad else "all correct", f"({bad} wrong)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
