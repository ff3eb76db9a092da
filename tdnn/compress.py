"""``compress_model``: plan each layer, factorize it, swap it in."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tdnn import walk
from tdnn.layers import CPConv2d, Factorized, SVDConv2d, SVDLinear, Tucker2Conv2d
from tdnn.plan import PLAN_ATTR, LayerPlan, Plan
from tdnn.ranks import NO_ENTRY, RankRule, check_method, dense_param_count, param_count, rank_for_ratio

# Methods for k×k convolutions; a new method is one more entry here.
CONV_METHODS: dict[str, type[Factorized]] = {"svd": SVDConv2d, "tucker2": Tucker2Conv2d, "cp": CPConv2d}
AUTO_CONV = "tucker2"

FilterFn = Callable[[nn.Module, str], bool]


def factorized_class(module: nn.Module, method: str) -> type[Factorized]:
    """The layer class for ``module`` under ``method``.

    A Linear layer or a 1×1 convolution is a matrix, for which Tucker-2 and CP both reduce to
    the SVD, so those always use SVD; k×k convolutions use ``method`` (Tucker-2 for ``"auto"``).
    """
    if isinstance(module, nn.Linear):
        return SVDLinear
    if tuple(module.kernel_size) == (1, 1):
        return SVDConv2d
    return CONV_METHODS[AUTO_CONV if method == "auto" else method]


def _why_not(name: str, module: nn.Module, parent: nn.Module | None) -> str | None:
    """Reasons that hold whatever the rank: modules that must stay as they are."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        return "nn.MultiheadAttention reads out_proj.weight directly and never calls it"
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    if type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides forward; its behaviour is not a plain {base.__name__}"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet; run one forward pass first"
    if module.weight.is_meta:
        return "weight is on the meta device; load real weights before compressing"
    # Factorizing would bake in the current weight and silently drop the constraint.
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "weight is parametrized; call torch.nn.utils.parametrize.remove_parametrizations first"
    if any(type(h).__name__ in ("WeightNorm", "SpectralNorm") for h in module._forward_pre_hooks.values()):
        return "weight is recomputed by a weight_norm/spectral_norm hook; remove it first"
    return None


def _plan_layer(name: str, module: nn.Module, parent: nn.Module | None, rule: RankRule,
                method: str, filter_fn: FilterFn | None) -> LayerPlan:
    entry = LayerPlan(name=name, kind="Linear" if isinstance(module, nn.Linear) else "Conv2d")
    reason = _why_not(name, module, parent)
    if reason is None and filter_fn is not None and not filter_fn(module, name):
        reason = "excluded by filter_fn"
    spec = rule(name, module) if reason is None else None
    if reason is None and spec is NO_ENTRY:
        reason = "no entry in ranks matches this layer"
    elif reason is None and spec.rank is None:
        reason = "rank None: kept dense"
    if reason is not None:
        entry.reason = reason
        return entry

    cls = factorized_class(module, check_method(spec.method or method, f"{name}: method"))
    reason = cls.unsupported(module)
    if reason is None and isinstance(spec.rank, float) and spec.rank == 1.0:
        reason = "ratio 1.0 keeps every parameter"
    if reason is not None:
        entry.reason = reason
        return entry

    rank = (rank_for_ratio(cls, module, spec.rank) if isinstance(spec.rank, float)
            else cls.check_rank(module, spec.rank, name))
    factor_params, dense_params = param_count(cls, module, rank), dense_param_count(module)
    if factor_params >= dense_params:
        entry.reason = (f"{cls.method} at rank {rank} would have {factor_params} parameters, "
                        f"not fewer than the dense {dense_params}")
        return entry
    if not torch.isfinite(module.weight.detach()).all():
        raise ValueError(f"{name}: weight {tuple(module.weight.shape)} has NaN or Inf values")
    entry.method, entry.rank = cls.method, rank
    return entry


def compress_model(model: nn.Module, ranks: Any, *, method: str = "auto",
                   filter_fn: FilterFn | None = None, inplace: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by low-rank factorized ones.

    Every layer is planned first (so bad input fails before any work), then decomposed in
    float64 and swapped in. Layers are left dense, with a reason recorded in the plan, when the
    factorized form would not have fewer parameters, when the method does not apply (e.g. CP on a
    grouped conv), when ``filter_fn`` or ``ranks`` excludes them, and for modules that must not be
    swapped (``nn.MultiheadAttention.out_proj``, subclasses overriding ``forward``).

    Args:
        model: any module; layers are found at any nesting depth.
        ranks: a rank spec for every layer (``int``; a pair ``(r_out, r_in)`` for Tucker-2; a
            ``float`` ratio in ``(0, 1]`` of each layer's parameters to keep), a mapping from layer
            name or ``"re:<pattern>"`` to a spec (``None`` keeps a layer dense; a
            :class:`tdnn.LayerSpec` or ``{"rank": ..., "method": ...}`` picks a method), or a
            callable ``(name, module) -> spec``. Layers a mapping does not cover stay dense.
        method: ``"auto"`` (SVD for Linear and 1×1 convs, Tucker-2 for k×k convs), ``"svd"``,
            ``"tucker2"`` or ``"cp"``. Linear and 1×1 layers always use SVD.
        filter_fn: ``(module, name) -> bool``; layers for which it returns ``False`` stay dense.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The compressed model (a copy unless ``inplace``), with its :class:`tdnn.Plan` in the
        attribute ``tdnn_plan``.

    Raises:
        ValueError: for a bad rank or method (naming the layer), non-finite weights, or a model
            without Linear/Conv2d layers.
        TypeError: for a rank of the wrong type.

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(),
        ...                           torch.nn.Flatten(), torch.nn.Linear(32 * 6 * 6, 10))
        >>> small = tdnn.compress_model(net, ranks=0.5)
        >>> [type(m).__name__ for m in small]
        ['Tucker2Conv2d', 'ReLU', 'Flatten', 'SVDLinear']
        >>> small(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_method(method)
    rule = RankRule(ranks)
    layers = list(walk.named_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d layers to compress")
    plan = Plan([_plan_layer(name, module, parent, rule, method, filter_fn)
                 for name, module, parent in layers])
    for key in rule.unused_keys():
        warnings.warn(f"ranks: pattern '{key}' matches no layer of {type(model).__name__}", stacklevel=2)

    if not inplace:
        # Copy only now: planning never mutates, and a copy keeps the same module order.
        memo: dict[int, Any] = {}
        model = copy.deepcopy(model, memo)
        layers = [(name, memo[id(module)], None) for name, module, _ in layers]
    replacements = {}
    for (name, module, _), entry in zip(layers, plan.layers):
        if entry.factorized:
            cls = factorized_class(module, entry.method)
            replacements[id(module)] = cls.from_dense(module, entry.rank, name=name)
    model = walk.swap(model, replacements)
    previous = getattr(model, PLAN_ATTR, None)
    if isinstance(previous, Plan):  # compressing twice: keep what earlier calls factorized
        plan.layers = previous.factorized() + plan.layers
    setattr(model, PLAN_ATTR, plan)
    return model
