"""Probe (H200): where the host time of an eager int4 linear call past 64 rows (decode + cuBLAS,
a prompt's prefill) goes, against bf16's ``nn.Linear`` on the same shapes.

    OUT=DIR python3 benches/probe_linear_host.py [--rows 128,512] [--replay 16] [--forward 512]

Each line is one piece of the call (the whole module call, then the layers below it, then the
torch calls they make), timed as host time per call: ``n`` calls issued back to back with
``time.perf_counter`` around them, best of ``ROUNDS`` rounds, the pieces alternating within each
round. The GPU work per call is smaller than the host's here (checked: the "GPU per call" line,
CUDA events around the module's calls), so issuing never waits for the GPU.

``--replay M``: the int4 module at M rows (up to 64: its launch kept as a ``fastlaunch.Replay``)
against bf16, with a replay that expands the weight's tensor descriptor (the W4A8 Gluon TMA
kernel's codes, 5-32 rows) once when kept, as shipped, and with one whose launch expands it on
every call (the launcher's own, as before).

``--forward P``: also a whole prefill forward of ``bench_gpu_generate.py``'s model (1.1B;
``QT_BENCH_MODEL=8b``: 8B) over P tokens, bf16 against int4-g64: the host time each module
class takes itself (its call less its children's, from forward hooks around every module),
summed over one forward, best of ``ROUNDS`` forwards. The hooks cost the same per module call
in both models (the int4 model has a ``QuantizedLinear`` where bf16's has an ``nn.Linear``).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import Report  # noqa: E402
from torch import nn  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch import linear as lin  # noqa: E402
from qtensors.torch.kernels import launch as L  # noqa: E402

REPORT = Report()
say = REPORT.say
ROUNDS = 7
N_CALLS = 100
# (out, in): the 1.1B model's joined gate/up and down, Llama-3-8B's down
SHAPES = ((11264, 2048), (2048, 5632), (4096, 14336))


def host_us(fn, n: int = N_CALLS) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def best_host_us(calls: dict) -> dict:
    """name -> the best of ``ROUNDS`` host times per call, the calls alternating each round."""
    best = {k: float("inf") for k in calls}
    for _ in range(ROUNDS):
        for k, fn in calls.items():
            best[k] = min(best[k], host_us(fn))
    return best


def gpu_us(fn, n: int = N_CALLS) -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def pieces(dense: nn.Linear, q: nn.Module, x: torch.Tensor) -> dict:
    """name -> a call of one piece of the int4 path (and bf16's), on ``x``."""
    args = _args(q)
    codes, scales, mins, _, shape, name, bits, group_size, axis = args
    q(x)
    q(x)  # the decode's launch kept (fastlaunch.Refill)
    p = lin._cuda_weight(codes, scales, mins, shape, name, bits, group_size, axis)
    refill = p.refills[x.dtype]
    wd = refill()
    N, K = p.shape
    M = x.numel() // K
    devices = (x.device, codes.device)
    a = 1
    return {
        "bf16 nn.Linear module": lambda: dense(x),
        "bf16 F.linear": lambda: F.linear(x, dense.weight),
        "int4 module call": lambda: q(x),
        "  lin.linear": lambda: lin.linear(x, *args),
        "  lin.linear_cuda": lambda: lin.linear_cuda(x, *args),
        "  lin._linear_cuda": lambda: lin._linear_cuda(p, x, *args),
        "  lin._decode_then_linear": lambda: lin._decode_then_linear(
            p, x, codes, scales, mins, None, shape, name, bits, group_size, a
        ),
        "    refill (empty + decode launch)": refill,
        "    linear_rows (F.linear on decoded w)": lambda: lin.linear_rows(x, wd, None),
        "    (before: F.linear on x's 2-D view)": lambda: F.linear(x.reshape(-1, K), wd).reshape(
            *x.shape[:-1], N
        ),
        "    F.linear(x, decoded w)": lambda: F.linear(x, wd),
        "    torch.mm(x2, w.t())": lambda: torch.mm(x.view(-1, K), wd.t()),
        "    torch.empty(w's shape)": lambda: torch.empty((N, K), dtype=x.dtype, device=x.device),
        "    _cuda_weight": lambda: lin._cuda_weight(
            codes, scales, mins, shape, name, bits, group_size, axis
        ),
        "    _check_meta": lambda: lin._check_meta(
            K, x.dtype, devices, *p.meta, None, p.shape, name, bits, group_size, axis
        ),
        "    route": lambda: L.route(M, N, K, name, bits, group_size, a, p.aligned, True, True),
        "    _replayable(x)": lambda: lin._replayable(x),
        "    replay key": lambda: (
            x.shape,
            x.dtype,
            x.device,
            x.data_ptr() % 16 == 0,
            L.INT8_ACTIVATIONS,
        ),
    }


def replay_times(dense: nn.Linear, q: nn.Module, rows: int) -> None:
    from qtensors.torch.kernels import fastlaunch

    x = torch.randn(1, rows, dense.in_features, device="cuda", dtype=torch.bfloat16)
    w = q._modules["weight"]
    p = lin._cuda_weight(*(w._buffers[k] for k in ("codes", "scales", "mins")), *w.op_args)
    shipped = fastlaunch._expanded

    def kept(expand_once: bool):
        fastlaunch._expanded = shipped if expand_once else (lambda *a: None)
        p.replays.clear()
        for _ in range(4):
            q(x)
        fastlaunch._expanded = shipped
        (rp,) = [r for r in p.replays.values() if isinstance(r, fastlaunch.Replay)]
        return rp

    once, each = kept(True), kept(False)
    key = next(iter(p.replays))
    a, b = once(x), each(x)
    torch.cuda.synchronize()
    same = torch.equal(a, b) and torch.equal(a, lin._linear_cuda(p, x, *_args(q)))
    calls = {
        "bf16 nn.Linear module": lambda: dense(x),
        "int4 replay, descriptor expanded once": lambda: once(x),
        "int4 replay, expanded each call": lambda: each(x),
    }
    best = best_host_us(calls)
    p.replays[key] = once
    say(f"## {q.out_features} x {q.in_features}, {rows} rows, replays: outputs equal {same}, "
        f"expanded once: {bool(once.held)}")  # fmt: skip
    for k, v in best.items():
        say(f"  {k:42s} {v:7.1f} us")


def _args(q: nn.Module) -> tuple:
    w = q._modules["weight"]
    parts = w._buffers
    return (parts["codes"], parts["scales"], parts["mins"], None, *w.op_args)


def self_times(model: nn.Module) -> tuple[dict, list]:
    """Hooks on every module: (class name -> [self seconds, calls], the hook handles)."""
    totals: dict[str, list] = {}
    stack: list[list] = []  # [start, children's seconds]

    def pre(_mod, _args):
        stack.append([time.perf_counter(), 0.0])

    def post(mod, _args, _out):
        start, children = stack.pop()
        took = time.perf_counter() - start
        if stack:
            stack[-1][1] += took
        row = totals.setdefault(type(mod).__name__, [0.0, 0])
        row[0] += took - children
        row[1] += 1

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    return totals, handles


def forward_by_module(P: int) -> None:
    import bench_gpu_generate as G

    models = {"bf16": G.build_model(), "int4": G.build_model()}
    qtt.quantize_model(models["int4"], qt.Affine(bits=4, group_size=64, axis=-1))
    ids = torch.randint(1, models["bf16"].config.vocab_size, (1, P), device=G.DEV)
    sync = torch.cuda.synchronize if G.DEV != "cpu" else (lambda: None)
    say(f"## {G.MODEL_NAME} prefill forward, P={P}: host seconds each module class takes "
        f"itself, best of {ROUNDS} forwards (ms)")  # fmt: skip
    with torch.inference_mode():
        plain = {k: float("inf") for k in models}
        for _ in range(ROUNDS):
            for k, m in models.items():
                m(ids)
                sync()
                t = time.perf_counter()
                m(ids)
                plain[k] = min(plain[k], time.perf_counter() - t)
                sync()
        say("  forward without hooks (host, to the last launch): " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" for k, v in plain.items()))  # fmt: skip
        best: dict[str, dict] = {}
        for k, m in models.items():
            totals, handles = self_times(m)
            for _ in range(ROUNDS):
                for row in totals.values():
                    row[0], row[1] = 0.0, 0
                sync()
                m(ids)
                sync()
                total = sum(r[0] for r in totals.values())
                if k not in best or total < best[k]["_total"][0]:
                    best[k] = {c: list(r) for c, r in totals.items()}
                    best[k]["_total"] = [total, 0]
            for h in handles:
                h.remove()
        for k, rows in best.items():
            say(f"  {k}: total {rows['_total'][0] * 1e3:.2f} ms with hooks")
            for c, (sec, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
                if c != "_total":
                    say(f"    {c:28s} {sec * 1e3:7.2f} ms  {n:5d} calls  "
                        f"{sec / max(n, 1) * 1e6:6.1f} us a call")  # fmt: skip


def main() -> None:
    rows_list = (
        [int(v) for v in sys.argv[sys.argv.index("--rows") + 1].split(",")]
        if "--rows" in sys.argv
        else [128, 512]
    )
    shapes = SHAPES if "--rows" in sys.argv or "--forward" not in sys.argv else ()
    if "--rows" not in sys.argv and "--replay" in sys.argv:
        rows_list = []
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    say(f"# eager linear host time per call, {gpu}, torch "
        f"{torch.__version__}; us, best of {ROUNDS} rounds of {N_CALLS} calls")  # fmt: skip
    torch.manual_seed(0)
    for n_out, n_in in shapes:
        dense = nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        holder = nn.Sequential(
            nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        )
        with torch.no_grad():
            holder[0].weight.copy_(dense.weight)
        qtt.quantize_model(holder, qt.Affine(bits=4, group_size=64, axis=-1))
        q = holder[0]
        with torch.inference_mode():
            if "--replay" in sys.argv:
                replay_times(dense, q, int(sys.argv[sys.argv.index("--replay") + 1]))
            for rows in rows_list:
                x = torch.randn(1, rows, n_in, device="cuda", dtype=torch.bfloat16)
                calls = pieces(dense, q, x)
                best = best_host_us(calls)
                say(f"## {n_out} x {n_in}, {rows} rows: GPU per call, int4 module "
                    f"{gpu_us(calls['int4 module call']):.1f} us, bf16 module "
                    f"{gpu_us(calls['bf16 nn.Linear module']):.1f} us")  # fmt: skip
                for k, v in best.items():
                    say(f"  {k:42s} {v:7.1f} us")
    if "--forward" in sys.argv:
        forward_by_module(int(sys.argv[sys.argv.index("--forward") + 1]))
    REPORT.write("linear_host", {})


if __name__ == "__main__":
    main()
