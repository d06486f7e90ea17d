"""Time to first token in a fresh process: fp16 through transformers against the int4-g64 folder.

    python3 benches/bench_gpu_load.py                # the 1.1B Llama-shaped model, on CUDA
    python3 benches/bench_gpu_load.py --quick --device cpu      # a small dry run, any machine

A 1.1B Llama-shaped model (hidden 2048, 22 layers, intermediate 5632, GQA 32/4, vocab 32000) with
random weights is written to a temporary folder as fp16 safetensors (`save_pretrained` layout)
and converted with `qtensors convert --preset int4-g64`. Then each way of loading runs in a fresh
Python process, which first pays (and reports apart) its imports (torch, transformers' auto
classes and Llama modules, qtensors.torch) and CUDA's initialisation, then times:

* `load_s`: the load onto the device, synchronised;
* `first_forward_s`: the first forward of a 16-token prompt (kernels compile or load here unless
  the load warmed them), and `second_forward_s` for comparison;
* `ttft_s` = load + first forward.

Ways: `hf_fp16` = `AutoModelForCausalLM.from_pretrained(fp16_folder, dtype=float16,
device_map=DEV)`; `qtt` = `qtensors.torch.from_pretrained(q_folder, dtype=float16, device=DEV)`
(warm-up on, the default: it skips what an earlier load in this environment warmed,
`kernels/warm_record.py`; and the replica that pays torch's first-use costs during the load,
`prewarm.py`); `qtt_warmup_every_load` the same with that record off; `qtt_noprewarm` without
the replica; `qtt_prewarm_torch_only` with a replica of stand-ins (torch's ops only, not our
kernels); `qtt_prewarm_no_helpers` without the threads that make common ops' first calls beside it;
`qtt_nowarm` = the same with `warmup=False`; `hf_qtensors` =
`AutoModelForCausalLM.from_pretrained(q_folder, dtype=float16, device_map=DEV)` through the
registered quantizer. Each runs `--repeat` times (default 2) with the page cache warm (after one
untimed run, which also fills Triton's on-disk cache and Python's bytecode cache: a pip install
compiles every module, a machine with PYTHONDONTWRITEBYTECODE would not; `--no-bytecode-cache`
keeps the environment's setting), once with a fresh Triton cache
(`*_fresh_triton`: what a first-ever run pays), and once with the page cache dropped (`cold`, when
/proc/sys/vm/drop_caches is writable). Correctness first: the qtensors loaders give identical
logits, and close to the fp16 model's. Writes JSON and text to $OUT when set. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SIZES = {
    "full": dict(hidden=2048, layers=22, inter=5632, heads=32, kv=4, vocab=32000),
    "quick": dict(hidden=256, layers=2, inter=704, heads=4, kv=2, vocab=1024),
}
PROMPT = 16


# ------------------------------------------------------------------------------------------------
# the child: one fresh process, one way of loading
# ------------------------------------------------------------------------------------------------


def _launchers() -> int:
    """How many (kernel, specialization) launchers qtensors has set up in this process."""
    try:
        from qtensors.torch.kernels import fastlaunch
    except ImportError:  # no Triton
        return 0
    return len(fastlaunch._LAUNCHERS)


def child(way: str, folder: str, device: str, dump: str | None) -> None:
    t0 = time.perf_counter()
    import torch
    import transformers
    import transformers.quantizers.auto
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    import qtensors.torch as qtt

    t1 = time.perf_counter()
    dev, sync = device_ready(device)
    prof = None
    if os.environ.get("QT_BENCH_PROFILE"):  # the load and first forward, by function
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t2 = time.perf_counter()
    if way == "hf_fp16" or way == "hf_qtensors":
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float16, device_map=str(dev)
        )
    elif way in ("qtt", "qtt_nowarm"):
        model = qtt.from_pretrained(folder, device=dev, dtype=torch.float16, warmup=way == "qtt")
    elif way == "qtt_breakdown":  # warm-up off, then run by hand one batch size at a time
        from qtensors.torch.warmup import default_rows, gemm16_only_rows, warmup

        model = qtt.from_pretrained(folder, device=dev, dtype=torch.float16, warmup=False)
        sync()
        breakdown = {"load_without_warmup_s": time.perf_counter() - t2}
        # (the gemm16 route's own rows run only for its tables' weights: none of this model's)
        for rows in sorted(set(default_rows()) - gemm16_only_rows()):
            tb = time.perf_counter()
            warmup(model, rows=(rows,))
            breakdown[f"warmup_rows_{rows}_s"] = time.perf_counter() - tb
    else:
        raise ValueError(way)
    sync()
    t3 = time.perf_counter()
    ids = torch.arange(1, PROMPT + 1, device=dev).unsqueeze(0)
    launchers = _launchers()
    with torch.inference_mode():
        logits = model(ids).logits
        sync()
        t4 = time.perf_counter()
        launchers = _launchers() - launchers
        if prof is not None:
            prof.disable()
            _write_profile(prof, os.environ["QT_BENCH_PROFILE"], way)
        _ = model(ids).logits
        sync()
        t5 = time.perf_counter()
    res = getattr(model, "qtensors_load_result", None)
    out = {
        "way": way,
        "imports_s": t1 - t0,
        "cuda_init_s": t2 - t1,
        "load_s": t3 - t2,
        "first_forward_s": t4 - t3,
        "second_forward_s": t5 - t4,
        "ttft_s": t4 - t2,
        "quantized_linears": sum(type(m).__name__ == "QuantizedLinear" for m in model.modules()),
        "warmed": len(res.warmed) if res is not None else 0,
        "warmup_s": res.warmup_seconds if res is not None else 0.0,
        "prewarm_s": res.prewarm_seconds if res is not None else 0.0,
        # our kernel launches the first forward set up (0: the load's replica or warm-up ran
        # every kernel it needs)
        "first_forward_new_launchers": launchers,
        "prewarm_error": res.prewarm_error if res is not None else None,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    if way == "qtt_breakdown":
        out["breakdown"] = breakdown
    if dump:
        torch.save(logits[0, -1].float().cpu(), dump)
    print("RESULT " + json.dumps(out))


def _write_profile(prof, folder: str, way: str) -> None:
    import pstats

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"profile_{way}.txt"), "w") as f:
        stats = pstats.Stats(prof, stream=f).sort_stats("cumulative")
        stats.print_stats(70)
        stats.sort_stats("tottime").print_stats(30)


def run_child(way: str, folder: str, device: str, env: dict, dump: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", way, folder, "--device", device]
    if dump:
        cmd += ["--dump", dump]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{way} failed:\n{p.stderr[-4000:]}")


# ------------------------------------------------------------------------------------------------
# the parent: make the folders, check, time
# ------------------------------------------------------------------------------------------------


def make_folders(work: str, size: dict) -> tuple[str, str, dict]:
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        vocab_size=size["vocab"],
        tie_word_embeddings=False,
        dtype="float16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    src, dst = os.path.join(work, "fp16"), os.path.join(work, "int4-g64")
    os.makedirs(src)
    cfg.save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = torch.ones(s, dtype=torch.float16)
        else:
            sd[k] = (torch.randn(s, generator=g) * 0.02).to(torch.float16)
    save_file(sd, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    params = sum(v.numel() for v in sd.values())
    del sd
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "qtensors", "convert", src, dst, "--preset", "int4-g64"],
        check=True,
        capture_output=True,
    )
    info = {
        "params": params,
        "fp16_bytes": os.path.getsize(os.path.join(src, "model.safetensors")),
        "q_bytes": sum(
            os.path.getsize(os.path.join(dst, f))
            for f in os.listdir(dst)
            if f.endswith(".qtensors")
        ),
        "convert_s": time.perf_counter() - t,
    }
    return src, dst, info


def check(src: str, dst: str, device: str, env: dict, work: str) -> dict:
    import torch

    dumps = {}
    runs = (("hf_fp16", src, env), ("qtt", dst, env), ("hf_qtensors", dst, env))
    # the replica shares caches with the model (launchers, plans): its logits must not move
    runs += (("qtt_noprewarm", dst, dict(env, QTENSORS_PREWARM="0")),)
    for name, folder, run_env in runs:
        path = os.path.join(work, f"{name}.pt")
        run_child(name.replace("_noprewarm", ""), folder, device, run_env, dump=path)
        dumps[name] = torch.load(path)
    same = torch.equal(dumps["qtt"], dumps["hf_qtensors"])
    same_unwarmed = torch.equal(dumps["qtt"], dumps["qtt_noprewarm"])
    cos = torch.nn.functional.cosine_similarity(dumps["qtt"], dumps["hf_fp16"], dim=0).item()
    if not same:
        raise AssertionError("qtensors.torch.from_pretrained and transformers' loader differ")
    if not same_unwarmed:
        raise AssertionError("from_pretrained's logits differ with and without the replica")
    return {
        "qtt_equals_hf_qtensors": same,
        "qtt_equals_qtt_noprewarm": same_unwarmed,
        "cosine_last_logits_vs_fp16": cos,
    }


def device_ready(device: str):
    """``(torch.device, sync)`` with CUDA initialised (its start-up kept out of what a child
    times); ``sync`` waits for the device (a no-op on the CPU)."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.empty(1, device=dev)
        sync()
    return dev, sync


def probe_parser(repeat: int) -> argparse.ArgumentParser:
    """The probes' common options (``probe_in_fresh_processes`` runs them with ``--child``)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", metavar="FOLDER")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=repeat)
    return ap


def print_profile(prof, lines: int) -> None:
    """A probe child's profile: the functions with the most time of their own."""
    import io
    import pstats

    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(lines)
    print(s.getvalue())


def probe_in_fresh_processes(
    script: str, device: str, quick: bool, repeat: int, extra: list[str], tail: int = 9000
) -> None:
    """The probes' parent (``probe_prewarm_phases.py``, ``probe_first_forward.py``): make the
    int4-g64 folder, run ``script --child FOLDER --device DEVICE *extra`` in ``repeat`` + 2 fresh
    processes (the first two fill Triton's and Python's caches, as here) printing each one's
    ``RESULT`` line, then once more with ``--profile``, printing the end of its output."""
    work = tempfile.mkdtemp(prefix="qtensors-probe-")
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(work, "triton"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    try:
        _, dst, _ = make_folders(work, SIZES["quick" if quick else "full"])
        cmd = [sys.executable, os.path.abspath(script), "--child", dst, "--device", device, *extra]
        for i in range(repeat + 2):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(p.stderr[-4000:])
            print(("untimed " if i < 2 else "") + line[0][7:], flush=True)
        p = subprocess.run([*cmd, "--profile"], capture_output=True, text=True, env=env)
        print(p.stdout[-tail:] if p.returncode == 0 else p.stderr[-4000:])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def drop_caches_ok() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("WAY", "FOLDER"))
    ap.add_argument("--dump")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also qtt_breakdown: load without warm-up, then the warm-up timed per batch size",
    )
    ap.add_argument("--profile", metavar="DIR", help="one more qtt run under cProfile, into DIR")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="keep the environment's PYTHONDONTWRITEBYTECODE (by default the children share a"
        " bytecode cache, filled by the untimed runs, as a pip install's compiled modules)",
    )
    ap.add_argument("--ways", help="only these warm runs (comma-separated names of the table)")
    ap.add_argument(
        "--quick-phases",
        action="store_true",
        help="only the warm page-cache runs (no fresh-Triton-cache, no cold-cache runs)",
    )
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.device, args.dump)
        return

    from _common import drop_caches

    size = SIZES["quick" if args.quick else "full"]
    lines = ["$ python3 " + " ".join(sys.argv[0:1] + sys.argv[1:]), f"model: {size}"]

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    report: dict = {
        "size": size,
        "device": args.device,
        "bytecode_cache": not args.no_bytecode_cache,
    }
    work = tempfile.mkdtemp(prefix="qtensors-bench-load-")
    triton_cache = os.path.join(work, "triton-cache")
    env = dict(os.environ, TRITON_CACHE_DIR=triton_cache, TOKENIZERS_PARALLELISM="false")
    if not args.no_bytecode_cache:
        # Python's bytecode cache as after a pip install (which compiles every module): a
        # machine with PYTHONDONTWRITEBYTECODE set (the lent H200's image) would otherwise
        # compile each lazily imported module without a .pyc from source in every process
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    try:
        src, dst, info = make_folders(work, size)
        report["folders"] = info
        say(
            f"{info['params'] / 1e9:.2f}B params; fp16 {info['fp16_bytes'] / 1e9:.2f} GB, "
            f"int4-g64 {info['q_bytes'] / 1e9:.2f} GB (convert {info['convert_s']:.1f} s)"
        )
        report["check"] = check(src, dst, args.device, env, work)
        say(f"check: {report['check']}")
        write(report, lines)

        # warm page cache: the three loaders a user picks, and qtt without its warm-up
        # qtt_nowarm: with Triton's cache filled, whether the warm-up pays for itself in TTFT
        ways = [("hf_fp16", src), ("qtt", dst), ("qtt_nowarm", dst), ("hf_qtensors", dst)]
        if args.breakdown:
            ways.append(("qtt_breakdown", dst))
        runs: dict = {}
        report["runs"] = runs

        def timed(name: str, way: str, folder: str, child_env: dict) -> None:
            r = run_child(way, folder, args.device, child_env)
            runs.setdefault(name, []).append(r)
            say(
                f"  {name}: load {r['load_s']:.3f} s, 1st fwd {r['first_forward_s']:.3f} s, "
                f"prewarm {r['prewarm_s']:.3f} s, launchers set up by the 1st fwd "
                f"{r['first_forward_new_launchers']}"
            )
            if r.get("prewarm_error"):
                say(f"    the replica failed: {r['prewarm_error']}")
            if "breakdown" in r:
                say("    " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"].items()))
            write(report, lines)  # what ran so far survives a timeout

        # qtt with its warm-up record off: every signature warmed on every load, as before it
        # kept one
        variants = {
            "qtt_warmup_every_load": dict(env, QTENSORS_WARMUP_RECORD="0"),
            # without the background replica that pays torch's first-use costs during the load
            "qtt_noprewarm": dict(env, QTENSORS_PREWARM="0"),
            # the replica with stand-ins only (torch's ops, not our kernels), as in stop 27
            "qtt_prewarm_torch_only": dict(env, QTENSORS_PREWARM="torch"),
            # the replica without the helper threads that make common ops' first calls
            "qtt_prewarm_no_helpers": dict(env, QTENSORS_PREWARM_THREADS="0"),
        }
        if args.ways:
            keep = set(args.ways.split(","))
            ways = [(w, f) for w, f in ways if w in keep]
            variants = {k: v for k, v in variants.items() if k in keep}
        for _ in range(args.repeat):
            for way, folder in ways:
                timed(way, way, folder, env)
            for name, variant_env in variants.items():
                timed(name, "qtt", dst, variant_env)
        if args.profile:  # where qtt's load and first forward spend their time, by function
            for way in ("qtt", "qtt_nowarm", "hf_fp16"):
                folder = src if way == "hf_fp16" else dst
                run_child(way, folder, args.device, dict(env, QT_BENCH_PROFILE=args.profile))
        fresh_ways = () if args.quick_phases else ("qtt", "qtt_nowarm", "hf_qtensors")
        for way in fresh_ways:  # a first-ever run: Triton's cache empty
            fresh = dict(env, TRITON_CACHE_DIR=os.path.join(work, f"triton-{way}"))
            timed(f"{way}_fresh_triton", way, dst, fresh)
        if drop_caches_ok() and not args.quick_phases:
            for way, folder in ways:
                drop_caches([])
                timed(f"{way}_cold", way, folder, env)

        def med(way: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[way])

        say(
            f"transformers {runs['qtt'][0]['transformers']}, torch {runs['qtt'][0]['torch']}; "
            f"medians of {args.repeat} fresh processes (page cache warm) unless marked; Python's"
            f" bytecode cache {'off' if args.no_bytecode_cache else 'shared (filled by the check)'}"
        )
        say(
            f"{'way':28s} {'imports':>8s} {'cuda init':>9s} {'load':>7s} {'1st fwd':>8s} "
            f"{'2nd fwd':>8s} {'TTFT':>7s} {'warmup':>7s} {'prewarm':>7s}"
        )
        for way in runs:
            say(
                f"{way:28s} {med(way, 'imports_s'):8.2f} {med(way, 'cuda_init_s'):9.2f} "
                f"{med(way, 'load_s'):7.3f} {med(way, 'first_forward_s'):8.3f} "
                f"{med(way, 'second_forward_s'):8.4f} {med(way, 'ttft_s'):7.3f} "
                f"{med(way, 'warmup_s'):7.3f} {med(way, 'prewarm_s'):7.3f}"
            )
        base = med("hf_fp16", "ttft_s") if "hf_fp16" in runs else None
        for way in runs:
            if base is not None and not way.startswith("hf_fp16"):
                cold = way.endswith("_cold") and "hf_fp16_cold" in runs
                ref = med("hf_fp16_cold", "ttft_s") if cold else base
                say(f"TTFT hf_fp16 / {way}: {ref / med(way, 'ttft_s'):.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(report, lines)


def write(report: dict, lines: list[str]) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_load.json"), "w") as fh:
            json.dump(report, fh, indent=2)
        with open(os.path.join(out, "gpu_load.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
