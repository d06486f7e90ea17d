"""Disk -> GPU benchmark of `qtensors.stream` and `qtensors.torch.offload` (issue #5).

One run, on a machine with a CUDA GPU, in this order (each phase appends to the results):

1. check: streaming to CUDA decodes every encoding like `load_file` (small file);
2. model: a Llama-architecture decoder built from a config with random fp16 weights
   (`--layers` layers of hidden 4096: 16 layers = 3.5 B parameters, 7 GB in fp16), saved with
   `save_pretrained` (sharded safetensors) and converted with `qtensors.convert` (FLEXGEN);
3. raw: the disk's sequential read rate with direct I/O (`dd iflag=direct bs=16M`, one stream
   and one stream per shard at once) over the fp16 shards;
4. stream: `qtensors.stream` of the qtensors folder to the GPU, cold page cache, for each read
   mode (pread / direct / mmap), decoded on the GPU and packed, plus one warm run;
5. safetensors: `safetensors.torch.load_file(device="cuda")` of the fp16 shards, cold;
6. offload: per-token forward time of `qtensors.torch.offload` (4-bit file) against
   accelerate's `disk_offload` (fp16), cold first pass and warm decoding steps, and the
   offloaded logits against the same weights loaded fully on the GPU.

Page cache: dropped with `sync; echo 3 > /proc/sys/vm/drop_caches` where allowed, else with
`posix_fadvise(DONTNEED)` on every file read (the results say which).

    python benches/bench_stream.py --work /root/qtbench --out $OUT [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback

from _common import drop_caches

MiB = 1 << 20
GB = 1e9
RESULTS: dict = {"phases": {}, "errors": {}}
T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def save(out: str) -> None:
    with open(os.path.join(out, "stream_results.json"), "w") as fh:
        json.dump(RESULTS, fh, indent=2, default=str)


def files_of(folder: str, suffix: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(suffix))


def phase(name: str, out: str):
    def wrap(fn):
        def run(*a, **k):
            log(f"== {name}")
            t = time.perf_counter()
            try:
                r = fn(*a, **k)
                RESULTS["phases"][name] = r
                log(f"{name}: {json.dumps(r, default=str)[:1500]}")
                return r
            except Exception as e:
                RESULTS["errors"][name] = traceback.format_exc()
                log(f"{name} FAILED: {e!r}")
                traceback.print_exc()
                return None
            finally:
                RESULTS.setdefault("phase_seconds", {})[name] = time.perf_counter() - t
                save(out)

        return run

    return wrap


# ------------------------------------------------------------------------------------------------


def env_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
    }
    for mod in ("transformers", "accelerate", "safetensors", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:
            info[mod] = repr(e)
    for cmd in ("df -h {w}", "findmnt -T {w}", "lsblk -o NAME,SIZE,ROTA,MODEL", "free -g"):
        try:
            info[cmd.split()[0]] = subprocess.run(
                cmd.format(w=ARGS.work), shell=True, capture_output=True, text=True, timeout=20
            ).stdout
        except Exception as e:
            info[cmd.split()[0]] = repr(e)
    ra = {}
    for dev in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{dev}/queue/read_ahead_kb") as fh:
                ra[dev] = int(fh.read())
        except OSError:
            pass
    info["read_ahead_kb"] = ra
    return info


def check_cuda_stream(work: str) -> dict:
    import numpy as np
    import torch

    import qtensors as qt

    rng = np.random.default_rng(1)
    t = {
        "a4": rng.standard_normal((512, 700)).astype(np.float32),
        "a8": torch.randn(300, 256, dtype=torch.float16),
        "a3": torch.randn(130, 96, dtype=torch.bfloat16),
        "sym": rng.standard_normal((256, 64)).astype(np.float32),
        "nf4": rng.standard_normal((128, 128)).astype(np.float32),
        "raw16": torch.randn(33, dtype=torch.float16),
        "int": np.arange(100, dtype=np.int64),
    }
    quant = {
        "a4": qt.FLEXGEN,
        "a8": qt.Affine(bits=8, group_size=32, axis=-1),
        "a3": qt.Affine(bits=3, group_size=64, axis=0, scale_dtype="bfloat16"),
        "sym": qt.Symmetric(bits=4, group_size=64),
        "nf4": qt.NF4(),
        "raw16": qt.Raw(),
        "int": qt.Raw(),
    }
    path = os.path.join(work, "check.qtensors")
    qt.save_file(t, path, quant=quant)
    full = qt.load_file(path, "pt")
    res = {}
    for mode in ("pread", "direct", "mmap"):
        got = dict(qt.stream(path, device="cuda", verify=True, mode=mode, pinned=64 * 1024))
        diffs = {}
        for n, v in got.items():
            assert v.device.type == "cuda" and v.dtype == full[n].dtype, n
            diffs[n] = float((v.cpu().double() - full[n].double()).abs().max())
        assert list(got) == list(full)
        res[mode] = diffs
    packed = dict(qt.stream(path, device="cuda", quantized=True))
    with qt.safe_open(path, "pt") as f:
        res["packed_equal"] = all(
            torch.equal(packed[n].codes.cpu(), f.get_quantized(n).codes) for n in t
        )
    return res


def make_model(work: str, layers: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import qtensors as qt

    st_dir = os.path.join(work, "fp16")
    q_dir = os.path.join(work, "q4")
    cfg = llama_config(layers)
    info: dict = {"layers": layers}
    if not os.path.exists(os.path.join(st_dir, "config.json")):
        shutil.rmtree(st_dir, ignore_errors=True)
        t = time.perf_counter()
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        info["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(st_dir, max_shard_size="2GB")
        del model
        torch.cuda.empty_cache()
        info["build_save_s"] = time.perf_counter() - t
    if not os.path.exists(os.path.join(q_dir, "config.json")):
        t = time.perf_counter()
        qt.convert(st_dir, q_dir, force=True)
        info["convert_s"] = time.perf_counter() - t
    os.sync()
    info["fp16_bytes"] = sum(os.path.getsize(f) for f in files_of(st_dir, ".safetensors"))
    info["q4_bytes"] = sum(os.path.getsize(f) for f in files_of(q_dir, ".qtensors"))
    info["fp16_files"] = len(files_of(st_dir, ".safetensors"))
    info["q4_files"] = len(files_of(q_dir, ".qtensors"))
    return info


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def dd_rate(files: list[str], parallel: bool, direct: bool = True) -> dict:
    flag = "iflag=direct" if direct else ""
    t = time.perf_counter()
    procs = []
    outs = []
    for f in files:
        p = subprocess.Popen(
            f"dd if={f} of=/dev/null bs=16M {flag}",
            shell=True,
            stderr=subprocess.PIPE,
            text=True,
        )
        if parallel:
            procs.append(p)
        else:
            outs.append(p.communicate()[1])
    for p in procs:
        outs.append(p.communicate()[1])
    dt = time.perf_counter() - t
    total = 0
    for o in outs:
        m = re.search(r"(\d+) bytes", o)
        total += int(m.group(1)) if m else 0
    return {"bytes": total, "s": dt, "GB_s": total / dt / GB, "dd_tail": outs[-1].strip()[-120:]}


def raw_disk(work: str) -> dict:
    st = files_of(os.path.join(work, "fp16"), ".safetensors")
    q = files_of(os.path.join(work, "q4"), ".qtensors")
    res = {}
    res["drop"] = drop_caches(st + q)
    res["dd_direct_fp16"] = dd_rate(st, parallel=False)
    drop_caches(st)
    res["dd_buffered_fp16_cold"] = dd_rate(st, parallel=False, direct=False)
    drop_caches(q)
    res["dd_direct_q4"] = dd_rate(q, parallel=False)
    drop_caches(q)
    res["dd_direct_q4_parallel"] = dd_rate(q, parallel=True)
    drop_caches(q)
    res["dd_buffered_q4_cold"] = dd_rate(q, parallel=False, direct=False)
    return res


def stream_once(q_dir: str, **kw) -> dict:
    import torch

    import qtensors as qt

    files = files_of(q_dir, ".qtensors")
    cold = kw.pop("cold", True)
    how = drop_caches(files) if cold else "warm"
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = stored = fp16 = 0
    s = qt.stream(q_dir, device="cuda", **kw)
    for _, v in s:
        n += 1
        if kw.get("quantized"):
            stored += v.nbytes
            numel = 1
            for d in v.shape:
                numel *= d
            fp16 += numel * 2
        else:
            fp16 += v.numel() * v.element_size()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    st = s.stats()
    return {
        "cache": how,
        "tensors": n,
        "stored_bytes": st["bytes"],
        "s": dt,
        "stored_GB_s": st["bytes"] / dt / GB,
        "fp16_equiv_GB_s": fp16 / dt / GB,
        "peak_window_MiB": st["peak_window_bytes"] / MiB,
        "pinned_MiB": st["pinned_bytes"] / MiB,
        "mode": st["mode"],
        **{k: v for k, v in kw.items() if k != "quantized"},
        "quantized": bool(kw.get("quantized")),
    }


def stream_bench(work: str) -> dict:
    q_dir = os.path.join(work, "q4")
    qfiles = files_of(q_dir, ".qtensors")
    res: dict = {}
    # Untimed first pass: Triton compiles its kernels for each shape here.
    res["first_run_incl_compile"] = stream_once(q_dir, mode="pread", cold=False)
    res["dd_direct_q4_before"] = (drop_caches(qfiles), dd_rate(qfiles, parallel=False))[1]
    runs = []
    for _ in range(3):
        for mode in ("pread", "direct", "mmap"):
            runs.append(stream_once(q_dir, mode=mode, threads=4))
            log(runs[-1])
    for mode in ("pread", "direct", "mmap"):
        runs.append(stream_once(q_dir, mode=mode, quantized=True, threads=4))
        log(runs[-1])
    for mode, threads, chunk in (
        ("pread", 8, 8 * MiB),
        ("direct", 8, 8 * MiB),
        ("pread", 2, 16 * MiB),
        ("direct", 2, 16 * MiB),
        ("direct", 4, 16 * MiB),
        ("pread", 1, 32 * MiB),
    ):
        runs.append(stream_once(q_dir, mode=mode, threads=threads, chunk_size=chunk))
        log(runs[-1])
    res["dd_direct_q4_after"] = (drop_caches(qfiles), dd_rate(qfiles, parallel=False))[1]
    drop_caches(qfiles)
    res["dd_buffered_q4_after"] = dd_rate(qfiles, parallel=False, direct=False)
    # Warm: the page cache holds the file (read just above).
    runs.append(stream_once(q_dir, mode="pread", cold=False))
    runs.append(stream_once(q_dir, mode="pread", cold=False, quantized=True))
    res["runs"] = runs
    by_mode: dict = {}
    for r in runs[:9]:
        by_mode.setdefault(r["mode"], []).append(r["stored_GB_s"])
    res["decoded_cold_median_GB_s"] = {m: sorted(v)[1] for m, v in by_mode.items()}
    return res


def safetensors_bench(work: str) -> dict:
    import torch
    from safetensors.torch import load_file

    st = files_of(os.path.join(work, "fp16"), ".safetensors")
    how = drop_caches(st)
    torch.cuda.synchronize()
    t = time.perf_counter()
    total = 0
    for f in st:
        d = load_file(f, device="cuda")
        total += sum(v.numel() * v.element_size() for v in d.values())
        del d
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"cache": how, "bytes": total, "s": dt, "GB_s": total / dt / GB}


def decode_steps(model, steps: int, files: list[str], prompt: int = 16) -> dict:
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, prompt), device="cuda")
    res: dict = {"cache_drop": drop_caches(files)}
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        torch.cuda.synchronize()
        res["prefill_cold_s"] = time.perf_counter() - t
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
    res["token_s"] = times
    res["token_s_median"] = sorted(times)[len(times) // 2]
    return res


def offload_bench(work: str, layers: int, steps: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import qtensors as qt
    from qtensors.torch import init_empty_weights
    from qtensors.torch.offload import offload

    q_dir = os.path.join(work, "q4")
    cfg = llama_config(layers)
    res: dict = {}
    torch.set_default_dtype(torch.float16)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg).eval()
        alt = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    # A variant first (more reader threads, deeper prefetch), then the default settings.
    offload(alt, q_dir, device="cuda", prefetch=4, threads=8)
    res["qtensors_prefetch4_threads8"] = decode_steps(alt, steps, files_of(q_dir, ".qtensors"))
    res["qtensors_prefetch4_threads8"]["stats"] = alt.qtensors_offload.stats()
    alt.qtensors_offload.remove()
    del alt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    offload(model, q_dir, device="cuda", prefetch=ARGS.prefetch)
    res["qtensors"] = decode_steps(model, steps, files_of(q_dir, ".qtensors"))
    res["qtensors"]["stats"] = model.qtensors_offload.stats()
    res["qtensors"]["max_gpu_mem_GB"] = torch.cuda.max_memory_allocated() / GB
    log(res)

    # Equality with the same weights loaded fully (decoded by the same GPU op, via stream).
    torch.manual_seed(1)
    ids = torch.randint(0, 32000, (1, 8), device="cuda")
    with torch.no_grad():
        a = model(ids).logits.float()
    model.qtensors_offload.remove()
    del model
    torch.cuda.empty_cache()
    torch.set_default_dtype(torch.float16)
    with init_empty_weights():
        ref = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    sd = dict(qt.stream(q_dir, device="cuda"))
    ref.load_state_dict(sd, strict=False, assign=True)
    ref.to("cuda")
    with torch.no_grad():
        b = ref(ids).logits.float()
    res["equal_to_fully_loaded"] = bool(torch.equal(a, b))
    res["max_abs_diff"] = float((a - b).abs().max())
    # The GPU decode against the CPU (Rust) decode of two tensors.
    with qt.safe_open(
        os.path.join(q_dir, os.path.basename(files_of(q_dir, ".qtensors")[0])), "pt"
    ) as f:
        for n in list(f.keys())[:2]:
            res[f"gpu_vs_cpu_decode_{n}"] = (
                float((sd[n].float().cpu() - f.get_tensor(n).float()).abs().max())
                if n in sd
                else None
            )
    del ref, sd
    torch.cuda.empty_cache()
    save(ARGS.out)
    return res


def minilm_bench(repo: str) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    import qtensors as qt
    from qtensors.torch import init_empty_weights
    from qtensors.torch.offload import offload

    folder = os.path.join(repo, "benches", "_data", "minilm")
    path = os.path.join(folder, "model.qtensors")
    cfg = BertConfig.from_json_file(os.path.join(folder, "config.json"))
    with init_empty_weights():
        ref = BertModel(cfg).eval()
    ref.load_state_dict(dict(qt.stream(path, device="cuda")), strict=False, assign=True)
    ref.to("cuda")
    with init_empty_weights():
        off = BertModel(cfg).eval()
    offload(off, path, device="cuda", prefetch=3, verify=True)
    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 64), device="cuda")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = [off(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(3)]
    torch.cuda.synchronize()
    return {
        "equal": all(bool(torch.equal(g, want)) for g in got),
        "max_abs_diff": max(float((g - want).abs().max()) for g in got),
        "stats": off.qtensors_offload.stats(),
    }


def accelerate_bench(work: str, steps: int) -> dict:
    import torch
    from accelerate import disk_offload
    from transformers import LlamaForCausalLM

    st_dir = os.path.join(work, "fp16")
    off_dir = os.path.join(work, "accel_offload")
    shutil.rmtree(off_dir, ignore_errors=True)
    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(st_dir, dtype=torch.float16).eval()
    disk_offload(model, off_dir, execution_device=torch.device("cuda"))
    setup = time.perf_counter() - t
    files = [os.path.join(r, f) for r, _, fs in os.walk(off_dir) for f in fs]
    res = decode_steps(model, steps, files)
    res["setup_s"] = setup
    res["offload_dir_bytes"] = sum(os.path.getsize(f) for f in files)
    del model
    shutil.rmtree(off_dir, ignore_errors=True)
    return res


def summary() -> str:
    p = RESULTS["phases"]
    lines = ["| measurement | value |", "| --- | --- |"]
    raw = p.get("raw") or {}
    for k in (
        "dd_direct_fp16",
        "dd_buffered_fp16_cold",
        "dd_direct_q4",
        "dd_direct_q4_parallel",
        "dd_buffered_q4_cold",
    ):
        if k in raw:
            lines.append(f"| disk {k} | {raw[k]['GB_s']:.2f} GB/s |")
    sp = p.get("stream") or {}
    for k in ("dd_direct_q4_before", "dd_direct_q4_after", "dd_buffered_q4_after"):
        if k in sp:
            lines.append(f"| disk {k} | {sp[k]['GB_s']:.2f} GB/s |")
    if "decoded_cold_median_GB_s" in sp:
        med = ", ".join(f"{m} {v:.2f}" for m, v in sp["decoded_cold_median_GB_s"].items())
        lines.append(f"| stream decoded cold, median of 3 (stored GB/s) | {med} |")
    for r in sp.get("runs", []):
        what = "packed" if r["quantized"] else "decoded"
        chunk = r.get("chunk_size", 8 * MiB) // MiB
        lines.append(
            f"| stream {r['mode']} threads={r.get('threads', 4)} chunk={chunk}M {what}"
            f" ({r['cache']}) | {r['stored_GB_s']:.2f} GB/s stored,"
            f" {r['fp16_equiv_GB_s']:.2f} GB/s fp16-equiv, {r['s']:.2f} s |"
        )
    s = p.get("safetensors")
    if s:
        lines.append(
            f"| safetensors fp16 -> cuda ({s['cache']}) | {s['GB_s']:.2f} GB/s, {s['s']:.2f} s |"
        )
    o = p.get("offload")
    q = (o or {}).get("qtensors")
    if q:
        lines.append(
            f"| qtensors offload: prefill cold / token median | {q['prefill_cold_s']:.2f} s /"
            f" {q['token_s_median']:.3f} s |"
        )
        v = o.get("qtensors_prefetch4_threads8")
        if v:
            lines.append(
                f"| qtensors offload prefetch=4 threads=8: prefill cold / token median |"
                f" {v['prefill_cold_s']:.2f} s / {v['token_s_median']:.3f} s |"
            )
        eq, diff = o.get("equal_to_fully_loaded"), o.get("max_abs_diff")
        lines.append(f"| offload == fully loaded | {eq} (max diff {diff}) |")
    mini = p.get("minilm")
    if mini:
        lines.append(f"| MiniLM offload (cuda) == fully loaded | {mini['equal']} |")
    a = p.get("accelerate")
    if a:
        lines.append(
            f"| accelerate disk_offload: prefill cold / token median |"
            f" {a['prefill_cold_s']:.2f} s / {a['token_s_median']:.3f} s |"
        )
        if q:
            lines.append(
                f"| speed-up per token | {a['token_s_median'] / q['token_s_median']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/root/qtbench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated phases to skip")
    ARGS = ap.parse_args()
    os.makedirs(ARGS.work, exist_ok=True)
    os.makedirs(ARGS.out, exist_ok=True)
    RESULTS["command"] = " ".join(sys.argv)
    skip = set(ARGS.skip.split(","))
    out = ARGS.out
    phase("env", out)(env_info)()
    if "check" not in skip:
        phase("check", out)(check_cuda_stream)(ARGS.work)
    phase("model", out)(make_model)(ARGS.work, ARGS.layers)
    if "raw" not in skip:
        phase("raw", out)(raw_disk)(ARGS.work)
    if "stream" not in skip:
        phase("stream", out)(stream_bench)(ARGS.work)
    if "safetensors" not in skip:
        phase("safetensors", out)(safetensors_bench)(ARGS.work)
    if "offload" not in skip:
        phase("offload", out)(offload_bench)(ARGS.work, ARGS.layers, ARGS.steps)
    if "minilm" not in skip:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        phase("minilm", out)(minilm_bench)(repo)
    if "accelerate" not in skip:
        phase("accelerate", out)(accelerate_bench)(ARGS.work, ARGS.steps)
    RESULTS["total_s"] = time.perf_counter() - T0
    save(out)
    table = summary()
    with open(os.path.join(out, "stream_results.md"), "w") as fh:
        fh.write(f"command: `{RESULTS['command']}`\n\n{table}\n")
    print(table, flush=True)


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
