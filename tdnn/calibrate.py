"""Activation statistics for data-aware initialisation.

Forward hooks stream each target layer's input second moment ``E[x xᵀ]`` in float64 (memory
O(n²) per layer, whatever the amount of data), where ``x`` is what the layer's weight multiplies
as its kind sees it (:meth:`tdnn.registry.LayerKind.vectors`): an input feature vector (Linear), an
input position's channel vector (Tucker-2, CP) or an unfolded input patch (SVD of a conv). They
also find a BatchNorm that directly consumes a layer's output, whose per-channel scale weights
the output error that matters.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn import decompose, registry, temporary
from tdnn.batches import call, map_tensors


@dataclass
class InputStats:
    """Streaming second moment of a layer's inputs and what was learned about its surroundings.

    Attributes:
        geometry: ``"patches"`` (unfolded conv patches, ordered like ``weight.flatten(1)``; a
            Linear layer's input features) or ``"channels"`` (each position's channel vector).
        gram: sum of ``x xᵀ`` (float64, on CPU); the covariance once :attr:`cov` was read.
        count: number of vectors summed.
        input_shape: shape of the first input seen (for FLOP counting).
        out_scale: ``|γ| / sqrt(var + eps)`` of a BatchNorm fed by this layer, else ``None``.
        cross: sum of ``x_ref xᵀ`` where ``x_ref`` is the same input in the uncompressed
            reference model (sequential mode), else ``None``.
    """

    geometry: str
    gram: torch.Tensor | None = None
    count: int = 0
    input_shape: tuple[int, ...] | None = None
    out_scale: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    normalized: bool = False  # gram already divided by count (see cov)
    same_as: InputStats | None = None  # a layer whose inputs were exactly these, batch by batch
    roots: dict[float, Root] = field(default_factory=dict)  # damping -> square root of the covariance
    keep: bool = False  # kept for later calls (a tdnn.Calibration): the covariance outlives its root

    @property
    def cov(self) -> torch.Tensor:
        """``E[x xᵀ]``: ``gram`` divided by ``count`` in place the first time (no second n×n copy)."""
        if self.count == 0:
            raise ValueError("no calibration data reached this layer")
        if self.gram is None:
            raise RuntimeError("this covariance was released once its square root was taken (keep=False)")
        if self.normalized is False:
            self.gram.div_(self.count)
            self.normalized = True
        return self.gram

    def update(self, module: nn.Module, x: torch.Tensor, reference: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Add a batch ``x``; ``reference`` holds the same rows as seen by the reference model, and
        ``mask`` (batch, tokens) the tokens to count (padding is left out).
        Returns this batch's ``(Σ x xᵀ, count)``, for layers reading the same input (:meth:`add`)."""
        vectors = rows(module, x, self.geometry, mask)
        term = vectors.T @ vectors
        if reference is not None:
            self.cross = _add(self.cross, reference.to(vectors.dtype).T @ vectors)
        self.add(x, term, vectors.shape[0])
        return term, vectors.shape[0]

    def add(self, x: torch.Tensor, term: torch.Tensor, count: int, source: InputStats | None = None) -> None:
        """Add a batch whose ``Σ x xᵀ`` is already known: computed for ``source``'s layer, which
        reads the very same input (then, if every batch came from it, ``same_as`` is ``source``)."""
        if self.normalized:
            raise RuntimeError("statistics already read as a covariance cannot take more data")
        if self.input_shape is None:
            self.input_shape = tuple(x.shape)
        self.same_as = source if self.count == 0 or source is self.same_as else None
        self.gram = _add(self.gram, term)
        self.count += count

    @property
    def cross_cov(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross / self.count

    def root(self, damping: float) -> Root:
        """:func:`square_root` of the covariance, computed once per damping (and once for all the
        layers that read the very same inputs: Q, K and V)."""
        owner = self.same_as or self
        if damping not in owner.roots:
            owner.roots[damping] = square_root(owner.cov, damping)
        for stats in (owner, self):
            if not stats.keep:  # only the root is read from now on: an 8192-wide input's 512 MiB go
                stats.gram = None
        return owner.roots[damping]


def rows(module: nn.Module, x: torch.Tensor, geometry: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The vectors ``module``'s weight multiplies in ``x`` (float32 or float64); with a (batch, tokens) ``mask``
    of a matrix layer's (batch, tokens, features) input, only the tokens it keeps."""
    kind = registry.kind_of(module)
    x = x.detach()
    if mask is not None and not kind.spatial and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.to(x.device)]
    # products in float32 (float64 for a float64 model) are summed in float64: within a batch the
    # rounding is far below the damping, and a large layer's Gram costs half the time
    return kind.vectors(module, x, geometry).to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term`` summed in float64: a new tensor to start with (layers reading one input share
    the term, and cov divides in place), then in place, so that a large layer's Gram is held once.
    A float32 term is added a slab of rows at a time: adding it whole makes a float64 copy of it
    (512 MiB for an 8192-wide input, on top of the Gram itself); a slab of 2²¹ elements is 16 MiB
    as float64."""
    if total is None:
        return term.to(dtype=torch.float64, device="cpu", copy=True)
    for rows in decompose.slabs(term, 1 << 21):
        total[rows].add_(term[rows].to("cpu"))
    return total


@dataclass
class _Tracker:
    """Hooks for one calibration run."""

    stats: dict[str, InputStats]
    modules: dict[str, nn.Module]
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> weakref to the latest output
    mask: torch.Tensor | None = None  # this batch's tokens to count
    # vectors key -> (weakref to an input, its version, Σ x xᵀ, count, whose), this batch:
    # layers reading the very same tensor the same way (Q, K, V) compute the product once
    terms: dict[tuple, tuple[Any, int, torch.Tensor, int]] = field(default_factory=dict)

    def attach(self, model: nn.Module) -> list[Any]:
        """Register the hooks; return their handles."""
        handles = []
        for name, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                handles.append(bn.register_forward_pre_hook(self._bn))
        return handles

    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x, stats = args[0], self.stats[name]
            if x.is_inference():  # no version counter: cannot tell an in-place change, so no sharing
                stats.update(module, x, mask=self.mask)
                return
            key = registry.kind_of(module).vectors_key(module, stats.geometry)
            seen = self.terms.get(key)
            if seen is not None and seen[0]() is x and seen[1] == x._version:
                stats.add(x, *seen[2:])
            else:
                self.terms[key] = (weakref.ref(x), x._version, *stats.update(module, x, mask=self.mask), stats)
        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            # a BatchNorm scales dim 1: the output channels of a conv, or of a matrix layer's 2-D output
            if registry.kind_of(module).spatial or output.dim() == 2:
                self.outputs[name] = weakref.ref(output)
        return hook

    def _bn(self, bn: nn.Module, args: tuple[Any, ...]) -> None:
        for name, ref in self.outputs.items():
            if ref() is args[0] and self.stats[name].out_scale is None:
                scale = (bn.running_var + bn.eps).rsqrt() if bn.running_var is not None else None
                if scale is not None:
                    if bn.weight is not None:
                        scale = scale * bn.weight.detach().abs()
                    self.stats[name].out_scale = scale.detach().to(torch.float64).cpu()


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
        bad = []
        map_tensors(batch, lambda t: bad.append(t.is_floating_point() and not torch.isfinite(t).all()) or t)
        if any(bad):
            raise ValueError(f"calibration batch {i} holds NaN or Inf values")
    return batches


class Calibration:
    """Calibration batches, checked once, whose statistics are kept for reuse.

    Give one to several :func:`tdnn.compress_model` calls on the same model (a sweep over budgets,
    say): the first one-shot data-aware call collects every layer's input statistics (and, for a
    budget, the layers' sensitivities), the later ones reuse them, so a sweep costs one calibration
    pass. A layer whose weight changed since (another model) is collected again; sequential mode,
    whose statistics depend on the compressed layers, always runs its own passes.

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
        # layer name -> how its inputs were read ("patches", "channels"; "" for the sensitivities)
        # -> (a fingerprint of the layer's weight, the value): SVD and Tucker-2 of one conv read
        # different statistics, and a sweep over both methods keeps both
        self.stats: dict[str, dict[str, tuple[tuple, InputStats]]] = {}
        self.fisher: dict[str, dict[str, tuple[tuple, float]]] = {}

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @staticmethod
    def _mark(module: nn.Module) -> tuple:
        w = module.weight.detach()
        return tuple(w.shape), str(w.dtype), float(w.double().sum()), float(w.double().square().sum())

    def lookup(self, table: dict[str, dict[str, tuple[tuple, Any]]], name: str, module: nn.Module,
               how: str = "") -> Any:
        """``name``'s entry in ``table`` (``stats`` or ``fisher``) for the geometry ``how`` of its
        inputs, if kept for this very weight, else ``None``."""
        entry = table.get(name, {}).get(how)
        return entry[1] if entry is not None and entry[0] == self._mark(module) else None

    def store(self, table: dict[str, dict[str, tuple[tuple, Any]]], name: str, module: nn.Module, value: Any,
              how: str = "") -> None:
        if self.keep:
            kept, mark = table.setdefault(name, {}), self._mark(module)
            if any(old != mark for old, _ in kept.values()):
                kept.clear()  # another weight under this name: what was kept for the old one goes
            kept[how] = (mark, value)


@torch.no_grad()
def collect(model: nn.Module, batches: Sequence[Any], layers: dict[str, tuple[nn.Module, str]], *,
            runner: Runner | None = None, masks: Sequence[torch.Tensor | None] | None = None,
            progress: bool = False) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` (in eval mode) and return input statistics per layer.

    Args:
        model: the model to run (its train/eval flags are restored afterwards).
        batches: model inputs: tensors, tuples of arguments, or dicts of keyword arguments.
        layers: ``name -> (module, geometry)`` with geometry ``"patches"`` or ``"channels"``.
        runner: ``(index, batch) -> output`` to run instead of ``model(batch)`` (e.g. one block
            on its cached inputs); the hooks sit on ``layers`` either way.
        masks: per batch, the (batch, tokens) mask of tokens to count, or ``None``.
        progress: show a tqdm bar.

    Raises:
        ValueError: if no batch was given, a layer never saw an input or saw NaN or Inf.
    """
    tracker = _Tracker({name: InputStats(geometry) for name, (_, geometry) in layers.items()},
                       {name: module for name, (module, _) in layers.items()})
    runner = runner or (lambda i, batch: run(model, batch, i))
    with temporary.hooks(tracker.attach(model)), temporary.modes({model: False}):
        for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress, leave=False)):
            tracker.outputs.clear()
            tracker.mask = masks[i] if masks else None
            runner(i, batch)
            tracker.terms.clear()
    if not batches:
        raise ValueError("calibration: no batches given")
    return _checked(tracker.stats)


def _checked(stats: dict[str, InputStats]) -> dict[str, InputStats]:
    for name, s in stats.items():
        if s.count == 0:
            raise ValueError(f"{name}: calibration data never reached this layer")
        if not decompose.all_finite(s.gram):
            raise ValueError(f"{name}: calibration inputs of this layer hold NaN or Inf values (an overflow "
                             f"in the layers before it?)")
    return stats


def run(model: nn.Module, batch: Any, index: int) -> Any:
    """``model`` on calibration batch number ``index``; a failure says how batches are passed."""
    try:
        return call(model, batch)
    except (TypeError, ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"calibration batch {index}: the model failed on it ({type(err).__name__}: {err}); "
                         f"a batch is passed as model(batch) for a tensor, model(*batch) for a tuple or list, "
                         f"model(**batch) for a dict: for a DataLoader of (inputs, labels) give "
                         f"(x for x, _ in loader)") from err


@torch.no_grad()
def collect_pairs(model: nn.Module, reference: nn.Module, n: int, layers: dict[str, tuple[nn.Module, nn.Module, str]],
                  runner: Runner, *, masks: Sequence[torch.Tensor | None] | None = None) -> dict[str, InputStats]:
    """Input statistics of layers of ``model`` with their cross moments with the inputs of the same
    layers of ``reference`` (the uncompressed original) on the same data: ``runner(i, reference)``
    then ``runner(i, model)`` run batch ``i`` of ``n`` through each.

    Args:
        layers: ``name -> (module in model, module in reference, geometry)``.
    """
    stats = {name: InputStats(geometry) for name, (_, _, geometry) in layers.items()}
    seen = {name: collections.deque() for name in layers}  # a layer may run several times per batch
    mask: list[torch.Tensor | None] = [None]
    handles = []
    for name, (module, ref_module, geometry) in layers.items():
        def remember(m: nn.Module, args: tuple[Any, ...], name: str = name, geometry: str = geometry) -> None:
            seen[name].append(rows(m, args[0], geometry, mask[0]))

        def accumulate(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            stats[name].update(m, args[0], seen[name].popleft(), mask=mask[0])

        handles += [ref_module.register_forward_pre_hook(remember), module.register_forward_pre_hook(accumulate)]
    with temporary.hooks(handles), temporary.modes({reference: False, model: False}):
        for i in range(n):
            mask[0] = masks[i] if masks else None
            runner(i, reference)
            runner(i, model)
    return _checked(stats)


Runner = Callable[[int, Any], Any]  # (batch index, batch or module) -> output

MIN_DAMPING = 1e-9  # the ridge damping=0 gets, relative to the mean eigenvalue


@dataclass
class Root:
    """``R`` with ``R Rᵀ = cov + λI``: a Cholesky factor, or ``None`` when the data carries no signal."""

    chol: torch.Tensor | None
    ridge: float


def square_root(cov: torch.Tensor, damping: float) -> Root:
    """The damped covariance's Cholesky factor (``λ = damping × mean eigenvalue``, at least 1e-9 of
    it, so dead units stay invertible). Should rounding make it fail, λ grows tenfold and it tries
    again: the result is never NaN.

    Raises:
        ValueError: if no ridge makes the covariance positive definite (it holds NaN or Inf).
    """
    diag = cov.diagonal()
    mean = float(diag.sum()) / cov.shape[0]  # the trace over n: the mean eigenvalue, without one
    if mean <= torch.finfo(cov.dtype).eps * float(diag.abs().max().clamp_min(1e-300)):
        return Root(None, 0.0)  # no signal at all: plain truncation
    ridge, saved = max(damping, MIN_DAMPING) * mean, diag.clone()
    for _ in range(8):
        diag.add_(ridge)  # on the diagonal in place: a large covariance is not copied
        chol, info = torch.linalg.cholesky_ex(cov)
        diag.copy_(saved)
        if int(info) == 0 and decompose.all_finite(chol):
            return Root(chol, ridge)
        ridge *= 10
    raise ValueError("the input covariance is not positive semi-definite (NaN or Inf in it?)")


class Whitening:
    """Maps a weight into the space where plain truncation minimises the output error.

    With ``cov + λI = R Rᵀ`` (``cov = E[x xᵀ]``, ``λ = damping × mean eigenvalue`` so a singular
    covariance stays invertible, ``R`` its Cholesky factor, :func:`square_root`) and ``D`` the output
    scale (a following BatchNorm, else the identity), ``‖D (W − W') R‖² = ‖D (W − W') X‖² +
    λ‖D (W − W')‖²``. Decomposing ``D W R`` and mapping the factors back (:meth:`out_factor`,
    :meth:`in_factor`) therefore minimises the output error plus ``λ`` times the weight error, so it
    is never worse on the data than plain truncation; at full rank the round trip is exact.

    Sequential mode (``cross = E[x_ref xᵀ]``): the least-squares target is ``W·M`` with
    ``M = (cross + λI)(cov + λI)⁻¹``, which maps the inputs the layer now gets to what the original
    layer computed (the identity when nothing upstream changed); ``W·M·R = W (cross + λI) R⁻ᵀ``.
    """

    def __init__(self, cov: torch.Tensor | None = None, out_scale: torch.Tensor | None = None, *,
                 damping: float = 0.01, cross: torch.Tensor | None = None, root: Root | None = None) -> None:
        if (cov is None) == (root is None):
            raise ValueError("Whitening needs the covariance or its root (one of them)")
        self.root = root if root is not None else square_root(cov, damping)
        self.cross = cross
        if out_scale is not None:  # a dead BN channel (γ = 0) must not divide by zero
            out_scale = out_scale.clamp_min(max(1e-6 * float(out_scale.max()), torch.finfo(out_scale.dtype).tiny))
        self.out_scale = out_scale
        self._damping = damping

    def group(self, g: int, groups: int) -> Whitening:
        """The whitening of group ``g`` of a grouped layer (diagonal block of the covariance)."""
        if groups == 1 or self.root.chol is None:
            return self
        chol = self.root.chol
        n, s = chol.shape[0] // groups, None
        block = slice(g * n, (g + 1) * n)
        cov = chol[block] @ chol[block].T
        cov.diagonal().sub_(self.root.ridge)
        if self.out_scale is not None:
            m = self.out_scale.shape[0] // groups
            s = self.out_scale[g * m:(g + 1) * m]
        cross = None if self.cross is None else self.cross[block, block]
        return Whitening(cov, s, damping=self._damping, cross=cross)

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``D W R`` (``D W M R`` in sequential mode) for a weight with output mode 0 and input mode 1."""
        w = weight
        if self.root.chol is not None:
            moved = weight.movedim(1, -1)                                 # (S, ..., n)
            flat = moved.reshape(-1, moved.shape[-1])
            if self.cross is None:
                flat = flat @ self.root.chol
            else:
                target = flat @ self.cross + self.root.ridge * flat
                flat = torch.linalg.solve_triangular(self.root.chol, target.T, upper=False).T
            w = flat.reshape(moved.shape).movedim(-1, 1)
        if self.out_scale is not None:
            w = w * self.out_scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def out_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """Map a whitened output factor ``(S, r)`` back: ``D⁻¹ U``."""
        return factor if self.out_scale is None else factor / self.out_scale[:, None]

    def in_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """Map a whitened input factor ``(n, r)`` back: ``R⁻ᵀ V``."""
        if self.root.chol is None:
            return factor
        return torch.linalg.solve_triangular(self.root.chol.T, factor, upper=True)
