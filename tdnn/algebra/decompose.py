"""Tensor decompositions behind the factorized layers.

This is the only module that imports tensorly. Every function takes a weight tensor, works in
float64 under ``torch.no_grad()`` with a fixed seed, and returns float64 factors; the caller
casts them to the layer's dtype and device. tensorly's backend is switched only inside a local
context, so a user's own tensorly code keeps its backend.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from tensorly.decomposition._cp import initialize_cp

SEED = 0


_SLAB = 1 << 22  # elements per slab when a large tensor is worked on a slab of rows at a time


def slabs(tensor: torch.Tensor, size: int | None = None) -> Iterator[slice]:
    """Row ranges of ``tensor`` (at least 1-D) of about ``size`` elements each (default ``_SLAB``):
    for work whose whole-tensor form would make full-size temporaries."""
    step = max(1, (size or _SLAB) // max(1, math.prod(tensor.shape[1:])))
    for start in range(0, tensor.shape[0], step):
        yield slice(start, start + step)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``, scanned a slab at a time: ``torch.isfinite`` of a whole float
    tensor makes a full-size temporary (``abs``), 512 MiB for an 8192² float64 covariance."""
    if tensor.dim() == 0:
        return bool(torch.isfinite(tensor))
    return all(bool(torch.isfinite(tensor[rows]).all()) for rows in slabs(tensor))


def relative_distance(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖exact − approx‖ / ‖exact‖`` in float64, a slab of rows at a time (no full-size copies)."""
    num = den = 0.0
    for rows in slabs(exact):
        e = exact[rows].double()
        num += float((e - approx[rows].double()).square().sum())
        den += float(e.square().sum())
    return num ** 0.5 / max(den ** 0.5, 1e-300)


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    # Meta/offloaded weights cannot be decomposed; callers check that before reaching here.
    return tensor.detach().to(dtype=torch.float64, device="cpu")


@contextmanager
def _quiet() -> Iterator[None]:
    # tensorly warns whenever a requested rank exceeds one unfolding's size and then clamps it,
    # which is expected for full-rank Tucker and wide CP decompositions.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        yield


def _top_singular(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets from an eigendecomposition of the smaller Gram matrix.

    Much faster than a full SVD of a wide unfolding (a 512 × 4608 kernel: 0.08 s against 0.9 s
    on 2 cores) and accurate in float64 for every singular value above ~1e-8 of the largest.

    Returns:
        ``u`` ``(m, rank)`` with orthonormal columns, singular values ``s`` ``(rank,)``, and
        ``proj = uᵀ @ matrix`` ``(rank, n)``, so ``u @ proj`` is the best rank-``rank`` approximation.
    """
    rows, cols = matrix.shape
    if rows <= cols or rank > cols:  # the row Gram also completes a basis beyond the matrix rank
        evals, vecs = torch.linalg.eigh(matrix @ matrix.T)
        u = vecs.flip(1)[:, :rank]
        proj = u.T @ matrix
    else:
        evals, vecs = torch.linalg.eigh(matrix.T @ matrix)
        v = vecs.flip(1)[:, :rank]
        # QR keeps u orthonormal even where singular values vanish.
        u, r = torch.linalg.qr(matrix @ v)
        proj = r @ v.T
    return u, evals.flip(0)[:rank].clamp_min(0).sqrt(), proj


@torch.no_grad()
def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` singular values, descending, from the smaller Gram matrix (fast, float64)."""
    m = _f64(matrix)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def _tensorly_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **_: object
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_top_singular`` with tensorly's SVD signature, for its ``svd=`` argument."""
    rank = min(matrix.shape) if n_eigenvecs is None else min(n_eigenvecs, *matrix.shape)
    u, s, proj = _top_singular(matrix, rank)
    return u, s, proj / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]


@torch.no_grad()
def svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``matrix ≈ left @ right`` with the singular values split evenly.

    ``left @ right`` is the best rank-``rank`` approximation (Eckart–Young). Splitting
    ``sqrt(s)`` onto both factors keeps them on the same scale, which is what gradient descent
    on the factors wants during fine-tuning.

    Returns:
        ``left`` of shape ``(m, rank)`` and ``right`` of shape ``(rank, n)``.
    """
    u, s, proj = _top_singular(_f64(matrix), rank)
    root = s.sqrt().clamp_min(torch.finfo(s.dtype).tiny)
    return u * root, proj / root[:, None]


@torch.no_grad()
def tucker2(
    weight: torch.Tensor, ranks: tuple[int, int], *, n_iter_max: int = 4, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv kernel over its two channel modes: HOSVD, then HOOI refinement.

    The HOSVD start is tensorly's ``partial_tucker`` (given a Gram-matrix SVD, which is ~10x faster
    than its default on wide unfoldings). The refinement sweeps are done here because tensorly's
    HOOI loop ignores the ``svd=`` argument and runs a full SVD per mode and sweep.

    Args:
        weight: kernel of shape ``(S, C, kh, kw)``.
        ranks: ``(r_out, r_in)``.
        n_iter_max: HOOI sweeps at most.
        tol: stop when a sweep lowers the relative error by less than this.

    Returns:
        ``core`` ``(r_out, r_in, kh, kw)``, ``out_factor`` ``(S, r_out)``, ``in_factor`` ``(C, r_in)``
        with ``weight ≈ core ×₀ out_factor ×₁ in_factor``.
    """
    w = _f64(weight)
    r_out, r_in = ranks
    with tl.backend_context("pytorch"), _quiet():
        (core, (out_factor, in_factor)), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=[0, 1], init="svd", svd=_tensorly_svd, n_iter_max=0)
    # Unfoldings as matmuls (much faster than einsum here): w3 is (S, C, kh·kw).
    s_, c_ = w.shape[:2]
    w3 = w.reshape(s_, c_, -1)
    norm2, error = w.square().sum(), float("inf")
    for _ in range(n_iter_max):
        in_proj = (w3.transpose(1, 2) @ in_factor).reshape(s_, -1)                   # (S, k·r_in)
        out_factor = _top_singular(in_proj, r_out)[0]
        out_proj = (out_factor.T @ w3.reshape(s_, -1)).reshape(r_out, c_, -1)       # (r_out, C, k)
        in_factor = _top_singular(out_proj.transpose(0, 1).reshape(c_, -1), r_in)[0]
        core = (out_proj.transpose(1, 2) @ in_factor).transpose(1, 2).reshape(r_out, r_in, *w.shape[2:])
        previous, error = error, float((norm2 - core.square().sum()).clamp_min(0).sqrt() / norm2.sqrt())
        if previous - error < tol:
            break
    return core, out_factor, in_factor


@torch.no_grad()
def cp(
    weight: torch.Tensor, rank: int, *, n_iter_max: int = 25, tol: float = 1e-4
) -> tuple[torch.Tensor, ...]:
    """CP (PARAFAC) of a conv kernel: tensorly's SVD start, then alternating least squares.

    The ALS sweeps are done here with a matricised-tensor-times-Khatri-Rao product that never
    forms the ``(S·C·kw) × R`` Khatri-Rao matrix of a spatial mode: tensorly's ``parafac`` does,
    which takes over a minute per sweep on a 512-channel 3×3 kernel. Kernels of a million entries
    or more run the sweeps in float32 (ample for factors that fine-tuning refines anyway).

    Args:
        weight: kernel of shape ``(S, C, *k)`` with one or more spatial axes.
        rank: number of rank-one components ``R``.
        n_iter_max: ALS sweeps at most.
        tol: stop when a sweep lowers the error by less than this fraction of it.

    Returns:
        Factors ``(S, R)``, ``(C, R)`` and one ``(k_i, R)`` per spatial axis, e.g. for a 2-D kernel
        ``weight[s, c, i, j] ≈ Σ_r out[s, r] in[c, r] vertical[i, r] horizontal[j, r]``; the
        component scales are spread evenly over the factors.
    """
    w = _f64(weight)
    with tl.backend_context("pytorch"), _quiet():
        _, factors = initialize_cp(w, rank, init="svd", svd=_tensorly_svd, random_state=SEED)
    dtype = torch.float32 if w.numel() >= 2 ** 20 else torch.float64
    w = w.to(dtype)
    s_, c_, *ks = w.shape
    w_out = w.reshape(s_, -1)                        # (S, C·k…)
    w_in = w.transpose(0, 1).reshape(c_, -1)         # (C, S·k…)
    norm2, error = float(w.double().square().sum()), float("inf")

    fs = [f.to(dtype) for f in factors]              # out (S, R), in (C, R), one (k_i, R) per axis
    grams = [f.T @ f for f in fs]                    # R×R, refreshed as each factor changes

    def update(i: int, mttkrp: torch.Tensor) -> torch.Tensor:
        """Least-squares factor ``i`` given the others, from its MTTKRP and the Hadamard of Grams."""
        gram = math.prod(g for j, g in enumerate(grams) if j != i)
        gram.diagonal().add_(1e-10 * gram.diagonal().mean().clamp_min(1e-30))  # ridge
        # the ridged Gram is positive definite: Cholesky, unless rounding says otherwise
        chol, info = torch.linalg.cholesky_ex(gram)
        fs[i] = (torch.cholesky_solve(mttkrp.T, chol) if int(info) == 0 else torch.linalg.solve(gram, mttkrp.T)).T
        grams[i] = fs[i].T @ fs[i]
        return fs[i]

    def khatri_rao(*factors: torch.Tensor) -> torch.Tensor:
        out = factors[0]
        for f in factors[1:]:
            out = (out[:, None, :] * f[None, :, :]).reshape(-1, rank)
        return out

    axes = "ijklmn"[:len(ks)]
    for _ in range(n_iter_max):
        a = update(0, w_out @ khatri_rao(*fs[1:]))
        b = update(1, w_in @ khatri_rao(a, *fs[2:]))
        t = (a.T @ w_out).reshape(rank, c_, *ks)                     # contract S once for all axes
        tb = torch.einsum(f"rc{axes},cr->r{axes}", t, b)              # (R, *k)
        for d, axis in enumerate(axes):  # each spatial factor from tb and the other spatial factors
            others = [(x, fs[2 + e]) for e, x in enumerate(axes) if e != d]
            spec = ",".join([f"r{axes}", *(f"{x}r" for x, _ in others)]) + f"->{axis}r"
            mttkrp = torch.einsum(spec, tb, *(f for _, f in others))
            update(2 + d, mttkrp)
        # ‖W − Ŵ‖² = ‖W‖² − 2⟨W, Ŵ⟩ + ‖Ŵ‖², all from R×R products (the last MTTKRP gives ⟨W, Ŵ⟩)
        inner = float((mttkrp * fs[-1]).sum())
        previous, error = error, max(norm2 - 2 * inner + float(math.prod(grams).sum()), 0.0) ** 0.5 / norm2 ** 0.5
        if previous - error < tol * previous:
            break

    factors = [f.double() for f in fs]
    norms = torch.stack([f.norm(dim=0) for f in factors])            # (modes, R)
    scale = norms.prod(0).pow(1 / len(factors))
    return tuple(f / n.clamp_min(1e-300) * scale for f, n in zip(factors, norms))
