"""The scalar quantizer of each grouped encoding, in torch, exactly as the format decodes it.

A method chooses per-group parameters (``scale`` and, for affine, ``min``) and codes; this
module holds the arithmetic both share with every reader (spec 4.5-4.7): parameters are rounded
to the scale dtype (``st``) before any code is computed from them, because the stored value is
the one that decodes. Parameters are fp32 tensors holding values exact in the scale dtype.

The FP4 block formats (spec 4.8, 4.9) are grids too: E2M1 levels, a block's ``scale`` the E8M0
power of two (MXFP4) or the E4M3 value (NVFP4; times the per-tensor fp32 scale, which ``fit``
computes once from the whole weight), no ``min``.

Methods work on 2-D matrices with groups along the last axis (``[rows, n]``, groups of ``g``
consecutive columns, the last one ragged); a weight grouped along axis 0 is handled as its
transpose (``rows_view``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ..encodings import MXFP4, NF4, NVFP4, Affine, Encoding, Symmetric
from ..errors import QuantizationError
from ..torch._layout import NF4_LEVELS

_TORCH_SCALE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FP4_KINDS = ("mxfp4", "nvfp4")
#: E2M1 magnitudes by code (spec 4.8); bit 3 of a code is the sign
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Scale steps (in the scale dtype's own lattice: powers of two, E4M3 bytes) that the FP4 range
#: search tries around round-to-nearest's block scale
FP4_SEARCH_STEPS = {"mxfp4": (-1, 1), "nvfp4": (-3, -2, -1, 1, 2)}


@dataclass(frozen=True)
class Grid:
    """The levels of one encoding and how a group's parameters map values onto them."""

    kind: str  # "affine", "symmetric", "nf4", "mxfp4" or "nvfp4"
    bits: int
    group_size: int
    axis: int
    scale_dtype: str
    full: bool = False  # symmetric with all 2^bits levels (levels="full", llama.cpp's Q4_0)
    tensor_scale: float | None = None  # nvfp4: the fp32 per-tensor scale g (``fit``)

    @classmethod
    def of(cls, encoding: Encoding, method: str = "a quantization method") -> Grid:
        if not isinstance(encoding, (Affine, Symmetric, NF4, MXFP4, NVFP4)):
            raise ValueError(
                f"{method} chooses the codes of affine, symmetric, NF4, MXFP4 and NVFP4 groups, "
                f"not {getattr(encoding, 'name', encoding)!r}"
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

    @property
    def fp4(self) -> bool:
        return self.kind in FP4_KINDS

    def fit(self, weight: torch.Tensor) -> Grid:
        """The grid for quantizing ``weight``: NVFP4 gets its per-tensor scale
        ``g = max(amax / 2688, 2^-126)`` from the whole weight (spec 4.9), computed once before
        any block is; the other grids have nothing per tensor. Non-finite FP4 input is refused
        here, as every writer refuses it (spec 4.3)."""
        if not self.fp4:
            return self
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise QuantizationError(f"{self.kind}: the weight holds NaN or Inf")
        if self.kind == "mxfp4":
            return self
        amax = w.abs().max() if w.numel() else torch.zeros(())
        g = torch.clamp_min(amax / 2688.0, 2.0**-126)  # fp32 division, as the spec rounds it
        return replace(self, tensor_scale=float(g))

    @property
    def g(self) -> float:
        """NVFP4's per-tensor scale (set by ``fit``)."""
        if self.tensor_scale is None:
            raise ValueError("an nvfp4 grid needs its tensor scale: Grid.fit(weight) first")
        return self.tensor_scale

    def block_scale(self, s: torch.Tensor) -> torch.Tensor:
        """The fp32 scale elements are divided by: ``s`` (MXFP4) or ``s * g`` rounded once
        (NVFP4)."""
        if self.kind == "nvfp4":
            return s * torch.tensor(self.g, dtype=torch.float32, device=s.device)
        return s

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

    def nearest_scale(self, s: torch.Tensor) -> torch.Tensor:
        """The storable scale nearest positive fp32 values ``s``: rounded to the scale dtype,
        or on the FP4 formats' own lattices (MXFP4: the power of two nearest in log scale;
        NVFP4: the E4M3 value, clamped to its range, as ``_fp4_scale`` clamps)."""
        if self.kind == "mxfp4":
            return _pow2(torch.round(torch.log2(s)).clamp(-127, 125))
        if self.kind == "nvfp4":
            return _e4m3(s.clamp(2.0**-9, 448.0))
        return self.st(s)

    def params_from_range(
        self, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored ``(scale, min)`` of groups spanning ``[lo, hi]`` (min None unless affine)."""
        lo, hi = lo.float(), hi.float()
        if self.fp4:
            return self._fp4_scale(torch.maximum(lo.abs(), hi.abs())), None
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
        """Parameters of groups (last dimension) that minimise ``sum weight * (x - q)^2`` per
        group (``weight`` broadcasts to ``groups``; GPTQ passes diag(H)) among candidates: the
        range shrunk by the ratio in ``1, ..., min_ratio`` (``steps`` points), or for the FP4
        grids the neighbours of round-to-nearest's block scale in the scale's own lattice
        (``FP4_SEARCH_STEPS``: upward steps too, since MXFP4's floor rule saturates blocks
        whose amax is above 6 X, and rounding NVFP4's scale down saturates a little; on
        SmolLM2 GPTQ the search took NVFP4 from 1.075x to 1.051x of fp32 perplexity,
        ``benches/bench_fp4_scale_search.py``). The first candidate is round-to-nearest's, so
        the error is never above RTN's."""
        x = groups.float()
        w = torch.ones_like(x) if weight is None else weight.float().expand_as(x)
        lo, hi = x.amin(-1), x.amax(-1)
        best_s, best_m = self.params_from_range(lo, hi)
        best = None
        for s, m in self._candidates(lo, hi, best_s, steps, min_ratio):
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

    def _candidates(
        self, lo: torch.Tensor, hi: torch.Tensor, s_rtn: torch.Tensor, steps: int, min_ratio: float
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.fp4:
            yield s_rtn, None
            for k in FP4_SEARCH_STEPS[self.kind]:
                yield self._fp4_step(s_rtn, k), None
            return
        for i in range(steps):
            r = 1 - (1 - min_ratio) * i / max(steps - 1, 1)
            yield self.params_from_range(lo * r, hi * r)

    # -- codes -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """Nearest codes (int32) of ``x`` under parameters broadcast to it."""
        if self.fp4:
            return _e2m1_codes(x.float(), x.float() / self.block_scale(s))
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
        if self.fp4:
            return _e2m1_values(c.device)[c.long()] * self.block_scale(s)
        if self.kind == "affine":
            return c.float() * s + m
        if self.kind == "symmetric":
            return (c - 2 ** (self.bits - 1)).float() * s
        return _nf4_levels(c.device)[c.long()] * s

    def fake(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        """``x`` quantized and decoded."""
        return self.decode(self.encode(x, s, m), s, m)

    # -- FP4 block scales (spec 4.8, 4.9) --------------------------------------------------------
    def _fp4_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest's block scale of blocks with this amax."""
        if self.kind == "mxfp4":
            # X = 2^(E(amax) - 127 - 2), biased exponent at least 0; frexp: amax = f * 2^e with
            # f in [0.5, 1), so E(amax) - 127 = e - 1 (zero and subnormal amax clamp to 2^-127)
            _, e = torch.frexp(amax)
            return _pow2(torch.where(amax == 0, -127, (e - 3).clamp(-127, 125)))
        r = amax / torch.tensor(6 * self.g, dtype=torch.float32, device=amax.device)
        s = _e4m3(r.clamp(2.0**-9, 448.0))
        return torch.where(r == 0, torch.ones_like(s), s)

    def _fp4_step(self, s: torch.Tensor, k: int) -> torch.Tensor:
        """Block scales ``k`` steps from ``s`` in the scale's lattice (clamped to its range;
        the E4M3 zero is skipped, it would drop the block)."""
        if self.kind == "mxfp4":
            _, e = torch.frexp(s)
            return _pow2((e - 1 + k).clamp(-127, 125))
        b = s.to(torch.float8_e4m3fn).view(torch.uint8).int()
        return (b + k).clamp(1, 126).to(torch.uint8).view(torch.float8_e4m3fn).float()


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k exactly in fp32 (2^-127 is subnormal)."""
    return torch.ldexp(torch.ones(k.shape, device=k.device), k.float())


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 values in [2^-9, 448] rounded to the nearest E4M3 value, ties to even
    (torch's float8_e4m3fn conversion; the caller clamps, since it does not saturate)."""
    return v.to(torch.float8_e4m3fn).float()


def _e2m1_values(device: torch.device) -> torch.Tensor:
    lv = torch.tensor(E2M1, dtype=torch.float32, device=device)
    return torch.cat([lv, -lv])


def _e2m1_codes(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of ``x`` scaled to ``t``: the nearest magnitude to ``|t|``, ties to the even
    code, saturating at 6 (the count of the spec's seven threshold tests), sign of ``x < 0``."""
    a = t.abs()
    mag = (a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
    mag += (a > 2.5).int() + (a >= 3.5).int() + (a > 5).int()
    return mag + 8 * (x < 0).int()


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
