"""Whitening: the linear algebra that makes truncation minimise a layer's output error on data.

A layer's input covariance ``cov`` (from calibration) gives ``cov + λI = R Rᵀ``; decomposing the
weight times ``R`` and mapping the factors back is data-aware truncation (:class:`Whitening`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdnn.algebra import decompose

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
