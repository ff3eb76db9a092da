"""What every factorized layer shares: registration, provenance, ``from_dense``, ``to_dense`` and sizing."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.algebra.whitening import Whitening
from tdnn.layers import registry
from tdnn.layers.registry import Geometry, LayerKind

Rank = Any  # an int, or a tuple with one int per rank component (Tucker-2: (r_out, r_in))
RANK_HINT = "; give this layer its own entry in a ranks mapping (None keeps it dense) or use a ratio"


def rank_components(rank: Any, arity: int, where: str, method: str = "") -> tuple[int, ...]:
    """``rank`` as ``arity`` positive ints (an int stands for all of them); ``where`` names the layer.

    Raises:
        TypeError: if ``rank`` is neither an int nor a sequence of ``arity`` ints.
        ValueError: if a component is below 1.
    """
    parts = (rank,) * arity if isinstance(rank, int) and not isinstance(rank, bool) else rank
    if (not isinstance(parts, (tuple, list)) or len(parts) != arity
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in parts)):
        shape = "an int" if arity == 1 else f"an int or {arity} ints"
        raise TypeError(f"{where}: {method + ' ' if method else ''}rank must be {shape}, got {rank!r}")
    if min(parts) < 1:
        raise ValueError(f"{where}: rank={rank!r} must be at least 1")
    return tuple(parts)


def grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """View a kernel ``(S, C/G, *k)`` as ``(G, S/G, C/G, *k)``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


class Factorized(nn.Sequential):
    """A chain of stock layers standing in for one dense layer.

    A subclass declared with ``method=`` and ``kind=`` (a kind name or :class:`tdnn.registry.LayerKind`)
    registers itself as that method's form for that layer kind, e.g.
    ``class SVDConv2d(SVD, kind="Conv2d")``; :func:`tdnn.compress_model` and :func:`tdnn.load` then find
    it. A method's generic class (declared with ``method=`` only) implements :meth:`_build`,
    :meth:`_decompose`, :meth:`dense_weight` and :meth:`max_rank` through the kind adapter, so a new
    kind is one line per method. The last child, ``last``, carries the original bias.

    Each instance records where it came from: ``dense_kwargs`` (the original constructor
    arguments), ``rank`` and ``rel_error`` (``‖W − W'‖ / ‖W‖`` at decomposition time).
    """

    method: ClassVar[str]
    kind: ClassVar[LayerKind]
    # What the method decomposes, and so which input vectors calibration collects.
    geometry: ClassVar[Geometry] = Geometry.PATCHES
    # False: on a plain matrix (Linear, 1×1 conv) the registry uses "svd" instead (Tucker-2, CP).
    takes_matrices: ClassVar[bool] = True
    rank_arity: ClassVar[int] = 1  # ints in a rank: 2 for Tucker-2's (r_out, r_in)
    # Whether Energy / VBMF rules apply (they read ranks off the unfoldings' spectra).
    spectral_ranks: ClassVar[bool] = True

    def __init_subclass__(cls, *, method: str | None = None, kind: str | LayerKind | None = None,
                          replace: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            cls.method = method
        if kind is not None:
            cls.kind = registry.kind_named(kind) if isinstance(kind, str) else kind
        if (method is not None or kind is not None) and hasattr(cls, "method") and hasattr(cls, "kind"):
            registry.register_method(cls, replace=replace)

    def __init__(self, children: OrderedDict[str, nn.Module], *, dense_kwargs: dict[str, Any],
                 rank: Rank) -> None:
        super().__init__(children)
        self.dense_kwargs = dense_kwargs
        self.rank = rank
        self.rel_error: float | None = None

    @property
    def groups(self) -> int:
        return self.dense_kwargs.get("groups", 1)

    # -- what a method provides --------------------------------------------------------------
    @classmethod
    def _build(cls, layer: nn.Module, rank: Rank, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        """The uninitialised children for ``layer`` at ``rank``."""
        raise NotImplementedError

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        """Fill the children's weights from per-group ``(whitened float64 weight, whitening)``."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel ``(out, in / groups, *k)``, computed from the factors."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, layer: nn.Module) -> Rank:
        """The largest rank this method accepts for ``layer`` (exact reconstruction for SVD/Tucker-2)."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, layer: nn.Module) -> str | None:
        """Why this method cannot factorize ``layer``, or ``None`` if it can."""
        return None

    @staticmethod
    def unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
        """The matrices whose spectra set this method's rank(s), one per rank component."""
        return [weight.flatten(1)]

    @classmethod
    def estimate_error(cls, spectra: list[torch.Tensor], rank: Rank) -> float:
        """Estimated relative squared error at ``rank`` from :meth:`spectra` (discarded energy)."""
        (s,) = spectra
        energy = s.square()
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))

    @classmethod
    def rank_levels(cls, layer: nn.Module) -> list[Rank]:
        """Ranks ordered by size, used to turn a parameter ratio into a rank."""
        return list(range(1, cls.max_rank(layer) + 1))

    # -- shared behaviour --------------------------------------------------------------------
    @classmethod
    def check_rank(cls, layer: nn.Module, rank: Rank, name: str = "layer") -> Rank:
        """Validate ``rank`` for ``layer``; return it in canonical form (an int, or a tuple).

        Raises:
            TypeError: if ``rank`` is not an int (or a tuple of :attr:`rank_arity` ints).
            ValueError: if ``rank`` is not positive or exceeds :meth:`max_rank`.
        """
        parts = rank_components(rank, cls.rank_arity, name, cls.method)
        top = cls.max_rank(layer)
        if any(r > t for r, t in zip(parts, top if cls.rank_arity > 1 else (top,))):
            raise ValueError(f"{name}: rank={rank} exceeds the full rank {top} of weight "
                             f"{tuple(cls.kind.kernel(layer).shape)} for method {cls.method!r}{RANK_HINT}")
        return parts if cls.rank_arity > 1 else parts[0]

    @classmethod
    def structure(cls, layer: nn.Module, rank: Rank, *, name: str = "layer",
                  device: torch.device | str | None = None) -> Factorized:
        """Build the factorized structure for ``layer`` at ``rank`` without decomposing.

        The children are uninitialised; this is what loading a checkpoint rebuilds. Pass
        ``device="meta"`` to size a candidate without allocating memory.
        """
        rank = cls.check_rank(layer, rank, name)
        reason = cls.unsupported(layer)
        if reason is not None:
            raise ValueError(f"{name}: {reason}")
        factory = {"device": device if device is not None else layer.weight.device,
                   "dtype": layer.weight.dtype}
        return cls(cls._build(layer, rank, factory), dense_kwargs=cls.kind.dense_kwargs(layer), rank=rank)

    @classmethod
    def targets(cls, layer: nn.Module, whitening: Whitening | None = None,
                *, name: str = "layer") -> list[tuple[torch.Tensor, Whitening | None]]:
        """Per group, the float64 (whitened) weight to decompose and the group's whitening."""
        weight = cls.kind.kernel(layer).detach()
        if weight.is_meta:
            raise ValueError(f"{name}: weight is on the meta device; nothing to decompose")
        if not decompose.all_finite(weight):
            raise ValueError(f"{name}: weight {tuple(weight.shape)} has NaN or Inf values")
        weight = weight.to(dtype=torch.float64, device="cpu")
        g = cls.kind.groups(layer)
        parts = []
        for i, w in enumerate(grouped(weight, g)):
            w = w.flatten(1) if cls.geometry is Geometry.PATCHES else w
            wh = None if whitening is None else whitening.group(i, g)
            parts.append((w if wh is None else wh.whiten(w), wh))
        return parts

    @classmethod
    def spectra(cls, layer: nn.Module, whitening: Whitening | None = None,
                *, name: str = "layer") -> list[torch.Tensor]:
        """Singular values of each of :meth:`unfoldings` of the (whitened) weight.

        For a grouped layer the groups' squared spectra are averaged: one rank serves every group.
        """
        per_group = [[decompose.singular_values(m) for m in cls.unfoldings(w)]
                     for w, _ in cls.targets(layer, whitening, name=name)]
        return [torch.stack([g[i] for g in per_group]).square().mean(0).sqrt()
                for i in range(len(per_group[0]))]

    @classmethod
    def from_dense(cls, layer: nn.Module, rank: Rank, *, name: str = "layer",
                   whitening: Whitening | None = None) -> Factorized:
        """Factorize ``layer`` at ``rank``; the factors come from a float64 decomposition.

        Args:
            layer: the dense layer, of this class's kind.
            rank: the rank (see the subclass for its form).
            name: the layer's name, used in error messages.
            whitening: input statistics (and output scale) from calibration data; the factors
                then minimise the layer's output error on that data instead of its weight error.

        Raises:
            ValueError: for a bad rank, an unsupported layer, non-finite weights or factors, or
                naming the layer, if the method's ``_decompose`` fails.
        """
        module = cls.structure(layer, rank, name=name)
        parts = cls.targets(layer, whitening, name=name)
        with torch.no_grad():
            try:
                module._decompose(parts)
            except Exception as err:  # a method of the user's own: say which layer it failed on
                raise ValueError(f"{name}: {cls.__qualname__}._decompose failed at rank {rank} "
                                 f"({type(err).__name__}: {err})") from err
            if layer.bias is not None:
                module.last.bias.copy_(layer.bias)
            bad = [n for n, p in module.named_parameters() if not decompose.all_finite(p)]
            if bad:
                raise ValueError(f"{name}: the {cls.method} factors {', '.join(bad)} have NaN or Inf values "
                                 f"(rank {rank}{', data-aware' if whitening is not None else ''}); check the "
                                 f"weights and calibration data, or raise damping")
            module.rel_error = decompose.relative_distance(cls.kind.kernel(layer).detach(), module.dense_weight())
        return module

    def to_dense(self) -> nn.Module:
        """Return the equivalent plain dense layer (a new module of the original kind)."""
        weight = self.last.weight
        # the last factor may have gained a bias since (a BatchNorm folded into it)
        layer = self.kind.build(self.dense_kwargs, bias=self.last.bias is not None,
                                device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.kind.set_kernel(layer, self.dense_weight())
            if layer.bias is not None:
                layer.bias.copy_(self.last.bias)
        return layer

    def extra_repr(self) -> str:
        err = "" if self.rel_error is None else f", rel_error={self.rel_error:.3g}"
        return f"method={self.method!r}, rank={self.rank}{err}"


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy float64 ``value`` into ``param`` (reshaping, casting to its dtype and device)."""
    param.copy_(value.reshape(param.shape).to(dtype=param.dtype, device=param.device))
