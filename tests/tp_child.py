"""One rank of ``test_tensor_parallel.py``: started with the environment torchrun sets (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), it loads a converted model folder with ``tp_plan="auto"``
on the CPU (gloo), runs one forward, and saves its logits and what it read. For the first folder it
also compiles (``fullgraph=True``: a graph break raises) a row-wise layer and the gathered head,
hooks and collectives included, and saves their outputs next to the eager ones.

    python tests/tp_child.py FOLDER OUT.pt [FOLDER OUT.pt ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import qtensors.torch as qtt


def compiled_vs_eager(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (eager output, compiled output) for a row-wise linear (all-reduce), the LM head
    (all-gather) and the vocabulary-split embedding (masks, all-reduce)."""
    torch._dynamo.reset()
    got = {}
    g = torch.Generator().manual_seed(1)
    for path in ("model.layers.0.mlp.down_proj", "lm_head", "model.embed_tokens"):
        layer = model.get_submodule(path)
        if path == "model.embed_tokens":
            x = torch.randint(0, model.config.vocab_size, (2, 3), generator=g)
        else:
            x = torch.randn(2, 3, layer.in_features, generator=g)
        compiled = torch.compile(lambda t, m=layer: m(t), fullgraph=True, backend="aot_eager")
        with torch.inference_mode():
            got[path] = (layer(x), compiled(x))
    return got


def run(folder: str, out: str, compile_too: bool) -> None:
    model = qtt.from_pretrained(folder, device="cpu", tp_plan="auto")
    vocab = model.config.vocab_size
    ids = (torch.arange(12).reshape(2, 6) * 37 + 5) % vocab
    with torch.inference_mode():
        logits = model(ids).logits
    r = model.qtensors_load_result
    shapes = {
        n: list(m.weight.shape) for n, m in model.named_modules() if hasattr(m, "weight") and n
    }
    saved = {"logits": logits, "bytes_read": r.bytes_read, "shapes": shapes}
    if compile_too:
        saved["compiled"] = compiled_vs_eager(model)
    torch.save(saved, out)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    args = sys.argv[1:]
    for i in range(0, len(args), 2):  # one process group for every model: one start-up
        run(args[i], args[i + 1], compile_too=i == 0)
    dist.destroy_process_group()
