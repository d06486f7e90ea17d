"""GPU check (sm_90+) of ``kernels/gemm16_gluon.py``, which Triton's interpreter cannot run: every
candidate configuration of ``probe_gemm16.py`` on small and odd shapes, and the op as routed
with ``launch.use_gemm16()`` (gemm16 on the table's weights; ``gemm16_regs_gluon.py`` on
``GEMM16_REGS_TABLE``'s), with and without a bias,
against decode + ``F.linear`` in fp32; that a quantized Llama layer's down projection takes it,
and that layer's eager time per call with and without it (with its launch kept,
``launch.Gemm16Kept``, and through the full path); ``gemm16_regs_gluon.py``'s configurations
(one program a tile, split K) on the same small shapes. Exits non-zero on any
relative error of 2e-2 or more (bf16 output).

    python3 benches/check_gemm16.py [--regs-only]
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
from _common import count_calls  # noqa: E402

from qtensors.torch.kernels import launch as L  # noqa: E402

#: (encoding, N, K, rows): odd rows and features, groups of 64 and 128, both encodings, one
#: K slice shorter than the others (K / 64 = 9 steps split in 2)
SMALL = [("int4-affine-g64", 200, 576, 70), ("int4-sym-g64", 256, 512, 130),
         ("int4-affine-g128", 2048, 2048, 256), ("int4-sym-g64", 72, 1024, 97)]  # fmt: skip
#: ``gemm16_regs_kernel``'s configurations checked on ``SMALL``: one program a tile (one and
#: two warpgroups), split K
REGS = [L.Gemm16RegsConfig(64, 3), L.Gemm16RegsConfig(64, 4, split_k=2),
        L.Gemm16RegsConfig(128, 3)]  # fmt: skip


def check_regs_small() -> int:
    """``REGS`` on ``SMALL``, with and without a bias, three calls each (the split-K counters
    must be back at 0 after each): the number of wrong results."""
    bad = 0
    for enc, N, K, M in SMALL:
        case = S.Case(enc, N, K)
        w = case.ws[0]
        name, _, g = w.enc
        x = case.x(M)
        bias = torch.randn(N, device="cuda", dtype=S.DT)
        for cfg in REGS:
            for b in (None, bias):
                ref = F.linear(x.float(), case.ref_w, None if b is None else b.float())
                got = [L.gemm16_regs_linear(x, w.codes, w.scales, w.mins, b, N, K, name, g, cfg)
                       for _ in range(3)]  # fmt: skip
                err = S.rel_err(got[0], ref)
                same = all(torch.equal(got[0], y) for y in got[1:])
                bad += err >= S.TOL or not same
                print(f"regs {enc} {N}x{K} M{M} {cfg} {'bias' if b is not None else 'no bias'}:"
                      f" rel err {err:.2e}, same bits x3 {same}", flush=True)  # fmt: skip
    return bad


def main() -> int:
    L.use_gemm16()  # the route takes gemm16 (off by default)
    bad = 0
    regs_only = "--regs-only" in sys.argv  # the routed weights of GEMM16_REGS_TABLE alone
    bad += check_regs_small()
    for enc, N, K, M in [] if regs_only else SMALL:
        case = S.Case(enc, N, K)
        x = case.x(M)
        ref = F.linear(x.float(), case.ref_w)
        for c in P.ALL:
            err = S.rel_err(P.gemm16(c)(x, case.ws[0]), ref)
            bad += err >= S.TOL
            print(f"{enc} {N}x{K} M{M} {P.label(c)}: rel err {err:.2e}", flush=True)
    for bucket, N, K in sorted(
        L.GEMM16_REGS_TABLE if regs_only else {*L.GEMM16_TABLE, *L.GEMM16_REGS_TABLE}
    ):
        # the register-operand kernel where its table has the weight, else gemm16_gluon.py
        regs = L.GEMM16_REGS_TABLE.get((bucket, N, K))
        label = f"regs {regs}" if regs else P.label(L.GEMM16_TABLE[(bucket, N, K)])
        case = S.Case("int4-affine-g64", N, K)
        bias = torch.randn(N, device="cuda", dtype=S.DT)
        w = case.ws[0]
        for b in (None, bias):
            # the first call compiles, the second keeps its launch (launch.Gemm16Kept), the
            # later ones take it with their own rows
            with (
                count_calls(L, "gemm16_linear") as full,
                count_calls(L.Gemm16Kept, "__call__") as kept,
                count_calls(L, "gemm16_regs_linear") as by_regs,
            ):
                for M in (bucket - 27, bucket - 27, bucket - 5, bucket, bucket - 27):
                    x = case.x(M)
                    assert L.route(M, N, K, "affine", 4, 64, 1, True, True, False) == "gemm16"
                    got = torch.ops.qtensors.linear(x, *w.args[:3], b, *w.args[3:])
                    ref = F.linear(x.float(), case.ref_w, None if b is None else b.float())
                    err = S.rel_err(got, ref)
                    bad += err >= S.TOL
                    tag = "bias" if b is not None else "no bias"
                    print(f"routed {N}x{K} M{M} {label} {tag}: rel err {err:.2e}", flush=True)
            if regs:  # (Gemm16RegsKept's calls count as Gemm16Kept's)
                bad += not 1 <= len(by_regs) <= 2 or len(by_regs) + len(kept) != 5 or bool(full)
                print(f"  gemm16_regs_linear {len(by_regs)} calls, kept launch {len(kept)} (of 5;"
                      " 1-2 full)")  # fmt: skip
                continue
            # (a configuration another cell compiled is noted from its first call)
            bad += not 1 <= len(full) <= 2 or len(full) + len(kept) != 5 or bool(by_regs)
            plan = getattr(w.args[0], "_qt_cuda_plan", None)
            direct = [k.direct is not None for k in getattr(plan, "gemm16s", {}).values()]
            print(f"  full path {len(full)} calls, kept launch {len(kept)} (of 5; 1-2 full);"
                  f" kept launches through the C launch: {direct}")  # fmt: skip
    bad += not regs_only and not model_takes_gemm16()
    print("FAILED" if bad else "all correct", f"({bad} wrong)")
    return 1 if bad else 0


def eager_times(layer, x, n: int = 50) -> None:
    """The layer's eager call, with and without gemm16: host time per call (the launches'
    Python) and GPU time per call (CUDA events around ``n`` calls)."""
    import time

    from qtensors.torch import linear as lin

    for on, kept in ((True, True), (True, False), (False, True)) * 2:
        L.use_gemm16(on)
        lin.REPLAYS = kept
        for _ in range(3):
            layer(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            layer(x)
        host = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            layer(x)
        b.record()
        torch.cuda.synchronize()
        gpu = a.elapsed_time(b) / n * 1e3
        path = ("gemm16" if on else "decode + cuBLAS") + ("" if kept else ", full path")
        print(f"  eager {path}: host {host:.0f} us a call, {gpu:.0f} us a call end to end",
              flush=True)  # fmt: skip
    L.use_gemm16()
    lin.REPLAYS = True


def model_takes_gemm16() -> bool:
    """A quantized Llama layer of Llama-3-8B's widths: its MLP's down projection at 256 rows (a
    table weight) runs gemm16, as the op routes it outside a model (counted calls)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qtensors as qt
    import qtensors.torch as qtt

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=256)  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    qtt.quantize_model(model, qt.Affine(bits=4, group_size=64, axis=-1))
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, 256, 14336, device="cuda", dtype=torch.bfloat16)
    with count_calls(L, "gemm16_linear") as calls, torch.inference_mode():
        down(x)
    with torch.inference_mode():
        eager_times(down, x)
    codes = [b for n, b in down.named_buffers() if "codes" in n]
    info = [(n, tuple(b.shape), b.dtype, b.data_ptr() % 16) for n, b in down.named_buffers()]
    print(f"model's down_proj at 256 rows: gemm16 calls {len(calls)}; buffers {info}", flush=True)
    return bool(calls) and bool(codes)


if __name__ == "__main__":
    sys.exit(main())
