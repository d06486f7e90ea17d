"""On the GPU: ``mma_int8_linear`` routes 5 and 16 rows to the Gluon W4A8 kernel, and its result,
through the cached launcher (calls 2 and 3), equals the ``tl.dot`` kernel's.

    PYTHONPATH=python python3 benches/check_gluon_route.py
"""

import torch

from qtensors.torch.kernels import fastlaunch
from qtensors.torch.kernels import launch as L

torch.manual_seed(0)
N, K, g = 8192, 4096, 64
codes = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
scales = (torch.rand(N, K // g, device="cuda") * 0.01).half()
mins = (-torch.rand(N, K // g, device="cuda") * 0.05).half()
for M in (5, 16):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    assert L.gluon_applies(codes, scales, 0, M)
    outs = [L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g) for _ in range(3)]
    ref = L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g, gluon=False)
    torch.cuda.synchronize()
    top = ref.float().abs().max().item()
    d = max((o.float() - ref.float()).abs().max().item() for o in outs) / top
    print(f"M={M} routed gluon x3 vs tl.dot: max rel diff {d:.2e}", "ok" if d < 2e-2 else "FAIL")
names = [getattr(getattr(k[0], "fn", None), "__name__", "") for k in fastlaunch._LAUNCHERS]
gluon = [n for n in names if "gluon" in n]
print("cached launchers:", len(gluon))
# split K (``split_k_sum``, shared with gemm16_gluon.py): 4 slices against 1, twice each (the
# counters must be back at 0 for the second launch)
x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
cfg = L.MmaConfig(block_m=0, block_n=64, groups=2, num_warps=2)
one = L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g, cfg, gluon=True)
for _ in range(2):
    four = L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g,
                             L.MmaConfig(block_m=0, block_n=64, groups=2, split_k=4,
                                         num_warps=2), gluon=True)  # fmt: skip
    torch.cuda.synchronize()
    d = (four.float() - one.float()).abs().max().item() / one.float().abs().max().item()
    print(f"split K 4 vs 1: max rel diff {d:.2e}", "ok" if d < 1e-2 else "FAIL")

# The TMA kernel (``GLUON_TMA_STAGES``, sm_90+): routed, bit-identical to the register kernel,
# through the cached launcher, an eager ``Replay`` of the op and a CUDA-graph replay.
from qtensors.torch.linear import linear  # noqa: E402

if torch.cuda.get_device_capability() >= (9, 0):
    assert L.GLUON_TMA_STAGES and L.tma_applies(codes, K, 0)
    x = torch.randn(16, K, device="cuda", dtype=torch.bfloat16)
    stages = L.GLUON_TMA_STAGES
    L.GLUON_TMA_STAGES = 0
    reg = L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g)
    L.GLUON_TMA_STAGES = stages
    tma = [L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g) for _ in range(3)]
    names = [getattr(getattr(k[0], "fn", None), "__name__", "") for k in fastlaunch._LAUNCHERS]
    print("TMA launcher cached:", "mma_int8_gluon_tma_kernel" in names)
    print("TMA x3 == register kernel:", all(torch.equal(t, reg) for t in tma))
    op = [linear(x, codes, scales, mins, None, (N, K), "affine", 4, g, -1) for _ in range(5)]
    print("op (replayed from call 3) == register kernel:", all(torch.equal(o, reg) for o in op))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, codes, scales, mins, None, (N, K), "affine", 4, g, -1)
    x.copy_(torch.randn_like(x))
    graph.replay()
    L.GLUON_TMA_STAGES = 0
    want = L.mma_int8_linear(x, codes, scales, mins, None, N, K, "affine", g)
    L.GLUON_TMA_STAGES = stages
    torch.cuda.synchronize()
    print("CUDA graph replay, new x == register kernel:", torch.equal(y, want))
