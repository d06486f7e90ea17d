"""Sibling fusion: quantized linears that read the same input run as one.

A Llama layer calls ``q_proj``, ``k_proj`` and ``v_proj`` on one hidden state, and ``gate_proj``
and ``up_proj`` on another. ``fuse_siblings(model)`` joins each such group of ``QuantizedLinear``
modules into one weight of their stacked rows, so that an eager forward multiplies once per
group (7 linear calls a Llama layer become 4): each call costs host time (the GPU's launch, the
CPU pool's join) that a small layer (k_proj, v_proj) barely covers.

* Memory: the group's parts (codes, scales, mins, bias) are one concatenation; each member's own
  buffers become views (row ranges) of it, so nothing is stored twice, and each member still
  works on its own (``state_dict``, ``save_model``, ``dequantize()``, a call alone). ``.to()``
  / ``.cuda()`` move the group's parts once and re-view the members (``_apply``).
* Calls ("stash"): the first member called computes the whole group's output and returns its
  slice; the others' slices are kept, per thread, with the input they were computed from (the
  tensor object, its version counter, data pointer and shape). A sibling called with that same
  unmodified tensor returns its slice; any other call computes on its own weight, as before.
  The slices are views of one output (not contiguous along the last dim when there are several
  rows; transformers' ``.view(...)`` of heads and elementwise products take them).
  A group whose kept slices go unused twice (cross-attention: k and v read another input) stops
  fusing. For subclassed tensors and for inputs that need gradients the members run alone.
* Under ``torch.compile`` (``traced``): each member calls the group's multiply on its input and
  narrows it to its rows (views of one output, as eager's slices). The calls are identical;
  inductor's post-grad pass (``inductor_pass.py``, put in ``post_grad_custom_post_pass`` when a
  group is traced, after any pass already there) merges them, so a compiled Llama layer also
  makes 4 linear calls, and cuts a call whose rows are read in part (cross-attention, a decode
  step that calls q alone) to those rows. A one-row input (a batch-1 decode step) runs the
  members alone: that step is host-bound, and the join's guards cost more than it saves.
  Other backends keep one call per member, each
  computing the whole group (same results). Dynamo guards the member's views (one given other
  parts traces again and runs alone); a member whose input or bias needs gradients runs alone.
  ``torch.inference_mode`` tensors have no version counter: there an in-place edit of the input
  between two sibling calls is not seen (model code makes none).
* Which groups: siblings of one parent module named as in ``SIBLINGS`` (or ``groups=``), all
  ``QuantizedLinear`` with the same input size, encoding (name, bits, group size, axis, scale
  dtype), decode dtype and device, biases all or none, whose parts concatenate exactly: codes
  rows that start on a byte, and with groups along the output rows (``axis`` 0) every member
  but the last a whole number of groups. NVFP4 (one tensor scale per weight) never fuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ._layout import row_parts
from .linear import linear
from .modules import QuantizedLinear
from .ops import OUT_DTYPES

#: Child names of one parent whose linears read the same input, by model family.
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi-3 (unfused), OPT
    ("gate_proj", "up_proj"),  # Llama-style gated MLPs
    ("query", "key", "value"),  # BERT, RoBERTa, ViT
    ("w1", "w3"),  # Mixtral experts
    ("q", "k", "v"),  # T5 (its cross-attention stops fusing by itself)
    ("wi_0", "wi_1"),  # T5 v1.1 gated MLP
)
#: Kept slices that went unused before a group stops fusing.
MAX_UNUSED = 2
_ATTR = "_qt_siblings"  # a member's group, in the QuantizedLinear's __dict__
_TRACED = "_qt_sibling_views"  # its record (SiblingGroup.records), in its __dict__ for traced()
_PARTS = ("codes", "scales", "mins")


class SiblingGroup:
    """Linears of one parent that share an input, joined along their output rows."""

    def __init__(self, members: Sequence[QuantizedLinear]) -> None:
        self.members = list(members)
        self.index = {id(m): i for i, m in enumerate(self.members)}
        w0 = self.members[0].weight
        rows = [int(m.out_features) for m in self.members]
        self.starts = [sum(rows[:i]) for i in range(len(rows))]
        self.rows = rows
        n_in = int(w0.shape[1])
        _, name, bits, group_size, axis = w0.op_args
        self.op_args = ((sum(rows), n_in), name, bits, group_size, axis)
        with torch.no_grad():
            self.parts: dict[str, torch.Tensor | None] = {
                p: _cat([m.weight._buffers[p] for m in self.members]) for p in _PARTS
            }
            self.parts["bias"] = _cat([m._parameters["bias"] for m in self.members])
        # per member: (start, rows, weight module, codes, scales, mins, bias) as attached
        self.records: list[tuple | None] = [None] * len(self.members)
        self.generation = 0
        self.attached_generation = [0] * len(self.members)
        self.unused = 0  # kept slices dropped unused (MAX_UNUSED: stop fusing)
        self.enabled = True
        self.dissolved = False
        self._local = threading.local()
        for i in range(len(self.members)):
            self.attach(i)
            self.members[i].__dict__[_ATTR] = self

    # -- memory ----------------------------------------------------------------------------------
    def views(self, i: int) -> tuple:
        """Member ``i``'s parts as views of the group's: codes bytes, scale rows, bias rows."""
        m, start, rows = self.members[i], self.starts[i], self.rows[i]
        shape, _, bits, group_size, axis = self.op_args
        cut = row_parts(shape, bits, group_size, axis, start, rows)
        assert cut is not None  # _joinable keeps members that start on a byte and a group
        c0, cn, s0, sn = cut
        codes = self.parts["codes"][c0 : c0 + cn]
        scales = self.parts["scales"][s0 : s0 + sn]
        mins = self.parts["mins"]
        mins = None if mins is None else mins[s0 : s0 + sn]
        bias = self.parts["bias"]
        if bias is not None:
            old = m._parameters["bias"]
            bias = nn.Parameter(bias[start : start + rows], requires_grad=old.requires_grad)
        return codes, scales, mins, bias

    def attach(self, i: int) -> None:
        m = self.members[i]
        codes, scales, mins, bias = self.views(i)
        buffers = m.weight._buffers
        buffers["codes"], buffers["scales"], buffers["mins"] = codes, scales, mins
        m._parameters["bias"] = bias
        self.attached_generation[i] = self.generation
        self.fresh = all(g == self.generation for g in self.attached_generation)
        # what intact() / valid() compare, also in the member's dict: traced() reads it there
        rec = (self.starts[i], self.rows[i], m.weight, codes, scales, mins, bias)
        self.records[i] = m.__dict__[_TRACED] = rec

    def intact(self, i: int) -> bool:
        """Whether member ``i`` still holds the views this group gave it."""
        rec = self.records[i]
        return rec is not None and _holds(self.members[i], rec)

    def valid(self) -> bool:
        """Whether every member holds views of the group's current parts. Runs before each
        multiply of the group: a flat loop of identity checks. A member moved alone waits for
        its siblings to follow; one given other buffers (``load_state_dict(assign=True)``,
        ``load_model``) ends the group (``dissolve``), which would otherwise keep the old
        weights resident."""
        if not self.fresh:
            return False
        for m, rec in zip(self.members, self.records, strict=True):
            if not _holds(m, rec):
                self.dissolve()
                return False
        return True

    def apply(self, member: QuantizedLinear, fn: Callable, recurse: bool) -> QuantizedLinear:
        """``member._apply(fn)``: the first member of a move moves the group's parts (device
        only for the quantized parts, as ``QuantizedWeight._apply``), each re-views them; a
        member that was given other buffers leaves the group's care."""
        i = self.index[id(member)]
        if self.dissolved:
            pass
        elif not self.intact(i):
            self.dissolve()
        else:
            if self.attached_generation[i] == self.generation:
                moved = {k: _apply_part(k, t, fn) for k, t in self.parts.items()}
                if any(moved[k] is not t for k, t in self.parts.items()):
                    self.parts = moved
                    self.generation += 1
            self.attach(i)
        return nn.Module._apply(member, fn, recurse)

    # -- calls -----------------------------------------------------------------------------------
    def call(self, member: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """Member's output through the group (a kept slice, or the group's multiply), or None:
        the member computes alone."""
        if not self.enabled or type(x) is not torch.Tensor:
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None
        local = self._local.__dict__
        i = self.index[id(member)]
        ver = -1 if x.is_inference() else x._version
        kept = local.get("kept")  # [x, version, data_ptr, shape, slices (None: served), left]
        if kept is not None:
            out = kept[4][i]
            if out is not None and kept[0] is x and kept[1] == ver and kept[2] == x.data_ptr():
                if kept[3] == x.shape:
                    kept[4][i] = None
                    kept[5] -= 1
                    if not kept[5]:
                        local["kept"] = None
                    return out
            local["kept"] = None
            self.unused += 1  # computed for members that never asked
            if self.unused >= MAX_UNUSED:
                self.enabled = False
                return None
        if not self.valid():
            return None
        w = member._modules["weight"]
        y = self.multiply(x if x.dtype in OUT_DTYPES else x.to(w.dtype))
        # one call makes every member's view (each view costs ~1 us of host time)
        outs = list(y.split_with_sizes(self.rows, -1))
        out = outs[i]
        outs[i] = None
        local["kept"] = [x, ver, x.data_ptr(), x.shape, outs, len(outs) - 1]
        return out

    def traced(self, member: QuantizedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """Under ``torch.compile``: the member's rows (a narrow of the last dim, as ``call``'s
        slices) of the group's multiply, or None: the member computes alone. Every member
        makes the same call (the group's parts, the same input), which inductor's pass
        (``inductor_pass.py``) merges into one. Dynamo guards what this reads, so a member
        given other buffers, or moved alone, or a group ended, traces again; it reads little
        (the member's record from its own dict, not the group's lists): each read is a guard
        checked before every compiled call."""
        if type(x) is not torch.Tensor or x.numel() <= x.shape[-1]:
            # one row (a batch-1 decode step): the step is host-bound, and the guards dynamo
            # adds for what follows (~10 per member, checked before every call) cost more than
            # the launches the join saves (H200: 0.97-0.98x the members apart, three runs)
            return None
        rec = member.__dict__.get(_TRACED)
        if rec is None or not self.enabled or not self.fresh:
            return None
        if not _holds(member, rec):
            return None
        start, rows, w, _, _, _, bias = rec
        if torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return None  # gradients: the member's own bias parameter, not the group's rows
        _install_pass()
        y = self.multiply(x if x.dtype in OUT_DTYPES else x.to(w.dtype))
        return y.narrow(-1, start, rows)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """The whole group's output ``[..., sum of rows]`` (members in ``members`` order)."""
        p = self.parts
        shape, name, bits, group_size, axis = self.op_args
        return linear(x, p["codes"], p["scales"], p["mins"], p["bias"], shape, name, bits,
                      group_size, axis)  # fmt: skip

    # -- copies ----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_local"]  # per-thread kept slices: not part of a copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self.index = {id(m): i for i, m in enumerate(self.members)}  # a copy's members

    def dissolve(self) -> None:
        """Give every member still holding the group's views its own copy of its parts, and
        end the group (its parts are freed with the last view)."""
        if self.dissolved:
            return
        self.enabled, self.fresh, self.dissolved = False, False, True
        self._local = threading.local()
        with torch.no_grad():
            for i, m in enumerate(self.members):
                m.__dict__.pop(_ATTR, None)
                m.__dict__.pop(_TRACED, None)
                if not self.intact(i):
                    continue
                b = m.weight._buffers
                for k in _PARTS:
                    if b[k] is not None:
                        b[k] = b[k].clone()
                bias = m._parameters["bias"]
                if bias is not None:
                    m._parameters["bias"] = nn.Parameter(
                        bias.detach().clone(), requires_grad=bias.requires_grad
                    )
        self.parts = dict.fromkeys(self.parts)
        self.records = [None] * len(self.members)  # no reference kept to the old views


def _holds(m: QuantizedLinear, rec: tuple) -> bool:
    """Whether member ``m`` still holds what its record ``rec`` has: the same weight module,
    parts and bias (identities)."""
    _, _, w, codes, scales, mins, bias = rec
    b = w._buffers
    return (
        m._modules.get("weight") is w
        and m._parameters.get("bias") is bias
        and b.get("codes") is codes
        and b.get("scales") is scales
        and b.get("mins") is mins
    )


@torch.compiler.assume_constant_result
def _install_pass() -> bool:
    """Put the merging pass in inductor's config (``inductor_pass.install``; a pass already
    there stays, chained). Dynamo runs this at trace time, so each compile of a joined group
    finds the pass in place, also when the slot was set after an earlier compile; and
    importing ``qtensors.torch`` does not load inductor (a second's import)."""
    from . import inductor_pass

    inductor_pass.install()
    return True


def _cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if ts[0] is None:
        return None
    return torch.cat([t.detach() for t in ts])


def _apply_part(name: str, t: torch.Tensor | None, fn: Callable) -> torch.Tensor | None:
    if t is None:
        return None
    with torch.no_grad():
        new = fn(t)
    if name != "bias" and new.dtype != t.dtype:  # quantized parts follow devices, not dtypes
        new = t.to(new.device)
    return new


# -- finding groups ------------------------------------------------------------------------------
def _layout(m: QuantizedLinear) -> tuple:
    """What members of a group must share."""
    w = m.weight
    bias = m._parameters["bias"]
    enc = tuple(sorted(w.encoding.items()))
    b = None if bias is None else (bias.dtype, bias.requires_grad)
    return (int(m.in_features), enc, w.dtype, w.codes.device, b)


def _joinable(members: list[QuantizedLinear]) -> list[QuantizedLinear]:
    """The members (reordered) whose parts concatenate exactly, or fewer than two."""
    w0 = members[0].weight
    e = w0.encoding
    if e["name"] == "nvfp4" or w0.codes.is_meta or len(w0.shape) != 2:
        return []
    # a forward pre-hook may hand each member another input (tensor parallelism's): not joined
    same = [m for m in members if _layout(m) == _layout(members[0]) and not m._forward_pre_hooks]
    same = [m for m in same if m.weight.scales.is_contiguous() and m.weight.codes.is_contiguous()]
    n_in, bits, g, axis = int(w0.shape[1]), w0.bits, int(e["group_size"]), int(e["axis"])
    if axis == 0:
        # groups of rows: every member but the last must be whole groups
        whole = [m for m in same if m.out_features % g == 0]
        ragged = [m for m in same if m.out_features % g]
        same = whole + ragged[:1]
    out: list[QuantizedLinear] = []
    start = 0
    for m in same:
        if start * n_in * bits % 8 == 0:  # codes rows start on a byte
            out.append(m)
            start += m.out_features
    return out if len(out) >= 2 else []


def _candidates(model: nn.Module, groups: Iterable[Sequence[str]]) -> Iterable[list]:
    for parent in model.modules():
        children = parent._modules
        for names in groups:
            found = [children.get(n) for n in names]
            members = [m for m in found if type(m) is QuantizedLinear and _ATTR not in m.__dict__]
            if len(members) >= 2:
                yield members


def fuse_siblings(model: nn.Module, groups: Iterable[Sequence[str]] | None = None) -> int:
    """Join the ``QuantizedLinear`` siblings of ``model`` that read one input (names in
    ``groups``, default ``SIBLINGS``; see the module's docstring); returns how many groups were
    joined. In place; already joined members are left as they are."""
    table = [tuple(g) for g in (SIBLINGS if groups is None else groups)]
    for g in table:
        if len(g) < 2 or not all(isinstance(n, str) for n in g):
            raise ValueError(f"a sibling group names two or more children, not {g!r}")
    count = 0
    for members in list(_candidates(model, table)):
        joined = _joinable(members)
        if joined and all(_ATTR not in m.__dict__ for m in joined):
            SiblingGroup(joined)
            count += 1
    return count


def unfuse_siblings(model: nn.Module) -> int:
    """Undo ``fuse_siblings``: each member gets its own copy of its parts. Returns how many
    groups were undone."""
    seen: dict[int, SiblingGroup] = {}
    for m in model.modules():
        g = m.__dict__.get(_ATTR)
        if g is not None:
            seen[id(g)] = g
    for g in seen.values():
        g.dissolve()
    return len(seen)


def group_of(module: nn.Module) -> SiblingGroup | None:
    """The group a ``QuantizedLinear`` was joined to, or None."""
    return module.__dict__.get(_ATTR)


__all__ = ["MAX_UNUSED", "SIBLINGS", "SiblingGroup", "fuse_siblings", "group_of", "unfuse_siblings"]
