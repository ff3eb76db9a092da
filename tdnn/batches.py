"""Calling a model on one batch, and mapping over its tensors, whatever form the batch takes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def call(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on ``batch``: a tensor is one argument, a tuple/list positional arguments,
    a mapping keyword arguments (as for Hugging Face-style models)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"a batch must be a tensor, a tuple/list of arguments or a dict of keyword "
                    f"arguments, got {type(batch).__name__}")


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (through tuples, lists and mappings)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch
