"""Quantize a transformers model block by block on calibration data, as GPTQ does: the inputs
of each block are the outputs of the previous block *after* its quantization, so every block
learns to correct what came before. Only the block being quantized needs to be on ``device``.

Blocks are the repeated layers of a Llama-like decoder (``model.layers``) or a BERT-like
encoder (``encoder.layer``). Per block, stage by stage in the order the block calls its linears
(q/k/v, o, gate/up, down: "true-sequential"), with the earlier stages already quantized: the
method may rewrite the block's float weights (``prepare_stage``: AWQ folds scales), observers
collect the stage's inputs (the run stops after the stage), and its linears are quantized and
swapped for ``QuantizedLinear``; a last pass computes the next block's inputs.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..encodings import Encoding
from ..torch.modules import QuantizedLinear, QuantizedWeight
from .base import Method

#: Where the repeated blocks live in the models we know, tried in order.
BLOCK_PATHS = (
    "model.layers",
    "model.model.layers",
    "layers",
    "encoder.layer",
    "bert.encoder.layer",
    "model.encoder.layer",
    "transformer.h",
    "model.decoder.layers",
)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the ModuleList of the model's repeated blocks."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    raise ValueError(
        "calibrated quantization runs decoder or encoder blocks one at a time, but this model "
        f"has none of {', '.join(BLOCK_PATHS)}"
    )


class _Stop(Exception):
    """Raised by the hook on the first block once its inputs are captured."""


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer not inside ``blocks`` to ``device``."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)


def capture_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block gets for each batch of windows."""
    calls: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Stop

    home = next(model.parameters()).device
    _move_outside(model, blocks, device)
    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size].to(device)
            try:
                model(input_ids=ids, **extra)
            except _Stop:
                pass
    finally:
        h.remove()
        _move_outside(model, blocks, home)
    return calls


def _swap(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def quantize_blocks(
    model: nn.Module,
    encoding: Encoding,
    method: Method,
    windows: torch.Tensor,
    *,
    skip: Iterable[str] = (),
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    on_block: Callable[[int, nn.Module], None] | None = None,
    holdout: torch.Tensor | None = None,
    load_block: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Quantize the linears of every block of ``model`` with ``method`` on ``windows`` (token
    ids ``[samples, L]``); in place. Returns a record of what was done (e.g. AWQ's alphas).

    ``holdout``: other windows on which each linear's relative output error
    ``||X W^T - X W'^T|| / ||X W^T||`` is measured (X: its inputs there, W: its float weight as
    the method left it, W': quantized), recorded under ``layer_error``.

    ``load_block(i, block)``: called before block ``i`` is first used (a streaming build fills
    its weights there, see ``lazy.py``)."""
    skip = tuple(skip)
    prefix, blocks = find_blocks(model)
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    record: dict[str, Any] = {"blocks": len(blocks)}
    layer_error: dict[str, float] = {}
    with torch.no_grad():
        calls = capture_inputs(model, blocks, windows, batch_size, dev)
        # the float model's own stream, for a method that scores against its outputs
        float_calls = list(calls) if getattr(method, "float_targets", False) else None
        held = [] if holdout is None else capture_inputs(model, blocks, holdout, batch_size, dev)
        bar = _bar(len(blocks), f"{method.name} blocks", progress)
        for i, block in enumerate(blocks):
            if load_block is not None:
                load_block(i, block)
            block.to(dev)

            run = BlockRun(block, calls, float_calls)
            prepared: list[Any] = []
            linears = {
                n: m
                for n, m in block.named_modules()
                if type(m) is nn.Linear
                and not any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in skip)
            }
            # true-sequential: each stage's inputs come from the earlier stages as quantized
            for stage in stages(block, linears, calls[:1]):
                extra = method.prepare_stage(block, stage, run, encoding)
                if extra:
                    prepared.extend(extra)
                last = linears[stage[-1]]
                observers = {n: method.observer(linears[n], n, encoding) for n in stage}
                hooks = [
                    linears[n].register_forward_pre_hook(lambda _m, a, o=o: o.add(a[0]))
                    for n, o in observers.items()
                    if o is not None
                ]
                try:
                    if hooks:
                        run(stop_after=last)
                finally:
                    for h in hooks:
                        h.remove()
                held_inputs = _inputs_of(block, {n: linears[n] for n in stage}, held, last)
                for n in stage:
                    lin = linears[n]
                    q = method.quantize_weight(lin.weight, encoding, observers[n])
                    qw = QuantizedWeight.from_quantized(q, device=dev, dtype=lin.weight.dtype)
                    bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())
                    _swap(block, n, QuantizedLinear.from_weight(qw, bias))
                    if held:
                        x = held_inputs[n]
                        ref = x @ lin.weight.float().t()
                        err = torch.linalg.norm(ref - x @ qw.dequantize(torch.float32).t())
                        layer_error[f"{prefix}.{i}.{n}"] = float(err / torch.linalg.norm(ref))
                    observers[n] = None  # free the Hessian before the next one is built
            if prepared:
                record.setdefault("prepare", []).append(prepared)
            # the next block sees this block's quantized outputs
            _advance(block, calls)
            _advance(block, held)
            if float_calls is not None:
                _advance(run.float_block, float_calls)
            del run
            block.to(home)
            if on_block is not None:
                on_block(i, block)
            bar.update(1)
        bar.close()
    if layer_error:
        record["layer_error"] = layer_error
    return record


def quantize_weights_only(
    blocks: nn.ModuleList,
    prefix: str,
    encoding: Encoding,
    method: Method,
    load_block: Callable[[int, nn.Module], None],
    skip: Iterable[str] = (),
    progress: bool | None = True,
) -> None:
    """Quantize the blocks' linears with a method that needs no data, block by block, each
    filled by ``load_block`` first (its float linears are freed as they are swapped)."""
    bar = _bar(len(blocks), f"{method.name} blocks", bool(progress))
    for i, block in enumerate(blocks):
        load_block(i, block)
        for n, lin in list(block.named_modules()):
            if type(lin) is not nn.Linear or any(
                fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", p) for p in skip
            ):
                continue
            q = method.quantize_weight(lin.weight, encoding, None)
            qw = QuantizedWeight.from_quantized(q, device=lin.weight.device, dtype=lin.weight.dtype)
            bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())
            _swap(block, n, QuantizedLinear.from_weight(qw, bias))
        bar.update(1)
    bar.close()


def quantize_outside(
    model: nn.Module,
    names: list[str],
    encoding: Encoding,
    method: Method,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> None:
    """Quantize the linears ``names`` that sit outside the blocks (e.g. an lm_head) with a
    calibrated method: their inputs come from one forward of the whole model, blocks already
    quantized, on ``windows``. In place."""
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    linears = {n: model.get_submodule(n) for n in names}
    observers = {n: method.observer(m, n, encoding) for n, m in linears.items()}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, o=observers[n]: o.add(a[0]))
        for n, m in linears.items()
        if observers[n] is not None
    ]
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    model.to(dev)
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i : i + batch_size].to(dev), **extra)
    finally:
        for h in hooks:
            h.remove()
        model.to(home)
    for n, lin in linears.items():
        q = method.quantize_weight(lin.weight, encoding, observers[n])
        qw = QuantizedWeight.from_quantized(q, device=home, dtype=lin.weight.dtype)
        bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())
        _swap(model, n, QuantizedLinear.from_weight(qw, bias))
        observers[n] = None


def _advance(block: nn.Module, calls: list[tuple[tuple, dict]]) -> None:
    """Replace each call's hidden states by the block's output on them."""
    for j, (args, kwargs) in enumerate(calls):
        if args:
            calls[j] = ((_first(block(*args, **kwargs)), *args[1:]), kwargs)
        else:
            calls[j] = (args, {**kwargs, "hidden_states": _first(block(**kwargs))})


class BlockRun:
    """What ``prepare_stage`` gets as ``run``: ``run(max_batches, stop_after=module)`` runs the
    block as it is now (earlier stages quantized) on the calibration calls;
    ``run.float_outputs(module, max_batches)`` gives the float model's outputs of one of its
    modules, from a float copy of the block (made before anything in it changed) on the float
    model's own stream (``float_calls``, only for a method with ``float_targets``)."""

    def __init__(
        self,
        block: nn.Module,
        calls: list[tuple[tuple, dict]],
        float_calls: list[tuple[tuple, dict]] | None = None,
    ) -> None:
        self.block, self.calls, self.float_calls = block, calls, float_calls
        self.float_block = None if float_calls is None else copy.deepcopy(block)
        self._names = {id(m): n for n, m in block.named_modules()}

    def __call__(self, max_batches: int | None = None, stop_after: nn.Module | None = None) -> None:
        _run(self.block, self.calls[:max_batches], stop_after)

    def float_outputs(
        self, module: nn.Module, max_batches: int | None = None
    ) -> list[torch.Tensor]:
        if self.float_block is None or self.float_calls is None:
            raise ValueError("float outputs need the method's float_targets (a float stream)")
        target = self.float_block.get_submodule(self._names[id(module)])
        outs: list[torch.Tensor] = []
        h = target.register_forward_hook(lambda _m, _a, o: outs.append(_first(o).float()))
        try:
            _run(self.float_block, self.float_calls[:max_batches], target)
        finally:
            h.remove()
        return outs


def _run(
    block: nn.Module, calls: list[tuple[tuple, dict]], stop_after: nn.Module | None = None
) -> None:
    """Run ``block`` on ``calls``; with ``stop_after``, each call ends once that module ran
    (what comes after it is not needed)."""
    h = None
    if stop_after is not None:

        def stop(_m: nn.Module, _a: tuple, _o: Any) -> None:
            raise _Stop

        h = stop_after.register_forward_hook(stop)
    try:
        for args, kwargs in calls:
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
    finally:
        if h is not None:
            h.remove()


def stages(
    block: nn.Module, linears: dict[str, nn.Linear], calls: list[tuple[tuple, dict]]
) -> list[list[str]]:
    """``linears`` in the order the block calls them, split into stages: consecutive linears
    fed the same input tensor (q/k/v, gate/up) form one stage. Linears the block never calls
    form a last stage."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, a, n=n: None if any(n == s for s, _ in seen) else seen.append((n, a[0]))
        )
        for n, m in linears.items()
    ]
    try:
        _run(block, calls)
    finally:
        for h in hooks:
            h.remove()
    out: list[list[str]] = []
    prev: torch.Tensor | None = None
    for n, x in seen:  # the inputs are kept alive in ``seen``, so identity is meaningful
        if out and x is prev:
            out[-1].append(n)
        else:
            out.append([n])
        prev = x
    rest = [n for n in linears if all(n != s for s, _ in seen)]
    return out + ([rest] if rest else [])


def _inputs_of(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    calls: list[tuple[tuple, dict]],
    stop_after: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The inputs (rows) every linear of ``block`` gets on ``calls``."""
    if not calls:
        return {}
    got: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1]).float())
        )
        for n, m in linears.items()
    ]
    try:
        _run(block, calls, stop_after)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items() if v}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="block")
