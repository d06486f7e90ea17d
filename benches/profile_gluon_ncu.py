"""Nsight Compute view of the Gluon W4A8 kernel (``kernels/mma_int8_gluon.py``), 16 rows of bf16
x against int4 affine g64, as routed (the results of stop 27, ``gpu_gluon_ncu_h200.txt``, also
profiled a diagnostic variant that re-read each slice's first operands: it lives in commit
51e81a1). Run under ``ncu``:

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        -k regex:mma_int8_gluon python3 benches/profile_gluon_ncu.py [N K]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_gpu_gemv_sweep as S  # noqa: E402
import torch  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

N, K = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 8192)
w = S.Weight(N, K, ("affine", 4, 64), seed=0)
x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
for _ in range(2):
    L.mma_int8_linear(x, w.codes, w.scales, w.mins, None, N, K, "affine", 64, None, True)
torch.cuda.synchronize()
print("ran", N, K)
