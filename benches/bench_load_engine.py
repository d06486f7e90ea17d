"""load_model's I/O engine on a synthetic Llama-shaped model (int4-g64), page cache warm, or
with ``--cold`` read from the disk.

    python3 benches/bench_load_engine.py [--hidden 1024 --layers 8 --inter 2816 --device cpu]
    python3 benches/bench_load_engine.py --cold --hidden 2048 --layers 22 --inter 5632 \
        --device cuda      # the 1.1B model; root (drop_caches) or posix_fadvise on the file

Times `qtensors.torch.load_model(model, folder, device, keep_quantized=True)` into a model built
on the meta device (built before the timer starts), each reader the function offers
(`io=...`), against the obvious alternative: `qtensors.load_file` (memory-mapped, decoded on
the CPU) then `model.load_state_dict(..., assign=True)`. Best and median of --repeat runs after
one warm-up run (which also fills the page cache). Outputs are checked equal first. Writes JSON
and text to $OUT when it is set.

``--cold``: the page cache is dropped before every timed run (``_common.drop_caches``: all of it
where /proc/sys/vm/drop_caches is writable, else the file's pages), no warm-up run is timed, and
the disk's own rate is measured the same way: the file read cold from start to end in 16 MiB
reads, best of ``--repeat``. Each loader's rate is then also given as a share of that rate (the
issue's target: ``load_model`` at >= 80% of it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from _common import drop_caches

import qtensors as qt
import qtensors.torch as qtt


def build(args, meta: bool):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 512),
        vocab_size=args.vocab,
        tie_word_embeddings=False,
    )
    if meta:
        with qtt.init_empty_weights():
            return transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def timed(fn, repeat: int, cold_path: str | None = None, setup=lambda: None) -> dict:
    """Best and median seconds of ``fn(setup())`` over ``repeat`` runs after an untimed one (page
    cache, allocator, first-call costs), ``setup`` (building the empty model) untimed;
    ``cold_path``: that file's pages dropped before each run."""
    fn(setup())
    ts = []
    for _ in range(repeat):
        arg = setup()
        if cold_path:
            drop_caches([cold_path])
        t = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t)
    return {"best_s": min(ts), "median_s": statistics.median(ts), "runs": ts}


def read_file(path: str) -> None:
    """The whole file, 16 MiB at a time, as a plain sequential reader would."""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "model.qtensors")
        src = build(args, meta=False)
        qt.save_file(src.state_dict(), path, quant="int4-g64")
        stored = os.path.getsize(path)
        del src

        ios = ["builtin", "stream"]
        if "io" not in inspect.signature(qtt.load_model).parameters:
            ios = ["default"]

        def empty():  # the model load_model fills, built before the timer starts
            return build(args, meta=True)

        def load(io: str, model):
            kw = {} if io == "default" else {"io": io}
            qtt.load_model(model, path, device=dev, keep_quantized=True, **kw)
            sync()
            return model

        def plain(model):
            sd = qt.load_file(path, framework="pt")
            model.load_state_dict(sd, strict=False, assign=True)
            model.to(dev)
            sync()
            return model

        # correctness first: every reader gives the same model
        ids = torch.randint(0, args.vocab, (1, 8), device=dev)
        ref = None
        for io in ios:
            with torch.no_grad():
                out = load(io, empty())(ids).logits.float().cpu()
            if ref is None:
                ref = out
            assert torch.equal(out, ref), f"io={io} differs"

        results = {"stored_bytes": stored, "device": str(dev), "args": vars(args)}
        cold = path if args.cold else None
        if cold:
            results["cache_drop"] = drop_caches([path])
            results["disk: the file read cold, 16 MiB reads"] = timed(
                lambda _: read_file(path), args.repeat, cold
            )
        for io in ios:
            results[f"load_model[{io}]"] = timed(
                lambda m, io=io: load(io, m), args.repeat, cold, empty
            )
        results["load_file+load_state_dict (decoded)"] = timed(plain, args.repeat, cold, empty)

    lines = [
        "$ python3 " + " ".join(sys.argv),
        f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, inter {args.inter}, "
        f"vocab {args.vocab}; int4-g64 file {stored / 1e6:.1f} MB; device {dev}; "
        + (f"cold ({results['cache_drop']} before each run)" if args.cold else "page cache warm"),
    ]
    disk = results.get("disk: the file read cold, 16 MiB reads")
    for k, v in results.items():
        if isinstance(v, dict) and "best_s" in v:
            rate = stored / v["best_s"] / 1e9
            share = f", {disk['best_s'] / v['best_s']:.0%} of the disk's" if disk else ""
            lines.append(
                f"{k:40s} best {v['best_s'] * 1e3:8.1f} ms  median {v['median_s'] * 1e3:8.1f} ms"
                f"  ({rate:.2f} GB/s of stored bytes{share})"
            )
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "load_engine.json"), "w") as fh:
            json.dump(results, fh, indent=2)
        with open(os.path.join(out, "load_engine.txt"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
