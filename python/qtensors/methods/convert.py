"""``qtensors convert --method``: a transformers model folder quantized with a method.

What it does today: the model is loaded whole (fp32) with transformers, quantized block by
block (``quantize_model``; the calibrated methods run one block at a time on ``device``), and
written as a model folder: ``model.qtensors`` (the linears of the blocks quantized, everything
else raw in the source's dtype), config, generation config, tokenizer and the folder's other
small files. Not yet: streaming weights lazily from the safetensors shards block by block,
so peak memory is the fp32 model plus one block's activations, not one block.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from ..encodings import Encoding, Raw
from .calibration import CalibrationError, read_texts

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
) -> dict[str, Any]:
    """Quantize the model folder ``src`` with ``method`` into the model folder ``dst``."""
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
    model = auto.from_pretrained(src, dtype=torch.float32).eval()
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
        skip=("lm_head", *keep),
        progress=progress,
    )
    source_dtype = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
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
