"""A layer's input statistics: the streaming second moment ``E[x xᵀ]`` of what its weight multiplies.

``x`` is what the layer's weight multiplies as its kind sees it
(:meth:`tdnn.layers.registry.LayerKind.vectors`): an input feature vector (Linear), an input
position's channel vector (Tucker-2, CP) or an unfolded input patch (SVD of a conv). Products are
taken in float32 and summed in float64 (memory O(n²) per layer, whatever the amount of data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.algebra.whitening import Root, Whitening, square_root
from tdnn.layers import registry
from tdnn.layers.registry import Geometry


@dataclass
class InputStats:
    """Streaming second moment of a layer's inputs and what was learned about its surroundings.

    Attributes:
        geometry: how the inputs are read (:class:`~tdnn.layers.registry.Geometry`): unfolded conv
            patches ordered like ``weight.flatten(1)`` (a Linear layer's input features), or each
            position's channel vector.
        gram: sum of ``x xᵀ`` (float64, on CPU); the covariance once :attr:`cov` was read.
        count: number of vectors summed.
        input_shape: shape of the first input seen (for FLOP counting).
        out_scale: ``|γ| / sqrt(var + eps)`` of a BatchNorm fed by this layer, else ``None``.
        cross: sum of ``x_ref xᵀ`` where ``x_ref`` is the same input in the uncompressed
            reference model (sequential mode), else ``None``.
    """

    geometry: Geometry
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

    def whitening(self, damping: float) -> Whitening:
        """The :class:`~tdnn.algebra.whitening.Whitening` these statistics give a layer's weight."""
        return Whitening(out_scale=self.out_scale, damping=damping, cross=self.cross_cov, root=self.root(damping))

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


def rows(module: nn.Module, x: torch.Tensor, geometry: Geometry, mask: torch.Tensor | None = None) -> torch.Tensor:
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
