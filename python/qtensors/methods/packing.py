"""Codes and parameters a method computed, as the parts the format stores (spec 4.1-4.2)."""

from __future__ import annotations

import numpy as np
import torch

from ..quantized import QuantizedTensor
from ..torch.modules import QuantizedWeight
from .grid import _TORCH_SCALE, Grid


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-major codes as the little-endian bit stream of spec 4.2 (uint8, 1-D)."""
    flat = codes.reshape(-1).to(torch.uint8).cpu().numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    # bit i of code e is stream bit e*bits + i; stream bit j is bit j % 8 of byte j // 8
    stream = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def quantized_weight(
    grid: Grid,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> QuantizedWeight:
    """A QuantizedWeight of a 2-D weight from its codes ``[rows, n]`` and parameters
    ``[rows, G]``, all in the method's row orientation (``grid.rows_view``)."""
    transposed = grid.axis % 2 == 0
    if transposed:
        codes, scales = codes.t(), scales.t()
        mins = None if mins is None else mins.t()
    enc = {
        "name": grid.kind,
        "bits": grid.bits,
        "group_size": grid.group_size,
        "axis": 0 if transposed else 1,
        "scale_dtype": grid.scale_dtype,
    }
    if grid.full:
        enc["levels"] = "full"
    if grid.kind == "nvfp4":  # the third part is the fp32 tensor scale
        mins = torch.tensor(grid.g, dtype=torch.float32)
    return QuantizedWeight.from_parts(
        pack_codes(codes.contiguous(), grid.bits),
        stored_scales(grid, scales.contiguous()).cpu(),
        None if mins is None else mins.contiguous().to(_third_dtype(grid)).cpu(),
        tuple(codes.shape),
        enc,
        dtype,
    )


def stored_scales(grid: Grid, scales: torch.Tensor) -> torch.Tensor:
    """fp32 scale values as the scales part stores them: MXFP4's power of two ``2^k`` as its
    E8M0 byte ``k + 127``, the rest in their scale dtype (exact: the grid made them so)."""
    if grid.kind == "mxfp4":
        _, e = torch.frexp(scales)  # 2^k = 0.5 * 2^(k + 1)
        return (e + 126).to(torch.uint8)
    if grid.kind == "nvfp4":
        return scales.to(torch.float8_e4m3fn)
    return scales.to(_TORCH_SCALE[grid.scale_dtype])


def _third_dtype(grid: Grid) -> torch.dtype:
    return torch.float32 if grid.kind == "nvfp4" else _TORCH_SCALE[grid.scale_dtype]


def quantized_tensor(
    grid: Grid, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None
) -> QuantizedTensor:
    """The same parts as a CPU QuantizedTensor (framework "pt"), e.g. for ``save_file``."""
    return quantized_weight(grid, codes, scales, mins).to_quantized()
