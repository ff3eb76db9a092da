"""``sweep``: compress at a series of budgets, measure each model, and mark the Pareto front.

Also how close a compressed model stays to its original: the whole output (the sweep's default
metric) and each factorized layer's output (:func:`layer_errors`, for :meth:`tdnn.Report.plot`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn.analysis.report import format_table
from tdnn.compress import Budget, CompressSettings, compress_model
from tdnn.compress.settings import FilterFn
from tdnn.core import temporary
from tdnn.core.batches import batch_mask, call
from tdnn.core.checks import plain_number
from tdnn.core.timing import latencies
from tdnn.layers import registry, walk
from tdnn.layers.base import Factorized
from tdnn.planning.cost import Measure, model_flops
from tdnn.planning.ranks import NO_ENTRY, RankRule
from tdnn.statistics.calibration import Calibration
from tdnn.statistics.hooks import run
from tdnn.statistics.sensitivity import output_of

MODES = ("plain", "data-aware", "sequential")
MEASURES = (Measure.PARAMS.value, Measure.FLOPS.value)
COSTS = tuple(m.value for m in Measure)
# settings of compress_model that the sweep sets itself
_OWN = frozenset({"ranks", "budget", "method", "sequential"})
Evaluate = Callable[[nn.Module], float]


@dataclass(frozen=True)
class SweepPoint:
    """One model of a :class:`Sweep`: the original (``mode="original"``) or a compressed one.

    Attributes:
        mode: ``"original"``, ``"plain"`` (no calibration data), ``"data-aware"`` or ``"sequential"``.
        method: the ``method`` given to :func:`tdnn.compress_model` (``None`` for the original).
        target: the budget's fraction of parameters or FLOPs (``None`` for the original).
        params, param_ratio: parameters, and their fraction of the original's.
        flops, flop_ratio: FLOPs of one forward on the sweep's first input batch (``None`` without one).
        latency, latency_ratio: median seconds per forward on that batch (``None`` if not timed),
            and the ratio to the original timed alongside (interleaved).
        metric: what ``evaluate`` returned (or the fidelity to the original).
        seconds: wall time of the compression (0 for the original).
        pareto: on the Pareto front of cost (the sweep's measure) against metric.
    """

    mode: str
    method: str | None
    target: float | None
    params: int
    param_ratio: float
    flops: int | None
    flop_ratio: float | None
    latency: float | None
    latency_ratio: float | None
    metric: float
    seconds: float = 0.0
    pareto: bool = False

    @property
    def label(self) -> str:
        """The mode, and the method unless ``"auto"``: ``"original"``, ``"plain"``, ``"data-aware tucker2"``."""
        return self.mode if self.method in (None, "auto") else f"{self.mode} {self.method}"

    def cost(self, cost: str) -> float | None:
        """The ratio to the original by ``"params"``, ``"flops"`` or ``"latency"``."""
        return {"params": self.param_ratio, "flops": self.flop_ratio, "latency": self.latency_ratio}[cost]


def pareto_mask(costs: Sequence[float], values: Sequence[float], *, maximize: bool = True) -> list[bool]:
    """Whether each point is Pareto-optimal: no other point costs no more and scores no worse,
    and strictly better in one of the two. Points with a NaN cost or value are never optimal.

    Example:
        >>> pareto_mask([1, 2, 3, 4], [0.5, 0.9, 0.8, 0.95])
        [True, True, False, True]
        >>> pareto_mask([1, 2], [3.0, 2.0], maximize=False)
        [True, True]
    """
    sign = 1.0 if maximize else -1.0
    points = [(float(c), sign * float(v)) for c, v in zip(costs, values)]
    valid = [not (math.isnan(c) or math.isnan(v)) for c, v in points]

    def dominated(c: float, v: float) -> bool:
        return any(ok and c2 <= c and v2 >= v and (c2 < c or v2 > v) for ok, (c2, v2) in zip(valid, points))

    return [ok and not dominated(c, v) for ok, (c, v) in zip(valid, points)]


@dataclass(frozen=True)
class Sweep:
    """What :func:`sweep` measured: one :class:`SweepPoint` per model, the original first.

    The rows are marked (``pareto``) when the sweep is made; ``str(sweep)`` is a table (``*``
    marks the Pareto front), :meth:`plot` draws it and :meth:`cheapest` picks the smallest model
    that reaches a metric.

    Example:
        >>> import pathlib, tempfile
        >>> rows = [SweepPoint("original", None, None, 100, 1.0, None, None, None, None, 0.95)]
        >>> rows += [SweepPoint("data-aware", "auto", t, int(100 * t), t, None, None, None, None, m)
        ...          for t, m in ((0.2, 0.90), (0.5, 0.96), (0.7, 0.96))]
        >>> result = Sweep(tuple(rows), "top-1")
        >>> [r.target for r in result.pareto], result.cheapest(0.95).target
        ([0.2, 0.5], 0.5)
        >>> figure = result.plot(pathlib.Path(tempfile.mkdtemp()) / "sweep.svg")
        >>> [line.get_label() for line in figure.axes[0].get_lines()]
        ['data-aware', 'original', 'Pareto front']
    """

    rows: tuple[SweepPoint, ...]
    metric: str = "metric"
    maximize: bool = True
    measure: str = "params"

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise ValueError(f"measure={self.measure!r}: choose one of {', '.join(MEASURES)}")
        costs = [math.nan if r.cost(self.measure) is None else r.cost(self.measure) for r in self.rows]
        mask = pareto_mask(costs, [r.metric for r in self.rows], maximize=self.maximize)
        marked = [r if r.pareto == m else SweepPoint(**{**asdict(r), "pareto": m}) for r, m in zip(self.rows, mask)]
        object.__setattr__(self, "rows", tuple(marked))  # frozen: set once, here

    @property
    def pareto(self) -> tuple[SweepPoint, ...]:
        """The rows on the Pareto front of the sweep's measure against the metric, cheapest first."""
        return tuple(sorted((r for r in self.rows if r.pareto), key=lambda r: r.cost(self.measure)))

    @property
    def original(self) -> SweepPoint:
        return next(r for r in self.rows if r.mode == "original")

    def front(self, cost: str = "params") -> tuple[SweepPoint, ...]:
        """The Pareto front by ``cost`` (``"params"``, ``"flops"`` or ``"latency"``), cheapest first."""
        if cost not in COSTS:
            raise ValueError(f"cost={cost!r}: choose one of {', '.join(COSTS)}")
        rows = [r for r in self.rows if r.cost(cost) is not None]
        if not rows:
            raise ValueError(f"cost={cost!r}: the sweep did not measure it")
        mask = pareto_mask([r.cost(cost) for r in rows], [r.metric for r in rows], maximize=self.maximize)
        return tuple(sorted((r for r, m in zip(rows, mask) if m), key=lambda r: r.cost(cost)))

    def cheapest(self, reaching: float) -> SweepPoint | None:
        """The smallest model (by the sweep's measure) whose metric reaches ``reaching``, or ``None``."""
        good = [r for r in self.rows if (r.metric >= reaching if self.maximize else r.metric <= reaching)]
        return min(good, key=lambda r: r.cost(self.measure), default=None)

    def to_dict(self) -> dict[str, Any]:
        """The sweep as plain data (for JSON): its settings and every row with its label."""
        return {"metric": self.metric, "maximize": self.maximize, "measure": self.measure,
                "rows": [{**asdict(r), "label": r.label} for r in self.rows]}

    def plot(self, path: str | Path, *, title: str | None = None, dpi: int = 100) -> Any:
        """Draw the metric against parameters (and against latency, or FLOPs) with the original
        marked and the Pareto front drawn, into a ``.png``, ``.svg`` or ``.pdf`` file. Needs
        matplotlib (``pip install "tdnn[plot]"``). Returns the matplotlib ``Figure``."""
        from tdnn.analysis.plot import plot_sweep

        return plot_sweep(self, path, title=title, dpi=dpi)

    def __str__(self) -> str:
        head = ["model", "target", "params", "x", "MFLOPs/batch", "x", "ms/batch", "x", self.metric,
                "compress s", "pareto"]
        rows = [[r.label, "-" if r.target is None else f"{r.target:g}", f"{r.params:,}", f"{r.param_ratio:.3f}",
                 _num(r.flops, 1e-6), _num(r.flop_ratio, 1, ".3f"), _num(r.latency, 1e3),
                 _num(r.latency_ratio, 1, ".3f"), f"{r.metric:.4f}", f"{r.seconds:.1f}", "*" if r.pareto else ""]
                for r in self.rows]
        return format_table(head, rows, right=set(range(1, 10)))


def _num(value: float | None, scale: float, spec: str | None = None) -> str:
    """``value × scale`` by ``spec``; without one, to one decimal from 10 on, else 3 significant digits."""
    if value is None:
        return "-"
    value *= scale
    return format(value, spec or (",.1f" if abs(value) >= 10 else ".3g"))


@dataclass
class _Fidelity:
    """Closeness to the original's outputs on fixed batches: top-1 agreement for logits (a 2-D
    output or ``.logits``; per token, padding left out), else the mean cosine per sample."""

    model: nn.Module
    batches: list[Any]
    reference: list[torch.Tensor] = field(default_factory=list)
    logits: bool = False

    def __post_init__(self) -> None:
        outputs = [self._outputs(self.model, b, i) for i, b in enumerate(self.batches)]
        self.reference = [z for z, _ in outputs]
        self.logits = outputs[0][1]

    @property
    def name(self) -> str:
        return "top-1 agreement" if self.logits else "cosine to original"

    @staticmethod
    @torch.no_grad()
    def _outputs(model: nn.Module, batch: Any, index: int) -> tuple[torch.Tensor, bool]:
        with temporary.modes({model: False}):
            z, logits = output_of(run(model, batch, index, "inputs batch"))
        return z.detach().float(), logits

    def __call__(self, model: nn.Module) -> float:
        hits = total = 0.0
        for i, (batch, ref) in enumerate(zip(self.batches, self.reference)):
            z = self._outputs(model, batch, i)[0]
            if self.logits:
                same = (z.argmax(-1) == ref.argmax(-1)).float()
                mask = batch_mask(batch)
                if mask is not None and tuple(mask.shape) == tuple(same.shape):
                    same = same[mask]
            else:
                same = torch.cosine_similarity(z.reshape(len(z), -1), ref.reshape(len(ref), -1), dim=1)
            hits, total = hits + float(same.sum()), total + same.numel()
        return hits / max(total, 1)


@dataclass
class _Run:
    """What every point of one sweep shares."""

    original: nn.Module
    evaluate: Evaluate
    measure: str
    calibration: Calibration | None  # kept statistics, shared by every method and budget
    probe: Any  # the batch FLOPs and latency are measured on, or None
    timed: bool
    options: dict[str, Any]
    params: int = 0
    flops: int | None = None
    dense_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.params = sum(p.numel() for p in self.original.parameters())
        self.flops = self.count_flops(self.original)

    def count_flops(self, model: nn.Module) -> int | None:
        """FLOPs on the probe batch, in eval mode (a forward in train mode would move BatchNorm statistics)."""
        if self.probe is None:
            return None
        with temporary.modes({model: False}):
            return model_flops(model, self.probe)

    def compress(self, mode: str, method: str, target: float) -> tuple[nn.Module, float]:
        start = time.perf_counter()
        small = compress_model(self.original, budget=Budget(**{self.measure: target}), method=method,
                               calibration=None if mode == "plain" else self.calibration,
                               sequential=mode == "sequential", **self.options)
        return small, time.perf_counter() - start

    def point(self, model: nn.Module, mode: str, method: str | None, target: float | None,
              seconds: float) -> SweepPoint:
        params = sum(p.numel() for p in model.parameters())
        flops = self.count_flops(model)
        latency = ratio = None
        if self.timed and model is not self.original:
            with temporary.modes({self.original: False, model: False}):
                times = latencies({"original": self.original, "compressed": model}, self.probe)
            self.dense_times.append(times["original"])
            latency, ratio = times["compressed"], times["compressed"] / max(times["original"], 1e-12)
        return SweepPoint(mode, method, target, params, params / self.params, flops,
                          None if flops is None else flops / max(self.flops, 1), latency, ratio,
                          _metric(self.evaluate(model)), seconds)

    def original_point(self, metric: float) -> SweepPoint:
        latency = statistics.median(self.dense_times) if self.dense_times else None
        return SweepPoint("original", None, None, self.params, 1.0, self.flops, None if self.flops is None else 1.0,
                          latency, None if latency is None else 1.0, metric)


def _metric(value: Any) -> float:
    plain = plain_number(value)
    if plain is None:
        raise TypeError(f"evaluate must return a number, got {type(value).__name__} {value!r}")
    return float(plain)


def _names(value: Sequence[str] | str) -> tuple[str, ...]:
    """Method or mode names: a single name is one name, not its characters."""
    return (value,) if isinstance(value, str) else tuple(value)


def _targets(targets: Any) -> tuple[float, ...]:
    """The budget fractions, from any iterable of numbers (a list, a tuple, a numpy array)."""
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise ValueError(f"targets must be a non-empty sequence of fractions in (0, 1], got {targets!r}")
    values = [plain_number(t) for t in targets]
    if not values:
        raise ValueError(f"targets must be a non-empty sequence of fractions in (0, 1], got {targets!r}")
    for t, value in zip(targets, values):
        if value is None or not 0 < value <= 1:
            raise ValueError(f"targets: {t!r} is not a fraction in (0, 1]")
    return tuple(float(v) for v in values)


def _batches(value: Any, name: str) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, Mapping)):
        raise TypeError(f"{name} must be an iterable of batches, got a single {type(value).__name__}; "
                        f"for one batch x pass {name}=[x]")
    batches = list(value)
    if not batches:
        raise ValueError(f"{name}: no batches given")
    return batches


def _check(measure: str, methods: Sequence[str], modes: Sequence[str], has_data: bool,
           options: Mapping[str, Any]) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r}: choose one of {', '.join(MEASURES)}")
    for method in methods:
        registry.check_method(method, "methods")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode != "plain" and not has_data:
            raise ValueError(f"modes: {mode!r} needs calibration data (calibration=...)")
    if Measure(measure) is Measure.FLOPS and (not has_data or "plain" in modes):
        raise ValueError("measure='flops' needs calibration data in every mode (FLOPs depend on the input "
                         "size), and mode 'plain' has none: use measure='params' or drop 'plain'")
    known = {f.name for f in dataclasses.fields(CompressSettings)} - _OWN
    for key in options:
        if key not in known:
            raise TypeError(f"sweep got an unexpected option {key!r}; it passes on these options of "
                            f"compress_model: {', '.join(sorted(known))}")


def sweep(model: nn.Module, evaluate: Evaluate | None = None, *, targets: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7),
          measure: str = "params", calibration: Iterable[Any] | None = None, methods: Sequence[str] = ("auto",),
          modes: Sequence[str] | None = None, inputs: Iterable[Any] | None = None, latency: bool = True,
          metric: str | None = None, maximize: bool = True, progress: bool = False, **options: Any) -> Sweep:
    """Compress ``model`` at a series of budgets, measure every result, and mark the Pareto front.

    Each point is ``compress_model(model, budget=Budget(<measure>=target), method=..., ...)`` for
    every mode, method and target. One-shot data-aware statistics and the budget's sensitivities
    are collected once and reused (:class:`tdnn.Calibration`): a sweep over six budgets costs one
    calibration pass (plus one for the sensitivities), then only decompositions and evaluations.
    Sequential mode fits each layer behind the compressed ones, so each of its points runs its own
    passes; an SVD and a Tucker-2/CP sweep read conv inputs differently and collect once each.

    Args:
        model: the trained model (left untouched).
        evaluate: ``model -> number``, e.g. test accuracy, called on the original and each
            compressed model as :func:`tdnn.compress_model` returns it. ``None``: the fidelity to
            the original on ``inputs`` — top-1 agreement when the output is logits (a 2-D tensor or
            ``.logits``; per token, padding left out) else the mean cosine between each sample's
            outputs (e.g. ``last_hidden_state``).
        targets: the fractions of the original's parameters (or FLOPs) to keep, each in ``(0, 1]``.
        measure: ``"params"`` or ``"flops"`` (needs calibration data).
        calibration: batches for data-aware compression, as for :func:`tdnn.compress_model`, or
            a :class:`tdnn.Calibration` (keep it to compress the chosen point later at no pass).
        methods: methods to compare (``"auto"``, ``"svd"``, ``"tucker2"``, ``"cp"``, ...).
        modes: any of ``"plain"`` (no calibration data), ``"data-aware"`` and ``"sequential"``;
            default: data-aware with calibration data, else plain.
        inputs: batches for the fidelity, FLOP count and latency (the first batch); default: the
            calibration batches (give held-out ones for an unbiased fidelity).
        latency: time each model against the original on the first input batch (interleaved, eval mode).
        metric: a name for the metric (default: ``evaluate``'s name, or the fidelity's).
        maximize: whether a higher metric is better (``False`` for a loss or a perplexity).
        progress: show a progress bar.
        **options: further options of :func:`tdnn.compress_model` (``filter_fn``, ``rank_multiple``,
            ``damping``, ``blocks``, ``latency_aware``).

    Returns:
        A :class:`Sweep` with the original first, then the points in the order mode, method, target.

    Raises:
        ValueError: for bad targets, measure, methods or modes, or data missing for what is asked.
        TypeError: for an unknown option, or ``evaluate`` returning something else than a number.

    Example:
        >>> import torch, tdnn
        >>> torch.manual_seed(0) and None
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> data = [torch.randn(64, 32)]
        >>> result = tdnn.sweep(net, targets=(0.3, 0.6), calibration=data, latency=False)
        >>> [(r.mode, r.target) for r in result.rows]
        [('original', None), ('data-aware', 0.3), ('data-aware', 0.6)]
        >>> result.metric, result.rows[0].metric, result.rows[-1].pareto
        ('top-1 agreement', 1.0, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be a callable model -> number, got {type(evaluate).__name__}")
    calibration = _batches(calibration, "calibration") if not isinstance(calibration, Calibration) else calibration
    modes = _names(modes) if modes is not None else ("data-aware",) if calibration is not None else ("plain",)
    targets, methods = _targets(targets), _names(methods)
    _check(measure, methods, modes, calibration is not None, options)
    inputs = _batches(inputs, "inputs") or (list(calibration) if calibration is not None else None)
    if inputs is None and (evaluate is None or latency):
        raise ValueError("give inputs= (or calibration=): batches to measure fidelity and latency on; or pass "
                         "evaluate= and latency=False")
    judge = evaluate if evaluate is not None else _Fidelity(model, inputs)
    if calibration is not None and not (isinstance(calibration, Calibration) and calibration.keep):
        calibration = Calibration(calibration)
    run = _Run(model, judge, measure, calibration, None if inputs is None else inputs[0], latency, options)
    plan = [(mode, method, t) for mode in modes for method in methods for t in targets]
    points = []
    for mode, method, target in tqdm(plan, desc="sweep", disable=not progress):
        small, seconds = run.compress(mode, method, target)
        points.append(run.point(small, mode, method, target, seconds))
        del small
    name = metric or (judge.name if isinstance(judge, _Fidelity) else _name(evaluate))
    return Sweep((run.original_point(_metric(judge(model))), *points), name, maximize, measure)


def _name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", "")
    return name if name and name != "<lambda>" else "metric"


def ranks_filter(ranks: Any) -> FilterFn:
    """A ``filter_fn`` choosing the layers a ``ranks`` spec compresses (those it maps to a rank,
    not ``None``), so a budget compresses the same layers as a config's ranks.

    Example:
        >>> import torch
        >>> keep = ranks_filter({"fc": None, "re:.*": 0.5})
        >>> keep(torch.nn.Linear(2, 2), "fc"), keep(torch.nn.Linear(2, 2), "body.0")
        (False, True)
    """
    rule = RankRule(ranks)

    def chosen(module: nn.Module, name: str) -> bool:
        spec = rule(name, module)
        return spec is not NO_ENTRY and spec.rank is not None

    return chosen


@torch.no_grad()
def layer_errors(original: nn.Module, compressed: nn.Module, inputs: Iterable[Any]) -> dict[str, float]:
    """Each factorized layer's relative output error ``‖y − y'‖ / ‖y‖`` on ``inputs``, measured
    where it sits: ``y'`` is its output in ``compressed``, ``y`` what the same-named dense layer of
    ``original`` computes from that very input (errors of the layers before it left out). Both
    models run in eval mode. For :meth:`tdnn.Report.plot` (``errors=``).

    Args:
        original: the dense model ``compressed`` was made from.
        compressed: a model from :func:`tdnn.compress_model`.
        inputs: batches (tensors, tuples of arguments or dicts of keyword arguments).

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> small = tdnn.compress_model(net, ranks={"0": 8})
        >>> errors = tdnn.layer_errors(net, small, [torch.randn(8, 32)])
        >>> list(errors), 0 < errors["0"] < 1
        (['0'], True)
    """
    layers = {n: m for n, m, _ in walk.named_layers(compressed, lambda m: isinstance(m, Factorized))}
    dense = dict(original.named_modules())
    for name, module in layers.items():
        twin = dense.get(name)
        kind = registry.kind_of(twin) if twin is not None else None
        if kind is None or kind.name != module.kind.name or kind.dense_kwargs(twin) != module.dense_kwargs:
            raise ValueError(f"layer_errors: {name}: the original has no {module.kind.name}"
                             f"({', '.join(f'{k}={v}' for k, v in module.dense_kwargs.items())}) there; pass the "
                             f"dense model {type(compressed).__name__} was compressed from")
    sums = {n: [0.0, 0.0] for n in layers}

    def hook(name: str) -> Callable[..., None]:
        def measure(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            y = original.get_submodule(name)(*args).double()
            sums[name][0] += float((y - output.double()).square().sum())
            sums[name][1] += float(y.square().sum())
        return measure

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    with temporary.hooks(handles), temporary.modes({original: False, compressed: False}):
        for batch in _batches(inputs, "inputs"):
            call(compressed, batch)
    return {n: math.sqrt(err / max(ref, 1e-300)) for n, (err, ref) in sums.items()}
