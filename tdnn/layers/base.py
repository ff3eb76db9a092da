"""What every factorized layer shares: provenance, ``from_dense``, ``to_dense`` and sizing."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import nn

from tdnn import decompose
from tdnn.calibrate import Whitening

Rank = Any  # int for SVD and CP, (r_out, r_in) for Tucker-2
RANK_HINT = "; give this layer its own entry in a ranks mapping (None keeps it dense) or use a ratio"


def dense_kwargs(layer: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``layer`` (without device or dtype)."""
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": tuple(layer.kernel_size), "stride": tuple(layer.stride),
                "padding": layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                "dilation": tuple(layer.dilation), "groups": layer.groups,
                "bias": layer.bias is not None, "padding_mode": layer.padding_mode}
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(layer).__name__}")


def groups_of(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def grouped(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """View a conv kernel ``(S, C/G, kh, kw)`` as ``(G, S/G, C/G, kh, kw)``."""
    return weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


class Factorized(nn.Sequential):
    """A chain of stock ``nn.Linear`` / ``nn.Conv2d`` layers standing in for one dense layer.

    Subclasses name their children (the last one, ``last``, carries the original bias) and
    implement :meth:`_build`, :meth:`_decompose`, :meth:`dense_weight` and :meth:`max_rank`.
    Each instance records where it came from: ``dense_kwargs`` (the original constructor
    arguments), ``rank`` and ``rel_error`` (``‖W − W'‖ / ‖W‖`` at decomposition time).
    """

    method: ClassVar[str]
    dense_type: ClassVar[type[nn.Module]]
    # True: decompose the kernel unfolded to (S, C·kh·kw) and calibrate on input patches;
    # False: decompose the 4-D kernel and calibrate on input channels.
    flat: ClassVar[bool] = True

    def __init__(self, children: OrderedDict[str, nn.Module], *, dense_kwargs: dict[str, Any],
                 rank: Rank) -> None:
        super().__init__(children)
        self.dense_kwargs = dense_kwargs
        self.rank = rank
        self.rel_error: float | None = None

    # -- what subclasses provide -------------------------------------------------------------
    @classmethod
    def _build(cls, layer: nn.Module, rank: Rank,
               factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        """The uninitialised children for ``layer`` at ``rank``."""
        raise NotImplementedError

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        """Fill the children's weights from per-group ``(whitened float64 weight, whitening)``."""
        raise NotImplementedError

    @staticmethod
    def unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
        """The matrices whose spectra set this method's rank(s), one per rank dimension."""
        return [weight.flatten(1)]

    @classmethod
    def estimate_error(cls, spectra: list[torch.Tensor], rank: Rank) -> float:
        """Estimated relative squared error at ``rank`` from :meth:`spectra` (discarded energy)."""
        (s,) = spectra
        energy = s.square()
        return float(energy[rank:].sum() / energy.sum().clamp_min(1e-300))

    def dense_weight(self) -> torch.Tensor:
        """The weight of the equivalent dense layer, computed from the factors."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, layer: nn.Module) -> Rank:
        """The largest rank this method accepts for ``layer`` (exact reconstruction for SVD/Tucker-2)."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, layer: nn.Module) -> str | None:
        """Why this method cannot factorize ``layer``, or ``None`` if it can."""
        return None

    @classmethod
    def rank_levels(cls, layer: nn.Module) -> list[Rank]:
        """Ranks ordered by size, used to turn a parameter ratio into a rank."""
        top = cls.max_rank(layer)
        return list(range(1, top + 1))

    # -- shared behaviour --------------------------------------------------------------------
    @classmethod
    def check_rank(cls, layer: nn.Module, rank: Rank, name: str = "layer") -> Rank:
        """Validate ``rank`` for ``layer``; return it in canonical form.

        Raises:
            TypeError: if ``rank`` is not an int (or, for Tucker-2, a pair of ints).
            ValueError: if ``rank`` is not positive or exceeds :meth:`max_rank`.
        """
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{name}: {cls.method} rank must be an int, got {rank!r}")
        top = cls.max_rank(layer)
        if rank < 1:
            raise ValueError(f"{name}: rank={rank} must be at least 1")
        if rank > top:
            raise ValueError(f"{name}: rank={rank} exceeds the full rank {top} of weight "
                             f"{tuple(layer.weight.shape)} for method {cls.method!r}{RANK_HINT}")
        return rank

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
        return cls(cls._build(layer, rank, factory), dense_kwargs=dense_kwargs(layer), rank=rank)

    @classmethod
    def targets(cls, layer: nn.Module, whitening: Whitening | None = None,
                *, name: str = "layer") -> list[tuple[torch.Tensor, Whitening | None]]:
        """Per group, the float64 (whitened) weight to decompose and the group's whitening."""
        weight = layer.weight.detach()
        if weight.is_meta:
            raise ValueError(f"{name}: weight is on the meta device; nothing to decompose")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}: weight {tuple(weight.shape)} has NaN or Inf values")
        weight = weight.to(dtype=torch.float64, device="cpu")
        g = groups_of(layer)
        parts = []
        for i, w in enumerate(grouped(weight, g) if weight.dim() == 4 else [weight]):
            w = w.flatten(1) if cls.flat else w
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
            layer: the dense ``nn.Linear`` or ``nn.Conv2d``.
            rank: the rank (see the subclass for its form).
            name: the layer's name, used in error messages.
            whitening: input statistics (and output scale) from calibration data; the factors
                then minimise the layer's output error on that data instead of its weight error.

        Raises:
            ValueError: for a bad rank, an unsupported layer or non-finite weights.
        """
        module = cls.structure(layer, rank, name=name)
        parts = cls.targets(layer, whitening, name=name)
        weight = layer.weight.detach()
        with torch.no_grad():
            module._decompose(parts)
            if layer.bias is not None:
                module.last.bias.copy_(layer.bias)
            approx = module.dense_weight().double()
            exact = weight.double()
            module.rel_error = float((exact - approx).norm() / exact.norm().clamp_min(1e-300))
        return module

    def to_dense(self) -> nn.Module:
        """Return the equivalent plain ``nn.Linear`` / ``nn.Conv2d`` (a new module)."""
        weight = self.last.weight
        # the last factor may have gained a bias since (a BatchNorm folded into it)
        kwargs = {**self.dense_kwargs, "bias": self.last.bias is not None}
        layer = self.dense_type(**kwargs, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.dense_weight())
            if layer.bias is not None:
                layer.bias.copy_(self.last.bias)
        return layer

    def extra_repr(self) -> str:
        err = "" if self.rel_error is None else f", rel_error={self.rel_error:.3g}"
        return f"method={self.method!r}, rank={self.rank}{err}"


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy float64 ``value`` into ``param`` (reshaping, casting to its dtype and device)."""
    param.copy_(value.reshape(param.shape).to(dtype=param.dtype, device=param.device))
