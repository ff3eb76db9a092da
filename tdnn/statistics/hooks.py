"""Calibration passes: forward hooks that stream each target layer's input statistics
(:class:`~tdnn.statistics.moments.InputStats`) over the calibration batches, on one model or on a
model beside its uncompressed reference (sequential mode). They also find a BatchNorm that directly
consumes a layer's output, whose per-channel scale weights the output error that matters.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn.algebra import decompose
from tdnn.core import temporary
from tdnn.core.batches import call
from tdnn.layers import registry
from tdnn.layers.registry import Geometry
from tdnn.statistics.moments import InputStats, rows

Runner = Callable[[int, Any], Any]  # (batch index, batch or module) -> output


@dataclass
class _Tracker:
    """Hooks for one calibration run."""

    stats: dict[str, InputStats]
    modules: dict[str, nn.Module]
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> weakref to the latest output
    mask: torch.Tensor | None = None  # this batch's tokens to count
    # vectors key -> (weakref to an input, its version, Σ x xᵀ, count, whose), this batch:
    # layers reading the very same tensor the same way (Q, K, V) compute the product once
    terms: dict[tuple, tuple[Any, int, torch.Tensor, int]] = field(default_factory=dict)

    def attach(self, model: nn.Module) -> list[Any]:
        """Register the hooks; return their handles."""
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                handles.append(bn.register_forward_pre_hook(self._bn))
        return handles

    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x, stats = args[0], self.stats[name]
            if x.is_inference():  # no version counter: cannot tell an in-place change, so no sharing
                stats.update(module, x, mask=self.mask)
                return
            key = registry.kind_of(module).vectors_key(module, stats.geometry)
            seen = self.terms.get(key)
            if seen is not None and seen[0]() is x and seen[1] == x._version:
                stats.add(x, *seen[2:])
            else:
                self.terms[key] = (weakref.ref(x), x._version, *stats.update(module, x, mask=self.mask), stats)
        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            # a BatchNorm scales dim 1: the output channels of a conv, or of a matrix layer's 2-D output
            if registry.kind_of(module).spatial or output.dim() == 2:
                self.outputs[name] = weakref.ref(output)
        return hook

    def _bn(self, bn: nn.Module, args: tuple[Any, ...]) -> None:
        for name, ref in self.outputs.items():
            if ref() is args[0] and self.stats[name].out_scale is None:
                scale = (bn.running_var + bn.eps).rsqrt() if bn.running_var is not None else None
                if scale is not None:
                    if bn.weight is not None:
                        scale = scale * bn.weight.detach().abs()
                    self.stats[name].out_scale = scale.detach().to(torch.float64).cpu()


@torch.no_grad()
def collect(model: nn.Module, batches: Sequence[Any], layers: dict[str, tuple[nn.Module, Geometry]], *,
            runner: Runner | None = None, masks: Sequence[torch.Tensor | None] | None = None,
            progress: bool = False) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` (in eval mode) and return input statistics per layer.

    Args:
        model: the model to run (its train/eval flags are restored afterwards).
        batches: model inputs: tensors, tuples of arguments, or dicts of keyword arguments.
        layers: ``name -> (module, geometry)`` (:class:`~tdnn.layers.registry.Geometry`).
        runner: ``(index, batch) -> output`` to run instead of ``model(batch)`` (e.g. one block
            on its cached inputs); the hooks sit on ``layers`` either way.
        masks: per batch, the (batch, tokens) mask of tokens to count, or ``None``.
        progress: show a tqdm bar.

    Raises:
        ValueError: if no batch was given, a layer never saw an input or saw NaN or Inf.
    """
    tracker = _Tracker({name: InputStats(geometry) for name, (_, geometry) in layers.items()},
                       {name: module for name, (module, _) in layers.items()})
    runner = runner or (lambda i, batch: run(model, batch, i))
    with temporary.hooks(tracker.attach(model)), temporary.modes({model: False}):
        for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress, leave=False)):
            tracker.outputs.clear()
            tracker.mask = masks[i] if masks else None
            runner(i, batch)
            tracker.terms.clear()
    if not batches:
        raise ValueError("calibration: no batches given")
    return _checked(tracker.stats)


def _checked(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    for name, s in stats.items():
        if s.count == 0:
            raise ValueError(f"{name}: calibration data never reached this layer")
        if not decompose.all_finite(s.gram):
            raise ValueError(f"{name}: calibration inputs of this layer hold NaN or Inf values (an overflow "
                             f"in the layers before it?)")
    return stats


def run(model: nn.Module, batch: Any, index: int, what: str = "calibration batch") -> Any:
    """``model`` on batch number ``index``; a failure says which batch and how batches are passed."""
    try:
        return call(model, batch)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"{what} {index}: the model failed on it ({type(err).__name__}: {err}); "
                         f"a batch is passed as model(batch) for a tensor, model(*batch) for a tuple or list, "
                         f"model(**batch) for a dict: for a DataLoader of (inputs, labels) give "
                         f"(x for x, _ in loader)") from err


@torch.no_grad()
def collect_pairs(model: nn.Module, reference: nn.Module, n: int, layers: dict[str, tuple[nn.Module, nn.Module, Geometry]],
                  runner: Runner, *, masks: Sequence[torch.Tensor | None] | None = None) -> dict[str, InputStats]:
    """Input statistics of layers of ``model`` with their cross moments with the inputs of the same
    layers of ``reference`` (the uncompressed original) on the same data: ``runner(i, reference)``
    then ``runner(i, model)`` run batch ``i`` of ``n`` through each.

    Args:
        layers: ``name -> (module in model, module in reference, geometry)``.
    """
    stats = {name: InputStats(geometry) for name, (_, _, geometry) in layers.items()}
    seen = {name: collections.deque() for name in layers}  # a layer may run several times per batch
    mask: list[torch.Tensor | None] = [None]
    handles = []
    for name, (module, ref_module, geometry) in layers.items():
        def remember(m: nn.Module, args: tuple[Any, ...], name: str = name, geometry: Geometry = geometry) -> None:
            seen[name].append(rows(m, args[0], geometry, mask[0]))

        def accumulate(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            stats[name].update(m, args[0], seen[name].popleft(), mask=mask[0])

        handles += [ref_module.register_forward_pre_hook(remember), module.register_forward_pre_hook(accumulate)]
    with temporary.hooks(handles), temporary.modes({reference: False, model: False}):
        for i in range(n):
            mask[0] = masks[i] if masks else None
            runner(i, reference)
            runner(i, model)
    return _checked(stats)
