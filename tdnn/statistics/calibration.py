"""Calibration data: batches checked once, and the statistics kept for reuse across calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tdnn.core.batches import batch_mask, map_tensors
from tdnn.core.digest import model_digest
from tdnn.layers.registry import Geometry
from tdnn.statistics.moments import InputStats


def batch_list(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches as a list, each checked to hold only finite values.

    Raises:
        TypeError: for a single tensor or dict (one batch, not an iterable of batches).
        ValueError: naming the first batch with NaN or Inf values.
    """
    if isinstance(calibration, (torch.Tensor, Mapping)):
        what = f"tensor of shape {tuple(calibration.shape)}" if isinstance(calibration, torch.Tensor) else "dict"
        raise TypeError(f"calibration must be an iterable of batches, got a single {what}; for one batch x "
                        f"pass calibration=[x]")
    batches = list(calibration)
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list, Mapping)):
            raise TypeError(f"calibration batch {i}: a batch must be a tensor, a tuple/list of arguments or a "
                            f"dict of keyword arguments, got {type(batch).__name__}")
        tensors: list[torch.Tensor] = []
        map_tensors(batch, lambda t: tensors.append(t) or t)
        if any(t.is_meta for t in tensors):
            raise ValueError(f"calibration batch {i} holds tensors on the meta device, which have no values; "
                             f"give real data")
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
            raise ValueError(f"calibration batch {i} holds NaN or Inf values")
    masks = [batch_mask(b) for b in batches]
    if masks and all(m is not None and not bool(m.any()) for m in masks):
        raise ValueError("calibration: every batch's attention_mask is all zeros, so no token would be counted; "
                         "give batches with real tokens (1 marks a token to keep)")
    return batches


class Calibration:
    """Calibration batches, checked once, whose statistics are kept for reuse.

    Give one to several :func:`tdnn.compress_model` calls on the same model (a sweep over budgets,
    say): the first one-shot data-aware call collects every layer's input statistics (and, for a
    budget, the layers' sensitivities), the later ones reuse them, so a sweep costs one calibration
    pass. Statistics depend on every layer before a layer, so they are kept for one model at a
    time: each call compares the digest of the model it compresses (its structure and
    every parameter and buffer) with the one they were collected on, and a changed model is
    collected again. Sequential mode, whose statistics depend on the compressed layers, always
    runs its own passes.

    Args:
        batches: as for ``compress_model(calibration=...)``.
        keep: keep the statistics (``False``: a plain, checked list of batches).

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> data = tdnn.Calibration([torch.randn(64, 32)])
        >>> smalls = [tdnn.compress_model(net, budget=tdnn.Budget(params=p), calibration=data) for p in (0.3, 0.6)]
        >>> sorted(data.stats)
        ['0', '2']
    """

    def __init__(self, batches: Iterable[Any], *, keep: bool = True) -> None:
        self.batches, self.keep = batch_list(batches), keep
        # layer name -> how its inputs were read -> statistics (SVD and Tucker-2 of one conv read
        # different ones, and a sweep over both methods keeps both); layer name -> Fisher weights
        self.stats: dict[str, dict[Geometry, InputStats]] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.model_fingerprint: str | None = None  # of the model the kept values were collected on

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def bind(self, model: nn.Module) -> None:
        """Before a call on ``model``: forget what was kept unless it came from this very model."""
        if not self.keep:
            return
        current = model_digest(model)
        if current != self.model_fingerprint:
            self.stats.clear()
            self.fisher.clear()
            self.model_fingerprint = current
