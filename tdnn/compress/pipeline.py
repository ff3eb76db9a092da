"""``compress_model``: select the layers, rank them (their own specs or the budget), factorize them
with or without calibration data, swap them in and record the plan."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn.compress.allocation import HOLD_OUT, check, unchecked
from tdnn.compress.budget import assign
from tdnn.compress.select import accept, own_rank, select, why_none
from tdnn.compress.settings import CompressSettings, make_settings
from tdnn.compress.swapper import Swapper
from tdnn.core.timing import LatencyTimer, latency_ratio
from tdnn.layers.base import Factorized
from tdnn.planning.plan import PLAN_ATTR, LayerJob, Plan
from tdnn.planning.ranks import Energy
from tdnn.statistics.blockwise import Runs
from tdnn.statistics.calibration import Calibration
from tdnn.statistics.moments import InputStats
from tdnn.statistics.refine import BlockRefinement, Refine


def _apply(jobs: list[LayerJob], ranks: list[Any]) -> None:
    """The ranks a budget chose: each job accepted at its rank, or kept dense."""
    for job, rank in zip(jobs, ranks):
        if rank is None:
            job.keep_dense("the budget keeps this layer dense")
        else:
            accept(job, rank)


def _plain(model: nn.Module, jobs: list[LayerJob], settings: CompressSettings, swap: Swapper, progress: bool) -> None:
    """Without calibration data: ranks from the weights alone, factors from plain truncation."""
    if settings.budget is not None:
        _apply(jobs, assign(model, jobs, settings.budget, batch=None, fisher=None, multiple=settings.rank_multiple))
    else:
        for job in jobs:
            accept(job, own_rank(job, settings.rank_multiple))
    for job in tqdm([j for j in jobs if j.cls is not None], desc="decomposing", disable=not progress, leave=False):
        old, job.module = job.module, None  # let the dense layer go once swapped out
        swap(old, job.cls.from_dense(old, job.entry.rank, name=job.name))


@dataclass(frozen=True)
class _Surveyed:
    """What a survey of the data says about a layer before its rank is chosen."""

    spectra: list[torch.Tensor]
    input_shape: tuple[int, ...] | None
    out_scale: torch.Tensor | None


class _Factorizer:
    """Block-wise calibration's :class:`~tdnn.statistics.blockwise.Replacer`: each layer factorized at
    its planned rank from its statistics (kept dense where ``latency_aware`` finds it slower)."""

    def __init__(self, swap: Swapper, jobs: list[LayerJob], settings: CompressSettings) -> None:
        self.swap, self.jobs, self.damping = swap, {j.name: j for j in jobs}, settings.damping
        aware = settings.latency_aware
        self.timer: LatencyTimer | None = None if aware is False else latency_ratio if aware is True else aware

    @property
    def model(self) -> nn.Module:
        return self.swap.model

    def replace(self, name: str, stats: InputStats) -> None:
        job = self.jobs[name]
        if job.cls is not None:
            self.put(name, job.cls.from_dense(job.module, job.entry.rank, name=name,
                                              whitening=stats.whitening(self.damping)), stats.input_shape)

    def put(self, name: str, new: Factorized, input_shape: tuple[int, ...]) -> None:
        """Swap ``new``, the data-aware factorized form of layer ``name``, in (unless it is slower)."""
        job = self.jobs[name]
        job.entry.data_aware = True
        old, job.module = job.module, None  # the dense layer is not needed any more: let it go once swapped out
        if self.timer is None or self._faster(job, old, new, input_shape):
            self.swap(old, new)

    def _faster(self, job: LayerJob, dense: nn.Module, new: Factorized, input_shape: tuple[int, ...]) -> bool:
        """Time ``new`` against the dense layer; keep the dense one (with the reason) unless faster."""
        x = torch.randn(input_shape, dtype=dense.weight.dtype, device=dense.weight.device)
        ratio = float(self.timer(dense, new, x))
        job.entry.latency_ratio = ratio
        if ratio >= 1.0:
            job.keep_dense(f"latency-aware: the factorized form took {ratio:.2f}x the dense latency")
        return ratio < 1.0


def _data_aware(model: nn.Module, jobs: list[LayerJob], calibration: Calibration, swap: Swapper,
                settings: CompressSettings, runs: Runs, held_out: list[Any] | None
                ) -> tuple[list[BlockRefinement], dict[str, Any] | None]:
    """With calibration data, block by block (:mod:`tdnn.statistics.blockwise`): a survey of the
    whitened spectra where ranks depend on them (budget, energy), the ranks (a budget's checked on
    ``held_out``, if given: :mod:`tdnn.compress.allocation`; ``runs`` then see the other samples of
    ``calibration``), then the factors from all of ``calibration`` (and each block refined, if
    asked); what refining did, and what the check measured and chose."""
    if settings.budget is not None or any(isinstance(j.rank_spec, Energy) for j in jobs):
        _survey(jobs, runs, settings.damping)
    record = _ranks(model, jobs, settings, runs, held_out)
    if held_out is not None:  # the ranks chosen, the factors are made from every sample, the held-out ones too
        runs = runs.over(calibration)
    runs.only([j.name for j in jobs if j.cls is not None])
    factorizer = _Factorizer(swap, jobs, settings)
    return runs.compress(factorizer, sequential=settings.sequential, refine=Refine.of(settings.refine)), record


def _survey(jobs: list[LayerJob], runs: Runs, damping: float) -> None:
    """Each job's whitened spectra, input shape and output scale, from one-shot statistics."""
    by_name = {j.name: j for j in jobs}
    found = runs.survey(lambda name, stats: _Surveyed(
        by_name[name].cls.spectra(by_name[name].module, stats.whitening(damping), name=name),
        stats.input_shape, stats.out_scale))
    for job in jobs:
        job.spectra, job.input_shape, job.out_scale = (found[job.name].spectra, found[job.name].input_shape,
                                                       found[job.name].out_scale)


def _ranks(model: nn.Module, jobs: list[LayerJob], settings: CompressSettings, runs: Runs,
           held_out: list[Any] | None) -> dict[str, Any] | None:
    """Every job's rank, accepted or kept dense: its own spec's, or the budget's (checked on
    ``held_out``, if given: then also what was measured and chosen)."""
    budget, multiple = settings.budget, settings.rank_multiple
    if budget is None:
        for job in jobs:
            accept(job, own_rank(job, multiple))
        return None
    fisher = runs.fisher({j.name: j.module for j in jobs}) if budget.sensitivity else None
    batch = runs.batches[0]
    if held_out is None:
        _apply(jobs, assign(model, jobs, budget, batch=batch, fisher=fisher, multiple=multiple))
        return None
    choice = check(model, jobs, runs, held_out, settings, batch=batch, fisher=fisher)
    _apply(jobs, choice.ranks)
    return choice.record


def _copy(model: nn.Module, jobs: list[LayerJob]) -> nn.Module:
    """A deep copy of ``model``, the jobs pointing at the copy's layers."""
    memo: dict[int, Any] = {}
    try:
        copied = copy.deepcopy(model, memo)
    except RuntimeError as err:  # e.g. old-style weight_norm tensors refuse to be deep-copied
        raise ValueError(f"cannot copy {type(model).__name__} ({err}); pass inplace=True, or remove "
                         "old-style weight_norm/spectral_norm hooks first") from err
    for job in jobs:
        job.module = memo[id(job.module)]
    return copied


def compress_model(model: nn.Module, ranks: Any = None, *, settings: CompressSettings | None = None,
                   calibration: Iterable[Any] | None = None, inplace: bool = False, progress: bool = False,
                   **options: Any) -> nn.Module:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by low-rank factorized ones.

    Every layer is planned first (so bad input fails before any work), then decomposed in
    float64 and swapped in. Layers are left dense, with a reason recorded in the plan, when the
    factorized form would not have fewer parameters, when the method does not apply (e.g. CP on a
    grouped conv), when ``filter_fn`` or ``ranks`` excludes them, and for modules that must not be
    swapped (``nn.MultiheadAttention.out_proj``, subclasses overriding ``forward``).

    With ``calibration`` data the factors are data-aware: each layer's weight is whitened by its
    input covariance (and scaled by a BatchNorm that reads its output) before truncation, which
    minimises the layer's output error on that data instead of its weight error.

    The options form a :class:`tdnn.CompressSettings` (checked when made, recorded in
    ``model.tdnn_plan.settings`` and in checkpoints); pass one as ``settings=`` (keyword options
    override its fields), or the options themselves.

    Args:
        model: any module; layers are found at any nesting depth.
        settings: a :class:`tdnn.CompressSettings` instead of (or under) the options below.
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
            each in its faster memory layout, see :func:`tdnn.core.timing.latency_ratio`) and keep
            the dense layer where the factorized one is not faster; the measured ratios go into
            the plan and the report. A callable ``(dense, factorized, x) -> ratio`` replaces the timer.
        rank_multiple: ranks that ratios and budgets choose are multiples of this (or below it, or
            full), e.g. 8 for the channel blocks of CPU SIMD units and GPU tensor cores; ranks you
            give as ints, Energy or VBMF are kept as they are.
        refine: after each block's layers are factorized, train the block's factors with Adam on
            its cached inputs to reproduce the dense block's outputs (:class:`tdnn.Refine`:
            ``True`` for the defaults, an int for the steps per block); a held-out quarter of the
            calibration samples is never trained on, and each block keeps its weights with the
            lowest error there, its closed-form start included. The plan records each block's
            held-out error before and after (``tdnn_plan.blocks``).
        check_allocation: with a budget, hold out a seeded eighth of the calibration samples (at
            least one; never in any statistic), compare allocations at the same budget — the budget
            as given, the flat one (``sensitivity=False``) and uniform ranks (every layer the same
            fraction of its parameters) — each factorized one-shot, by the model's output error on
            them against the dense model's, and go on at the best one's ranks with every sample
            (:mod:`tdnn.compress.allocation`; the plan records ``tdnn_plan.allocation``). ``False``
            allocates once, from the estimates, a pass sooner.
        progress: show progress bars.
        **options: the other fields of :class:`tdnn.CompressSettings`, as above.

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
    settings = make_settings(settings, **({"ranks": ranks} if ranks is not None else {}), **options)
    if calibration is None and settings.data_needed():
        raise ValueError(settings.data_needed())
    jobs = select(model, settings)
    original = model
    if not inplace:  # copy only now: planning never mutates, and a copy keeps the same module order
        model = _copy(model, jobs)
    chosen = [j for j in jobs if j.cls is not None]
    if not chosen and settings.budget is not None:
        raise ValueError(f"{settings.budget}: no layer is left to allocate ranks to ({why_none(jobs)})")
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration(calibration, keep=False)
    swap, refined, checked = Swapper(model, park=inplace), [], None
    try:
        if calibration is None or not chosen:
            _plain(model, chosen, settings, swap, progress)
        else:
            refined, checked = _calibrated(model, chosen, calibration, swap, settings,
                                           reference=None if inplace else original, progress=progress)
    except BaseException:
        if inplace:  # leave the user's model as it was
            swap.undo()
        raise
    finally:
        swap.close()
    return _planned(swap.model, jobs, settings, refined, checked)


def _calibrated(model: nn.Module, jobs: list[LayerJob], calibration: Calibration, swap: Swapper,
                settings: CompressSettings, *, reference: nn.Module | None, progress: bool
                ) -> tuple[list[BlockRefinement], dict[str, Any] | None]:
    """:func:`_data_aware` on the calibration data, less a held-out slice if the budget is checked."""
    calibration.bind(model)
    checks = settings.budget is not None and settings.check_allocation
    split = calibration.split(HOLD_OUT) if checks else None
    data, held_out = split if split is not None else (calibration, None)
    runs = Runs(model, {j.name: (j.module, j.cls.geometry) for j in jobs}, data, blocks=settings.blocks,
                reference=reference, progress=progress)
    refined, checked = _data_aware(model, jobs, calibration, swap, settings, runs, held_out)
    return refined, unchecked(settings.budget) if checks and split is None else checked


def _planned(model: nn.Module, jobs: list[LayerJob], settings: CompressSettings,
             refined: list[BlockRefinement], checked: dict[str, Any] | None) -> nn.Module:
    """``model`` with its :class:`tdnn.Plan`: this call's entries, settings, refined blocks and checked
    allocation after any earlier call's (the allocation: this call's, if it checked one)."""
    plan = Plan([j.entry for j in jobs], [settings.to_dict()], [asdict(r) for r in refined], checked)
    previous = getattr(model, PLAN_ATTR, None)
    if isinstance(previous, Plan):  # compressing twice: keep what earlier calls factorized
        plan = Plan(previous.factorized() + plan.layers, previous.settings + plan.settings,
                    previous.blocks + plan.blocks, checked if checked is not None else previous.allocation)
    setattr(model, PLAN_ATTR, plan)
    return model
