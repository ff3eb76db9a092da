"""Calibration data: batches checked once, and the statistics kept for reuse across calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tdnn.core.batches import batch_mask, batch_size, map_tensors, split_rows, take_rows
from tdnn.core.digest import model_digest
from tdnn.layers.registry import Geometry
from tdnn.statistics.moments import InputStats

SEED = 0  # of the held-out draw


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
    runs its own passes. A budget checked on held-out samples keeps its statistics (and
    sensitivities) with the rest of the samples, :meth:`split`'s first part, which later calls reuse alike.

    Args:
        batches: as for ``compress_model(calibration=...)``.
        keep: keep the statistics (``False``: a plain, checked list of batches).

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> data = tdnn.Calibration([torch.randn(64, 32)])
        >>> smalls = [tdnn.compress_model(net, ranks=p, calibration=data) for p in (0.3, 0.6)]
        >>> sorted(data.stats)
        ['0', '2']
        >>> checked = [tdnn.compress_model(net, budget=tdnn.Budget(params=p), calibration=data) for p in (0.3, 0.6)]
        >>> kept, held_out = data.split(0.125)
        >>> sorted(kept.stats), sorted(kept.fisher), len(held_out[0])
        (['0', '2'], ['0', '2'], 8)
    """

    def __init__(self, batches: Iterable[Any], *, keep: bool = True) -> None:
        self.batches, self.keep = batch_list(batches), keep
        # layer name -> how its inputs were read -> statistics (SVD and Tucker-2 of one conv read
        # different ones, and a sweep over both methods keeps both); layer name -> Fisher weights
        self.stats: dict[str, dict[Geometry, InputStats]] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.model_fingerprint: str | None = None  # of the model the kept values were collected on
        self._splits: dict[float, tuple[Calibration, list[Any]] | None] = {}

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def bind(self, model: nn.Module) -> None:
        """Before a call on ``model``: forget what was kept unless it came from this very model."""
        if self.keep:
            self._remember(model_digest(model))

    def _remember(self, fingerprint: str | None) -> None:
        if fingerprint != self.model_fingerprint:
            self.stats.clear()
            self.fisher.clear()
            self.model_fingerprint = fingerprint
        for split in self._splits.values():
            if split is not None:
                split[0]._remember(fingerprint)

    def split(self, fraction: float) -> tuple[Calibration, list[Any]] | None:
        """``(these batches without a seeded draw of fraction of their samples, the drawn samples'
        batches)``, or ``None`` with fewer than two samples. The draw leaves the first batch whole
        when the others hold enough samples (it sets the input size of FLOPs and latency). Made once
        per fraction; the first part is a :class:`Calibration` keeping its own statistics alike.

        Example:
            >>> import torch, tdnn
            >>> kept, held = tdnn.Calibration([torch.randn(8, 4), torch.randn(8, 4)]).split(0.25)
            >>> [len(b) for b in kept], [len(b) for b in held]
            ([8, 4], [4])
        """
        if fraction not in self._splits:
            self._splits[fraction] = self._split(fraction)
        return self._splits[fraction]

    def _split(self, fraction: float) -> tuple[Calibration, list[Any]] | None:
        sizes = [batch_size(b) for b in self.batches]
        if sum(sizes) < 2:
            return None
        count = min(max(1, round(fraction * sum(sizes))), sum(sizes) - 1)
        first = 1 if sum(sizes[1:]) >= count else 0  # batches the draw leaves whole
        parts = [(torch.arange(0), torch.arange(n)) for n in sizes[:first]] + split_rows(sizes[first:], count, SEED)
        kept = [b if not len(held) else take_rows(b, rest, n)
                for b, n, (held, rest) in zip(self.batches, sizes, parts) if len(rest)]
        drawn = [take_rows(b, held, n) for b, n, (held, _) in zip(self.batches, sizes, parts) if len(held)]
        part = Calibration(kept, keep=self.keep)
        part._remember(self.model_fingerprint)
        return part, drawn
