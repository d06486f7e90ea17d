"""Shapes of the parts of a quantized tensor (spec 4.1), the NF4 levels (spec 4.7) and the
FP4 E2M1 values (spec 4.8)."""

from __future__ import annotations

from collections.abc import Sequence

#: bitsandbytes' NF4 levels as the fp32 values of spec 4.7.
NF4_LEVELS: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: FP4 E2M1 values by 4-bit code (bit 3 the sign; code 8 is -0), spec 4.8
E2M1_LEVELS: tuple[float, ...] = (
    *(0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    *(-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0),
)

#: the bit widths each quantized encoding allows
BITS_RANGE = {
    "affine": (1, 8),
    "symmetric": (2, 8),
    "nf4": (4, 4),
    "mxfp4": (4, 4),
    "nvfp4": (4, 4),
}
#: encodings whose codes index a table of 16 levels, times a per-group fp32 scale
CODEBOOKS = ("nf4", "mxfp4", "nvfp4")


def normalize_axis(axis: int, rank: int) -> int:
    r = max(rank, 1)
    if not -r <= axis < r:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % r


def group_layout(shape: Sequence[int], axis: int, group_size: int) -> tuple[int, int, int, int]:
    """``(P, L, Q, G)``: the elements before, along and after the group axis, and the number of
    groups along it (a rank-0 tensor counts as shape ``[1]``)."""
    s = [int(d) for d in shape] or [1]
    a = normalize_axis(axis, len(shape))
    P = 1
    for d in s[:a]:
        P *= d
    Q = 1
    for d in s[a + 1 :]:
        Q *= d
    L = s[a]
    return P, L, Q, -(-L // group_size)


def scale_shape(shape: Sequence[int], axis: int, group_size: int) -> tuple[int, ...]:
    """Shape of the ``scales`` / ``mins`` parts: the tensor's with the axis cut to G groups."""
    s = [int(d) for d in shape] or [1]
    a = normalize_axis(axis, len(shape))
    s[a] = -(-s[a] // group_size)
    return tuple(s)


def codes_nbytes(shape: Sequence[int], bits: int) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return (n * bits + 7) // 8


def row_parts(
    shape: Sequence[int], bits: int, group_size: int, axis: int, start: int, rows: int
) -> tuple[int, int, int, int] | None:
    """Where rows ``[start, start + rows)`` of a 2-D weight of ``shape`` lie in its parts:
    ``(c0, cn, s0, sn)``, the bytes ``[c0, c0 + cn)`` of its codes and the rows ``[s0, s0 + sn)``
    (dim 0) of its scales and mins; None when those rows cannot be cut out as a weight of their
    own: they do not start on a byte of the codes or, groups along the rows (axis 0), on a
    group. (An end inside a group is fine: the cut's last group is ragged.)"""
    n_in = int(shape[1])
    a = normalize_axis(axis, 2)
    if start * n_in * bits % 8 or (a == 0 and start % group_size):
        return None
    c0, cn = start * n_in * bits // 8, (rows * n_in * bits + 7) // 8
    if a == 0:
        return c0, cn, start // group_size, -(-rows // group_size)
    return c0, cn, start, rows
