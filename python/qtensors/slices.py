"""`safe_open(...).get_slice(name)`: numpy-style indexing of a stored tensor that decodes only the
box of elements the index touches (so only the code bytes and scales of the groups under it are
read from the file), as `safetensors`' `get_slice` does for raw tensors."""

from __future__ import annotations

from typing import Any

_Box = list[tuple[int, int]]


def _normalize_key(key: Any, rank: int) -> list[int | slice]:
    """`key` as one int or slice per dimension (Ellipsis expanded, missing dims filled)."""
    items = list(key) if isinstance(key, tuple) else [key]
    for k in items:
        if not (k is Ellipsis or isinstance(k, slice) or _is_int(k)):
            raise TypeError(
                f"get_slice indices must be ints, slices or ..., not {type(k).__name__}"
                " (index the returned tensor for anything fancier)"
            )
    if sum(k is Ellipsis for k in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = rank - (len(items) - 1)
        items[at : at + 1] = [slice(None)] * max(fill, 0)
    if len(items) > rank:
        raise IndexError(f"too many indices: the tensor has {rank} dimensions, {len(items)} given")
    return [int(k) if _is_int(k) else k for k in items] + [slice(None)] * (rank - len(items))


def _is_int(k: Any) -> bool:
    return hasattr(k, "__index__") and not isinstance(k, bool | slice)


def plan(key: Any, shape: tuple[int, ...]) -> tuple[_Box, list[int | slice]]:
    """The box to decode (one (start, stop) per dimension) and the index that turns the decoded
    box into the result (ints drop their dimension, steps pick every n-th element)."""
    box: _Box = []
    post: list[int | slice] = []
    for dim, (k, size) in enumerate(zip(_normalize_key(key, len(shape)), shape, strict=True)):
        if isinstance(k, int):
            i = k + size if k < 0 else k
            if not 0 <= i < size:
                raise IndexError(f"index {k} is out of bounds for dimension {dim} of size {size}")
            box.append((i, i + 1))
            post.append(0)
            continue
        picked = range(*k.indices(size))
        if len(picked) == 0:
            box.append((0, 0))
            post.append(slice(None))
            continue
        lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1]) + 1
        box.append((lo, hi))
        step = picked.step
        post.append(slice(None, None, step) if step > 0 else slice(hi - 1 - lo, None, step))
    return box, post


def apply_post(t: Any, post: list[int | slice], framework: str) -> Any:
    """Index the decoded box; a stepped result is copied so it does not pin the whole box."""
    if all(p == slice(None) for p in post):
        return t
    if framework == "pt":
        # torch slices take no negative steps: flip those dimensions first.
        flips = [d for d, p in enumerate(post) if isinstance(p, slice) and (p.step or 1) < 0]
        if flips:
            t = t.flip(flips)
            post = [slice(None, None, -p.step) if d in flips else p for d, p in enumerate(post)]
        out = t[tuple(post)]
        return out.contiguous() if any(_stepped(p) for p in post) else out
    out = t[tuple(post)]
    return out.copy() if any(_stepped(p) for p in post) else out


def _stepped(p: int | slice) -> bool:
    return isinstance(p, slice) and (p.step or 1) != 1


class TensorSlice:
    """A lazily indexed tensor of an open file (`safe_open(...).get_slice(name)`).

    `s[a:b]`, `s[:, a:b]`, `s[..., i]`, steps and negative indices as in numpy; the result is a
    new array (numpy or torch, on the file handle's device) holding only the selected elements.
    """

    def __init__(self, handle: Any, name: str) -> None:
        self._handle = handle
        self._name = name
        info = handle._info(name)
        self._shape: tuple[int, ...] = tuple(info["shape"])
        self._dtype: str = str(info["dtype"])

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> str:
        return self._dtype

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __getitem__(self, key: Any) -> Any:
        box, post = plan(key, self._shape)
        t = self._handle._decode_box(self._name, box)
        return apply_post(t, post, self._handle._framework)

    def __repr__(self) -> str:
        return f"TensorSlice({self._name!r}, shape={list(self._shape)}, dtype={self._dtype})"
