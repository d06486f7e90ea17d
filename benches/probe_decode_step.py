"""Where a compiled decode step's time goes (H200): the GPU's busy time against the host's.

For the 1.1B Llama-shaped model of ``bench_gpu_generate.py`` (its ``build_model``, random
weights; ``QT_BENCH_MODEL=8b``: Llama-3-8B's shape), bf16 and int4-g64 with its sibling linears
joined, greedy, with ``cache_implementation="static"`` and transformers'
own ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of the decoding step:

* ``generate``: tokens/s (best of ``--rounds`` alternating calls), whether inductor ran the step
  in CUDA graphs (its ``cudagraph_skips`` counter) and, from a ``torch.profiler`` trace of one
  call, the GPU's busy time (the union of its kernels' intervals) per step against the step's wall
  time: what is left is host time the GPU waits through;
* ``loop``: the same compiled step driven without ``generate``'s per-token work: the compiled
  forward called in a loop with the greedy token picked on the GPU and no host synchronisation per
  token (as gpt-fast-style decoders run), its tokens checked equal to ``generate``'s; its GPU
  time per step (the steps queued while a spin kernel holds the GPU, then run back to back), the
  host's time to queue them (an upper bound of its own work: a launch may wait for room in the
  queue; it varied 0.96-1.47 ms a step between runs of one int4 model), and the kernels that
  take the GPU's time. The loop's wall per token includes its eager prefill's share.

    OUT=DIR python3 benches/probe_decode_step.py [--batches 1,8] [--rounds 3] [--new 64]
    OUT=DIR python3 benches/probe_decode_step.py --batches 1 --host-profile

``--host-profile``: the loop's host time per step under ``torch.profiler`` (torch's regions) and
cProfile (Python functions), per model, instead of the timings.

Prints one line per model, batch and driver, and the int4 / bf16 ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import Report, generate_kwargs, gpu_busy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

import torch  # noqa: E402

import qtensors as qt  # noqa: E402
import qtensors.torch as qtt  # noqa: E402

REPORT = Report()
say = REPORT.say
PROMPT = 16
TOP = 14  # kernels listed per model and batch


def build_models(kinds: list[str]) -> dict:
    """The models named in ``kinds``: ``bf16``; ``int4-g64`` (affine, siblings joined: the
    default of ``quantize_model``); ``int4-sym`` (symmetric: two parts a weight, no mins);
    ``int4-apart`` (affine, siblings apart: no member's parts are views of a group's)."""
    import copy

    from bench_gpu_generate import build_model  # the bf16 model bench_gpu_generate times

    bf16 = build_model()
    encodings = {
        "int4-g64": qt.Affine(bits=4, group_size=64, axis=-1),
        "int4-sym": qt.Symmetric(bits=4, group_size=64, axis=-1),
        "int4-apart": qt.Affine(bits=4, group_size=64, axis=-1),
    }
    models = {}
    for kind in kinds:
        if kind == "bf16":
            models[kind] = bf16
            continue
        m = copy.deepcopy(bf16)
        qtt.quantize_model(m, encodings[kind], fuse_siblings=kind != "int4-apart")
        models[kind] = m
    torch.cuda.empty_cache()
    return models


def host_and_device(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(host s, device s) per decoding step of ``loop_steps`` after its prefill: the GPU held
    busy by a spin kernel while the host issues the steps (the host's time, launches that wait
    for queue room included), then the steps run back to back on the GPU, timed by CUDA events
    from the spin's end (gaps between kernels included)."""
    state = loop_prefill(model, ids, new)
    steps = new - 1
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(3e9))  # ~1.5 s of spinning: longer than the host needs
    start.record()
    t = time.perf_counter()
    loop_steps(state, steps)
    host = time.perf_counter() - t
    end.record()
    torch.cuda.synchronize()
    return host / steps, start.elapsed_time(end) * 1e-3 / steps


_CACHES: dict = {}


def loop_prefill(model, ids: torch.Tensor, new: int) -> dict:
    """The prompt's forward, uncompiled (as ``generate`` runs it), into a static cache kept per
    model and shape (as ``generate`` keeps its own, so the compiled step sees the same tensors on
    every call): the state ``loop_steps`` continues from."""
    from transformers import CompileConfig, StaticCache

    b, p = ids.shape
    key = (id(model), b, p + new)
    if key not in _CACHES:
        _CACHES[key] = StaticCache(config=model.config, max_cache_len=p + new)
    cache = _CACHES[key]
    cache.reset()
    pos = torch.arange(p, device=ids.device)
    out = model(input_ids=ids, past_key_values=cache, cache_position=pos,
                position_ids=pos[None].expand(b, p), use_cache=True)  # fmt: skip
    tok = out.logits[:, -1:].argmax(-1)
    return dict(
        step=model.get_compiled_call(CompileConfig(fullgraph=True, mode="reduce-overhead")),
        cache=cache,
        toks=[ids, tok],
        cp=torch.full((1,), p, device=ids.device, dtype=torch.long),
    )


def loop_steps(state: dict, n: int) -> torch.Tensor:
    """``n`` decoding steps of the compiled step ``generate`` uses (``get_compiled_call``), each
    next token picked on the GPU and fed back, no synchronisation per token."""
    step, cache, toks, cp = state["step"], state["cache"], state["toks"], state["cp"]
    b = toks[0].shape[0]
    for _ in range(n):
        out = step(input_ids=toks[-1], past_key_values=cache, cache_position=cp,
                   position_ids=cp[None].expand(b, 1), use_cache=True,
                   return_dict=True)  # fmt: skip
        toks.append(out.logits[:, -1:].argmax(-1))
        cp = cp + 1
    return torch.cat(toks, 1)


def loop_decode(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """``new`` greedy tokens: ``loop_prefill``, then ``new - 1`` of ``loop_steps``."""
    return loop_steps(loop_prefill(model, ids, new), new - 1)


def host_profile(model, ids: torch.Tensor, new: int, top: int) -> None:
    """Where the compiled step's host time goes: ``loop_steps`` under ``torch.profiler`` (CPU
    events, torch's own regions: dynamo's guard checks are "TorchDynamo Cache Lookup") and under
    cProfile (Python functions), each top ``top`` by own time per step."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    steps = new - 1
    state = loop_prefill(model, ids, new)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop_steps(state, steps)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    for e in events:
        say(f"{'':<12} {e.self_cpu_time_total / steps:8.1f} us/step own, {e.count / steps:6.1f}"
            f" calls/step  {e.key[:100]}")  # fmt: skip
    state = loop_prefill(model, ids, new)
    torch.cuda.synchronize()
    prof2 = cProfile.Profile()
    prof2.enable()
    loop_steps(state, steps)
    torch.cuda.synchronize()
    prof2.disable()
    st = pstats.Stats(prof2)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (cc, nc, tt, ct, callers)
    for (file, line, name), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{os.path.basename(file)}:{line}:{name}"
        say(f"{'':<12} own {tt / steps * 1e6:8.1f} cum {ct / steps * 1e6:8.1f} us/step, "
            f"{nc / steps:6.1f} calls/step  {where[:90]}")  # fmt: skip


def drivers(model, ids: torch.Tensor, kw: dict, new: int) -> list:
    """(name, call) of each way of decoding ``new`` tokens after ``ids``."""
    return [
        ("generate", lambda: model.generate(ids, **kw)),
        ("loop", lambda: loop_decode(model, ids, new)),
    ]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument(
        "--models", default="bf16,int4-g64", help="of bf16,int4-g64,int4-sym,int4-apart"
    )
    ap.add_argument("--top", type=int, default=22, help="rows of --host-profile's tables")
    ap.add_argument(
        "--host-profile",
        action="store_true",
        help="only the loop's host time per step, profiled (first batch)",
    )
    args = ap.parse_args()
    import transformers
    from torch._dynamo.utils import counters

    new = args.new
    models = build_models(args.models.split(","))
    cfg = next(iter(models.values())).config  # bench_gpu_generate's (QT_BENCH_MODEL=8b: 8B's)
    say(f"# probe_decode_step on {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; Llama shape, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, prompt {PROMPT}, {new} tokens, greedy; best of "
        f"{args.rounds} alternating calls")  # fmt: skip
    kw = generate_kwargs(new, True)
    rows: dict = {}
    for batch in (int(b) for b in args.batches.split(",")):
        ids = torch.randint(1, cfg.vocab_size, (batch, PROMPT), device="cuda")
        ref = {}
        with torch.inference_mode():
            for label, model in models.items():
                skips = counters["inductor"]["cudagraph_skips"]
                for _ in range(2):  # compile, record
                    ref[label] = model.generate(ids, **kw)
                for _ in range(2):
                    loop_decode(model, ids, new)
                torch.cuda.synchronize()
                same = float((loop_decode(model, ids, new) == ref[label]).float().mean())
                say(f"{label:<9} batch {batch}: cudagraph skips while compiling "
                    f"{counters['inductor']['cudagraph_skips'] - skips}; loop tokens equal "
                    f"generate's: {same:.1%}")  # fmt: skip
                if args.host_profile:
                    host, dev = host_and_device(model, ids, new)
                    say(f"{label:<9} batch {batch} loop: host {host * 1e3:6.3f} ms/step, GPU "
                        f"{dev * 1e3:6.3f} ms/step")  # fmt: skip
                    host_profile(model, ids, new, args.top)
            if args.host_profile:
                break
            times: dict = {}
            for _ in range(args.rounds):
                for label, model in models.items():
                    for driver, fn in drivers(model, ids, kw, new):
                        times.setdefault((label, driver), []).append(timed(fn))
            for label, model in models.items():
                for driver, fn in drivers(model, ids, kw, new):
                    wall, busy, kernels, by_name = gpu_busy(fn)
                    t = min(times[(label, driver)])
                    rows[(label, batch, driver)] = t
                    say(f"{label:<9} batch {batch:>2} {driver:<8} {batch * new / t:8.1f} tokens/s"
                        f"  {t / new * 1e3:6.3f} ms/step | profiled: wall {wall / new * 1e3:6.3f}"
                        f" ms/step, GPU busy {busy / new * 1e3:6.3f} ms/step"
                        f" ({busy / wall:4.0%}), {kernels / new:5.0f} kernels/step")  # fmt: skip
                    if driver == "loop":
                        host, dev = host_and_device(model, ids, new)
                        rows[(label, batch, "loop GPU")] = dev
                        say(f"{'':<9} batch {batch:>2} loop: host {host * 1e3:6.3f} ms/step "
                            f"issuing it, GPU {dev * 1e3:6.3f} ms/step back to back "
                            f"(gaps included)")  # fmt: skip
                        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP]
                        for name, sec in top:
                            say(f"{'':<12} {sec / new * 1e6:8.1f} us/step  {name[:110]}")
        torch._dynamo.reset()
    say("## bf16's time / each model's (tokens/s ratios; 'loop GPU': GPU time per step)")
    for (label, batch, driver), t in rows.items():
        if label == "bf16" or ("bf16", batch, driver) not in rows:
            continue
        say(f"  {label} batch {batch:>2} {driver:<8} {rows[('bf16', batch, driver)] / t:.2f}x")
    REPORT.write("probe_decode_step", {str(k): v for k, v in rows.items()})


if __name__ == "__main__":
    main()
