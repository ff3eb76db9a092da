"""Empirical variational Bayes matrix factorisation (EVBMF) rank estimation.

The analytic global solution of Nakajima et al. (JMLR 2013), as used by Kim et al. (ICLR 2016)
to pick Tucker-2 ranks from the two channel-mode unfoldings of a conv kernel: the noise
variance is estimated by minimising the free energy, and the rank is the number of singular
values above the resulting threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    H, alpha = len(s), L / M
    x = s ** 2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                 + alpha * np.sum(np.log(tau_z1 / alpha + 1)) + residual / (M * sigma2)
                 + (L - H) * np.log(sigma2))


def evbmf_rank(singular_values: np.ndarray, shape: tuple[int, int]) -> int:
    """The EVBMF rank of a matrix of ``shape`` with these (descending) singular values.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> signal = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 80))
        >>> noisy = signal + 0.1 * rng.normal(size=(60, 80))
        >>> evbmf_rank(np.linalg.svd(noisy, compute_uv=False), noisy.shape)
        5
    """
    L, M = sorted(shape)
    s = np.asarray(singular_values, dtype=np.float64)[:L]
    if s.size < 2 or s[0] <= 0:
        return 1
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    # Bounds of the noise variance (Nakajima et al., Theorem 3 and below).
    eh_ub = min(math.ceil(L / (1 + alpha)) - 1, L) - 1
    upper = float(np.sum(s ** 2)) / (L * M)
    tail = s[eh_ub + 1:] if 0 <= eh_ub + 1 < L else s[-1:]
    lower = max(float(tail[0] ** 2) / (M * xubar), float(np.mean(tail ** 2)) / M)
    positive = s[s > 0]
    if lower <= 0 or lower >= upper or positive.size < L:
        lower = max(lower, upper * 1e-12)
        s = np.maximum(s, math.sqrt(lower * M) * 1e-6)
    sigma2 = minimize_scalar(_free_energy, args=(L, M, s, 0.0, xubar), bounds=(lower, upper),
                             method="bounded").x
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))
