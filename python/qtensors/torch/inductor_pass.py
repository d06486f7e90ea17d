"""An inductor graph pass over qtensors' ops: a joined group multiplies once in compiled code.

Under ``torch.compile`` each member of a joined group (``siblings.py``) calls
``torch.ops.qtensors.linear`` on the group's parts with its input and narrows the result to
its rows, so a q/k/v group traces three identical calls. Neither AOTAutograd nor inductor
merges them (torch's CSE, ``fx_graph_cse``, runs on training's joint graph and under freezing
only, and keeps apart the nodes whose storage an output shares). This pass does, on inductor's
post-grad graph (normalized and functional), from its ``post_grad_custom_post_pass``:

1. merge: calls of qtensors' functional ops (``qtensors::linear``, ``qtensors::dequantize``:
   any op of the ``qtensors`` namespace that mutates nothing) with equal arguments and no
   mutating op between them become the first one;
2. cut: a ``qtensors::linear`` call whose uses all read rows of its output (slices of the last
   dim) computes those rows alone, on slices of its parts, where they start on a byte of the
   codes and (groups along the rows) on a group; e.g. a cross-attention's ``q``, whose group's
   ``k`` and ``v`` read another input, or a decode step that calls ``q`` alone.

``install()`` puts it in that config slot; a pass already there keeps running, before it (a
list where torch takes one, else a chain). ``siblings.py`` installs it when dynamo traces a
joined member: the slot is checked on each compile, and importing ``qtensors.torch`` does not
load inductor. Other backends run no inductor passes: there the identical calls stay (the
results are the same; each call computes the whole group). ``uuid()`` hashes this file and
``_layout.py`` (the row math) for inductor's FX graph cache.

Importing this module imports inductor (about a second).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import torch
import torch._inductor.config as _config
from torch._inductor import custom_graph_pass as _cgp

from . import linear as _linear  # noqa: F401  (registers torch.ops.qtensors.linear)
from ._layout import codes_nbytes, row_parts, scale_shape

_FILES = (__file__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_layout.py"))
# a recent torch takes a list of passes in the slot; older ones one pass (chained below)
_LISTS = hasattr(_cgp, "get_custom_graph_passes")
_AWARE = getattr(_cgp, "CustomInferenceAwareGraphPass", None)
_SLICE = torch.ops.aten.slice.Tensor


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    h = hashlib.sha256()
    for path in _FILES:
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


class MergePass(_cgp.CustomGraphPass):
    """The pass (``PASS``): ``run`` on the graph."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        run(graph)

    def uuid(self) -> str:
        return "qtensors-merge-" + _source_hash()


PASS = MergePass()


class _Chain(_AWARE or _cgp.CustomGraphPass):  # type: ignore[misc]
    """The slot's former pass, then ``PASS`` (a torch whose slot holds one pass)."""

    def __init__(self, first: Any) -> None:
        self.first = first

    def __call__(self, graph: torch.fx.Graph, is_inference: bool = False) -> None:
        if _AWARE is not None and isinstance(self.first, _AWARE):
            self.first(graph, is_inference=is_inference)
        else:
            self.first(graph)
        PASS(graph)

    def uuid(self) -> Any:
        # as inductor's own check: a pass without a uuid turns the FX graph cache off
        if not isinstance(self.first, _cgp.CustomGraphPass):
            return None
        theirs = self.first.uuid()
        return None if not theirs else (theirs, PASS.uuid())


def _has_ours(p: Any) -> bool:
    if p is PASS or isinstance(p, _Chain):
        return True
    return isinstance(p, (list, tuple)) and any(_has_ours(q) for q in p)


def install() -> None:
    """Put ``PASS`` in ``torch._inductor.config.post_grad_custom_post_pass`` unless it is
    there; the slot's former pass (or passes) runs first."""
    current = _config.post_grad_custom_post_pass
    if _has_ours(current):
        return
    if current is None:
        new: Any = PASS
    elif isinstance(current, (list, tuple)):  # a torch that takes lists
        new = [*current, PASS]
    elif _LISTS:
        new = [current, PASS]
    else:
        new = _Chain(current)
    _config.post_grad_custom_post_pass = new


# -- the pass ------------------------------------------------------------------------------------
def run(graph: torch.fx.Graph) -> None:
    """Merge equal calls of qtensors' ops, then cut ``qtensors::linear`` calls to the rows
    read."""
    merge(graph)
    target = torch.ops.qtensors.linear.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is target:
            cut(graph, node)


def _ours(node: torch.fx.Node) -> bool:
    t = node.target
    return (
        node.op == "call_function"
        and isinstance(t, torch._ops.OpOverload)
        and t.namespace == "qtensors"
        and not t._schema.is_mutable
    )


def _mutates(node: torch.fx.Node) -> bool:
    """Whether a node may change a tensor in place (or has other effects): merges do not
    cross it."""
    if node.op not in ("call_function", "call_method"):
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable or node.is_impure()
    if isinstance(t, torch._ops.HigherOrderOperator):
        return not t.name().startswith("auto_functionalized")
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or "out" in node.kwargs


def _key(v: Any) -> Any:
    """A hashable key of an argument: nodes by identity, containers by their items, scalars
    with their type (1, 1.0 and True apart); TypeError for what has none (symbolic ints)."""
    if isinstance(v, torch.fx.Node):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_key(a) for a in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _key(a)) for k, a in v.items()))
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise TypeError("symbolic")
    hash(v)
    return (type(v), v)


def merge(graph: torch.fx.Graph) -> int:
    """Calls of qtensors' functional ops equal to an earlier one, with no mutation between
    them, are replaced by it; returns how many."""
    seen: dict[Any, torch.fx.Node] = {}
    region = 0
    merged = 0
    for node in list(graph.nodes):
        if _mutates(node) and not _ours(node):
            region += 1
            continue
        if not _ours(node):
            continue
        try:
            key = (region, node.target, _key(node.args), _key(node.kwargs))
            first = seen.setdefault(key, node)
        except TypeError:
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            merged += 1
    return merged


def _rows_read(user: torch.fx.Node, node: torch.fx.Node, rank: int, n: int) -> Any:
    """``(start, end)`` when ``user`` is a slice of ``node``'s last dim (step 1), else None."""
    if user.op != "call_function" or user.target is not _SLICE or rank < 1:
        return None
    names = ("self", "dim", "start", "end", "step")
    args = dict(zip(names, user.args, strict=False)) | dict(user.kwargs)
    if args.get("self") is not node or sum(a is node for a in user.args) != 1:
        return None
    dim, start, end = args.get("dim", 0), args.get("start"), args.get("end")
    step = args.get("step", 1)
    if not all(v is None or type(v) is int for v in (dim, start, end, step)):
        return None
    if step != 1 or dim % rank != rank - 1:
        return None
    start = 0 if start is None else start + n if start < 0 else start
    end = n if end is None else end + n if end < 0 else end
    start = min(max(start, 0), n)
    return start, min(max(end, start), n)


def _val(v: Any) -> Any:
    return v.meta.get("val") if isinstance(v, torch.fx.Node) else v


def cut(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """Compute only the rows of ``node`` (a ``qtensors::linear`` call) that its uses read, when
    they are all slices of the last dim covering less than the whole output and the rows can
    be cut out of the weight's parts (``_layout.row_parts``). Returns whether it did."""
    if len(node.args) != 10 or node.kwargs:
        return False
    x, codes, scales, mins, bias, shape, encoding, bits, group_size, axis = node.args
    out = node.meta.get("val")
    fake_mode = getattr(out, "fake_mode", None)
    if fake_mode is None or encoding == "nvfp4" or not node.users:  # nvfp4: one tensor scale
        return False
    if not all(type(v) is int for v in (*shape, bits, group_size, axis)) or len(shape) != 2:
        return False
    n_out, n_in = shape
    reads = {u: _rows_read(u, node, out.dim(), n_out) for u in node.users}
    if any(r is None for r in reads.values()):
        return False
    lo, hi = min(r[0] for r in reads.values()), max(r[1] for r in reads.values())
    if lo >= hi or (lo, hi) == (0, n_out):
        return False
    where = row_parts(shape, bits, group_size, axis, lo, hi - lo)
    if where is None or not _weight_parts(codes, scales, mins, bias, shape, bits, group_size, axis):
        return False
    c0, cn, s0, sn = where
    with graph.inserting_before(node), fake_mode:

        def rows(t: Any, start: int, count: int) -> Any:
            if t is None:
                return None
            s = graph.call_function(_SLICE, (t, 0, start, start + count))
            s.meta["val"] = _SLICE(_val(t), 0, start, start + count)
            return s

        parts = (rows(codes, c0, cn), rows(scales, s0, sn), rows(mins, s0, sn))
        args = (x, *parts, rows(bias, lo, hi - lo), [hi - lo, n_in], encoding, bits, group_size,
                axis)  # fmt: skip
        new = graph.call_function(node.target, args)
        new.meta["val"] = node.target(*(_val(a) for a in args))
        for u, (a, b) in reads.items():
            u.args, u.kwargs = (new, -1, a - lo, b - lo), {}
            u.meta["val"] = _SLICE(new.meta["val"], -1, a - lo, b - lo)
    graph.erase_node(node)
    return True


def _weight_parts(codes, scales, mins, bias, shape, bits, group_size, axis) -> bool:
    """Whether the parts are laid out as a weight's (rows along dim 0): 1-D codes, scales and
    mins of the weight's scale shape, a bias of one value a row."""
    c, s, m, b = (_val(t) for t in (codes, scales, mins, bias))
    if not isinstance(c, torch.Tensor) or not isinstance(s, torch.Tensor):
        return False
    want = scale_shape(shape, axis, group_size)
    if c.dim() != 1 or c.shape[0] != codes_nbytes(shape, bits) or tuple(s.shape) != want:
        return False
    if mins is not None and (not isinstance(m, torch.Tensor) or tuple(m.shape) != want):
        return False
    return bias is None or (isinstance(b, torch.Tensor) and tuple(b.shape) == (shape[0],))


__all__ = ["PASS", "MergePass", "cut", "install", "merge", "run"]
