"""load_model's I/O engine on a synthetic Llama-shaped model (int4-g64), page cache warm.

    python3 benches/bench_load_engine.py [--hidden 1024 --layers 8 --inter 2816 --device cpu]

Times `qtensors.torch.load_model(model, folder, device, keep_quantized=True)` into a model built
on the meta device, each reader the function offers (`io=...`), against the obvious
alternative: `qtensors.load_file` (memory-mapped, decoded on the CPU) then
`model.load_state_dict(..., assign=True)`. Best and median of --repeat runs after one warm-up
run (which also fills the page cache). Outputs are checked equal first. Writes JSON and text to
$OUT when it is set.
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


def timed(fn, repeat: int) -> dict:
    fn()  # warm-up (page cache, allocator, first-call costs)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"best_s": min(ts), "median_s": statistics.median(ts), "runs": ts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
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

        def load(io: str):
            model = build(args, meta=True)
            kw = {} if io == "default" else {"io": io}
            qtt.load_model(model, path, device=dev, keep_quantized=True, **kw)
            sync()
            return model

        def plain():
            model = build(args, meta=True)
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
                out = load(io)(ids).logits.float().cpu()
            if ref is None:
                ref = out
            assert torch.equal(out, ref), f"io={io} differs"

        results = {"stored_bytes": stored, "device": str(dev), "args": vars(args)}
        for io in ios:
            results[f"load_model[{io}]"] = timed(lambda io=io: load(io), args.repeat)
        results["load_file+load_state_dict (decoded)"] = timed(plain, args.repeat)

    lines = [
        "$ python3 " + " ".join(sys.argv),
        f"model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, inter {args.inter}, "
        f"vocab {args.vocab}; int4-g64 file {stored / 1e6:.1f} MB; device {dev}; page cache warm",
    ]
    for k, v in results.items():
        if isinstance(v, dict) and "best_s" in v:
            rate = stored / v["best_s"] / 1e9
            lines.append(
                f"{k:40s} best {v['best_s'] * 1e3:8.1f} ms  median {v['median_s'] * 1e3:8.1f} ms"
                f"  ({rate:.2f} GB/s of stored bytes)"
            )
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "load_engine.json"), "w") as fh:
            json.dump(results, fh, indent=2)
        with open(os.path.join(out, "load_engine.txt"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
