"""The allocation checked on held-out data: a budget's ranks are estimates made on the dense model
(Fisher weights, whitened spectra), and at heavy compression the errors of consecutive layers
interact, so several allocations at the same budget are tried and the measured one kept.

The candidates are the budget as given (``"sensitivity"``, or ``"flat"`` with
``Budget(sensitivity=False)``), the flat budget (every layer's relative error weighed alike) and
``"uniform"`` (every layer keeps the same fraction of its parameters, the largest that meets the
budget). Each is factorized one-shot from the same statistics (those of the survey, kept when they
fit, else one pass), swapped into the model in turn and judged by the relative error
``‖y − t‖ / ‖t‖`` of the model's output (logits, for a language model; padding left out) against
the dense model's on calibration samples that no statistic ever saw. The lowest error wins (the
first candidate on a tie). The compression then goes on at the winner's ranks with every
calibration sample, the held-out ones included (one-shot, sequential or refined, as asked): the
check costs a pass, not the statistics of the samples it held out. The candidates' factors exist
side by side until the winner is known (each candidate smaller than the layers it stands for).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tdnn.compress.budget import Budget, assign, uniform
from tdnn.compress.settings import CompressSettings
from tdnn.core import temporary
from tdnn.core.batches import batch_mask, batch_size, square_sums
from tdnn.layers import walk
from tdnn.layers.base import Factorized
from tdnn.planning.plan import LayerJob
from tdnn.planning.ranks import saves
from tdnn.statistics.blockwise import Runs
from tdnn.statistics.hooks import run
from tdnn.statistics.moments import InputStats
from tdnn.statistics.sensitivity import output_of

HOLD_OUT = 0.125  # of the calibration samples (at least one) held out of every statistic


@dataclass(frozen=True)
class Candidate:
    """An allocation: per job, in order, its rank (``None``: dense)."""

    name: str
    ranks: tuple[Any, ...]


@dataclass
class Choice:
    """What the check chose: the winner's ranks and the record for the plan (``held_out``,
    ``measured``, ``chosen``)."""

    ranks: list[Any]
    record: dict[str, Any]


def candidates(model: nn.Module, jobs: list[LayerJob], budget: Budget, *, batch: Any,
               fisher: dict[str, torch.Tensor] | None, multiple: int) -> list[Candidate]:
    """The allocations to compare at ``budget``: the budget itself, the flat one if the budget is
    sensitivity-aware, and uniform ranks (not for a latency budget)."""
    found = [Candidate(_given(budget), tuple(assign(model, jobs, budget, batch=batch, fisher=fisher, multiple=multiple)))]
    if budget.sensitivity:
        flat = assign(model, jobs, replace(budget, sensitivity=False), batch=batch, fisher=None, multiple=multiple)
        found.append(Candidate("flat", tuple(flat)))
    same = uniform(model, jobs, budget, batch=batch, multiple=multiple)
    if same is not None:
        found.append(Candidate("uniform", tuple(same)))
    return found


def _given(budget: Budget) -> str:
    """The name of the candidate that is the budget as given."""
    return "sensitivity" if budget.sensitivity else "flat"


class _Trial:
    """A :class:`~tdnn.statistics.blockwise.Replacer` that swaps nothing: it builds each layer's
    factorized form at every rank some candidate gives it, from the layer's one-shot statistics."""

    def __init__(self, model: nn.Module, jobs: list[LayerJob], found: list[Candidate], damping: float) -> None:
        self.model, self.jobs, self.damping = model, {j.name: j for j in jobs}, damping
        self.wanted: dict[str, set[Any]] = {j.name: set() for j in jobs}
        for candidate in found:
            for job, rank in zip(jobs, candidate.ranks):
                if rank is not None and saves(job.cls, job.module, rank):
                    self.wanted[job.name].add(rank)
        self.built: dict[tuple[str, Any], Factorized] = {}

    def replace(self, name: str, stats: InputStats) -> None:
        job, whitening = self.jobs[name], stats.whitening(self.damping)
        for rank in self.wanted[name]:
            self.built[name, rank] = job.cls.from_dense(job.module, rank, name=name, whitening=whitening)


@torch.no_grad()
def outputs(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    """The tensor ``model``'s output is judged by (:func:`~tdnn.statistics.sensitivity.output_of`) on
    each batch, in eval mode."""
    with temporary.modes({model: False}):
        return [output_of(run(model, b, i, "held-out calibration batch"))[0].detach() for i, b in enumerate(batches)]


def output_error(model: nn.Module, batches: list[Any], targets: list[torch.Tensor]) -> float:
    """``‖y − t‖ / ‖t‖`` over ``batches`` of ``model``'s outputs ``y`` against ``targets`` (padding
    left out)."""
    num = den = 0.0
    for batch, out, target in zip(batches, outputs(model, batches), targets):
        d, r = square_sums(out.to(target.dtype), target, batch_mask(batch))
        num, den = num + float(d), den + float(r)
    return math.sqrt(num / max(den, 1e-300))


def _measured(model: nn.Module, jobs: list[LayerJob], candidate: Candidate, built: dict[tuple[str, Any], Factorized],
              batches: list[Any], targets: list[torch.Tensor]) -> float:
    """The output error of ``model`` with ``candidate``'s layers swapped in (then swapped back out)."""
    forms = {j.module: built[j.name, r] for j, r in zip(jobs, candidate.ranks) if (j.name, r) in built}
    trial = walk.swap(model, {id(old): new for old, new in forms.items()})
    try:
        return output_error(trial, batches, targets)
    finally:
        walk.swap(trial, {id(new): old for old, new in forms.items()})


def check(model: nn.Module, jobs: list[LayerJob], runs: Runs, held_out: list[Any], settings: CompressSettings, *,
          batch: Any, fisher: dict[str, torch.Tensor] | None) -> Choice:
    """Compare the :func:`candidates` of ``settings.budget`` by their output error on ``held_out`` (see
    the module docstring); the winner's ranks and factorized layers, and what was measured.

    Args:
        model: the dense model (left dense: each candidate is swapped in and out again).
        jobs: the layers the budget allocates, surveyed (their spectra and input shapes known).
        runs: the calibration passes, whose statistics factorize the candidates (no held-out sample in them).
        held_out: the held-out batches.
        batch: the first calibration batch (the input size of FLOPs and latency).
        fisher: the sensitivity-aware budget's Fisher weights, or ``None``.
    """
    found = candidates(model, jobs, settings.budget, batch=batch, fisher=fisher, multiple=settings.rank_multiple)
    trial = _Trial(model, jobs, found, settings.damping)
    runs.compress(trial, sequential=False)
    targets = outputs(model, held_out)
    errors: dict[tuple[Any, ...], float] = {}
    for candidate in found:  # candidates with the same ranks are measured once
        if candidate.ranks not in errors:
            error = _measured(model, jobs, candidate, trial.built, held_out, targets)
            errors[candidate.ranks] = error if math.isfinite(error) else math.inf
    best = min(found, key=lambda c: errors[c.ranks])
    record = {"held_out": sum(batch_size(b) for b in held_out), "measured": {c.name: errors[c.ranks] for c in found},
              "chosen": best.name}
    return Choice(list(best.ranks), record)


def unchecked(budget: Budget) -> dict[str, Any]:
    """The record of a budget that could not be checked: one calibration sample, none to hold out."""
    return {"held_out": 0, "measured": {}, "chosen": _given(budget),
            "note": "a single calibration sample: none to hold out, the allocation was not checked"}
