"""Block-wise refinement: once a block's layers are factorized, their factors are trained with Adam on
the cached block inputs to reproduce what the dense block computes, keeping the best weights by the
error on held-out samples that are never trained on — so a block never ends worse than its
closed-form start on data it was not fitted to.

Inputs are what the compressed model feeds the block (the outputs of the compressed and refined
blocks before it); targets are the dense block's outputs on the dense model's inputs, as sequential
mode defines them. Only the factorized layers' parameters train; everything else in the block, and
BatchNorm and dropout (eval mode), stays as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdnn.core import temporary
from tdnn.core.batches import batch_size, split_rows, square_sums, take_rows
from tdnn.core.checks import count, number
from tdnn.layers.base import Factorized
from tdnn.statistics.sensitivity import output_of

SEED = 0


@dataclass(frozen=True)
class Refine:
    """How each block is refined (``compress_model(..., refine=Refine(...))``; ``refine=True`` is
    ``Refine()``, ``refine=100`` is ``Refine(steps=100)``).

    Args:
        steps: optimizer steps per block at most.
        lr: Adam's step for each factor, relative to the root mean square of its entries (a step
            of ``lr × rms`` per entry whatever the layer's scale).
        minibatch: samples per step: a fraction of the block's training samples (``float``) or a count.
        holdout: the fraction of the calibration samples held out (at least one), never trained on:
            the weights with the lowest error there are kept, the closed form (step 0) included.
        checks: how many times the held-out error is measured over the steps.
        patience: stop a block once that many checks in a row did not improve it.

    Example:
        >>> import tdnn
        >>> tdnn.Refine(steps=100).lr
        0.01
    """

    steps: int = 50
    lr: float = 0.01
    minibatch: float | int = 0.125
    holdout: float = 0.25
    checks: int = 5
    patience: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "checks", "patience"):
            object.__setattr__(self, name, count(name, getattr(self, name)))
        object.__setattr__(self, "lr", number("lr", self.lr, low=0, open_low=True))
        object.__setattr__(self, "holdout", number("holdout", self.holdout, low=0, high=0.9, open_low=True))
        if isinstance(self.minibatch, int) and not isinstance(self.minibatch, bool):
            object.__setattr__(self, "minibatch", count("minibatch", self.minibatch))
        else:
            object.__setattr__(self, "minibatch", number("minibatch", self.minibatch, low=0, high=1, open_low=True))

    @classmethod
    def of(cls, value: Any) -> Refine | None:
        """``refine=`` as given: ``False``/``None`` (no refinement), ``True``, a number of steps, or a ``Refine``."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(steps=value)
        raise TypeError(f"refine must be True, False, a number of steps or a tdnn.Refine, got {value!r}")


@dataclass(frozen=True)
class BlockRefinement:
    """What refining one block did: its relative output error ``‖y − t‖ / ‖t‖`` on the held-out
    samples before (the closed form) and after, the step whose weights were kept and the steps run."""

    block: str
    before: float
    after: float
    best_step: int
    steps: int


@dataclass
class _Unit:
    """Samples ``rows`` of cached batch ``batch``."""

    batch: int
    rows: torch.Tensor


def _split(sizes: list[int], holdout: float) -> tuple[list[_Unit], list[_Unit]]:
    """Per cached batch, the held-out rows and the training rows (a seeded draw over all samples)."""
    parts = split_rows(sizes, max(1, round(holdout * sum(sizes))), SEED)
    held, train = [_Unit(b, rows) for b, (rows, _) in enumerate(parts)], [_Unit(b, rows) for b, (_, rows) in enumerate(parts)]
    return [u for u in held if len(u.rows)], [u for u in train if len(u.rows)]


class _Block:
    """Runs one block on some rows of its cached batches (each batch's own arguments cut alike)."""

    def __init__(self, segment: Any, block: nn.Module, xs: list[torch.Tensor], targets: list[torch.Tensor],
                 masks: list[torch.Tensor | None]) -> None:
        self.segment, self.block, self.xs, self.targets, self.masks = segment, block, xs, targets, masks

    def error(self, unit: _Unit) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ (y − t)², Σ t²)`` over ``unit``'s rows (padding left out)."""
        b, rows = unit.batch, unit.rows
        n = batch_size(self.xs[b])

        def cut(value: Any) -> Any:
            return take_rows(value, rows, n)

        out = _tensor(self.segment.run(self.block, b, cut(self.xs[b]), cut))
        return square_sums(out, self.targets[b][rows], None if self.masks[b] is None else self.masks[b][rows])

    @torch.no_grad()
    def held_out(self, units: list[_Unit]) -> float:
        """The relative output error ``‖y − t‖ / ‖t‖`` over ``units``."""
        num = den = 0.0
        for unit in units:
            d, r = self.error(unit)
            num, den = num + float(d), den + float(r)
        return math.sqrt(num / max(den, 1e-300))


def _tensor(output: Any) -> torch.Tensor:
    return output_of(output)[0]


def _minibatches(units: list[_Unit], size: int, steps: int) -> list[_Unit]:
    """``steps`` minibatches of up to ``size`` rows of one cached batch each, drawn with a seed."""
    g = torch.Generator().manual_seed(SEED)
    out = []
    while len(out) < steps:
        for u in [units[i] for i in torch.randperm(len(units), generator=g).tolist()]:
            order = u.rows[torch.randperm(len(u.rows), generator=g)]
            out += [_Unit(u.batch, order[i:i + size]) for i in range(0, len(order), size)]
    return out[:steps]


def refine_block(name: str, segment: Any, block: nn.Module, xs: list[torch.Tensor], targets: list[torch.Tensor],
                 masks: list[torch.Tensor | None], settings: Refine) -> BlockRefinement | None:
    """Train ``block``'s factorized layers so that the block on ``xs`` gives ``targets`` (see the
    module docstring); ``None`` if it has no factorized layer.

    Args:
        name: the block's name (for the record).
        segment: the block's cached call arguments (:class:`tdnn.statistics.blockwise.Segment`).
        block: the block, its layers factorized.
        xs: per cached batch, the block's input in the compressed model.
        targets: per cached batch, the dense block's output on the dense model's input.
        masks: per cached batch, the tokens that count (``None``: all).
        settings: how to train.
    """
    params = [p for m in block.modules() if isinstance(m, Factorized) for p in m.parameters()]
    if not params:
        return None
    held, train = _split([batch_size(x) for x in xs], settings.holdout)
    if not train:
        return None
    runner = _Block(segment, block, xs, targets, masks)
    n_train = sum(len(u.rows) for u in train)
    size = settings.minibatch if isinstance(settings.minibatch, int) else max(1, round(settings.minibatch * n_train))
    flags = {p: p.requires_grad for p in block.parameters()}
    with temporary.modes({block: False}), torch.inference_mode(False), torch.enable_grad():
        try:
            for p in flags:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            return _train(name, runner, params, held, _minibatches(train, size, settings.steps), settings)
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)


def _train(name: str, runner: _Block, params: list[nn.Parameter], held: list[_Unit], batches: list[_Unit],
           settings: Refine) -> BlockRefinement:
    """Adam with a cosine decay to a tenth, the held-out error checked ``settings.checks`` times
    (and at step 0); the best weights restored at the end."""
    groups = [{"params": [p], "lr": settings.lr * float(p.detach().square().mean().sqrt().clamp_min(1e-12))}
              for p in params]
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    every = max(1, len(batches) // settings.checks)
    before = best = runner.held_out(held)
    kept, best_step, stale, step = [p.detach().clone() for p in params], 0, 0, 0
    for step, unit in enumerate(batches, 1):
        scale = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / len(batches)))
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * scale
        diff, ref = runner.error(unit)
        opt.zero_grad(set_to_none=True)
        (diff / ref.detach().clamp_min(1e-300)).backward()
        opt.step()
        if step % every and step != len(batches):
            continue
        error = runner.held_out(held)
        if error < best:
            best, best_step, stale, kept = error, step, 0, [p.detach().clone() for p in params]
        else:
            stale += 1
            if stale >= settings.patience:
                break
    with torch.no_grad():
        for p, value in zip(params, kept):
            p.copy_(value)
    if not all(torch.isfinite(p).all() for p in params):
        raise ValueError(f"{name}: refinement left non-finite factors")
    return BlockRefinement(name, before, best, best_step, step)
