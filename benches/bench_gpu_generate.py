"""Decode speed of a 1.1B Llama-shaped model (hidden 2048, 22 layers, intermediate 5632, GQA
32/4, vocab 32000, random weights, built on the GPU), bf16 against ``qtt.quantize_model`` int4-g64
(affine, groups along in) kept quantized: greedy ``generate`` at batch 1 and 8, eager (dynamic
cache) and with ``cache_implementation="static"`` + ``torch.compile(mode="reduce-overhead")``
(transformers' own compile of the decoding step, fullgraph), tokens/s and peak GPU memory. The
int4 model runs with the batch-1-4 kernels' int8 activations (``launch.INT8_ACTIVATIONS``, the
default) and, as ``int4-exact``, a copy of it without (the exact float kernels). The int4 models
have their sibling linears joined (q/k/v and gate/up multiply once: ``qtt.fuse_siblings``, the
default of ``quantize_model``); ``int4-apart`` is the same weights with them apart, checked
first against the joined model (logits of one forward at each batch).
Self-contained, no network:

    python3 benches/bench_gpu_generate.py          # table to stdout; with OUT=DIR also files

Each model gets two warm-up calls (compilation, CUDA-graph recording), then the two models are
timed alternately, ``ROUNDS`` calls each, the fastest kept (the shared host drifts between
calls: one call per model let that drift decide the ratio); the compiled runs are skipped once
the script has run longer than
``QT_BENCH_BUDGET_S`` seconds (default 330). ``QT_BENCH_DRY=1``: a tiny model on the CPU, eager
only (checks the script). ``QT_BENCH_MODES=eager`` runs the eager rows only, ``QT_BENCH_EXACT=0``
leaves out ``int4-exact``, ``QT_BENCH_APART=0`` ``int4-apart``; ``QT_BENCH_ROUNDS`` sets
``ROUNDS``, ``QT_BENCH_BATCHES=1,16`` the batches, ``QT_BENCH_MODEL=8b`` Llama-3-8B's shape
(``_common.LLAMA_8B``) instead of the 1.1B model; ``QT_BENCH_GEMM16=1`` adds ``int4-no-gemm16``,
a copy of the int4 model run with ``launch.use_gemm16(False)`` (decode + cuBLAS past 64 rows,
where the default gemm16 route runs its kernels on its tables' weights at 65-256 rows: batches
of 65-256 sequences; ``int4-gemm16`` if the route is off by default).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from _common import LLAMA_1B, LLAMA_1B_DRY, LLAMA_8B, Report, generate_kwargs

DRY = os.environ.get("QT_BENCH_DRY") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402
from qtensors.torch.ops import HAVE_TRITON  # noqa: E402

DEV = "cpu" if DRY else "cuda"
BUDGET_S = float(os.environ.get("QT_BENCH_BUDGET_S", "330"))
PROMPT, NEW = (16, 64) if not DRY else (4, 3)
BATCHES = (1, 8) if not DRY else (1, 2)
if os.environ.get("QT_BENCH_BATCHES") and not DRY:
    BATCHES = tuple(int(b) for b in os.environ["QT_BENCH_BATCHES"].split(","))
# QT_BENCH_MODEL=8b: Llama-3-8B's shape instead of the 1.1B model
CONFIG = LLAMA_8B if os.environ.get("QT_BENCH_MODEL") == "8b" else LLAMA_1B
if DRY:
    CONFIG = LLAMA_1B_DRY
#: the model's name in the scripts' headers
MODEL_NAME = "tiny (dry run)" if DRY else "8B" if CONFIG is LLAMA_8B else "1.1B"
ROUNDS = int(os.environ.get("QT_BENCH_ROUNDS", "3"))
# QT_BENCH_MODES=eager: the eager rows only; QT_BENCH_EXACT=0: no int4-exact model (a short run)
_MODES = os.environ.get("QT_BENCH_MODES", "eager,static+compile").split(",")
MODES = tuple(m for m in ("eager", "static+compile") if m in _MODES and not (DRY and m != "eager"))
EXACT = os.environ.get("QT_BENCH_EXACT", "1") != "0"
APART = os.environ.get("QT_BENCH_APART", "1") != "0"
GEMM16 = os.environ.get("QT_BENCH_GEMM16") == "1"
#: the int4 models' gemm16 route, by label ("int4-g64" and the others: the library's default)
GEMM16_LABELS = {"int4-gemm16": True, "int4-no-gemm16": False}
T0 = time.time()
RESULTS: dict[str, Any] = {"runs": []}
REPORT = Report()
say = REPORT.say


def sync() -> None:
    if not DRY:
        torch.cuda.synchronize()


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if not DRY else torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: always NEW tokens
    model.generation_config.pad_token_id = 0
    return model


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def gemm16_default() -> bool:
    from qtensors.torch.kernels import launch

    return launch.GEMM16_ROWS is not None


GEMM16_DEFAULT = HAVE_TRITON and not DRY and gemm16_default()


def setting(label: str) -> None:
    """The int8-activation switch and gemm16 route each model runs under (read at each call,
    and when a CUDA graph is recorded)."""
    from qtensors.torch.kernels import launch

    launch.INT8_ACTIVATIONS = label != "int4-exact"
    gemm16 = GEMM16_LABELS.get(label, GEMM16_DEFAULT)
    if (launch.GEMM16_ROWS is not None) != gemm16:
        launch.use_gemm16(gemm16)


def _generate_s(model, ids, kw, label: str) -> float:
    setting(label)
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    sync()
    assert out.shape == (ids.shape[0], PROMPT + NEW), out.shape
    return time.perf_counter() - t


def measure_pair(models: dict, batch: int, mode: str) -> None:
    """Both models at one batch and mode: two warm-up calls each (compilation, CUDA-graph
    recording), then ROUNDS timed calls alternating between them; the fastest of each is kept,
    so a slow spell of the shared host hits both rather than one."""
    if mode != "eager" and time.time() - T0 > BUDGET_S:
        say(f"{'both':<10} {batch:>5} {mode:<15} skipped (past {BUDGET_S:.0f} s)")
        return
    kw = generate_kwargs(NEW, mode == "static+compile")
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(1, vocab, (batch, PROMPT), device=DEV)
    times: dict[str, list[float]] = {k: [] for k in models}
    warm: dict[str, float] = {}
    peak: dict[str, float] = {}
    total = sum(_bytes(m) for m in models.values())
    try:
        with torch.inference_mode():
            for label, model in models.items():
                setting(label)
                t = time.perf_counter()
                for _ in range(2):
                    model.generate(ids, **kw)
                sync()
                warm[label] = time.perf_counter() - t
                if not DRY:
                    torch.cuda.reset_peak_memory_stats()
                times[label].append(_generate_s(model, ids, kw, label))
                # the other model's weights are resident too: not this one's footprint
                other = total - _bytes(model)
                peak[label] = (torch.cuda.max_memory_allocated() - other) / 2**30 if not DRY else 0
            for _ in range(ROUNDS - 1):
                for label, model in models.items():
                    times[label].append(_generate_s(model, ids, kw, label))
    except Exception as exc:  # report and go on (a graph break under fullgraph, ...)
        err = f"{type(exc).__name__}: {str(exc)[:300]}"
        say(f"{'both':<10} {batch:>5} {mode:<15} FAILED {err}")
        RESULTS["runs"].append(dict(batch=batch, mode=mode, error=err))
        return
    for label in models:
        t = min(times[label])
        row = dict(
            model=label,
            batch=batch,
            mode=mode,
            seconds=t,
            seconds_rounds=times[label],
            tokens_per_s=batch * NEW / t,
            ms_per_step=t / NEW * 1e3,
            peak_gib=peak[label],
            warmup_s=warm[label],
        )
        RESULTS["runs"].append(row)
        spread = (max(times[label]) - t) / t
        say(
            f"{label:<14} {batch:>5} {mode:<15} {row['tokens_per_s']:9.1f} "
            f"{row['ms_per_step']:9.2f} {spread:7.0%} {row['peak_gib']:8.2f} {warm[label]:8.1f}"
        )


def replay_check(model) -> None:
    """Greedy tokens of the int4 model with ``linear.REPLAYS`` on (the default: eager calls
    repeat their recorded launches; at batch 8 the int8 tensor-core path's chain of two) equal
    those of the full path, at each batch."""
    from qtensors.torch import linear as lin

    for batch in BATCHES:
        ids = torch.randint(1, model.config.vocab_size, (batch, PROMPT), device=DEV)
        kw = generate_kwargs(8, False)
        outs = []
        with torch.inference_mode():
            for on in (False, True):
                lin.REPLAYS = on
                outs.append(model.generate(ids, **kw))
        lin.REPLAYS = True
        same = torch.equal(*outs)
        say(f"replay check, batch {batch}: greedy tokens equal with and without replays: {same}; "
            f"decode-step calls replayed: {replayed(model, batch)}")  # fmt: skip


def replayed(model, batch: int) -> str:
    """How many of the weights called with ``batch`` rows hold a replay for that shape (the
    others take the full path on every call), by route: which paths replay is what eager
    decoding's host time depends on."""
    from qtensors.torch import linear as lin
    from qtensors.torch.kernels import fastlaunch

    plans = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        group = qtt.siblings.group_of(m)
        for t in (getattr(w, "codes", None), *(getattr(group, "parts", None) or {}).values()):
            p = getattr(t, "_qt_cuda_plan", None)
            if p is not None:
                plans[id(p)] = p
    counts: dict[str, list[int]] = {}
    for p in plans.values():
        for key, entry in p.replays.items():
            if key[0][:-1].numel() == batch:
                enc, bits, g = p.args[1:4]
                L = lin._launch
                tag = L.route(batch, *p.shape, enc, bits, g, 1, p.aligned, True, L.INT8_ACTIVATIONS)
                c = counts.setdefault(f"{tag} {p.shape[0]}x{p.shape[1]}", [0, 0])
                c[0] += isinstance(entry, fastlaunch.Replay)
                c[1] += 1
    return ", ".join(f"{k} {a}/{b}" for k, (a, b) in sorted(counts.items())) or "none"


def siblings_check(joined, apart) -> None:
    """Joined and apart models give the same logits (up to the kernels' summation order: the
    joined multiply may take another kernel configuration) and the same greedy next tokens."""
    groups = sum(1 for m in joined.modules() if qtt.siblings.group_of(m) is not None)
    for batch in BATCHES:
        ids = torch.randint(1, joined.config.vocab_size, (batch, PROMPT), device=DEV)
        with torch.inference_mode():
            a, b = joined(ids).logits.float(), apart(ids).logits.float()
        rel = float((a - b).abs().max() / b.abs().max())
        same = float((a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).float().mean())
        say(
            f"siblings check, batch {batch}: {groups} joined linears; logits max |joined - apart|"
            f" / max |apart| = {rel:.2e}, same next token in {same:.0%} of rows"
        )
        RESULTS.setdefault("siblings_check", []).append(dict(batch=batch, rel=rel, same=same))
        if rel > 0.1:  # summation order, amplified through 22 random layers (2.4e-2 seen)
            raise SystemExit("the joined model's logits differ from the apart model's")


def main() -> None:
    import copy

    name = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    import transformers

    RESULTS["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    say(
        f"# {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}: Llama-shaped "
        f"decode, {name}, {RESULTS['versions']}, prompt {PROMPT}, "
        f"{NEW} new tokens, greedy; each row the fastest of {ROUNDS} calls alternating with the "
        "other model's; spread = (slowest - fastest) / fastest"
    )
    say(
        f"{'model':<14} {'batch':>5} {'mode':<15} {'tokens/s':>9} {'ms/step':>9} {'spread':>7} "
        f"{'peak GiB':>8} {'warmup s':>8}"
    )
    bf16 = build_model()
    int4 = copy.deepcopy(bf16)
    t = time.perf_counter()
    qtt.quantize_model(int4, qt.Affine(bits=4, group_size=64, axis=-1))
    sync()
    RESULTS["quantize_model_s"] = time.perf_counter() - t
    if not DRY:
        torch.cuda.empty_cache()
    replay_check(int4)
    models = {"bf16": bf16, "int4-g64": int4}
    if APART:
        apart = copy.deepcopy(int4)
        qtt.unfuse_siblings(apart)
        siblings_check(int4, apart)
        models["int4-apart"] = apart
    if not DRY and HAVE_TRITON and EXACT:
        models["int4-exact"] = copy.deepcopy(int4)
    other = "int4-no-gemm16" if GEMM16_DEFAULT else "int4-gemm16"
    if not DRY and HAVE_TRITON and GEMM16:
        models[other] = copy.deepcopy(int4)
    runs = [(b, m) for m in MODES for b in BATCHES]
    for b, m in runs:
        measure_pair(models, b, m)
        torch._dynamo.reset()
    say(f"(quantize_model: {RESULTS['quantize_model_s']:.1f} s)")
    by = {(r["model"], r["batch"], r["mode"]): r for r in RESULTS["runs"] if "error" not in r}

    def ratios(title: str, num: str, den: str) -> None:
        say(title)
        for b, m in runs:
            q, f = by.get((num, b, m)), by.get((den, b, m))
            if q and f:
                say(f"  batch {b} {m:<15} {q['tokens_per_s'] / f['tokens_per_s']:.2f}x")

    for label in models:
        if label != "bf16":
            ratios(f"speedup {label} / bf16 in tokens/s:", label, "bf16")
    if other in models:
        on, off = ("int4-g64", other) if GEMM16_DEFAULT else (other, "int4-g64")
        ratios(f"speedup of the gemm16 route, {on} / {off} in tokens/s:", on, off)
    if "int4-apart" in models:
        ratios("speedup of joined siblings, int4-g64 / int4-apart in tokens/s:", "int4-g64",
               "int4-apart")  # fmt: skip
    say(f"total {time.time() - T0:.0f} s")
    REPORT.write("bench_gpu_generate", RESULTS)


if __name__ == "__main__":
    main()
