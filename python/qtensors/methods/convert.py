"""``qtensors convert --method``: a transformers model folder quantized with a method.

The model is built from its config without weights; the parts outside the blocks are read from
the safetensors shards at once, each block (fp32) only when the runner reaches it
(``lazy.ShardWeights``), so a calibrated method holds one float block, the calibration
activations and the quantized blocks done so far, never the float model. The calibrated methods
run each block on ``device``. Written as a model folder: ``model.qtensors`` (the linears of the
blocks quantized, everything else raw in the source's dtype), config, generation config,
tokenizer and the folder's other small files. RTN and HQQ need no activations: each block is
read, quantized and its float weights let go in turn.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .._progress import want_progress
from ..encodings import Encoding, Raw
from . import runner
from .calibration import CalibrationError, read_texts
from .lazy import ShardWeights, trim_heap

#: Files of a model folder that are weights (rewritten) rather than copied.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".gguf",
    ".h5",
    ".msgpack",
    ".ckpt",
    ".onnx",
    ".pt",
    ".pth",
)


def convert_with_method(
    src: str,
    dst: str,
    encoding: Encoding,
    method: str,
    *,
    calibration: Sequence[str] | str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    device: str | None = None,
    keep: Sequence[str] = (),
    force: bool = False,
    progress: bool | None = None,
    quantize_head: bool = False,
) -> dict[str, Any]:
    """Quantize the model folder ``src`` with ``method`` into the model folder ``dst``;
    ``lm_head`` too with ``quantize_head`` (a head tied to the embeddings stays raw)."""
    import torch
    import transformers

    import qtensors.torch as qtt

    from . import get_method

    m = get_method(method)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ValueError(
            f"--method {method} needs a transformers model folder: {src} has no config.json"
        )
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists (use --force to replace it)")
    texts = None
    if m.needs_calibration:
        if not calibration:
            raise CalibrationError(f"--method {method} needs --calibration FILE or DIR of text")
        texts = read_texts(calibration)
    t0 = time.perf_counter()
    config = transformers.AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    auto = (
        transformers.AutoModelForCausalLM
        if any("CausalLM" in a for a in archs)
        else transformers.AutoModel
    )
    # built without weights; the parts outside the blocks are read now, each block when the
    # runner reaches it (lazy.py): one float block in memory at a time
    shards = ShardWeights(src)
    with qtt.init_empty_weights():
        model = auto.from_config(config, dtype=torch.float32).eval()
    _prefix, blocks = runner.find_blocks(model)
    shards.materialize(model, "", torch.float32, exclude=blocks)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    skip = tuple(keep) if quantize_head and not tied else ("lm_head", *keep)

    trim_heap()  # the construction's transient buffers

    def load_block(i: int, block: torch.nn.Module) -> None:
        trim_heap()  # the previous float block, freed when its linears were swapped
        shards.materialize(block, f"{_prefix}.{i}.", torch.float32)

    if not m.needs_calibration:  # nothing to run: each block is read, quantized, let go
        runner.quantize_weights_only(
            blocks, _prefix, encoding, m, load_block, skip, want_progress(progress)
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(src) if texts is not None else None
    qtt.quantize_model(
        model,
        encoding,
        method=m,
        calibration=texts,
        tokenizer=tokenizer,
        samples=samples,
        seq_len=seq_len,
        device=device,
        skip=skip,
        progress=progress,
        load_block=load_block if m.needs_calibration else None,
    )
    # transformers 5 names it ``dtype`` (reading ``torch_dtype`` warns); older configs the other
    source_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(source_dtype, torch.dtype):
        model.to(source_dtype)  # raw tensors back to the source's dtype (decode dtype too)

    parent = os.path.dirname(os.path.abspath(dst)) or "."
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=parent)
    try:
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, os.path.join(tmp, name))
        path = qtt.save_model(model, tmp, quant=Raw(), tokenizer=tokenizer)
        if os.path.exists(dst):
            shutil.rmtree(dst) if os.path.isdir(dst) else os.remove(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = dict(model.qtensors_quantization)
    return {
        "dst": dst,
        "file": os.path.join(dst, os.path.basename(path)),
        "seconds": time.perf_counter() - t0,
        **record,
    }
