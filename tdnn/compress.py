"""``compress_model``: plan each layer, factorize it, swap it in."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn import blockwise, calibrate, decompose, registry, walk
from tdnn.budget import Budget, allocate
from tdnn.calibrate import Whitening
from tdnn.cost import layer_cost, model_flops, timing_weights
from tdnn.inference import optimize_for_inference
from tdnn.latency import LatencyTimer, latencies, latency_ratio
from tdnn.layers import Factorized
from tdnn.plan import PLAN_ATTR, LayerPlan, Plan
from tdnn.ranks import NO_ENTRY, VBMF, Energy, RankRule, dense_param_count, rank_for_ratio, rank_from_spectra

FilterFn = Callable[[nn.Module, str], bool]


def _why_not(name: str, module: nn.Module, parent: nn.Module | None, ties: dict[int, list[str]]) -> str | None:
    """Reasons that hold whatever the rank: modules that must stay as they are."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        return "nn.MultiheadAttention reads out_proj.weight directly and never calls it"
    if isinstance(parent, nn.TransformerEncoderLayer) and module in (parent.linear1, parent.linear2):
        return "nn.TransformerEncoderLayer's inference fast path reads linear1.weight and linear2.weight directly"
    base = registry.kind_of(module).dense_type
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides forward; its behaviour is not a plain {base.__name__}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet; run one forward pass first"
    if module.weight.is_meta:
        return "weight is on the meta device; load real weights before compressing"
    # Factorizing would bake in the current weight and silently drop the constraint.
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "weight is parametrized; call torch.nn.utils.parametrize.remove_parametrizations first"
    if any(type(h).__name__ in ("WeightNorm", "SpectralNorm") for h in module._forward_pre_hooks.values()):
        return "weight is recomputed by a weight_norm/spectral_norm hook; remove it first"
    owners = [n.rpartition(".")[0] for n in ties.get(id(module.weight), [])]
    others = [n or "<root>" for n in owners if n != name]
    if others:
        return f"weight is tied to {', '.join(others)} (the same Parameter); factorizing would untie them"
    return None


@dataclass
class _Job:
    """A layer on its way through compress_model: the module, its plan entry, and what is known."""

    name: str
    module: nn.Module
    entry: LayerPlan
    cls: type[Factorized] | None = None
    rank_spec: Any = None  # None under a budget
    spectra: list[torch.Tensor] | None = None  # of the whitened weight, from a survey of the data
    input_shape: tuple[int, ...] | None = None
    out_scale: torch.Tensor | None = None  # of a BatchNorm reading the layer's output


def _select(name: str, module: nn.Module, parent: nn.Module | None, rule: RankRule | None,
            method: str, filter_fn: FilterFn | None, ties: dict[int, list[str]]) -> _Job:
    """Decide whether and how a layer is factorized, before any rank is known."""
    layer = _Job(name, module, LayerPlan(name=name, kind=registry.kind_of(module).name))
    reason = _why_not(name, module, parent, ties)
    if reason is None and filter_fn is not None and not filter_fn(module, name):
        reason = "excluded by filter_fn"
    if reason is None and rule is not None:
        spec = rule(name, module)
        if spec is NO_ENTRY:
            reason = "no entry in ranks matches this layer"
        elif spec.rank is None:
            reason = "rank None: kept dense"
        elif isinstance(spec.rank, float) and spec.rank == 1.0:
            reason = "ratio 1.0 keeps every parameter"
        else:
            layer.rank_spec, method = spec.rank, spec.method or method
    if reason is None:
        layer.cls = registry.factorized_class(module, registry.check_method(method, f"{name}: method"))
        reason = (f"method {method!r} has no form for {layer.entry.kind} layers" if layer.cls is None
                  else layer.cls.unsupported(module))
    if reason is not None:
        layer.entry.reason, layer.cls = reason, None
        return layer
    if layer.rank_spec is not None and not isinstance(layer.rank_spec, (float, Energy, VBMF)):
        layer.cls.check_rank(module, layer.rank_spec, name)
    if not decompose.all_finite(module.weight.detach()):
        raise ValueError(f"{name}: weight {tuple(module.weight.shape)} has NaN or Inf values")
    return layer


def _rank(layer: _Job, multiple: int) -> Any:
    """The concrete rank from the layer's own spec."""
    cls, module, spec, name = layer.cls, layer.module, layer.rank_spec, layer.name
    if isinstance(spec, float):
        return rank_for_ratio(cls, module, spec, multiple)
    if isinstance(spec, (Energy, VBMF)):
        # Energy follows the whitened spectrum (output energy); VBMF models the weight's own noise.
        spectra = layer.spectra if isinstance(spec, Energy) and layer.spectra is not None else \
            cls.spectra(module, name=name)
        return rank_from_spectra(cls, module, spec, spectra, name)
    return cls.check_rank(module, spec, name)


def _accept(layer: _Job, rank: Any) -> None:
    """Record ``rank`` in the plan, or keep the layer dense if that would not save parameters."""
    factor_params, dense_params = layer_cost("params", layer.module, layer.cls, rank), dense_param_count(layer.module)
    if factor_params >= dense_params:
        layer.entry.reason = (f"{layer.cls.method} at rank {rank} would have {factor_params} "
                              f"parameters, not fewer than the dense {dense_params}")
        layer.cls = None
    else:
        layer.entry.method, layer.entry.rank = layer.cls.method, rank


def _error_weight(fisher: torch.Tensor, layer: _Job) -> float:
    """The cost of a layer's relative error: its Fisher weight per channel (divided by a following
    BatchNorm's squared scale, which the whitened error already carries) times its whitened energy."""
    scale = layer.out_scale.clamp_min(1e-6 * float(layer.out_scale.max())) if layer.out_scale is not None else None
    per_channel = fisher if scale is None else fisher / scale.square()
    return float(per_channel.mean()) * float(layer.spectra[0].square().sum())


LATENCY_ROUNDS = 4  # whole-model measurements a latency budget may take to land on its target
LATENCY_TOLERANCE = 0.05


def _deployed_ratio(model: nn.Module, deployed: nn.Module, layers: list[_Job], ranks: list[Any], batch: Any) -> float:
    """Latency of ``model`` with the factorized forms at ``ranks`` (random factors: the time does
    not depend on them), deployed, over that of the dense ``deployed`` — timed interleaved."""
    trial = copy.deepcopy(model)
    modules = dict(trial.named_modules())
    g = torch.Generator().manual_seed(0)
    forms = {id(modules[l.name]): timing_weights(l.cls.structure(modules[l.name], rank, name=l.name), g)
             for l, rank in zip(layers, ranks) if rank is not None}
    trial = optimize_for_inference(walk.swap(trial, forms), batch, inplace=True)
    times = latencies({"dense": deployed, "small": trial}, batch, warmup=1, repeats=5)
    return times["small"] / max(times["dense"], 1e-12)


def _on_target(model: nn.Module, deployed: nn.Module, layers: list[_Job], ranks: list[Any], batch: Any,
               allocate_at: Callable[[float], list[Any]], target: float) -> list[Any]:
    """A latency budget's ranks, checked on the whole deployed model: layers timed alone do not add
    up to the model's time exactly (layout changes, caches, overheads), so while the measured ratio
    misses ``target`` by more than 5%, the ranks are allocated again at a corrected target — scaled
    by the miss, or interpolated between measurements on either side of it — at most
    :data:`LATENCY_ROUNDS` measurements; the closest ranks not slower than the target (with the
    tolerance) win, else the closest."""
    tried = []  # (allocation target, measured ratio, ranks)
    fraction = target
    for round_ in range(LATENCY_ROUNDS):
        tried.append((fraction, max(_deployed_ratio(model, deployed, layers, ranks, batch), 1e-12), ranks))
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


def _allocate(model: nn.Module, layers: list[_Job], budget: Budget, runs: blockwise.Runs | None,
              multiple: int) -> None:
    if budget.measure != "params" and runs is None:
        raise ValueError(f"Budget({budget.measure}=...) needs calibration data: it depends on the input size")
    weights = {l.name: 1.0 for l in layers}
    if runs is not None and budget.sensitivity:
        fisher = runs.fisher({l.name: l.module for l in layers})
        # cost of an error = Fisher weight × its whitened energy (estimate_error is relative)
        weights = {l.name: _error_weight(fisher[l.name], l) for l in layers}
    offered = sum(layer_cost(budget.measure, l.module, input_shape=l.input_shape) for l in layers)
    deployed: nn.Module | None = None  # the dense model as deployed, for a latency budget
    if budget.measure == "params":
        total = sum(p.numel() for p in model.parameters())
    elif budget.measure == "flops":
        total = model_flops(model, runs.batches[0])
    else:  # the whole model's latency as deployed (BatchNorm folded, faster layouts): its layers
        # (timed alone, in their faster layouts) and the rest, which stays
        deployed = optimize_for_inference(model, runs.batches[0])
        total = max(latencies({"model": deployed}, runs.batches[0], warmup=1, repeats=5)["model"], offered)
    fixed = total - offered
    offers = [(l.module, l.cls, l.spectra if l.spectra is not None else l.cls.spectra(l.module, name=l.name),
               l.input_shape, weights[l.name]) for l in layers]
    ranks = allocate(offers, budget, total=total, fixed=fixed, multiple=multiple)
    if deployed is not None:
        ranks = _on_target(model, deployed, layers, ranks, runs.batches[0],
                           lambda f: allocate(offers, replace(budget, latency=f), total=total, fixed=fixed,
                                              multiple=multiple), budget.fraction)
    for l, rank in zip(layers, ranks):
        if rank is None:
            l.entry.reason, l.cls = "the budget keeps this layer dense", None
        else:
            _accept(l, rank)


def _timer(latency_aware: bool | LatencyTimer, calibration: Iterable[Any] | None) -> LatencyTimer | None:
    if latency_aware is False:
        return None
    if calibration is None:
        raise ValueError("latency_aware needs calibration data: its first batch sets each layer's input size")
    return latency_ratio if latency_aware is True else latency_aware


def _faster(layer: _Job, new: Factorized, timer: LatencyTimer, input_shape: tuple[int, ...]) -> bool:
    """Time ``new`` against the dense layer; keep the dense one (with the reason) unless faster."""
    weight = layer.module.weight
    x = torch.randn(input_shape, dtype=weight.dtype, device=weight.device)
    ratio = float(timer(layer.module, new, x))
    layer.entry.latency_ratio = ratio
    if ratio < 1.0:
        return True
    layer.entry.reason = f"latency-aware: the factorized form took {ratio:.2f}x the dense latency"
    layer.entry.method = layer.entry.rank = None
    layer.entry.data_aware = False
    return False


class _Swapper:
    """Puts factorized layers in place (the one mutation), remembering how to undo it.

    With ``park`` (compressing in place) each replaced dense layer's tensors move to a temporary
    file, their memory freed, so an undo can bring them back exactly while memory stays that of
    the compressed model; without, replaced layers are simply let go.
    """

    def __init__(self, model: nn.Module, *, park: bool) -> None:
        self.model, self.done = model, {}
        self.directory = tempfile.TemporaryDirectory(prefix="tdnn-undo-") if park else None

    def __call__(self, old: nn.Module, new: nn.Module) -> nn.Module:
        self.model = walk.swap(self.model, {id(old): new})
        if self.directory is not None:
            tensors = [*old.parameters(), *old.buffers()]
            path = os.path.join(self.directory.name, f"{len(self.done)}.pt")
            torch.save([t.detach() for t in tensors], path)
            for t in tensors:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.done[id(new)] = (old, tensors, path)
        return self.model

    def undo(self) -> None:
        """Put every replaced layer back, with its tensors as they were."""
        for old, tensors, path in self.done.values():
            for t, saved in zip(tensors, torch.load(path, weights_only=True)):
                t.data = saved
        walk.swap(self.model, {key: old for key, (old, _, _) in self.done.items()})

    def close(self) -> None:
        if self.directory is not None:
            self.directory.cleanup()


def _plain(model: nn.Module, chosen: list[_Job], budget: Budget | None, multiple: int, swap: _Swapper,
           progress: bool) -> None:
    """Without calibration data: ranks from the weights alone, factors from plain truncation."""
    if budget is not None:
        _allocate(model, chosen, budget, None, multiple)
    else:
        for l in chosen:
            _accept(l, _rank(l, multiple))
    for l in tqdm([l for l in chosen if l.cls is not None], desc="decomposing", disable=not progress, leave=False):
        old, l.module = l.module, None  # let the dense layer go once swapped out
        swap(old, l.cls.from_dense(old, l.entry.rank, name=l.name))


def _data_aware(model: nn.Module, chosen: list[_Job], calibration: Any, swap: _Swapper, *,
                blocks: Any, sequential: bool, budget: Budget | None, damping: float,
                timer: LatencyTimer | None, multiple: int, progress: bool, reference: nn.Module | None) -> None:
    """With calibration data, block by block (:mod:`tdnn.blockwise`): a survey of the whitened
    spectra where ranks depend on them (budget, energy), the ranks, then the factors."""
    jobs = {l.name: l for l in chosen}
    runs = blockwise.Runs(model, {n: (l.module, l.cls.geometry) for n, l in jobs.items()}, calibration,
                          blocks=blocks, reference=reference, progress=progress)
    def whitening(stats: calibrate.InputStats) -> Whitening:
        return Whitening(out_scale=stats.out_scale, damping=damping, cross=stats.cross_cov, root=stats.root(damping))

    if budget is not None or any(isinstance(l.rank_spec, Energy) for l in chosen):
        def survey(name: str, stats: calibrate.InputStats) -> None:
            l = jobs[name]
            l.spectra = l.cls.spectra(l.module, whitening(stats), name=name)
            l.input_shape, l.out_scale = stats.input_shape, stats.out_scale

        runs.run(swap, survey, sequential=False)
    if budget is not None:
        _allocate(model, chosen, budget, runs, multiple)
    else:
        for l in chosen:
            _accept(l, _rank(l, multiple))

    def factorize(name: str, stats: calibrate.InputStats) -> Factorized | None:
        l = jobs[name]
        if l.cls is None:
            return None
        new = l.cls.from_dense(l.module, l.entry.rank, name=name, whitening=whitening(stats))
        l.entry.data_aware = True
        faster = timer is None or _faster(l, new, timer, stats.input_shape)
        l.module = None  # the dense layer is not needed any more: let it go once swapped out
        return new if faster else None

    runs.only([n for n, l in jobs.items() if l.cls is not None])
    runs.run(swap, factorize, sequential=sequential)


def _check(ranks: Any, method: str, budget: Any, calibration: Any, sequential: bool, rank_multiple: Any,
           damping: Any) -> None:
    """Refuse bad options before any work."""
    registry.check_method(method)
    if (ranks is None) == (budget is None):
        raise ValueError("give exactly one of ranks= or budget= (choose layers for a budget with "
                         "filter_fn and the method with method=)")
    if budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"budget must be a tdnn.Budget, got {type(budget).__name__}")
    if sequential and calibration is None:
        raise ValueError("sequential=True needs calibration data")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive int, got {rank_multiple!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise ValueError(f"damping={damping!r} must be a finite number >= 0")


def _plan(model: nn.Module, rule: RankRule | None, method: str, filter_fn: FilterFn | None) -> list[_Job]:
    """Every dense layer of ``model`` with the decision made before any rank is known."""
    found = list(walk.named_layers(model))
    if not found:
        done = sum(isinstance(m, Factorized) for m in model.modules())
        kinds = ", ".join(k.name for k in registry.kinds())
        raise ValueError(f"{type(model).__name__} has no dense layers to compress"
                         + (f": its {done} layers are already factorized" if done else f" ({kinds})"))
    ties = walk.shared_parameters(model)
    layers = [_select(name, module, parent, rule, method, filter_fn, ties) for name, module, parent in found]
    if rule is not None:
        for key in rule.unused_keys():
            warnings.warn(f"ranks: pattern '{key}' matches no layer of {type(model).__name__}", stacklevel=3)
    return layers


def _copy(model: nn.Module, layers: list[_Job]) -> nn.Module:
    """A deep copy of ``model``, the jobs pointing at the copy's layers."""
    memo: dict[int, Any] = {}
    try:
        copied = copy.deepcopy(model, memo)
    except RuntimeError as err:  # e.g. old-style weight_norm tensors refuse to be deep-copied
        raise ValueError(f"cannot copy {type(model).__name__} ({err}); pass inplace=True, or remove "
                         "old-style weight_norm/spectral_norm hooks first") from err
    for l in layers:
        l.module = memo[id(l.module)]
    return copied


def compress_model(model: nn.Module, ranks: Any = None, *, method: str = "auto",
                   filter_fn: FilterFn | None = None, inplace: bool = False,
                   calibration: Iterable[Any] | None = None, sequential: bool = False,
                   blocks: str | list[str] | None = None, budget: Budget | None = None, damping: float = 0.01,
                   latency_aware: bool | LatencyTimer = False, rank_multiple: int = 1,
                   progress: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by low-rank factorized ones.

    Every layer is planned first (so bad input fails before any work), then decomposed in
    float64 and swapped in. Layers are left dense, with a reason recorded in the plan, when the
    factorized form would not have fewer parameters, when the method does not apply (e.g. CP on a
    grouped conv), when ``filter_fn`` or ``ranks`` excludes them, and for modules that must not be
    swapped (``nn.MultiheadAttention.out_proj``, subclasses overriding ``forward``).

    With ``calibration`` data the factors are data-aware: each layer's weight is whitened by its
    input covariance (and scaled by a BatchNorm that reads its output) before truncation, which
    minimises the layer's output error on that data instead of its weight error.

    Args:
        model: any module; layers are found at any nesting depth.
        ranks: a rank spec for every layer (``int``; a pair ``(r_out, r_in)`` for Tucker-2; a
            ``float`` ratio in ``(0, 1]`` of each layer's parameters to keep; :class:`tdnn.Energy`;
            :class:`tdnn.VBMF`), a mapping from layer name or ``"re:<pattern>"`` to a spec
            (``None`` keeps a layer dense; a :class:`tdnn.LayerSpec` or
            ``{"rank": ..., "method": ...}`` picks a method), or a callable
            ``(name, module) -> spec``. Layers a mapping does not cover stay dense.
        method: ``"auto"`` (SVD for Linear and 1×1 convs, Tucker-2 for k×k convs), ``"svd"``,
            ``"tucker2"`` or ``"cp"``. Linear and 1×1 layers always use SVD.
        filter_fn: ``(module, name) -> bool``; layers for which it returns ``False`` stay dense.
        inplace: modify ``model`` itself instead of a deep copy.
        calibration: an iterable of batches of model inputs for data-aware factors: a batch is a
            tensor (``model(x)``), a tuple of arguments (``model(*batch)``) or a dict of keyword
            arguments (``model(**batch)``); for a DataLoader of ``(inputs, labels)`` give
            ``(x for x, _ in loader)``. A few hundred samples are plenty. Batches holding NaN or
            Inf are refused.
        sequential: calibrate each layer on the outputs of the already-compressed layers before
            it, fitting it to what the original layer computed on the original inputs, so errors
            do not compound. Runs block by block (see ``blocks``): a few passes of one block and
            a copy of it as the reference, per block.
        blocks: the modules calibration runs one at a time on cached inputs, each called on the
            previous one's output: names, a ``"re:"`` pattern or the name of an ``nn.ModuleList``
            (``"model.layers"``); ``None`` finds the longest ``nn.ModuleList`` of like modules
            holding layers (a transformer's layers), else treats the whole model as one block;
            ``[]`` forces the whole model. Layers outside the blocks get one-shot data-aware factors.
        budget: a :class:`tdnn.Budget` for the whole model instead of ``ranks``: ranks are
            allocated across layers to meet it while minimising the estimated output error.
        damping: relative damping of the input covariance, a finite number >= 0 (keeps whitening
            stable and the factors close to the weights in directions the calibration data never
            visits; 0 still keeps a ridge of 1e-9 of the mean eigenvalue, so dead units stay finite).
        latency_aware: time each factorized layer against its dense original on the current
            device (interleaved runs, input size from the first calibration batch, convolutions
            each in its faster memory layout, see :func:`tdnn.latency.latency_ratio`) and keep
            the dense layer where the factorized one is not faster; the measured ratios go into
            the plan and the report. A callable ``(dense, factorized, x) -> ratio`` replaces the timer.
        rank_multiple: ranks that ratios and budgets choose are multiples of this (or below it, or
            full), e.g. 8 for the channel blocks of CPU SIMD units and GPU tensor cores; ranks you
            give as ints, Energy or VBMF are kept as they are.
        progress: show progress bars.

    Returns:
        The compressed model (a copy unless ``inplace``), with its :class:`tdnn.Plan` in the
        attribute ``tdnn_plan``.

    Raises:
        ValueError: for a bad rank, method or budget (naming the layer), non-finite weights, or
            a model without Linear/Conv2d layers.
        TypeError: for a rank of the wrong type.

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10))
        >>> small = tdnn.compress_model(net, ranks=0.5)
        >>> [type(m).__name__ for m in small]
        ['Tucker2Conv2d', 'ReLU', 'Flatten', 'SVDLinear']
        >>> calibrated = tdnn.compress_model(net, ranks=0.5, calibration=[torch.randn(16, 3, 8, 8)])
        >>> calibrated.tdnn_plan["3"].data_aware
        True
    """
    _check(ranks, method, budget, calibration, sequential, rank_multiple, damping)
    timer = _timer(latency_aware, calibration)
    layers = _plan(model, None if ranks is None else RankRule(ranks), method, filter_fn)

    original = model
    if not inplace:  # copy only now: planning never mutates, and a copy keeps the same module order
        model = _copy(model, layers)
    chosen = [l for l in layers if l.cls is not None]
    if calibration is not None and not isinstance(calibration, calibrate.Calibration):
        calibration = calibrate.Calibration(calibration, keep=False)
    swap = _Swapper(model, park=inplace)
    try:
        if calibration is None or not chosen:
            _plain(model, chosen, budget, rank_multiple, swap, progress)
        else:
            _data_aware(model, chosen, calibration, swap, blocks=blocks, sequential=sequential, budget=budget,
                        damping=damping, timer=timer, multiple=rank_multiple, progress=progress,
                        reference=None if inplace else original)
    except BaseException:
        if inplace:  # leave the user's model as it was
            swap.undo()
        raise
    finally:
        swap.close()
    model = swap.model

    plan = Plan([l.entry for l in layers])
    previous = getattr(model, PLAN_ATTR, None)
    if isinstance(previous, Plan):  # compressing twice: keep what earlier calls factorized
        plan.layers = previous.factorized() + plan.layers
    setattr(model, PLAN_ATTR, plan)
    return model
