"""What a layer costs, dense or factorized at a rank: parameters, FLOPs or latency on an input size.

Parameters and FLOPs are counted on meta-device twins (no memory, no compute), latency is timed on
the current device; all are cached by the layer's constructor arguments, since networks repeat the
same layer shapes many times. A factorized form's parameters and FLOPs at every rank follow from a
few counted ranks (they are affine in each rank component).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tdnn.core.batches import call
from tdnn.core.timing import Clock, best_latencies, latencies
from tdnn.layers import registry
from tdnn.layers.base import Factorized


class Measure(str, enum.Enum):
    """What a cost counts: parameters, FLOPs of one forward, or seconds per forward."""

    PARAMS = "params"
    FLOPS = "flops"
    LATENCY = "latency"

    def __str__(self) -> str:
        return self.value


def model_flops(model: nn.Module, batch: Any) -> int:
    """FLOPs of one forward of ``model`` on ``batch`` (a tensor, a tuple of arguments or a dict of
    keyword arguments), as ``torch.utils.flop_counter`` counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(model, batch)
    return counter.get_total_flops()


def layer_cost(measure: Measure | str, layer: nn.Module, cls: type[Factorized] | None = None, rank: Any = None,
               input_shape: tuple[int, ...] | None = None, *, clock: Clock = latencies) -> float:
    """Parameters (``measure="params"``), FLOPs on ``input_shape`` (``"flops"``) or seconds per call on
    the layer's device (``"latency"``: the median of ``clock``'s timed runs, in the faster memory
    layout for a 4-D input; cached per clock) of the dense ``layer`` (``cls=None``), or of ``cls`` at
    ``rank`` standing in for it.

    Example:
        >>> import torch, tdnn
        >>> layer = torch.nn.Linear(100, 50)
        >>> layer_cost("params", layer), layer_cost("params", layer, tdnn.SVDLinear, 10)
        (5050, 1550)
    """
    measure, signature = Measure(measure), _signature(layer)
    if measure is Measure.LATENCY:
        return _timed(cls, signature, rank, input_shape, str(layer.weight.device), clock)
    if cls is None:
        return _counted(measure, None, signature, None, input_shape)
    polynomial = _polynomial(measure, cls, signature, input_shape, cls.max_rank(layer))
    return _counted(measure, cls, signature, rank, input_shape) if polynomial is None else polynomial(rank)


def _signature(layer: nn.Module) -> tuple:
    """What the cost depends on: the layer kind, dtype and constructor arguments."""
    kind = registry.kind_of(layer)
    return kind.name, layer.weight.dtype, tuple(sorted(kind.dense_kwargs(layer).items()))


@lru_cache(maxsize=65536)
def _counted(measure: Measure, cls: type[Factorized] | None, signature: tuple, rank: Any,
             input_shape: tuple[int, ...] | None) -> int:
    kind, dtype, kwargs = signature
    meta = registry.kind_named(kind).build(dict(kwargs), device="meta", dtype=dtype)
    module = meta if cls is None else cls.structure(meta, rank, device="meta")
    if measure is Measure.PARAMS:
        return sum(p.numel() for p in module.parameters())
    return model_flops(module, torch.empty(input_shape, device="meta", dtype=dtype))


def timing_weights(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """``module`` with small random weights, for timing: its structure built uninitialised may
    hold slow denormals (the time does not depend on the values otherwise)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


@lru_cache(maxsize=65536)
def _timed(cls: type[Factorized] | None, signature: tuple, rank: Any, input_shape: tuple[int, ...], device: str,
           clock: Clock) -> float:
    kind, dtype, kwargs = signature
    g = torch.Generator().manual_seed(0)
    module = registry.kind_named(kind).build(dict(kwargs), device="cpu", dtype=dtype)
    if cls is not None:
        module = cls.structure(module, rank)
    module = timing_weights(module, g).to(device).eval()
    x = torch.randn(input_shape, generator=g).to(device=device, dtype=dtype)
    return best_latencies({"layer": module}, x, warmup=2, repeats=7, clock=clock)["layer"]


@lru_cache(maxsize=4096)
def _polynomial(measure: Measure, cls: type[Factorized], signature: tuple, input_shape: tuple[int, ...] | None,
                top: Any) -> Callable[[Any], int] | None:
    """The cost at any rank from a few counted ones: each factor's parameters and FLOPs are affine
    in each rank component (bilinear in Tucker-2's pair), so ranks 1 and 2 per component fix them.
    Checked at the full rank; ``None`` (count every rank) if that fails or the layer is too small."""
    pair = isinstance(top, tuple)
    if min(top if pair else (top,)) < 2:
        return None
    f = {r: _counted(measure, cls, signature, r, input_shape)
         for r in ([(a, b) for a in (1, 2) for b in (1, 2)] if pair else [1, 2])}
    if pair:
        c11 = f[2, 2] - f[1, 2] - f[2, 1] + f[1, 1]
        c10, c01 = f[2, 1] - f[1, 1] - c11, f[1, 2] - f[1, 1] - c11
        c00 = f[1, 1] - c10 - c01 - c11

        def polynomial(r: Any) -> int:
            return c00 + c10 * r[0] + c01 * r[1] + c11 * r[0] * r[1]
    else:
        c1 = f[2] - f[1]
        c0 = f[1] - c1

        def polynomial(r: Any) -> int:
            return c0 + c1 * r
    return polynomial if polynomial(top) == _counted(measure, cls, signature, top, input_shape) else None
