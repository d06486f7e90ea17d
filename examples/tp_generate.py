"""Greedy generation with a converted qtensors model folder split over several GPUs (tensor
parallelism with the model's transformers plan); each rank reads only its shard of every weight.

    torchrun --nproc-per-node 2 examples/tp_generate.py MODEL_FOLDER --prompt "The capital of"
    torchrun --nproc-per-node 2 examples/tp_generate.py MODEL_FOLDER --cpu   # gloo, CPU ranks

A folder without a tokenizer gets a fixed prompt of token ids. Rank 0 prints the output and
what each rank loaded.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import qtensors.torch as qtt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--prompt", default="Tensor parallelism splits each layer")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cpu", action="store_true", help="CPU ranks, gloo backend")
    args = ap.parse_args()

    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank()

    model = qtt.from_pretrained(args.folder, device=device, dtype="auto", tp_plan="auto")
    result = model.qtensors_load_result
    loaded = torch.tensor([result.bytes_read, int(result.seconds * 1e3)], device=device)
    every = [torch.zeros_like(loaded) for _ in range(dist.get_world_size())]
    dist.all_gather(every, loaded)

    tokenizer = None
    if os.path.exists(os.path.join(args.folder, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.folder)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    else:
        ids = (torch.arange(8, device=device) * 37 + 5).reshape(1, -1) % model.config.vocab_size
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    if rank == 0:
        for r, (nbytes, ms) in enumerate(t.tolist() for t in every):
            print(f"rank {r}: read {nbytes / 2**20:.1f} MiB of weights in {ms / 1e3:.2f} s")
        new = out[0, ids.shape[1] :]
        print(tokenizer.decode(new) if tokenizer is not None else new.tolist())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
