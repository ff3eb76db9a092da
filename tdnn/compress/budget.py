"""The global budget: ranks for all layers at once, meeting the whole model's total parameters,
FLOPs or latency, while minimising the summed estimated cost of the layers' errors.

The decision has three parts, all here: what each layer's error costs (:func:`error_weight`,
sensitivity-aware with calibration data), the allocation over every layer's candidate ranks
(:func:`allocate`, greedy on the lower convex hulls), and for a latency budget the check on the whole
deployed model that corrects the allocation until it lands on the target (:func:`on_target`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from tdnn.core.checks import plain_number
from tdnn.core.timing import Clock, latencies
from tdnn.deploy.inference import optimize_for_inference
from tdnn.layers import walk
from tdnn.layers.base import Factorized
from tdnn.planning.cost import Measure, layer_cost, model_flops, timing_weights
from tdnn.planning.plan import LayerJob
from tdnn.planning.ranks import rank_for_ratio, rank_levels, saves

LEVELS = 128  # candidate ranks per layer; steps of <1% of a layer keep the total within 1%
TIMED_LEVELS = 8  # for a latency budget, ranks whose latency is measured per layer
LATENCY_ROUNDS = 4  # whole-model measurements a latency budget may take to land on its target
LATENCY_TOLERANCE = 0.05
UNIFORM_STEPS = 24  # bisection steps of the uniform fraction: within 1e-7 of the largest that fits


@dataclass(frozen=True)
class Budget:
    """The fraction of the whole model's parameters, FLOPs or latency to keep.

    Ranks are allocated across layers to meet the total while minimising the summed estimated cost
    of the layers' errors, so compressible layers give up more than sensitive ones; a layer may
    also stay dense. With calibration data a layer's error is the spectral energy its truncation
    discards from the whitened weight (its output error on the data), weighted by how much an
    error there costs at the model's output (:mod:`tdnn.statistics.sensitivity`: one backward pass
    per sample); without, the relative weight error.

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
        timer: the clock a latency budget times with (:func:`tdnn.core.timing.latencies`, the
            wall clock, by default): ``(models, batch, *, warmup, repeats) -> {name: seconds}``.

    Example:
        >>> import tdnn
        >>> tdnn.Budget(params=0.5)
        Budget(params=0.5, flops=None, latency=None, sensitivity=True)
    """

    params: float | None = None
    flops: float | None = None
    latency: float | None = None
    sensitivity: bool = True
    timer: Clock | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        given = [(m.value, getattr(self, m.value)) for m in Measure if getattr(self, m.value) is not None]
        if len(given) != 1:
            raise ValueError("Budget: give exactly one of params=, flops= or latency=")
        key, value = given[0]
        plain = plain_number(value)
        if plain is None or not (0.0 < plain <= 1.0):
            raise ValueError(f"Budget: {key}={value!r} must be a fraction in (0, 1]")
        object.__setattr__(self, key, float(plain))  # frozen: a numpy scalar made plain, once, here
        if not isinstance(self.sensitivity, bool):
            raise ValueError(f"Budget: sensitivity={self.sensitivity!r} must be true or false")
        if self.timer is not None and not callable(self.timer):
            raise TypeError(f"Budget: timer must be a clock (models, batch, ...) -> seconds, got {self.timer!r}")

    @property
    def measure(self) -> Measure:
        return next(m for m in Measure if getattr(self, m.value) is not None)

    @property
    def fraction(self) -> float:
        return float(getattr(self, self.measure.value))

    @property
    def clock(self) -> Clock:
        return self.timer or latencies

    def to_dict(self) -> dict[str, Any]:
        """``{measure: fraction, "sensitivity": ...}`` (a timer by its qualified name)."""
        out: dict[str, Any] = {self.measure.value: self.fraction, "sensitivity": self.sensitivity}
        if self.timer is not None:
            out["timer"] = {"callable": f"{self.timer.__module__}.{getattr(self.timer, '__qualname__', '')}"}
        return out


@dataclass(frozen=True)
class Offer:
    """A layer offered to the budget: the dense module, its factorized class, the spectra of its
    (whitened) unfoldings, its input shape (for FLOPs and latency), and the weight of its relative error."""

    layer: nn.Module
    cls: type[Factorized]
    spectra: list[torch.Tensor]
    input_shape: tuple[int, ...] | None
    weight: float


def error_weight(fisher: torch.Tensor, job: LayerJob) -> float:
    """The cost of a layer's relative error: its Fisher weight per channel (divided by a following
    BatchNorm's squared scale, which the whitened error already carries) times its whitened energy."""
    scale = job.out_scale.clamp_min(1e-6 * float(job.out_scale.max())) if job.out_scale is not None else None
    per_channel = fisher if scale is None else fisher / scale.square()
    return float(per_channel.mean()) * float(job.spectra[0].square().sum())


def assign(model: nn.Module, jobs: list[LayerJob], budget: Budget, *, batch: Any, fisher: dict[str, torch.Tensor] | None,
           multiple: int) -> list[Any]:
    """The budget's rank (``None``: dense) for each job of ``model``, in order.

    Args:
        batch: the first calibration batch (input sizes of FLOPs and latency), or ``None`` without data.
        fisher: per layer, Fisher weights per output channel (sensitivity-aware), or ``None``.
        multiple: ranks restricted as by :func:`tdnn.planning.ranks.rank_levels`.
    """
    measure, clock = budget.measure, budget.clock
    weights = {j.name: 1.0 if fisher is None else error_weight(fisher[j.name], j) for j in jobs}
    offers = [Offer(j.module, j.cls, j.spectra if j.spectra is not None else j.cls.spectra(j.module, name=j.name),
                    j.input_shape, weights[j.name]) for j in jobs]
    offered = sum(layer_cost(measure, o.layer, input_shape=o.input_shape, clock=clock) for o in offers)
    deployed = None  # the dense model as deployed, for a latency budget
    if measure is not Measure.LATENCY:
        total = whole_cost(model, measure, batch)
    else:  # the whole model's latency as deployed (BatchNorm folded, faster layouts): at least its layers
        deployed = optimize_for_inference(model, batch, timer=clock)
        total = max(clock({"model": deployed}, batch, warmup=1, repeats=5)["model"], offered)

    def at(fraction: float) -> list[Any]:
        return allocate(offers, replace(budget, **{measure.value: fraction}), total=total, fixed=total - offered,
                        multiple=multiple)

    ranks = at(budget.fraction)
    if deployed is not None:
        trial = _Trial(model, deployed, jobs, batch, clock)
        ranks = on_target(trial, ranks, at, budget.fraction)
    return ranks


def whole_cost(model: nn.Module, measure: Measure, batch: Any) -> float:
    """The dense model's parameters, or its FLOPs on ``batch``."""
    return sum(p.numel() for p in model.parameters()) if measure is Measure.PARAMS else model_flops(model, batch)


def uniform(model: nn.Module, jobs: list[LayerJob], budget: Budget, *, batch: Any, multiple: int) -> list[Any] | None:
    """Ranks keeping the same fraction of every job's parameters (:func:`tdnn.planning.ranks.rank_for_ratio`;
    ``None``: dense where that saves none), the largest fraction at which the whole model meets a
    parameter or FLOP ``budget``; ``None`` for a latency budget, or if even the smallest ranks miss it."""
    measure = budget.measure
    if measure is Measure.LATENCY:
        return None
    total = whole_cost(model, measure, batch)
    dense = [layer_cost(measure, j.module, input_shape=j.input_shape) for j in jobs]
    target = budget.fraction * total - (total - sum(dense))

    def at(fraction: float) -> tuple[list[Any], float]:
        ranks = [rank_for_ratio(j.cls, j.module, fraction, multiple) for j in jobs]
        ranks = [r if saves(j.cls, j.module, r) else None for j, r in zip(jobs, ranks)]
        return ranks, sum(d if r is None else layer_cost(measure, j.module, j.cls, r, j.input_shape)
                          for j, r, d in zip(jobs, ranks, dense))

    low, high = 0.0, 1.0
    for _ in range(UNIFORM_STEPS):  # the cost grows with the fraction: bisect
        middle = (low + high) / 2
        low, high = (middle, high) if at(middle)[1] <= target else (low, middle)
    ranks, spent = at(low)
    return ranks if spent <= target else None


@dataclass
class _Trial:
    """Times ``model`` with the factorized forms at given ranks, deployed, against the dense one."""

    model: nn.Module
    deployed: nn.Module
    jobs: list[LayerJob]
    batch: Any
    clock: Clock

    def ratio(self, ranks: Sequence[Any]) -> float:
        """Latency of the model at ``ranks`` (random factors: the time does not depend on them),
        deployed, over that of the dense deployed model — timed interleaved."""
        trial = copy.deepcopy(self.model)
        modules = dict(trial.named_modules())
        g = torch.Generator().manual_seed(0)
        forms = {id(modules[j.name]): timing_weights(j.cls.structure(modules[j.name], rank, name=j.name), g)
                 for j, rank in zip(self.jobs, ranks) if rank is not None}
        trial = optimize_for_inference(walk.swap(trial, forms), self.batch, inplace=True, timer=self.clock)
        times = self.clock({"dense": self.deployed, "small": trial}, self.batch, warmup=1, repeats=5)
        return max(times["small"] / max(times["dense"], 1e-12), 1e-12)


def on_target(trial: _Trial, ranks: list[Any], allocate_at: Callable[[float], list[Any]], target: float) -> list[Any]:
    """A latency budget's ranks, checked on the whole deployed model: layers timed alone do not add
    up to the model's time exactly (layout changes, caches, overheads), so while the measured ratio
    misses ``target`` by more than 5%, the ranks are allocated again at a corrected target — scaled
    by the miss, or interpolated between measurements on either side of it — at most
    :data:`LATENCY_ROUNDS` measurements; the closest ranks not slower than the target (with the
    tolerance) win, else the closest."""
    tried = []  # (allocation target, measured ratio, ranks)
    fraction = target
    for round_ in range(LATENCY_ROUNDS):
        tried.append((fraction, trial.ratio(ranks), ranks))
        below = [t for t in tried if t[1] <= target]
        above = [t for t in tried if t[1] > target]
        if abs(tried[-1][1] / target - 1) <= LATENCY_TOLERANCE or round_ == LATENCY_ROUNDS - 1:
            break
        if below and above:  # interpolate between the nearest measurements either side
            (f0, r0, _), (f1, r1, _) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
            fraction = f0 + (target - r0) * (f1 - f0) / (r1 - r0)
        else:
            fraction = min(1.0, fraction * target / tried[-1][1])
        try:
            ranks = allocate_at(fraction)
        except ValueError:  # out of reach at the corrected target: keep what was measured
            break
    within = [t for t in tried if t[1] <= target * (1 + LATENCY_TOLERANCE)]  # a budget: not slower
    return min(within or tried, key=lambda t: abs(t[1] / target - 1))[2]


def _options(offer: Offer, measure: Measure, multiple: int, clock: Clock) -> list[tuple[float, float, Any]]:
    """``(cost, estimated error, rank)`` for a subsample of ranks, cheapest first; ``None`` = dense."""
    layer, cls, spectra, input_shape, weight = offer.layer, offer.cls, offer.spectra, offer.input_shape, offer.weight
    levels = rank_levels(cls, layer, multiple)
    step = max(1, len(levels) // LEVELS)
    picks = levels[::step] if levels[-1] in levels[::step] else [*levels[::step], levels[-1]]
    dense = layer_cost(measure, layer, input_shape=input_shape, clock=clock)
    costs = _latencies(layer, cls, picks, input_shape, clock) if measure is Measure.LATENCY else \
        [layer_cost(measure, layer, cls, rank, input_shape) for rank in picks]
    options = []
    for rank, cost in zip(picks, costs):
        if cost < dense:
            options.append((cost, weight * cls.estimate_error(spectra, rank), rank))
    options.append((dense, 0.0, None))
    return options


def _latencies(layer: nn.Module, cls: type[Factorized], picks: list[Any], input_shape: Any,
               clock: Clock) -> list[float]:
    """Seconds per call at each of ``picks``: TIMED_LEVELS of them timed, the others interpolated."""
    timed = sorted({round(i * (len(picks) - 1) / (TIMED_LEVELS - 1)) for i in range(TIMED_LEVELS)})
    seconds = [layer_cost(Measure.LATENCY, layer, cls, picks[i], input_shape, clock=clock) for i in timed]
    return [float(np.interp(i, timed, seconds)) for i in range(len(picks))]


def allocate(offers: list[Offer], budget: Budget, *, total: float, fixed: float, multiple: int = 1) -> list[Any]:
    """Choose a rank (or ``None`` for dense) per offered layer so that the model's total cost is
    ``budget.fraction × total`` within 1%, minimising the summed estimated error.

    Greedy by marginal error reduction per unit of cost, first over each layer's lower convex
    hull of (cost, error) (the Lagrangian solution), then over all options, then spending what
    is left on upgrades that cost more but err no more, so the total lands on the target.

    Args:
        offers: the layers to allocate.
        budget: the target (and, for latency, the clock).
        total: the dense model's cost (parameters, FLOPs or seconds).
        fixed: the cost of everything that is not offered.
        multiple: ranks restricted as by :func:`tdnn.planning.ranks.rank_levels`.

    Returns:
        The chosen ranks, in the order of ``offers``.

    Raises:
        ValueError: if even the smallest ranks exceed the target.
    """
    target = budget.fraction * total - fixed
    options = [_options(offer, budget.measure, multiple, budget.clock) for offer in offers]
    picks = [opts[0] for opts in options]
    spent = sum(p[0] for p in picks)
    if spent > target:
        raise ValueError(f"Budget({budget.measure.value}={budget.fraction}) is out of reach: the smallest ranks "
                         f"keep {(spent + fixed) / total:.3f} of the model's {budget.measure.value}")
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
