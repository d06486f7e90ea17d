"""Tensor-parallel loading and decoding on two GPUs: a Llama-shaped model (random weights,
``_common.LLAMA_1B``; ``--big``: the 8B shape instead) saved as an fp16 safetensors folder and as
its qtensors int4-g64 conversion, each loaded under ``torchrun --nproc-per-node {1,2}``:

* qtensors ``from_pretrained(folder, tp_plan="auto")`` (TP=1: no plan) against transformers'
  own ``from_pretrained(fp16_folder, tp_plan="auto")`` (TP=1: ``device_map="cuda"``): per rank
  load seconds, host peak RSS added by the load (``ru_maxrss``), bytes read (``/proc/self/io``
  ``read_bytes``: from storage; ``rchar``: through read calls, page cache included), GPU memory;
  for qtensors the load split into skeleton (config, meta model), read+build (the copies to the
  device overlap the reads), kernel warm-up and hooks, each with its rchar / read_bytes; then the
  first forward (both loaders). The CUDA context and cuBLAS start before the clock (timed
  apart), for both: every process pays them once, whatever it loads;
* per rank, microseconds per decode-sized call of a row-wise layer with and without its hook and
  of the all-reduce three ways (what the hooks' host cost is in eager decoding);
* greedy decode tokens/s (batch 1, 16-token prompt, 64 new tokens, eager; then static cache +
  ``torch.compile`` where it works) at TP=2 against TP=1;
* the logits of TP=2 against TP=1 on the same prompt (max |difference| / max |logit|).

    python3 benches/bench_tp.py            # on nvidia-h200-x2 (~4-5 min); OUT=DIR: files
    python3 benches/bench_tp.py --smoke    # tiny model, CPU processes with gloo (checks it)
    # the 8B shape: an fp16 folder of 15 GiB and its int4 conversion (~4.3 GiB) in
    # QT_BENCH_DIR; building them ~3 min, ~10 min in all without the compiled decode
    QT_BENCH_COMPILE=0 QT_BENCH_LAUNCH_S=300 QT_BENCH_DIR=/tmp python3 benches/bench_tp.py --big

The page cache is dropped before every load (root: /proc/sys/vm/drop_caches; else
posix_fadvise DONTNEED on the files), so loads are cold. NCCL runs with NVLink multicast off
(``NCCL_NVLS_ENABLE=0``). Each torchrun is killed after ``QT_BENCH_LAUNCH_S`` seconds (180);
``QT_BENCH_COMPILE=0`` skips the compiled decode (tried for qtensors only); ``QT_BENCH_WARMUP=0``
loads qtensors without the kernel warm-up (its compiles move into the first forward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import LLAMA_1B, LLAMA_1B_DRY, LLAMA_8B, Report, drop_caches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

#: --smoke: the same architecture, small enough for CPU ranks, big enough that the weights and
#: not the imports dominate what a load reads
LLAMA_SMOKE: dict[str, Any] = dict(
    LLAMA_1B_DRY,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=4096,
)
PROMPT, NEW = 16, 64
LAUNCH_S = float(os.environ.get("QT_BENCH_LAUNCH_S", "180"))


# ------------------------------------------------------------------------------------------------
# the children: one rank each, under torchrun
# ------------------------------------------------------------------------------------------------


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}


class Phases:
    """Seconds and ``/proc/self/io`` deltas of named calls inside a load: the loader's functions
    are wrapped in this child process only, so the breakdown needs no hook in the library."""

    def __init__(self, sync) -> None:
        self.sync, self.got = sync, {}

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            io0, t0 = _proc_io(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                io1 = _proc_io()
                d = self.got.setdefault(label, dict(s=0.0, rchar=0, read_bytes=0))
                d["s"] += time.perf_counter() - t0
                d["rchar"] += io1["rchar"] - io0["rchar"]
                d["read_bytes"] += io1["read_bytes"] - io0["read_bytes"]

        setattr(owner, attr, timed)


def breakdown(phases: dict[str, dict[str, float]], load_s: float) -> dict[str, dict[str, float]]:
    """The load split into what runs before ``load_model`` (config, model skeleton) and after it,
    its reads and builds (the copies to the device overlap them, a sync ends them), the kernel
    warm-up and the hooks."""
    whole = phases.get("load_model", dict(s=0.0, rchar=0, read_bytes=0))
    parts = {k: phases[k] for k in ("warmup", "hooks") if k in phases}
    rb = {k: whole[k] - sum(p[k] for p in parts.values()) for k in ("s", "rchar", "read_bytes")}
    return {"skeleton+rest": dict(s=load_s - whole["s"]), "read+build": rb, **parts}


def host_costs(model: Any, sync) -> dict[str, float]:
    """Microseconds per call, decode-sized (one token), of: a row-wise layer with its hook
    (matmul + all-reduce) and without it; the all-reduce alone as the hooks run it in eager
    (functional op, in place), out of place (as under torch.compile) and through
    ``dist.all_reduce`` (the hooks before). Every rank makes the same calls in the same order,
    so the collectives pair up."""
    import torch
    import torch.distributed as dist

    from qtensors.torch.tensor_parallel import all_reduce

    tp = model.qtensors_load_result.tensor_parallel
    path = next(p for p, style in tp.plan.items() if style == "rowwise")
    layer = model.get_submodule(path)
    x = torch.randn(1, 1, layer.in_features, device=layer.weight.device, dtype=model.dtype)
    y = torch.zeros(1, 1, layer.out_features, device=x.device, dtype=x.dtype)
    name = dist.group.WORLD.group_name
    c10d = torch.ops._c10d_functional
    hooks = layer._forward_hooks

    def bare():
        layer._forward_hooks = {}
        try:
            layer(x)
        finally:
            layer._forward_hooks = hooks

    calls = {
        "layer": bare,
        "layer+hook": lambda: layer(x),
        "all_reduce in place (hooks)": lambda: all_reduce(y, name),
        "out of place": lambda: c10d.wait_tensor(c10d.all_reduce(y, "sum", name)),
        "dist.all_reduce": lambda: dist.all_reduce(y),
    }
    got = {}
    with torch.inference_mode():
        for label, fn in calls.items():
            for _ in range(50):
                fn()
            sync()
            dist.barrier()
            t = time.perf_counter()
            for _ in range(200):
                fn()
            sync()
            got[label] = (time.perf_counter() - t) / 200 * 1e6
    return got


def phase_text(label: str, v: dict[str, float]) -> str:
    text = f"{label} {v['s']:.2f} s"
    if "rchar" in v:
        text += f" (rchar {v['rchar'] / 2**20:.0f} MiB, read {v['read_bytes'] / 2**20:.0f} MiB)"
    return text


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    smoke = args.smoke
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if smoke:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    dtype = torch.float32 if smoke else torch.float16
    import transformers

    # imported before the clock starts: the loads below are timed without them
    from transformers.models.llama import modeling_llama  # noqa: F401

    import qtensors.torch as qtt
    import qtensors.torch.transformers as qtt_hf
    from qtensors.torch.tensor_parallel import TensorParallel

    out: dict[str, Any] = dict(rank=rank, world=world, kind=args.child)
    out["device"] = "cpu" if smoke else torch.cuda.get_device_name(dev)
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    # the CUDA context and cuBLAS start before the clock for both loaders: a process pays them
    # once whatever it loads (their libraries' first reads would otherwise land in one load)
    t = time.perf_counter()
    probe = torch.ones(64, 64, device=dev, dtype=dtype)
    (probe @ probe).sum().item()
    out["cuda_init_s"] = time.perf_counter() - t
    phases = Phases(sync)
    if args.child == "qtensors":
        phases.wrap(qtt_hf, "load_model", "load_model")
        phases.wrap(sys.modules["qtensors.torch.warmup"], "warmup", "warmup")
        phases.wrap(TensorParallel, "install", "hooks")
    dist.barrier()
    io0, rss0 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if args.child == "qtensors":
        plan = "auto" if world > 1 or args.plan_at_1 else None
        warm = os.environ.get("QT_BENCH_WARMUP", "1") == "1"
        model = qtt.from_pretrained(args.folder, device=dev, dtype=dtype, tp_plan=plan, warmup=warm)
    else:
        cls = transformers.AutoModelForCausalLM
        if world > 1:
            model = cls.from_pretrained(args.folder, dtype=dtype, tp_plan="auto")
        else:
            model = cls.from_pretrained(args.folder, dtype=dtype, device_map=dev)
    sync()
    out["load_s"] = time.perf_counter() - t
    io1, rss1 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["read_bytes"] = io1["read_bytes"] - io0["read_bytes"]
    out["rchar"] = io1["rchar"] - io0["rchar"]
    out["peak_rss_before_gib"] = rss0 / 2**20
    out["peak_rss_added_gib"] = (rss1 - rss0) / 2**20
    if args.child == "qtensors":
        out["loader_bytes"] = model.qtensors_load_result.bytes_read  # what the StreamReader read
        out["phases"] = breakdown(phases.got, out["load_s"])
    if not smoke:
        out["gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: always NEW tokens
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (1, PROMPT), generator=g).to(dev)
    try:
        with torch.inference_mode():
            t = time.perf_counter()
            logits = model(ids).logits
            sync()
            out["first_forward_s"] = time.perf_counter() - t
            if rank == 0:
                torch.save(logits.float().cpu(), args.logits)
    except Exception as exc:  # reported; generate below may still run
        out["logits_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if out.get("phases", {}).get("hooks"):
        out["host_us"] = host_costs(model, sync)
    new = 3 if smoke else NEW
    modes = ["eager"]
    if not smoke and args.child == "qtensors" and os.environ.get("QT_BENCH_COMPILE", "1") == "1":
        modes.append("static+compile")
    for mode in modes:
        kw: dict[str, Any] = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if mode == "eager":
            kw["disable_compile"] = True
        else:
            kw["cache_implementation"] = "static"
            kw["compile_config"] = transformers.CompileConfig(fullgraph=False)
        try:
            with torch.inference_mode():
                for _ in range(1 if mode == "eager" else 2):
                    model.generate(ids, **kw)
                sync()
                t = time.perf_counter()
                tokens = model.generate(ids, **kw)
                sync()
                t = time.perf_counter() - t
            out[mode] = dict(tokens_per_s=new / t, tokens=tokens[0, PROMPT:].tolist())
        except Exception as exc:  # a compile that does not work: reported, not fatal
            out[mode] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
        # the JSON after each step: a later step that hangs (killed) leaves these figures
        with open(f"{args.out}.{rank}.json", "w") as fh:
            json.dump(out, fh)
    dist.destroy_process_group()
    # every figure is written: leave without waiting on compile workers at interpreter exit
    # (a TP=1 child once sat there until torchrun was killed)
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# the parent: builds the folders, starts torchrun, compares
# ------------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> None:
    """(In a process of its own, so the parent holds no GPU memory.) The fp16 folder and its
    int4-g64 conversion."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import qtensors as qt
    import qtensors.torch as qtt

    shape = json.loads(args.shape)
    cfg = LlamaConfig(**shape, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    dev = "cpu" if args.smoke else "cuda"
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.float32 if args.smoke else torch.float16)
    model.save_pretrained(args.fp16)
    qtt.save_model(model, args.folder, quant=qt.Affine(bits=4, group_size=64, axis=-1))


def launch(args: argparse.Namespace, world: int, extra: list[str], say) -> subprocess.Popen:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={world}", os.path.abspath(__file__), *extra]
    if args.smoke:
        cmd.append("--smoke")
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_S)
        if p.returncode:
            say(f"  torchrun exit {p.returncode}: {(p.stdout + p.stderr)[-1500:]}")
    except subprocess.TimeoutExpired:
        say(f"  torchrun killed after {LAUNCH_S:.0f} s (figures written before it are kept)")


def read_ranks(stem: str, world: int) -> list[dict[str, Any]]:
    got = []
    for r in range(world):
        try:
            with open(f"{stem}.{r}.json") as fh:
                got.append(json.load(fh))
        except FileNotFoundError:
            got.append({"rank": r, "error": "no result"})
    return got


def stored_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.endswith((".qtensors", ".safetensors"))
    )


def run_shape(
    args, label: str, shape: dict[str, Any], work: str, report: Report, worlds: tuple[int, ...]
) -> dict:
    say = report.say
    fp16, folder = os.path.join(work, f"{label}-fp16"), os.path.join(work, f"{label}-qt")
    t = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--build", "--shape", json.dumps(shape)]
    cmd += ["--fp16", fp16, "--folder", folder] + (["--smoke"] if args.smoke else [])
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="8"))
    res: dict[str, Any] = dict(build_s=time.perf_counter() - t, runs={})
    res["stored_bytes"] = {"qtensors": stored_bytes(folder), "fp16": stored_bytes(fp16)}
    say(
        f"## {label}: fp16 folder {res['stored_bytes']['fp16'] / 2**30:.2f} GiB, qtensors "
        f"int4-g64 {res['stored_bytes']['qtensors'] / 2**30:.2f} GiB (built in "
        f"{res['build_s']:.0f} s)"
    )
    say(
        f"{'loader':<10} {'TP':>2} {'rank':>4} {'load s':>7} {'RSS+ MiB':>8} {'read MiB':>8} "
        f"{'rchar MiB':>9} {'GPU GiB':>7} {'eager tok/s':>11} {'compiled tok/s':>14}"
    )
    for kind, src in (("qtensors", folder), ("hf-fp16", fp16)):
        for world in worlds:
            stem = os.path.join(work, f"{label}-{kind}-tp{world}")
            logits = stem + ".logits.pt"
            files = [os.path.join(src, f) for f in os.listdir(src)]
            how = drop_caches(files)
            child_kind = "qtensors" if kind == "qtensors" else "hf"
            extra = ["--child", child_kind, "--folder", src, "--out", stem, "--logits", logits]
            if worlds == (1,):  # one GPU: the TP path (hooks, NCCL) at world size 1
                extra.append("--plan-at-1")
            launch(args, world, extra, say)
            ranks = read_ranks(stem, world)
            res["runs"][f"{kind}-tp{world}"] = ranks
            res["page_cache"] = how
            for r in ranks:
                if "load_s" not in r:
                    say(f"{kind:<10} {world:>2} {r['rank']:>4} {r.get('error', 'failed')}")
                    continue
                tps = [
                    f"{r[m]['tokens_per_s']:.1f}" if "tokens_per_s" in r.get(m, {}) else "-"
                    for m in ("eager", "static+compile")
                ]
                say(
                    f"{kind:<10} {world:>2} {r['rank']:>4} {r['load_s']:7.2f} "
                    f"{r['peak_rss_added_gib'] * 1024:8.0f} {r['read_bytes'] / 2**20:8.0f} "
                    f"{r['rchar'] / 2**20:9.0f} {r.get('gpu_allocated_gib', 0):7.2f} "
                    f"{tps[0]:>11} {tps[1]:>14}"
                )
                if "phases" in r:
                    ph = r["phases"]
                    line = ", ".join(phase_text(k, v) for k, v in ph.items())
                    say(f"    rank {r['rank']} load: {line}")
                if "first_forward_s" in r:
                    say(
                        f"    rank {r['rank']}: CUDA+cuBLAS start {r['cuda_init_s']:.2f} s (before "
                        f"the clock), first forward {r['first_forward_s']:.2f} s"
                    )
                if "host_us" in r:
                    us = ", ".join(f"{k} {v:.0f}" for k, v in r["host_us"].items())
                    say(f"    rank {r['rank']} us per decode call: {us}")
                for m in ("eager", "static+compile"):
                    if "error" in r.get(m, {}):
                        say(f"    {m}: {r[m]['error']}")
            if os.path.exists(logits):
                res.setdefault("logits", {})[f"{kind}-tp{world}"] = logits
    compare(res, report)
    # the logits files are paths in the work dir: keep only the comparisons
    res.pop("logits", None)
    return res


def compare(res: dict[str, Any], report: Report) -> None:
    import torch

    say = report.say
    runs = res["runs"]
    lg = res.get("logits", {})
    if "qtensors-tp1" in lg and "qtensors-tp2" in lg:
        a, b = torch.load(lg["qtensors-tp1"]), torch.load(lg["qtensors-tp2"])
        rel = ((a - b).abs().max() / a.abs().max()).item()
        res["logits_tp2_vs_tp1_rel"] = rel
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        say(
            f"qtensors logits TP=2 vs TP=1: max |diff| / max |logit| = {rel:.2e}, "
            f"argmax agree {agree:.3f}"
        )

    def rank0(key: str) -> dict[str, Any]:
        return (runs.get(key) or [{}])[0]

    def ratio(num: float | None, den: float | None) -> str:
        return f"{num / den:.2f}x" if num and den else "n/a"

    stored = res["stored_bytes"]["qtensors"]
    q2 = runs.get("qtensors-tp2", [])
    if q2 and all("read_bytes" in r for r in q2):
        for key, what in (
            ("loader_bytes", "read by the loader"),
            ("read_bytes", "read from storage (read_bytes)"),
            ("rchar", "through read calls (rchar)"),
        ):
            per = [r[key] / stored for r in q2]
            say(f"qtensors TP=2, per rank {what} / stored: {', '.join(f'{p:.2f}' for p in per)}")
            res[f"tp2_{key}_share"] = per
    for w in (1, 2):
        q, h = rank0(f"qtensors-tp{w}"), rank0(f"hf-fp16-tp{w}")
        r = ratio(h.get("load_s"), q.get("load_s"))
        say(f"TP={w} load seconds: transformers fp16 / qtensors int4 = {r}")
    for m in ("eager", "static+compile"):
        t1 = rank0("qtensors-tp1").get(m, {}).get("tokens_per_s")
        t2 = rank0("qtensors-tp2").get(m, {}).get("tokens_per_s")
        h2 = rank0("hf-fp16-tp2").get(m, {}).get("tokens_per_s")
        say(
            f"decode {m}: qtensors TP=2 / TP=1 = {ratio(t2, t1)}; "
            f"TP=2 int4 / fp16 = {ratio(t2, h2)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, gloo")
    ap.add_argument("--big", action="store_true", help="the 8B shape instead (see the docstring)")
    ap.add_argument("--child", choices=["qtensors", "hf"])
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--shape")
    ap.add_argument("--folder")
    ap.add_argument("--fp16")
    ap.add_argument("--out")
    ap.add_argument("--logits")
    ap.add_argument("--plan-at-1", action="store_true", help="tp_plan at world size 1 too")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.build:
        return build(args)
    import torch
    import transformers

    report = Report()
    t0 = time.time()
    name = "cpu (smoke, gloo)" if args.smoke else "cuda"  # the parent keeps off the GPUs
    results: dict[str, Any] = dict(
        device=name,
        gpus=0 if args.smoke else torch.cuda.device_count(),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        shapes={},
    )
    report.say(
        f"# tensor-parallel load and decode, {name} x{results['gpus']}, {results['versions']}"
    )
    # one GPU: TP=1 only, through tp_plan (NCCL at world size 1); TP=2 comparisons show n/a
    worlds = (1, 2) if args.smoke or results["gpus"] >= 2 else (1,)
    if worlds == (1,):
        report.say("only one GPU: TP=1 runs only")
    shapes = {"llama-smoke": LLAMA_SMOKE} if args.smoke else {"llama-1b": LLAMA_1B}
    if args.big and not args.smoke:
        shapes = {"llama-8b": LLAMA_8B}
    with tempfile.TemporaryDirectory(dir=os.environ.get("QT_BENCH_DIR")) as work:
        for label, shape in shapes.items():
            results["shapes"][label] = run_shape(args, label, shape, work, report, worlds)
    report.say(f"total {time.time() - t0:.0f} s")
    report.write("bench_tp" + ("_smoke" if args.smoke else ""), results)


if __name__ == "__main__":
    main()
