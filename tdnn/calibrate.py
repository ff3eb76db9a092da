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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn import registry, temporary
from tdnn.batches import call, map_tensors


@dataclass
class InputStats:
    """Streaming second moment of a layer's inputs and what was learned about its surroundings.

    Attributes:
        geometry: ``"patches"`` (unfolded conv patches, ordered like ``weight.flatten(1)``; a
            Linear layer's input features) or ``"channels"`` (each position's channel vector).
        gram: sum of ``x xᵀ`` (float64, on CPU).
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

    @property
    def cov(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration data reached this layer")
        return self.gram / self.count

    def update(self, module: nn.Module, x: torch.Tensor, reference: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, int]:
        """Add a batch ``x``; ``reference`` holds the same rows as seen by the reference model.
        Returns this batch's ``(Σ x xᵀ, count)``, for layers reading the same input (:meth:`add`)."""
        vectors = registry.kind_of(module).vectors(module, x.detach(), self.geometry).to(torch.float64)
        term = vectors.T @ vectors
        if reference is not None:
            self.cross = _add(self.cross, reference.T @ vectors)
        self.add(x, term, vectors.shape[0])
        return term, vectors.shape[0]

    def add(self, x: torch.Tensor, term: torch.Tensor, count: int) -> None:
        """Add a batch whose ``Σ x xᵀ`` is already known."""
        if self.input_shape is None:
            self.input_shape = tuple(x.shape)
        self.gram = _add(self.gram, term)
        self.count += count

    @property
    def cross_cov(self) -> torch.Tensor | None:
        return None if self.cross is None else self.cross / self.count


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term.cpu() if total is None else total + term.cpu()


@dataclass
class _Tracker:
    """Hooks for one calibration run."""

    stats: dict[str, InputStats]
    modules: dict[str, nn.Module]
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> weakref to the latest output
    # vectors key -> (weakref to an input, its version, Σ x xᵀ, count), this batch:
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
                stats.update(module, x)
                return
            key = registry.kind_of(module).vectors_key(module, stats.geometry)
            seen = self.terms.get(key)
            if seen is not None and seen[0]() is x and seen[1] == x._version:
                stats.add(x, *seen[2:])
            else:
                self.terms[key] = (weakref.ref(x), x._version, *stats.update(module, x))
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


@torch.no_grad()
def collect(model: nn.Module, batches: Iterable[Any], layers: dict[str, tuple[nn.Module, str]],
            *, progress: bool = False) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` (in eval mode) and return input statistics per layer.

    Args:
        model: the model to run (its train/eval flags are restored afterwards).
        batches: iterable of model inputs: tensors, tuples of arguments, or dicts of keyword
            arguments; a ``(inputs, labels)`` pair from a DataLoader passes both to the model, so
            give inputs only.
        layers: ``name -> (module, geometry)`` with geometry ``"patches"`` or ``"channels"``.
        progress: show a tqdm bar.

    Raises:
        ValueError: if no batch was given or a layer never saw an input.
    """
    tracker = _Tracker({name: InputStats(geometry) for name, (_, geometry) in layers.items()},
                       {name: module for name, (module, _) in layers.items()})
    n = 0
    with temporary.hooks(tracker.attach(model)), temporary.modes({model: False}):
        for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
            tracker.outputs.clear()
            run(model, batch, n)
            tracker.terms.clear()
            n += 1
    if n == 0:
        raise ValueError("calibration: no batches given")
    for name, stats in tracker.stats.items():
        if stats.count == 0:
            raise ValueError(f"{name}: calibration data never reached this layer")
        if not torch.isfinite(stats.gram).all():
            raise ValueError(f"{name}: calibration inputs of this layer hold NaN or Inf values (an overflow "
                             f"in the layers before it?)")
    return tracker.stats


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
def collect_cross(model: nn.Module, module: nn.Module, reference: nn.Module, ref_module: nn.Module,
                  batches: Iterable[Any], geometry: str) -> InputStats:
    """Input statistics of ``module`` in ``model`` together with their cross moment with the inputs
    of ``ref_module`` in ``reference`` (the uncompressed model) on the same batches."""
    stats, seen = InputStats(geometry), collections.deque()  # a layer may run several times per batch

    def remember(m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(registry.kind_of(m).vectors(m, args[0].detach(), geometry).to(torch.float64))

    def accumulate(m: nn.Module, args: tuple[Any, ...]) -> None:
        stats.update(m, args[0], seen.popleft())

    handles = [ref_module.register_forward_pre_hook(remember), module.register_forward_pre_hook(accumulate)]
    with temporary.hooks(handles), temporary.modes({reference: False, model: False}):
        for batch in batches:
            call(reference, batch)
            call(model, batch)
    return stats


MIN_DAMPING = 1e-9  # the ridge damping=0 gets, relative to the mean eigenvalue


class Whitening:
    """Maps a weight into the space where plain truncation minimises the output error.

    With ``cov + λI = R Rᵀ`` (``cov = E[x xᵀ]``, ``λ = damping × mean eigenvalue`` so a singular
    covariance stays invertible, ``R`` from an eigendecomposition) and ``D`` the output scale (a
    following BatchNorm, else the identity), ``‖D (W − W') R‖² = ‖D (W − W') X‖² + λ‖D (W − W')‖²``.
    Decomposing ``D W R`` and mapping the factors back (:meth:`out_factor`, :meth:`in_factor`)
    therefore minimises the output error plus ``λ`` times the weight error, so it is never worse
    on the data than plain truncation; at full rank the round trip is exact.
    """

    def __init__(self, cov: torch.Tensor, out_scale: torch.Tensor | None = None, *,
                 damping: float = 0.01, cross: torch.Tensor | None = None,
                 eig: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        cov = (cov + cov.T) / 2
        evals, vecs = torch.linalg.eigh(cov) if eig is None else eig  # eig: of this same cov
        mean = float(evals.clamp_min(0).mean())
        if mean <= torch.finfo(cov.dtype).eps * float(evals.abs().max().clamp_min(1e-300)):
            ridge, evals = 0.0, torch.ones_like(evals)  # no signal at all: fall back to plain truncation
        else:
            # damping=0 still needs an invertible root where the data never goes (dead units)
            ridge = max(damping, MIN_DAMPING) * mean
            evals = evals.clamp_min(0) + ridge               # cov + λI
        self.root = vecs * evals.sqrt()                      # R,   R Rᵀ = cov + λI
        self.root_inv = (vecs / evals.sqrt()).T              # R⁻¹
        if cross is not None:
            # Sequential mode: the least-squares target is W·M with M = (E[x_ref xᵀ] + λI)(cov + λI)⁻¹,
            # which maps the inputs this layer now gets to what the original layer computed (and
            # is the identity when nothing upstream changed). Whitening W·M: M R = (cross + λI) Q Λ^-½.
            eye = torch.eye(cross.shape[0], dtype=cross.dtype)
            self.root = (cross + ridge * eye) @ (vecs / evals.sqrt())
        if out_scale is not None:  # a dead BN channel (γ = 0) must not divide by zero
            out_scale = out_scale.clamp_min(max(1e-6 * float(out_scale.max()), torch.finfo(cov.dtype).tiny))
        self.out_scale = out_scale
        self._cov, self._damping, self._cross = cov, damping, cross

    def group(self, g: int, groups: int) -> Whitening:
        """The whitening of group ``g`` of a grouped layer (diagonal block of the covariance)."""
        if groups == 1:
            return self
        n, s = self._cov.shape[0] // groups, None
        if self.out_scale is not None:
            m = self.out_scale.shape[0] // groups
            s = self.out_scale[g * m:(g + 1) * m]
        block = slice(g * n, (g + 1) * n)
        cross = None if self._cross is None else self._cross[block, block]
        return Whitening(self._cov[block, block], s, damping=self._damping, cross=cross)

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``D W R`` for a weight with output mode 0 and input mode 1 (matrix or conv kernel)."""
        w = torch.einsum("sc...,cd->sd...", weight, self.root)
        if self.out_scale is not None:
            w = w * self.out_scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w

    def out_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """Map a whitened output factor ``(S, r)`` back: ``D⁻¹ U``."""
        return factor if self.out_scale is None else factor / self.out_scale[:, None]

    def in_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """Map a whitened input factor ``(n, r)`` back: ``R⁻ᵀ V``."""
        return self.root_inv.T @ factor


def whitenings(stats: dict[str, InputStats], damping: float) -> dict[str, Whitening]:
    """A :class:`Whitening` per layer from its statistics. Layers whose input covariances are
    identical (Q, K and V reading one tensor) share one eigendecomposition."""
    eigs: dict[tuple, list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]] = {}
    out = {}
    for name, s in stats.items():
        cov = s.cov
        same = eigs.setdefault((tuple(cov.shape), float(cov.sum()), float(cov.trace())), [])
        eig = next((e for c, e in same if torch.equal(c, cov)), None)
        if eig is None:
            eig = torch.linalg.eigh((cov + cov.T) / 2)
            same.append((cov, eig))
        out[name] = Whitening(cov, s.out_scale, damping=damping, eig=eig)
    return out
