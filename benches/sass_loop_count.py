"""Instructions in the main loop of the batch-1 GEMV kernels, from the sm_90 SASS Triton emits
(no GPU needed: Triton compiles for a named target; its bundled ``cuobjdump`` disassembles).

    python3 benches/sass_loop_count.py [--encodings affine,symmetric,nf4,mxfp4,nvfp4]
                                       [--block-n 8] [--block-k 2048] [--warps 4]
    python3 benches/sass_loop_count.py --mma [--block-n 128]   # the tensor-core kernels
    python3 benches/sass_loop_count.py --gluon [--block-n 64 --warps 2]   # mma_int8_gluon.py
    python3 benches/sass_loop_count.py --gluon-tma [--swords 1]    # its TMA kernel, per XTMA
    python3 benches/sass_loop_count.py --encodings affine --paired --prefetch --kspec 4096
                                       [--l2-ahead 1] [--pipeline 2] [--stream]  # words_int8

For each encoding, ``words.py`` (exact) and ``words_int8.py`` (int8 activations): registers a
thread, instructions in the loop (the longest backward branch's body), and per weight (a loop
step covers ``block_n * block_k / (32 * warps)`` weights a thread). ``--mma``: ``mma.py`` and
``mma_int8.py`` (int4 affine / symmetric g64, 16 rows, ``block_n`` features, 3 stages), a loop
step covering ``block_n * 64 * groups / (32 * warps)`` weights a thread. ``--gluon``:
``mma_int8_gluon.py`` (int4 g64, 16 rows, 2 groups a step; compiled per K = 4096 and not), whose
loop (unrolled by two) covers two steps. ``--gluon-tma``: its TMA kernel in the routed
configuration (64 features, 2 warps, 16 rows, 3 stages, K = 4096) in each ``XTMA`` mode:
registers (needs torch, for the descriptors' types). The figures the README and
the kernels' docstrings quote come from this script under Triton 3.6 (the H200's); other Triton
versions lay the same code out differently.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
# the kernel modules need Triton alone: their packages stand in for qtensors and qtensors.torch
# (whose __init__s import the Rust core and torch), so a bare Triton venv runs this script
for _name in ("qtensors", "qtensors.torch"):
    if _name not in sys.modules:
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [os.path.join(os.path.dirname(HERE), "python", *_name.split("."))]
        sys.modules[_name] = _pkg

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from qtensors.torch.kernels import mma_int8_gluon  # noqa: E402
from qtensors.torch.kernels.mma import MMA_ENC, mma_kernel  # noqa: E402
from qtensors.torch.kernels.mma_int8 import MMA_INT8_ENC, mma_int8_kernel  # noqa: E402
from qtensors.torch.kernels.scales import SCALE_FORMATS  # noqa: E402
from qtensors.torch.kernels.tiled import TILED_ENC  # noqa: E402
from qtensors.torch.kernels.words import words_kernel  # noqa: E402
from qtensors.torch.kernels.words_int8 import words_int8_kernel  # noqa: E402

GROUP = {"affine": 64, "symmetric": 64, "nf4": 64, "mxfp4": 32, "nvfp4": 16}
INSTR = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*);")


def compile_sass(fn, enc: str, bn: int, bk: int, warps: int, int8_opts=None) -> tuple[str, int]:
    sfmt = SCALE_FORMATS.get(enc, 0)
    consts = dict(ENC=TILED_ENC[enc], SFMT=sfmt, BITS=4, GS=GROUP[enc], HAS_BIAS=False,
                  BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, EMULATE=False)  # fmt: skip
    if fn is words_int8_kernel:  # its options, off unless asked
        off = dict(PAIRED=False, PREFETCH=False, KSPEC=0, L2_AHEAD=0, PIPELINE=0, STREAM=False)
        consts.update(off, **(int8_opts or {}))
    options = {"num_warps": warps, "num_stages": 2, "enable_fp_fusion": True}  # as launched
    return compile_kernel(fn, consts, {"scales_ptr": "*u8" if sfmt else "*fp16",
                                       "mins_ptr": "*fp32" if sfmt else "*fp16"},
                          options)  # fmt: skip


def compile_kernel(fn, consts: dict, ptr_types: dict, options: dict, source=ASTSource):
    """(SASS, registers a thread) of ``fn`` for sm_90 with these constexprs (``source``:
    ``GluonASTSource`` for a Gluon kernel)."""
    ptrs = {"x_ptr": "*bf16", "words_ptr": "*i32", "units_ptr": "*i64", "out_ptr": "*bf16",
            "scales_ptr": "*fp16", "mins_ptr": "*fp16", "levels_ptr": "*fp16",
            "bias_ptr": "*fp16", "ws_ptr": "*fp32", "lock_ptr": "*i32", "codes_ptr": "*u8",
            "xq_ptr": "*i8", "xs_ptr": "*fp32", **ptr_types}  # fmt: skip
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n.endswith("_ptr") or (sig[n] == "i32" and n != "M")}  # fmt: skip
    consts = {k: v for k, v in consts.items() if k in names}
    src = source(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return sass, int(re.search(r"REG:(\d+)", res)[1])


def loop_body(sass: str) -> list[str]:
    """The opcodes between the longest backward branch and its target, in order."""
    ins = [(int(m[1], 16), m[3], m[4]) for m in map(INSTR.match, sass.splitlines()) if m]
    spans = [(int(t[1], 16), a) for a, op, rest in ins if op == "BRA"
             for t in [re.search(r"0x([0-9a-f]+)", rest)] if t and int(t[1], 16) < a]  # fmt: skip
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return [op for a, op, _ in ins if lo <= a <= hi]


def loop_ops(sass: str) -> Counter:
    """The instructions between the longest backward branch and its target."""
    return Counter(loop_body(sass))


def loads_up_front(sass: str) -> str:
    """ "k/n": of the loop's n global loads, k issued before its first ``dp4a`` (all of them:
    the step's loads in flight together; fewer: ptxas spread them through the arithmetic)."""
    body = loop_body(sass)
    first = next((i for i, op in enumerate(body) if op.startswith("IDP")), len(body))
    loads = [i for i, op in enumerate(body) if op.startswith("LDG")]
    return f"{sum(i < first for i in loads)}/{len(loads)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encodings", default="affine,symmetric,nf4,mxfp4,nvfp4")
    ap.add_argument("--block-n", type=int, default=8)
    ap.add_argument("--block-k", type=int, default=2048)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--mma", action="store_true", help="the tensor-core kernels instead")
    ap.add_argument("--gluon", action="store_true", help="the Gluon int8 kernel instead")
    ap.add_argument("--gluon-tma", action="store_true", help="its TMA kernel, per XTMA mode")
    ap.add_argument("--swords", type=int, default=0, help="--gluon: the scales as N words a row")
    ap.add_argument("--paired", action="store_true", help="words_int8: PAIRED (affine)")
    ap.add_argument("--prefetch", action="store_true", help="words_int8: PREFETCH")
    ap.add_argument("--kspec", type=int, default=0, help="words_int8: KSPEC, this K")
    ap.add_argument("--l2-ahead", type=int, default=0, help="words_int8: L2_AHEAD")
    ap.add_argument("--pipeline", type=int, default=0, help="words_int8: PIPELINE (2, 3)")
    ap.add_argument("--stream", action="store_true", help="words_int8: STREAM")
    a = ap.parse_args()
    if a.mma:
        mma_counts(a.block_n if a.block_n != 8 else 128)
        return
    if a.gluon_tma:
        gluon_tma_counts(a.swords)
        return
    if a.gluon:
        gluon_counts(a.block_n if a.block_n != 8 else 64, a.warps if a.warps != 4 else 2, a.swords)
        return
    weights = a.block_n * a.block_k / (32 * a.warps)  # per thread and loop step
    print(f"# triton {triton.__version__}, sm_90, {a.block_n} features x {a.block_k} codes, "
          f"{a.warps} warps: {weights:.0f} weights a thread a step")  # fmt: skip
    for enc in a.encodings.split(","):
        opts = dict(PAIRED=a.paired and enc == "affine", PREFETCH=a.prefetch, KSPEC=a.kspec,
                    L2_AHEAD=a.l2_ahead, PIPELINE=a.pipeline, STREAM=a.stream)  # fmt: skip
        for name, fn in (("words.py", words_kernel), ("words_int8.py", words_int8_kernel)):
            sass, regs = compile_sass(fn, enc, a.block_n, a.block_k, a.warps, opts)
            ops = loop_ops(sass)
            n = sum(ops.values())
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
            early = (
                f"  loads before the first dp4a {loads_up_front(sass)}" if "int8" in name else ""
            )
            print(f"{enc:<10} {name:<14} {regs:4d} regs  loop {n:5d}  {n / weights:5.2f} a weight"
                  f"  ({top}){early}")  # fmt: skip


def mma_counts(bn: int) -> None:
    """``mma.py`` against ``mma_int8.py`` (1, 2, 4 groups a step), int4 g64, 16 rows."""
    print(f"# triton {triton.__version__}, sm_90, {bn} features x 16 rows, 4 warps, 3 stages")
    opts = {"num_warps": 4, "num_stages": 3}
    for enc in ("affine", "symmetric"):
        runs = [("mma.py", 1, mma_kernel, dict(ENC=MMA_ENC[enc], SFMT=0, IEEE=False, EVEN=True))]
        runs += [(f"mma_int8.py g{g}", g, mma_int8_kernel, dict(ENC=MMA_INT8_ENC[enc],
                                                                 EMULATE=False))
                 for g in (1, 2, 4)]  # fmt: skip
        for name, groups, fn, extra in runs:
            consts = dict(GS=64, HAS_BIAS=False, BLOCK_M=16, BLOCK_N=bn, GROUPS=groups,
                          SPLIT_K=1, **extra)  # fmt: skip
            sass, regs = compile_kernel(fn, consts, {}, opts)
            ops = loop_ops(sass)
            n = sum(ops.values())
            weights = bn * 64 * groups / 128
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
            print(f"{enc:<10} {name:<17} {regs:4d} regs  loop {n:5d}  {n / weights:5.2f} a weight"
                  f"  ({top})")  # fmt: skip


def gluon_counts(bn: int, warps: int, swords: int = 0) -> None:
    """``mma_int8_gluon.py``, int4 g64, 16 rows, 2 groups a step, compiled per K or not;
    ``swords``: the scales read as that many words a row and step (``SWORDS``)."""
    print(f"# triton {triton.__version__}, sm_90, {bn} features x 16 rows, {warps} warps, 2 groups,"
          f" scales as {swords or 'no'} words")  # fmt: skip
    weights = bn * 64 * 2 * 2 / (32 * warps)  # the loop: two steps
    for enc in ("affine", "symmetric"):
        for kspec in (4096, 0):
            consts = dict(ENC=MMA_INT8_ENC[enc], GS=64, HAS_BIAS=False, BLOCK_M=16, BLOCK_N=bn,
                          SPLIT_K=1, GROUPS=2, KSPEC=kspec,
                          **mma_int8_gluon.layouts(bn, 16, warps, 2, 1, 0, swords))  # fmt: skip
            sass, regs = compile_kernel(mma_int8_gluon.mma_int8_gluon_kernel, consts, {},
                                        {"num_warps": warps}, GluonASTSource)  # fmt: skip
            ops = loop_ops(sass)
            n = sum(ops.values())
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
            name = f"gluon K={kspec or 'any'}"
            print(f"{enc:<10} {name:<17} {regs:4d} regs  loop {n:5d} (2 steps)  "
                  f"{n / weights:5.2f} a weight  ({top})")  # fmt: skip


def gluon_tma_counts(swords: int) -> None:
    """``mma_int8_gluon_tma_kernel`` in the routed configuration, int4 affine g64, in each
    ``XTMA`` mode: registers a thread."""
    import torch
    from triton.runtime.jit import mangle_type

    from qtensors.torch.kernels.launch import _acts_descriptors, _codes_descriptor

    print(f"# triton {triton.__version__}, sm_90, mma_int8_gluon_tma_kernel: 64 features x 16"
          f" rows, 2 warps, 3 stages, int4 affine g64, K = 4096, scales as {swords or 'no'}"
          " words")  # fmt: skip
    bn, bm, K = 64, 16, 4096
    for xtma in (0, 1, 2):
        consts = dict(ENC=MMA_INT8_ENC["affine"], GS=64, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn,
                      SPLIT_K=1, GROUPS=2, KSPEC=K, STAGES=3, XTMA=xtma,
                      **mma_int8_gluon.layouts(bn, bm, 2, 2, 1, 0, swords))  # fmt: skip
        codes = _codes_descriptor(torch.zeros(bn, K // 2, dtype=torch.uint8), bn, K, consts)
        q, d = _acts_descriptors(torch.zeros(bm, K, dtype=torch.int8),
                                 torch.zeros(2, K // 64, bm), consts, codes)  # fmt: skip
        types = {"codes_desc": mangle_type(codes), "xq_desc": mangle_type(q),
                 "xs_desc": mangle_type(d)}  # fmt: skip
        _sass, regs = compile_kernel(mma_int8_gluon.mma_int8_gluon_tma_kernel, consts, types,
                                     {"num_warps": 2}, GluonASTSource)  # fmt: skip
        print(f"XTMA {xtma}: {regs:4d} regs")


if __name__ == "__main__":
    main()
