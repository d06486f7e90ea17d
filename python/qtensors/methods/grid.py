"""The scalar quantizer of each grouped encoding, in torch, exactly as the format decodes it.

A method chooses per-group parameters (``scale`` and, for affine, ``min``) and codes; this
module holds the arithmetic both share with every reader (spec 4.5-4.7): parameters are rounded
to the scale dtype (``st``) before any code is computed from them, because the stored value is
the one that decodes. Parameters are fp32 tensors holding values exact in the scale dtype.

Methods work on 2-D matrices with groups along the last axis (``[rows, n]``, groups of ``g``
consecutive columns, the last one ragged); a weight grouped along axis 0 is handled as its
transpose (``rows_view``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encodings import NF4, Affine, Encoding, Symmetric
from ..torch._layout import NF4_LEVELS

_TORCH_SCALE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Grid:
    """The levels of one encoding and how a group's parameters map values onto them."""

    kind: str  # "affine", "symmetric" or "nf4"
    bits: int
    group_size: int
    axis: int
    scale_dtype: str
    full: bool = False  # symmetric with all 2^bits levels (levels="full", llama.cpp's Q4_0)

    @classmethod
    def of(cls, encoding: Encoding, method: str = "a quantization method") -> Grid:
        if not isinstance(encoding, (Affine, Symmetric, NF4)):
            raise ValueError(
                f"{method} chooses the codes of affine, symmetric and NF4 groups, not "
                f"{getattr(encoding, 'name', encoding)!r}; MXFP4 and NVFP4 take method='rtn'"
            )
        full = isinstance(encoding, Symmetric) and encoding.levels == "full"
        return cls(
            encoding.name,
            encoding.bits,
            encoding.group_size,
            encoding.axis,
            encoding.scale_dtype,
            full,
        )

    # -- parameters ------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        """Largest code (affine) or largest |code - zero| (symmetric)."""
        return 2**self.bits - 1 if self.kind == "affine" else 2 ** (self.bits - 1) - 1

    def st(self, v: torch.Tensor) -> torch.Tensor:
        """Round fp32 values to the scale dtype and back (spec 4.3); overflow is an error."""
        out = v.float().to(_TORCH_SCALE[self.scale_dtype]).float()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"a scale or min does not fit in {self.scale_dtype}")
        return out + 0.0  # -0.0 -> +0.0, as the spec stores zeros

    def params_from_range(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored ``(scale, min)`` of groups spanning ``[lo, hi]`` (min None unless affine)."""
        lo, hi = lo.float(), hi.float()
        if self.kind == "affine":
            return self.st((hi - lo) / self.qmax), self.st(lo)
        if self.full:  # the value of largest magnitude (the positive one on a tie) -> -2^(b-1)
            peak = torch.where(hi >= -lo, hi, lo)
            return self.st(peak / -(2 ** (self.bits - 1))), None
        absmax = torch.maximum(lo.abs(), hi.abs())
        if self.kind == "symmetric":
            return self.st(absmax / self.qmax), None
        return self.st(absmax), None

    def params(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest parameters of groups laid out along the last dimension."""
        return self.params_from_range(groups.amin(-1), groups.amax(-1))

    def search_params(
        self,
        groups: torch.Tensor,
        weight: torch.Tensor | None = None,
        steps: int = 20,
        min_ratio: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parameters of groups (last dimension) with the range shrunk by the ratio in
        ``1, ..., min_ratio`` (``steps`` points) that minimises ``sum weight * (x - q)^2``
        per group (``weight`` broadcasts to ``groups``; GPTQ passes diag(H)). Ratio 1 is
        round-to-nearest, so the error is never above RTN's."""
        x = groups.float()
        w = torch.ones_like(x) if weight is None else weight.float().expand_as(x)
        lo, hi = x.amin(-1), x.amax(-1)
        best_s, best_m = self.params_from_range(lo, hi)
        best = None
        for i in range(steps):
            r = 1 - (1 - min_ratio) * i / max(steps - 1, 1)
            s, m = self.params_from_range(lo * r, hi * r)
            q = self.fake(x, s[..., None], None if m is None else m[..., None])
            err = (w * (x - q).pow(2)).sum(-1)
            if best is None:
                best = err
                continue
            better = err < best
            best = torch.where(better, err, best)
            best_s = torch.where(better, s, best_s)
            if m is not None:
                best_m = torch.where(better, m, best_m)
        return best_s, best_m

    # -- codes -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Nearest codes (int32) of ``x`` under parameters broadcast to it."""
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        if self.kind == "affine":
            t = (x.float() - m) * inv
            return torch.round(t).clamp_(0, self.qmax).to(torch.int32)
        t = x.float() * inv
        if self.kind == "symmetric":
            zero = 2 ** (self.bits - 1)
            low = -zero if self.full else -self.qmax
            return (torch.round(t).clamp_(low, self.qmax) + zero).to(torch.int32)
        mids = _nf4_mids(t.device)
        return torch.bucketize(t, mids, right=False).to(torch.int32)

    def decode(self, c: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """fp32 values of codes, as a reader computes them."""
        if self.kind == "affine":
            return c.float() * s + m
        if self.kind == "symmetric":
            return (c - 2 ** (self.bits - 1)).float() * s
        return _nf4_levels(c.device)[c.long()] * s

    def fake(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """``x`` quantized and decoded."""
        return self.decode(self.encode(x, s, m), s, m)


def _nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _nf4_mids(device: torch.device) -> torch.Tensor:
    lv = _nf4_levels(device)
    return (lv[:-1] + lv[1:]) / 2  # in fp32, as spec 4.7 computes them


# -- groups of a [rows, n] matrix --------------------------------------------------------------
def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[rows, G, g]`` view of ``[rows, n]``; a ragged last group is padded by repeating its
    last column, which leaves its min, max and absmax unchanged."""
    rows, n = w.shape
    pad = -n % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, g)


def group_mask(n: int, g: int, device: torch.device | None = None) -> torch.Tensor:
    """``[1, G, g]`` float mask: 1 on real columns, 0 on a ragged group's padding."""
    total = -(-n // g) * g
    return (torch.arange(total, device=device) < n).float().reshape(1, -1, g)


def expand(p: torch.Tensor | None, g: int, n: int) -> torch.Tensor | None:
    """Per-group parameters ``[rows, G]`` repeated onto the ``n`` columns."""
    if p is None:
        return None
    return p.repeat_interleave(g, dim=1)[:, :n]


def rows_view(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weight as ``[rows, n]`` with groups along the last axis (transposed if grouped along
    axis 0); ``from_rows`` undoes it."""
    if w.dim() != 2:
        raise ValueError(f"quantization methods take 2-D weights, not {list(w.shape)}")
    return w.t() if grid.axis % 2 == 0 else w


def from_rows(t: torch.Tensor, grid: Grid) -> torch.Tensor:
    return t.t() if grid.axis % 2 == 0 else t
