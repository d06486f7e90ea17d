"""Device check of the warp-specialized gemm16 configs: correctness only, one call each."""

import sys
import time

sys.path.insert(0, "benches")
import bench_gpu_gemv_sweep as S
import probe_gemm16 as P
import torch
import torch.nn.functional as F

CASES = [("int4-affine-g64", 256, 512, 70), ("int4-sym-g64", 256, 512, 70),
         ("int4-affine-g128", 2048, 2048, 256), ("int4-affine-g64", 8192, 8192, 1024)]  # fmt: skip
for enc, N, K, M in CASES:
    case = S.Case(enc, N, K)
    x = case.x(M)
    ref = F.linear(x.float(), case.ref_w)
    for c in [c for c in P.WS if not c.diag]:
        t = time.time()
        out = P.gemm16(c)(x, case.ws[0])
        torch.cuda.synchronize()
        err = S.rel_err(out, ref)
        print(enc, N, K, M, P.label(c), f"rel err {err:.2e} {time.time() - t:.1f}s", flush=True)
