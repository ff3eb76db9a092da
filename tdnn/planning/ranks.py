"""Rank specifications: what the user writes, and how it becomes a concrete rank per layer.

A *spec* for one layer is one of

* an ``int`` — the rank itself (for Tucker-2, both channel ranks);
* a pair ``(r_out, r_in)`` — Tucker-2 channel ranks;
* a ``float`` in ``(0, 1]`` — the fraction of the layer's parameters to keep;
* :class:`Energy` (or ``"energy:0.9"``) — the smallest rank keeping that fraction of the spectral
  energy (of the whitened weight when calibration data is given);
* :class:`VBMF` (or ``"vbmf"``) — the rank estimated by empirical variational Bayes matrix
  factorisation of the weight (Kim et al. 2016: per channel mode for Tucker-2);
* ``None`` — leave the layer dense;
* a :class:`LayerSpec` (or a dict ``{"rank": ..., "method": ...}``) — a rank with its own method.

``ranks`` given to :func:`tdnn.compress_model` is a spec for every layer, a mapping from layer
name (exact) or ``"re:<pattern>"`` (full match) to a spec, or a callable ``(name, module) -> spec``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from tdnn.algebra.vbmf import evbmf_rank
from tdnn.core.checks import plain_number
from tdnn.layers.base import Factorized, rank_components
from tdnn.layers.registry import check_method
from tdnn.planning.cost import layer_cost


@dataclass(frozen=True)
class Energy:
    """Keep the smallest rank whose singular values hold ``fraction`` of the spectral energy.

    Example:
        >>> import tdnn
        >>> tdnn.Energy(0.9)
        Energy(fraction=0.9)
    """

    fraction: float

    def __post_init__(self) -> None:
        if not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"Energy: fraction={self.fraction} must be in (0, 1]")


@dataclass(frozen=True)
class VBMF:
    """Estimate the rank by EVBMF of the weight (both channel modes for Tucker-2)."""


RankValue = Union[int, float, tuple[int, int], Energy, VBMF, None]


@dataclass(frozen=True)
class LayerSpec:
    """A rank for one layer and, optionally, the method to use for it.

    Args:
        rank: an int, a pair ``(r_out, r_in)``, a float ratio in ``(0, 1]``, an :class:`Energy` or
            :class:`VBMF` rule (or ``"energy:0.9"`` / ``"vbmf"``), or ``None`` (dense).
        method: ``"svd"``, ``"tucker2"``, ``"cp"``, ``"auto"`` or ``None`` for the global method.

    Example:
        >>> import tdnn
        >>> tdnn.LayerSpec(rank=0.25, method="cp")
        LayerSpec(rank=0.25, method='cp')
    """

    rank: RankValue
    method: str | None = None

    def __post_init__(self) -> None:
        check_rank_value(self.rank, "LayerSpec")
        if self.method is not None:
            check_method(self.method)


def check_rank_value(rank: Any, where: str) -> RankValue:
    """Validate one rank value (not yet against a layer)."""
    if rank is None or isinstance(rank, (Energy, VBMF)):
        return rank
    if isinstance(rank, str):
        return _parse_rule(rank, where)
    rank = plain_number(rank) if plain_number(rank) is not None else rank  # numpy scalars as int / float
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0):  # also rejects NaN
            raise ValueError(f"{where}: ratio={rank} must be in (0, 1]")
        return rank
    if isinstance(rank, bool) or not isinstance(rank, (int, tuple, list)) or (
            not isinstance(rank, int) and len(rank) != 2):
        raise TypeError(f"{where}: rank must be an int, a float ratio in (0, 1], a pair of ints or None, "
                        f"got {rank!r}")
    parts = rank_components(rank, 1 if isinstance(rank, int) else 2, where)
    return rank if isinstance(rank, int) else parts


def _parse_rule(text: str, where: str) -> Energy | VBMF:
    """``"vbmf"`` or ``"energy:<fraction>"`` (the forms a YAML config can hold)."""
    if text.strip().lower() == "vbmf":
        return VBMF()
    kind, _, value = text.partition(":")
    if kind.strip().lower() == "energy":
        try:
            return Energy(float(value))
        except ValueError as err:
            raise ValueError(f"{where}: {text!r}: {err}") from None
    raise ValueError(f"{where}: unknown rank rule {text!r}; use 'vbmf' or 'energy:<fraction>'")


def rank_from_spectra(cls: type[Factorized], layer: nn.Module, rule: Energy | VBMF,
                      spectra: list[torch.Tensor], name: str) -> Any:
    """The rank an :class:`Energy` or :class:`VBMF` rule gives ``layer`` from its spectra.

    ``spectra`` are :meth:`Factorized.spectra` of the layer (whitened for energy when calibrated,
    raw for VBMF). One rank per spectrum: an int for SVD, ``(r_out, r_in)`` for Tucker-2.
    """
    if not cls.spectral_ranks:
        raise ValueError(f"{name}: energy and VBMF ranks are read off singular values, which do not "
                         f"give {cls.method} ranks; give a {cls.method} layer an int or a ratio")
    ranks = []
    if isinstance(rule, Energy):
        for s in spectra:
            share = s.square().cumsum(0) / s.square().sum().clamp_min(1e-300)
            ranks.append(min(int((share < rule.fraction - 1e-12).sum()) + 1, s.numel()))
    else:  # VBMF also needs the shape of each unfolding (of one group)
        for s, matrix in zip(spectra, cls.unfoldings(cls.targets(layer, name=name)[0][0])):
            ranks.append(evbmf_rank(s.numpy(), tuple(matrix.shape)))
    return ranks[0] if len(ranks) == 1 else tuple(ranks)


def as_spec(value: Any, where: str) -> LayerSpec:
    """Normalise a user value (rank, dict or ``LayerSpec``) to a ``LayerSpec``."""
    if isinstance(value, LayerSpec):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"rank", "method"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; a layer spec has 'rank' and 'method'")
        if "rank" not in value:
            raise ValueError(f"{where}: a layer spec needs a 'rank'")
        return LayerSpec(check_rank_value(value["rank"], where), value.get("method"))
    return LayerSpec(check_rank_value(value, where))


NO_ENTRY = object()  # a mapping that names no pattern for a layer


class RankRule:
    """Turns ``ranks`` as the user gave it into a :class:`LayerSpec` per layer.

    Exact names win over patterns; patterns are tried in the order given.
    """

    def __init__(self, ranks: Any) -> None:
        self._fn: Callable[[str, nn.Module], Any] | None = None
        self._exact: dict[str, LayerSpec] = {}
        self._patterns: list[tuple[str, re.Pattern[str], LayerSpec]] = []
        self._used: set[str] = set()
        self._default: LayerSpec | None = None
        if callable(ranks) and not isinstance(ranks, Mapping):
            self._fn = ranks
        elif isinstance(ranks, Mapping):
            for key, value in ranks.items():
                if not isinstance(key, str):
                    raise TypeError(f"ranks: keys must be layer names or 're:' patterns, got {key!r}")
                spec = as_spec(value, f"ranks[{key!r}]")
                if key.startswith("re:"):
                    try:
                        self._patterns.append((key, re.compile(key[3:]), spec))
                    except re.error as err:
                        raise ValueError(f"ranks[{key!r}]: invalid regular expression: {err}") from None
                else:
                    self._exact[key] = spec
        else:
            self._default = as_spec(ranks, "ranks")

    def __call__(self, name: str, module: nn.Module) -> LayerSpec | object:
        """The spec for layer ``name``, or ``NO_ENTRY`` when a mapping does not cover it."""
        if self._default is not None:
            return self._default
        if self._fn is not None:
            try:
                value = self._fn(name, module)
            except Exception as err:
                raise ValueError(f"{name}: the ranks callable raised {type(err).__name__}: {err}") from err
            return as_spec(value, f"ranks({name!r})")
        if name in self._exact:
            self._used.add(name)
            return self._exact[name]
        for key, pattern, spec in self._patterns:
            if pattern.fullmatch(name):
                self._used.add(key)
                return spec
        return NO_ENTRY

    def unused_keys(self) -> list[str]:
        """Mapping keys that matched no layer so far."""
        keys = list(self._exact) + [key for key, _, _ in self._patterns]
        return [key for key in keys if key not in self._used]


def dense_param_count(layer: nn.Module) -> int:
    """Parameters of the dense layer (weight and bias)."""
    return sum(p.numel() for p in layer.parameters(recurse=False))


def saves(cls: type[Factorized], layer: nn.Module, rank: Any) -> bool:
    """Whether ``cls`` at ``rank`` has fewer parameters than the dense ``layer``."""
    return layer_cost("params", layer, cls, rank) < dense_param_count(layer)


def rank_levels(cls: type[Factorized], layer: nn.Module, multiple: int = 1) -> list[Any]:
    """``cls.rank_levels(layer)`` keeping, for ``multiple > 1``, the ranks whose every component is a
    multiple of it, smaller than it, or the full rank: channel counts that SIMD units and tensor
    cores process without a ragged remainder.

    Example:
        >>> import torch, tdnn
        >>> rank_levels(tdnn.SVDLinear, torch.nn.Linear(30, 20), 8)
        [1, 2, 3, 4, 5, 6, 7, 8, 16, 20]
    """
    levels = cls.rank_levels(layer)
    if multiple == 1:
        return levels
    top = cls.max_rank(layer)
    tops = top if isinstance(top, tuple) else (top,)
    return [rank for rank in levels if all(r % multiple == 0 or r < multiple or r == t for r, t in
                                           zip(rank if isinstance(rank, tuple) else (rank,), tops))]


def rank_for_ratio(cls: type[Factorized], layer: nn.Module, ratio: float, multiple: int = 1) -> Any:
    """The largest rank of ``cls`` whose parameter count stays within ``ratio`` of ``layer``'s
    (among :func:`rank_levels` for ``multiple``).

    Falls back to the smallest rank when even that exceeds the budget.
    """
    levels = rank_levels(cls, layer, multiple)
    budget = math.floor(ratio * dense_param_count(layer))
    lo, hi = 0, len(levels) - 1  # parameter counts grow with the level: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layer_cost("params", layer, cls, levels[mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return levels[lo]
