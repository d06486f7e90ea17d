"""Quick device check: each WS config once on a small and a large shape, correctness only."""
import sys, time
sys.path.insert(0, "benches")
import torch, torch.nn.functional as F
import bench_gpu_gemv_sweep as S
import probe_gemm16 as P
for (N, K), M in [((256, 512), 70), ((2048, 2048), 256), ((8192, 8192), 1024)]:
    case = S.Case("int4-affine-g64", N, K)
    x = case.x(M)
    ref = F.linear(x.float(), case.ref_w)
    for c in [c for c in P.WS if not c.diag]:
        t = time.time()
        out = P.gemm16(c)(x, case.ws[0]); torch.cuda.synchronize()
        print(N, K, M, P.label(c), "rel err %.2e" % S.rel_err(out, ref), "%.1fs" % (time.time() - t), flush=True)
