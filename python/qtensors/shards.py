"""Tensor-parallel shards of stored tensors: the block of one dimension that a rank keeps, as
the bytes of each part it reads (still quantized, nothing decoded), so that a rank reads about
1/world_size of every sharded weight.

Codes are one row-major bit stream (spec 4.2) and scales / mins have the tensor's shape with the
group axis counted in groups (spec 4.1). Seen as ``[P, L, Q]`` around the split dimension (``L``
its size), a shard ``[a, b)`` of that dimension is, in each part, ``P`` runs of ``(b - a)·Q``
elements ``L·Q`` apart: one contiguous range when ``P = 1`` (the rows of a weight: a column-wise
linear's output features), one strided read otherwise (the columns: a row-wise linear's input
features). Along the group axis a shard must start on a group boundary and end on one (or at
the end of the axis): a shard that cuts a group is refused (``ShardError``), never rounded, since
the neighbouring layer's shard would no longer match it.

The split is ``numpy.array_split``'s: the first ``size % world`` ranks get one more element.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from ._arrays import itemsize
from .errors import QtensorsError
from .stream import Entry

#: Alignment of each part in a shard's buffer (typed views of it need their dtype's alignment).
PART_ALIGN = 64


class ShardError(QtensorsError, ValueError):
    """A tensor cannot be split as asked: the shard boundary cuts a quantization group, or falls
    inside a byte of packed codes. The message names the tensor, the group size and the world
    size."""


def bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s share of ``size`` elements over ``world`` ranks."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class Block:
    """``rows`` runs of ``row_len`` bytes, ``stride`` apart from ``src`` in the tensor's read
    buffer, stored one after another from ``dst`` in the shard's buffer."""

    dst: int
    src: int
    row_len: int
    stride: int
    rows: int


def _code_bits(enc: dict[str, Any]) -> int:
    return int(enc["bits"]) if "bits" in enc else 4  # nf4, mxfp4, nvfp4: 4-bit codes


def _part_grid(info: dict[str, Any], part: str) -> tuple[list[int], int, int | None]:
    """(shape of the part's element grid, bits per element, group size along the grid's group
    axis or None) for a part of tensor ``info``; an empty shape for a per-tensor part."""
    enc = info["encoding"]
    shape = [int(d) for d in info["shape"]]
    if part == "data":
        return shape, 8 * itemsize(info["dtype"]), None
    if part == "codes":
        return shape, _code_bits(enc), None
    if part in ("scales", "mins"):
        g = int(enc["group_size"])
        grid = list(shape)
        grid[enc["axis"]] = -(-grid[enc["axis"]] // g)
        return grid, 8 * itemsize(enc["scale_dtype"]), g
    return [], 0, None  # tensor_scale: one value for the whole tensor


def plan_blocks(
    info: dict[str, Any],
    places: list[tuple[str, int, int]],
    dim: int,
    rank: int,
    world: int,
) -> tuple[list[int], list[tuple[str, int, int]], list[Block], int]:
    """Rank ``rank``'s shard of dimension ``dim`` of the stored tensor ``info`` whose parts lie
    at ``places`` ((name, offset, length) in its read buffer). Returns the shard's shape, its
    parts (name, offset, length) in the shard's buffer, the blocks to read, and the buffer's
    size."""
    name = info["name"]
    shape = [int(d) for d in info["shape"]]
    if not 0 <= dim < len(shape):
        raise ShardError(f"tensor {name!r} of shape {shape} has no dimension {dim} to split")
    size = shape[dim]
    a, b = bounds(size, rank, world)
    enc = info["encoding"]
    if enc["name"] != "raw" and dim == enc["axis"]:
        g = int(enc["group_size"])
        if a % g or (b % g and b != size):
            raise ShardError(
                f"tensor {name!r}: splitting dimension {dim} (size {size}, the group axis) over "
                f"world size {world} gives rank {rank} elements [{a}, {b}), which cut a "
                f"quantization group of {g}; a shard along the group axis must start and end "
                f"on group boundaries: use a group size that divides each rank's share, or "
                f"another world size"
            )
    out_shape = list(shape)
    out_shape[dim] = b - a
    parts: list[tuple[str, int, int]] = []
    blocks: list[Block] = []
    pos = 0
    for part, src, length in places:
        grid, bits, g = _part_grid(info, part)
        pos = -(-pos // PART_ALIGN) * PART_ALIGN
        if not grid:
            parts.append((part, pos, length))
            blocks.append(Block(pos, src, length, length, 1))
            pos += length
            continue
        lo, hi = a, b
        if g is not None and dim == enc["axis"]:
            lo, hi = a // g, -(-b // g)
        p = math.prod(grid[:dim])
        n, q = grid[dim], math.prod(grid[dim + 1 :])
        run, stride, first = (hi - lo) * q * bits, n * q * bits, lo * q * bits
        whole_rows = p == 1 and hi == n  # the run ends where the part does
        if first % 8 or (not whole_rows and (run % 8 or (p > 1 and stride % 8))):
            raise ShardError(
                f"tensor {name!r} part {part!r}: rank {rank}'s shard [{a}, {b}) of dimension "
                f"{dim} over world size {world} starts or ends inside a byte of its {bits}-bit "
                f"elements; a shard must cover whole bytes of each part"
            )
        start = first // 8
        row_len = length - start if whole_rows else run // 8
        rows = p if row_len else 0
        nbytes = rows * row_len
        parts.append((part, pos, nbytes))
        if nbytes:
            step = stride // 8 if p > 1 else row_len
            blocks.append(Block(pos, src + start, row_len, step, rows))
        pos += nbytes
    return out_shape, parts, blocks, pos


@dataclass
class ShardEntry(Entry):
    """A rank's shard of a stored tensor, read like a whole tensor's ``Entry`` by the same
    loader: ``info`` has the shard's shape, ``parts`` lie in the shard's buffer, and each piece
    of it comes from ``blocks`` through the Rust ``StreamReader`` (``read`` for a contiguous
    piece, ``read_strided`` for whole rows of a strided block)."""

    blocks: list[Block] = field(default_factory=list)
    #: the whole tensor's shape, and the (dimension, start, stop) of it this shard holds
    full_shape: list[int] = field(default_factory=list)
    region: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, e: Entry, dim: int, rank: int, world: int) -> ShardEntry:
        shape, parts, blocks, nbytes = plan_blocks(e.info, e.parts, dim, rank, world)
        info = {k: v for k, v in e.info.items() if k != "parts"} | {"shape": shape}
        a, b = bounds(int(e.info["shape"][dim]), rank, world)
        full = list(e.info["shape"])
        return cls(
            e.reader, e.index, e.name, info, e.start, nbytes, parts, blocks, full, (dim, a, b)
        )

    def pieces(self, chunk: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for blk in self.blocks:
            if blk.rows == 1 or blk.row_len > chunk:  # within one row, in chunks
                for r in range(blk.rows):
                    at = blk.dst + r * blk.row_len
                    out += [
                        (at + k, min(chunk, blk.row_len - k)) for k in range(0, blk.row_len, chunk)
                    ]
            else:  # whole rows, as many as fit in a chunk
                per = chunk // blk.row_len
                for r in range(0, blk.rows, per):
                    out.append((blk.dst + r * blk.row_len, min(per, blk.rows - r) * blk.row_len))
        return out or [(0, 0)]

    def read_into(self, pos: int, out: Any, verify: bool = False) -> None:
        if verify:
            # Checksums cover whole parts; a shard reads pieces of them.
            raise ValueError(f"tensor {self.name!r}: a shard's reads cannot verify checksums")
        n = len(out)
        if n == 0:
            return
        blk = self.blocks[bisect.bisect_right([b.dst for b in self.blocks], pos) - 1]
        row, col = divmod(pos - blk.dst, blk.row_len)
        src = blk.src + row * blk.stride
        if col == 0 and n % blk.row_len == 0 and n > blk.row_len:
            self.reader.read_strided(self.index, src, blk.stride, blk.row_len, out)
        else:
            self.reader.read(self.index, src + col, out, False)
