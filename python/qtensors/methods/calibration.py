"""Calibration data: texts or token batches turned into ``samples`` windows of ``seq_len``
tokens, drawn reproducibly (seeded)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch


class CalibrationError(ValueError):
    """Calibration data missing, empty or unusable; the message names the argument to fix."""


def read_texts(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The texts of a file, of several files, or of every ``.txt`` file in a folder (sorted)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[str] = []
    for p in map(os.fspath, items):
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".txt"))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise CalibrationError(f"calibration: {p} does not exist")
    if not files:
        raise CalibrationError(f"calibration: no .txt file in {', '.join(map(str, items))}")
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    return texts


def _is_token_data(calibration: Any) -> bool:
    if isinstance(calibration, torch.Tensor):
        return True
    if isinstance(calibration, (list, tuple)) and calibration:
        first = calibration[0]
        return isinstance(first, torch.Tensor) or (
            isinstance(first, (list, tuple)) and all(isinstance(t, int) for t in first)
        )
    return False


def calibration_windows(
    calibration: Any,
    tokenizer: Any = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    method: str = "this method",
) -> torch.Tensor:
    """``[samples, L]`` token ids (int64), ``L = min(seq_len, tokens available)``.

    ``calibration``: a text, a list of texts (tokenized with ``tokenizer``, joined into one
    stream), or token ids (a 2-D tensor, or a list of 1-D tensors / lists of ints). Windows
    start at seeded random offsets of the stream.

    Texts for an encoder (a tokenizer with CLS and SEP tokens, as BERT's) give windows shaped
    like its inputs: ``[CLS]``, ``L - 2`` stream tokens, ``[SEP]``: an encoder always sees those
    two tokens, and windows cut from the bare stream never show them to the calibration
    (MiniLM int4-g64 GPTQ, ``benches/results/methods_minilm.txt``: 0.9861 cosine against 0.9858
    from bare windows; what matters more there is ``seq_len`` near the inputs' length).
    """
    if calibration is None:
        raise CalibrationError(
            f"{method} needs calibration data: pass calibration=texts or token batches "
            "(and tokenizer= for texts)"
        )
    ends = None  # token ids are taken as they are
    if _is_token_data(calibration):
        if isinstance(calibration, torch.Tensor):
            rows = [calibration] if calibration.dim() == 1 else list(calibration)
        else:
            rows = [torch.as_tensor(r) for r in calibration]
        stream = torch.cat([r.reshape(-1).long() for r in rows]) if rows else torch.zeros(0)
    else:
        texts = [calibration] if isinstance(calibration, str) else list(calibration)
        if not all(isinstance(t, str) for t in texts):
            raise CalibrationError("calibration: expected a text, a list of texts, or token ids")
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise CalibrationError("calibration: the calibration data holds no tokens (no text)")
        if tokenizer is None:
            raise CalibrationError(f"{method}: calibration texts need a tokenizer: pass tokenizer=")
        ids: list[int] = []
        for t in texts:
            ids += list(tokenizer(t, add_special_tokens=False)["input_ids"])
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is not None:
                ids.append(int(eos))
        stream = torch.tensor(ids, dtype=torch.long)
        ends = _encoder_ends(tokenizer)
    if stream.numel() == 0:
        raise CalibrationError("calibration: the calibration data holds no tokens")
    if samples < 1 or seq_len < 1:
        raise CalibrationError("calibration: samples and seq_len must be at least 1")
    if ends is not None and seq_len > 2:
        inner = _draw(stream, samples, seq_len - 2, seed)
        cls = torch.full((samples, 1), ends[0], dtype=torch.long)
        sep = torch.full((samples, 1), ends[1], dtype=torch.long)
        return torch.cat([cls, inner, sep], dim=1)
    return _draw(stream, samples, seq_len, seed)


def _draw(stream: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``min(seq_len, len(stream))`` tokens at seeded random offsets."""
    L = min(seq_len, stream.numel())
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - L + 1, (samples,), generator=gen)
    return torch.stack([stream[s : s + L] for s in starts.tolist()])


def _encoder_ends(tokenizer: Any) -> tuple[int, int] | None:
    """The (CLS, SEP) token ids of an encoder's tokenizer; None for a decoder's."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if isinstance(cls, int) and isinstance(sep, int):
        return cls, sep
    return None
