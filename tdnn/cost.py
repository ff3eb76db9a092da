"""What a layer costs, dense or factorized at a rank: parameters, or FLOPs on an input size.

Counted on meta-device twins (no memory, no compute) and cached by the layer's constructor
arguments, since networks repeat the same layer shapes many times.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tdnn.layers.base import Factorized, dense_kwargs


def layer_cost(kind: str, layer: nn.Module, cls: type[Factorized] | None = None, rank: Any = None,
               input_shape: tuple[int, ...] | None = None) -> int:
    """Parameters (``kind="params"``) or FLOPs on ``input_shape`` (``kind="flops"``) of the dense
    ``layer`` (``cls=None``), or of ``cls`` at ``rank`` standing in for it.

    Example:
        >>> import torch, tdnn
        >>> layer = torch.nn.Linear(100, 50)
        >>> layer_cost("params", layer), layer_cost("params", layer, tdnn.SVDLinear, 10)
        (5050, 1550)
    """
    base = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
    signature = base, layer.weight.dtype, tuple(sorted(dense_kwargs(layer).items()))
    return _cost(kind, cls, signature, rank, input_shape)


@lru_cache(maxsize=65536)
def _cost(kind: str, cls: type[Factorized] | None, signature: tuple, rank: Any,
          input_shape: tuple[int, ...] | None) -> int:
    base, dtype, kwargs = signature
    meta = base(**dict(kwargs), device="meta", dtype=dtype)
    module = meta if cls is None else cls.structure(meta, rank, device="meta")
    if kind == "params":
        return sum(p.numel() for p in module.parameters())
    with FlopCounterMode(display=False) as counter:
        module(torch.empty(input_shape, device="meta", dtype=dtype))
    return counter.get_total_flops()
