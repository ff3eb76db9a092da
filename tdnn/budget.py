"""A global budget: ranks for all layers at once, meeting a total parameter or FLOP target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tdnn.cost import layer_cost
from tdnn.layers.base import Factorized
from tdnn.ranks import rank_levels

LEVELS = 128  # candidate ranks per layer; steps of <1% of a layer keep the total within 1%
TIMED_LEVELS = 8  # for a latency budget, ranks whose latency is measured per layer


@dataclass(frozen=True)
class Budget:
    """The fraction of the whole model's parameters or FLOPs to keep.

    Ranks are allocated across layers to meet the total while minimising the summed estimated cost
    of the layers' errors, so compressible layers give up more than sensitive ones; a layer may
    also stay dense. With calibration data a layer's error is the spectral energy its truncation
    discards from the whitened weight (its output error on the data), weighted by how much an
    error there costs at the model's output (:mod:`tdnn.sensitivity`: one backward pass per
    batch); without, the relative weight error.

    Args:
        params: fraction of the model's parameters to keep, in ``(0, 1]``.
        flops: fraction of the model's FLOPs to keep, in ``(0, 1]`` (needs calibration data,
            which fixes the input size).
        latency: fraction of the model's latency to keep, in ``(0, 1]``, measured on the current
            device at the first calibration batch's size (so calibrate with batches shaped as you
            will serve), for the model as deployed (:func:`tdnn.optimize_for_inference`). Ranks
            are allocated from each layer's latency dense and at a few ranks (in its faster memory
            layout, timed once per process and cached); then the whole deployed model is timed (a
            copy with random factors at those ranks, against the dense one) and the ranks are
            allocated again while it misses the target by more than 5% (at most 4 measurements).
        sensitivity: weigh each layer's output error by its measured effect on the model's output
            (with calibration data); ``False`` weighs every layer's relative error alike.

    Example:
        >>> import tdnn
        >>> tdnn.Budget(params=0.5)
        Budget(params=0.5, flops=None, latency=None, sensitivity=True)
    """

    params: float | None = None
    flops: float | None = None
    latency: float | None = None
    sensitivity: bool = True

    def __post_init__(self) -> None:
        given = [(k, v) for k, v in (("params", self.params), ("flops", self.flops), ("latency", self.latency))
                 if v is not None]
        if len(given) != 1:
            raise ValueError("Budget: give exactly one of params=, flops= or latency=")
        key, value = given[0]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0):
            raise ValueError(f"Budget: {key}={value!r} must be a fraction in (0, 1]")
        if not isinstance(self.sensitivity, bool):
            raise ValueError(f"Budget: sensitivity={self.sensitivity!r} must be true or false")

    @property
    def measure(self) -> str:
        return next(k for k in ("params", "flops", "latency") if getattr(self, k) is not None)

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.measure))


# A layer offered to the budget: the dense module, its factorized class, the spectra of its
# (whitened) unfoldings, its input shape (for FLOPs), and the weight of its relative error.
Offer = tuple[nn.Module, type[Factorized], list[torch.Tensor], "tuple[int, ...] | None", float]


def _options(offer: Offer, measure: str, multiple: int) -> list[tuple[int, float, Any]]:
    """``(cost, estimated error, rank)`` for a subsample of ranks, cheapest first; ``None`` = dense."""
    layer, cls, spectra, input_shape, weight = offer
    levels = rank_levels(cls, layer, multiple)
    step = max(1, len(levels) // LEVELS)
    picks = levels[::step] if levels[-1] in levels[::step] else [*levels[::step], levels[-1]]
    dense = layer_cost(measure, layer, input_shape=input_shape)
    costs = _latencies(layer, cls, picks, input_shape) if measure == "latency" else \
        [layer_cost(measure, layer, cls, rank, input_shape) for rank in picks]
    options = []
    for rank, cost in zip(picks, costs):
        if cost < dense:
            options.append((cost, weight * cls.estimate_error(spectra, rank), rank))
    options.append((dense, 0.0, None))
    return options


def _latencies(layer: nn.Module, cls: type[Factorized], picks: list[Any], input_shape: Any) -> list[float]:
    """Seconds per call at each of ``picks``: TIMED_LEVELS of them timed, the others interpolated."""
    timed = sorted({round(i * (len(picks) - 1) / (TIMED_LEVELS - 1)) for i in range(TIMED_LEVELS)})
    seconds = [layer_cost("latency", layer, cls, picks[i], input_shape) for i in timed]
    return [float(np.interp(i, timed, seconds)) for i in range(len(picks))]


def allocate(offers: list[Offer], budget: Budget, *, total: int, fixed: int, multiple: int = 1) -> list[Any]:
    """Choose a rank (or ``None`` for dense) per offered layer so that the model's total cost is
    ``budget.fraction × total`` within 1%, minimising the summed estimated error.

    Greedy by marginal error reduction per unit of cost, first over each layer's lower convex
    hull of (cost, error) (the Lagrangian solution), then over all options, then spending what
    is left on upgrades that cost more but err no more, so the total lands on the target.

    Args:
        offers: the layers to allocate, as ``(module, class, spectra, input shape, weight)``.
        budget: the target.
        total: the dense model's cost (parameters or FLOPs).
        fixed: the cost of everything that is not offered.
        multiple: ranks restricted as by :func:`tdnn.ranks.rank_levels`.

    Returns:
        The chosen ranks, in the order of ``offers``.

    Raises:
        ValueError: if even the smallest ranks exceed the target.
    """
    target = budget.fraction * total - fixed
    options = [_options(offer, budget.measure, multiple) for offer in offers]
    picks = [opts[0] for opts in options]
    spent = sum(p[0] for p in picks)
    if spent > target:
        raise ValueError(f"Budget({budget.measure}={budget.fraction}) is out of reach: the smallest ranks "
                         f"keep {(spent + fixed) / total:.3f} of the model's {budget.measure}")
    for pool in ([_lower_hull(opts) for opts in options], options):
        spent = _greedy(picks, pool, spent, target, strict=True)
    _greedy(picks, options, spent, target, strict=False)
    return [rank for _, _, rank in picks]


def _greedy(picks: list[tuple[int, float, Any]], pool: list[list[tuple[int, float, Any]]],
            spent: float, target: float, *, strict: bool) -> float:
    """Upgrade ``picks`` in place, best error drop per unit cost first, while the total fits
    (ties: the first layer, then its first option)."""
    owner = np.array([i for i, opts in enumerate(pool) for _ in opts], dtype=np.int64)
    cost = np.array([o[0] for opts in pool for o in opts], dtype=np.float64)
    err = np.array([o[1] for opts in pool for o in opts], dtype=np.float64)
    options = [o for opts in pool for o in opts]
    while len(options):
        cost0 = np.array([p[0] for p in picks], dtype=np.float64)[owner]
        err0 = np.array([p[1] for p in picks], dtype=np.float64)[owner]
        ok = (cost > cost0) & (err <= err0) & (spent + cost - cost0 <= target)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(ok, (err0 - err) / (cost - cost0), -np.inf)
        if strict:
            gain[gain <= 0] = -np.inf
        best = int(np.argmax(gain))
        if gain[best] == -np.inf:
            break
        i = int(owner[best])
        spent += options[best][0] - picks[i][0]
        picks[i] = options[best]
    return spent


def _lower_hull(options: list[tuple[int, float, object]]) -> list[tuple[int, float, object]]:
    """The options on the lower convex hull of (cost, error), cheapest first."""
    points = sorted(options, key=lambda o: (o[0], o[1]))
    hull: list[tuple[int, float, object]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more, errs no less
        while len(hull) >= 2:
            (c1, e1, _), (c2, e2, _) = hull[-2], hull[-1]
            # drop the middle point if it lies above the segment hull[-2] -> p
            if (e2 - e1) * (p[0] - c1) >= (p[1] - e1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull
