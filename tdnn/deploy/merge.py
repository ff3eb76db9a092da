"""``merge``: turn factorized layers back into the plain layers they approximate."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from torch import nn

from tdnn.layers import walk
from tdnn.layers.base import Factorized
from tdnn.planning.plan import PLAN_ATTR, Plan

MERGED = "merged back to dense by tdnn.merge"


def merge(model: nn.Module, *, filter_fn: Callable[[nn.Module, str], bool] | None = None,
          inplace: bool = False) -> nn.Module:
    """Replace every factorized layer of ``model`` by the equivalent dense layer of its original kind.

    The dense weight is the product of the factors (:meth:`tdnn.Factorized.to_dense`), so the
    merged model computes the same function as the factorized one, up to floating-point rounding.
    Use it for deployment targets that prefer one large matmul, or to inspect the approximation.
    Train/eval mode, frozen parameters and hooks carry over; merged layers stay in the plan as
    dense, with a reason.

    Args:
        model: a model with :class:`tdnn.Factorized` layers (a model without any is returned as is).
        filter_fn: ``(module, name) -> bool``; only layers for which it returns ``True`` are merged.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The merged model (a copy unless ``inplace``).

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> small = tdnn.compress_model(net.double(), ranks={"0": 8})
        >>> dense = tdnn.merge(small)
        >>> [type(m).__name__ for m in dense]
        ['Linear', 'ReLU', 'Linear']
        >>> x = torch.randn(5, 32, dtype=torch.float64)
        >>> torch.allclose(dense(x), small(x), rtol=1e-12, atol=1e-12)
        True
    """
    if not inplace:
        model = copy.deepcopy(model)
    merged = {name: module for name, module, _ in walk.named_layers(model, lambda m: isinstance(m, Factorized))
              if filter_fn is None or filter_fn(module, name)}
    model = walk.swap(model, {id(module): module.to_dense() for module in merged.values()})
    plan = getattr(model, PLAN_ATTR, None)
    if isinstance(plan, Plan):
        plan.layers = [dataclasses.replace(e, method=None, rank=None, reason=MERGED) if e.name in merged else e
                       for e in plan.layers]
    return model
