"""Tensor parallelism with transformers' plans: each rank of ``torch.distributed`` loads only its
shard of every planned weight, still quantized, and the layers exchange activations through
``torch.distributed`` collectives (NCCL on GPUs, gloo on CPUs).

    torch.distributed.init_process_group()            # under torchrun
    model = qtt.from_pretrained(folder, tp_plan="auto")

Styles (transformers' names; the plan is ``model._tp_plan`` / ``config.base_model_tp_plan`` for
``"auto"``, or a dict like theirs mapping module patterns, ``*`` for a layer number, to styles):

* ``colwise`` (``local_colwise``): the weight's rows (output features) and the bias are split;
  the output stays split (the next row-wise layer takes it as is).
* ``colwise_rep`` / ``colwise_gather_output``: the same, and the outputs are all-gathered.
* ``rowwise`` (``local_rowwise``): the weight's columns (input features) are split; the partial
  outputs are all-reduced and the bias, kept whole, added once after the sum.
* ``rowwise_rep`` / ``rowwise_split_input``: the same for a replicated input (each rank takes its
  slice of it first).
* ``embedding_rowwise``: the vocabulary rows are split; ids outside a rank's rows give zeros, and
  the rows are all-reduced.
* ``replicate``: every rank keeps the whole module.

Any other style in a plan that matches a module of the model raises ``TensorParallelError``.
Attention needs no change: transformers' attention reshapes with ``-1`` heads, so a rank's
``q/k/v`` shards are its heads; the head counts must divide by the world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import QtensorsError
from ..shards import ShardEntry, bounds
from ..stream import Entry
from .modules import QuantizedEmbedding, QuantizedLinear


class TensorParallelError(QtensorsError, ValueError):
    """A tensor-parallel plan that cannot be applied: an unsupported style, head counts that do
    not divide by the world size, tied weights split two ways, no process group."""


#: style -> (what is split, what happens to the output)
STYLES: dict[str, tuple[str, str]] = {
    "colwise": ("rows", "local"),
    "local_colwise": ("rows", "local"),
    "colwise_rep": ("rows", "gather"),
    "colwise_gather_output": ("rows", "gather"),
    "rowwise": ("columns", "reduce"),
    "local_rowwise": ("columns", "reduce"),
    "rowwise_rep": ("columns", "split_input"),
    "rowwise_split_input": ("columns", "split_input"),
    "embedding_rowwise": ("vocab", "reduce"),
    "replicate": ("none", "local"),
}

_LINEARS = (nn.Linear, QuantizedLinear)
_EMBEDDINGS = (nn.Embedding, QuantizedEmbedding)


def model_plan(model: nn.Module) -> dict[str, str]:
    """transformers' plan of ``model``: its config's ``base_model_tp_plan`` and its base model's
    ``_tp_plan`` under the base model's prefix, then the model's own ``_tp_plan`` (the head's
    rules; in recent transformers, the whole plan already)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    base_model = getattr(model, prefix, None) if prefix else None
    under = f"{prefix}." if base_model is not None else ""
    plan: dict[str, str] = {}
    for rules in (
        getattr(getattr(model, "config", None), "base_model_tp_plan", None),
        getattr(base_model, "_tp_plan", None),
    ):
        if isinstance(rules, dict):
            plan.update({under + k: v for k, v in rules.items()})
    own = getattr(model, "_tp_plan", None)
    if isinstance(own, dict):
        plan.update(own)
    return plan


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile(re.escape(key).replace(r"\*", r"[^.]+") + r"\Z")


def resolve_plan(model: nn.Module, tp_plan: str | dict[str, str]) -> dict[str, str]:
    """Module path -> style for each module of ``model`` a rule of the plan matches (the first
    matching rule wins; rules may also be written relative to the base model)."""
    if isinstance(tp_plan, str):
        if tp_plan != "auto":
            raise TensorParallelError(f"tp_plan must be 'auto' or a dict, not {tp_plan!r}")
        rules = model_plan(model)
        if not rules:
            raise TensorParallelError(
                f"{type(model).__name__} has no tensor-parallel plan (no _tp_plan, no "
                "config.base_model_tp_plan): pass tp_plan as a dict"
            )
    elif isinstance(tp_plan, dict):
        rules = dict(tp_plan)
    else:
        raise TensorParallelError(f"tp_plan must be 'auto' or a dict, not {type(tp_plan)}")
    prefix = getattr(model, "base_model_prefix", "") or ""
    compiled = []
    for key, style in rules.items():
        pats = [_pattern(key)]
        if prefix and not key.startswith(prefix + "."):
            pats.append(_pattern(f"{prefix}.{key}"))
        compiled.append((pats, style))
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        for pats, style in compiled:
            if any(p.match(path) for p in pats):
                if style not in STYLES:
                    raise TensorParallelError(
                        f"{path}: tensor-parallel style {style!r} is not supported "
                        f"(supported: {', '.join(sorted(STYLES))})"
                    )
                split = STYLES[style][0]
                kinds = _EMBEDDINGS if split == "vocab" else _LINEARS
                if split != "none" and not isinstance(module, kinds):
                    raise TensorParallelError(
                        f"{path}: style {style!r} applies to "
                        f"{'embeddings' if split == 'vocab' else 'linear layers'}, "
                        f"not {type(module).__name__}"
                    )
                out[path] = style
                break
    return out


def _check_heads(model: nn.Module, plan: dict[str, str], world: int) -> None:
    config = getattr(model, "config", None)
    if config is None or not any(".self_attn." in p for p in plan):
        return
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n % world:
            raise TensorParallelError(
                f"config.{attr} = {n} does not divide by the world size {world}: "
                "each rank must hold whole attention heads"
            )


@dataclass
class TensorParallel:
    """A resolved plan for one rank: which stored tensors it splits and how, and the hooks that
    make the split layers compute the whole model's outputs."""

    plan: dict[str, str]
    rank: int
    world: int
    group: Any = None
    #: module path -> its weight's whole shape (taken before loading replaces it by a shard)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls, model: nn.Module, tp_plan: str | dict[str, str], group: Any = None
    ) -> TensorParallel:
        if not (dist.is_available() and dist.is_initialized()):
            raise TensorParallelError(
                "tp_plan needs torch.distributed initialised (torchrun, then "
                "torch.distributed.init_process_group()): the rank and world size come from it"
            )
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        plan = resolve_plan(model, tp_plan)
        _check_heads(model, plan, world)
        full = {p: tuple(model.get_submodule(p).weight.shape) for p in plan}
        return cls(plan, rank, world, group, full)

    def dim_of(self, name: str) -> int | None:
        """The dimension of the model tensor ``name`` this rank splits (None: kept whole)."""
        module_path, _, leaf = name.rpartition(".")
        style = self.plan.get(module_path)
        if style is None:
            return None
        split = STYLES[style][0]
        if split == "rows" and leaf in ("weight", "bias"):
            return 0
        if split == "columns" and leaf == "weight":
            return 1
        if split == "vocab" and leaf == "weight":
            return 0
        return None

    def shard(self, e: Entry, names: list[str]) -> Entry:
        """``e`` itself, or this rank's ``ShardEntry`` of it when the plan splits it (``names``:
        every model name that shares the tensor; tied names must agree)."""
        dims = {n: self.dim_of(n) for n in names}
        if len(set(dims.values())) > 1:
            raise TensorParallelError(
                f"tied tensors are split differently by the plan ({dims}): give them one style"
            )
        dim = dims[names[0]]
        if dim is None or self.world == 1:
            return e
        return ShardEntry.of(e, dim, self.rank, self.world)

    def install(self, model: nn.Module) -> None:
        """Hook the split layers: gather, all-reduce (bias after the sum), input slices, vocab
        masks; fix ``in_features`` / ``out_features`` / ``num_embeddings`` to the shards."""
        for path, style in self.plan.items():
            module = model.get_submodule(path)
            split, output = STYLES[style]
            if split == "none":
                continue
            shape = tuple(module.weight.shape)
            full = self.full[path]
            if split == "rows":
                module.out_features = shape[0]
            elif split == "columns":
                module.in_features = shape[1]
            if split == "vocab":
                module.num_embeddings = shape[0]
                start, _ = bounds(full[0], self.rank, self.world)
                module.padding_idx = None  # only matters for gradients; it may be another rank's
                hooks = _VocabSplit(start, shape[0], self.group)
                module.register_forward_pre_hook(hooks.pre)
                module.register_forward_hook(hooks.post)
                continue
            if output == "gather":
                sizes = [
                    b - a for a, b in (bounds(full[0], r, self.world) for r in range(self.world))
                ]
                module.register_forward_hook(_Gather(sizes, self.group))
            elif output in ("reduce", "split_input"):
                if output == "split_input":
                    module.register_forward_pre_hook(
                        _SliceInput(*bounds(full[1], self.rank, self.world))
                    )
                bias = module.bias
                module.bias = None
                module.register_forward_hook(_Reduce(self.group, bias is not None))
                if bias is not None:
                    module.reduced_bias = bias  # registered: moves with .to()


def _group_name(group: Any) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


# The collectives are torch's functional ones (``_c10d_functional``, what
# ``torch.distributed._functional_collectives`` wraps): one dispatcher call each in eager, without
# ``dist.all_reduce``'s Python layers, and torch.compile traces them into its graph (an in-place
# ``dist.all_reduce`` in a hook breaks the graph and keeps CUDA graphs off).
_c10d = torch.ops._c10d_functional


def all_reduce(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of ``t`` over the group: in place in eager (``t`` is a fresh layer output: no
    copy), in a new tensor under torch.compile (which traces only the functional form)."""
    if torch.compiler.is_compiling():
        return _c10d.wait_tensor(_c10d.all_reduce(t, "sum", group_name))
    _c10d.all_reduce_(t, "sum", group_name)
    return _c10d.wait_tensor(t)


def all_gather_last(t: torch.Tensor, sizes: list[int], group_name: str) -> torch.Tensor:
    """Every rank's ``t`` (``sizes[r]`` wide, padded to the widest) side by side along the last
    dimension."""
    most, world = max(sizes), len(sizes)
    lead = t.shape[:-1]
    if t.shape[-1] < most:
        t = nn.functional.pad(t, (0, most - t.shape[-1]))
    got = _c10d.wait_tensor(
        _c10d.all_gather_into_tensor(t.reshape(1, -1).contiguous(), world, group_name)
    )
    got = got.view(world, -1, most)  # rank, row, feature
    if min(sizes) == most:
        return got.permute(1, 0, 2).reshape(*lead, world * most)
    parts = [got[r, :, :n] for r, n in enumerate(sizes)]
    return torch.cat(parts, dim=-1).reshape(*lead, sum(sizes))


class _Reduce:
    """Forward hook of a row-split linear: sum the partial outputs of every rank, then add the
    bias once (in place: the output is the layer's own fresh tensor)."""

    def __init__(self, group: Any, has_bias: bool = False) -> None:
        self.group_name = _group_name(group)
        self.has_bias = has_bias

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = all_reduce(out, self.group_name)
        if self.has_bias:
            out.add_(module.reduced_bias)
        return out


class _VocabSplit:
    """Hooks of a vocabulary-split embedding: before, ids shifted to the rank's rows and those of
    other ranks sent to row 0 (and remembered); after, their rows zeroed, then summed."""

    def __init__(self, start: int, rows: int, group: Any) -> None:
        self.start, self.rows = start, rows
        self.group_name = _group_name(group)
        self.outside: torch.Tensor | None = None

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0] - self.start
        self.outside = (ids < 0) | (ids >= self.rows)
        return (ids.masked_fill(self.outside, 0), *args[1:])

    def post(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        outside, self.outside = self.outside, None
        assert outside is not None, "the pre-hook runs first"
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0), self.group_name)


class _Gather:
    """Forward hook of a column-split linear whose output is gathered."""

    def __init__(self, sizes: list[int], group: Any) -> None:
        self.sizes, self.group_name = sizes, _group_name(group)

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return all_gather_last(out, self.sizes, self.group_name)


class _SliceInput:
    """Pre-hook of a row-split layer fed the whole input: keep this rank's features."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][..., self.start : self.stop], *args[1:])


__all__ = [
    "STYLES",
    "TensorParallel",
    "TensorParallelError",
    "all_gather_last",
    "all_reduce",
    "model_plan",
    "resolve_plan",
]
