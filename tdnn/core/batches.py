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


def split_labels(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of a training batch: ``inputs``, ``(inputs, labels)``, or a dict of
    keyword arguments with an optional ``"labels"`` entry; labels are ``None`` when absent."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(f"a batch must be inputs or (inputs, labels), got a {type(batch).__name__} "
                         f"of {len(batch)} items; use a dict for several model arguments")
    raise TypeError(f"a batch must be a tensor, (inputs, labels) or a dict, got {type(batch).__name__}")


def batch_size(batch: Any) -> int:
    """The batch dimension: the length of the first tensor found (0 if there is none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 0


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (a dict batch of a transformer), as booleans: which tokens count."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def take_rows(batch: Any, rows: torch.Tensor, n: int) -> Any:
    """``batch`` (a tensor or a structure of them) cut to ``rows`` where a tensor's first dimension is
    the batch's ``n`` samples; other tensors (and other values) as they are."""
    return map_tensors(batch, lambda t: t[rows] if t.dim() and t.shape[0] == n else t)


def split_rows(sizes: list[int], count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of ``sizes``, ``(drawn rows, the other rows)`` of a seeded draw of ``count`` of all the
    samples, each in order."""
    total = sum(sizes)
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]] = True
    return [(torch.arange(n)[part], torch.arange(n)[~part]) for n, part in zip(sizes, chosen.split(sizes))]


def square_sums(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ (out − target)², Σ target²)``, leaving out the tokens a (batch, tokens) ``mask`` drops."""
    diff, ref = (out - target).square(), target.square()
    if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
        weight = mask.to(diff.dtype).reshape(*mask.shape, *[1] * (diff.dim() - 2))
        diff, ref = diff * weight, ref * weight
    return diff.sum(), ref.sum()
