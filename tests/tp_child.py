"""One rank of ``test_tensor_parallel.py``: started with the environment torchrun sets (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), it loads a converted model folder with ``tp_plan="auto"``
on the CPU (gloo), runs one forward, and saves its logits and what it read.

    python tests/tp_child.py FOLDER OUT.pt [FOLDER OUT.pt ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import qtensors.torch as qtt


def run(folder: str, out: str) -> None:
    model = qtt.from_pretrained(folder, device="cpu", tp_plan="auto")
    vocab = model.config.vocab_size
    ids = (torch.arange(12).reshape(2, 6) * 37 + 5) % vocab
    with torch.inference_mode():
        logits = model(ids).logits
    r = model.qtensors_load_result
    shapes = {
        n: list(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight") and n
    }
    torch.save({"logits": logits, "bytes_read": r.bytes_read, "shapes": shapes}, out)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    args = sys.argv[1:]
    for i in range(0, len(args), 2):  # one process group for every model: one start-up
        run(args[i], args[i + 1])
    dist.destroy_process_group()
