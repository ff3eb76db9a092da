"""Which layers :func:`tdnn.compress_model` factorizes and with which class — decided for every layer
before any rank is known or any work done — and the rank each one gets from its own spec."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.compress.settings import CompressSettings
from tdnn.layers import registry, walk
from tdnn.layers.base import Factorized
from tdnn.planning.cost import Measure, layer_cost
from tdnn.planning.plan import LayerJob, LayerPlan
from tdnn.planning.ranks import (
    NO_ENTRY,
    VBMF,
    Energy,
    RankRule,
    dense_param_count,
    rank_for_ratio,
    rank_from_spectra,
    saves,
)

NO_FORM = "has no form for"  # the reason of a layer whose kind the method does not cover


def why_not(name: str, module: nn.Module, parent: nn.Module | None, ties: dict[int, list[str]]) -> str | None:
    """Reasons that hold whatever the rank: modules that must stay as they are."""
    if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
        return "nn.MultiheadAttention reads out_proj.weight directly and never calls it"
    if isinstance(parent, nn.TransformerEncoderLayer) and module in (parent.linear1, parent.linear2):
        return "nn.TransformerEncoderLayer's inference fast path reads linear1.weight and linear2.weight directly"
    base = registry.kind_of(module).dense_type
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
    owners = [n.rpartition(".")[0] for n in ties.get(id(module.weight), [])]
    others = [n or "<root>" for n in owners if n != name]
    if others:
        return f"weight is tied to {', '.join(others)} (the same Parameter); factorizing would untie them"
    return None


def _select(name: str, module: nn.Module, parent: nn.Module | None, rule: RankRule | None,
            settings: CompressSettings, ties: dict[int, list[str]]) -> LayerJob:
    """Decide whether and how a layer is factorized, before any rank is known."""
    job, method = LayerJob(name, module, LayerPlan(name=name, kind=registry.kind_of(module).name)), settings.method
    reason = why_not(name, module, parent, ties)
    if reason is None and settings.filter_fn is not None and not settings.filter_fn(module, name):
        reason = "excluded by filter_fn"
    if reason is None and rule is not None:
        spec = rule(name, module)
        if spec is NO_ENTRY:
            reason = "no entry in ranks matches this layer"
        elif spec.rank is None:
            reason = "rank None: kept dense"
        elif isinstance(spec.rank, float) and spec.rank == 1.0:
            reason = "ratio 1.0 keeps every parameter"
        else:
            job.rank_spec, method = spec.rank, spec.method or method
    if reason is None:
        job.cls = registry.factorized_class(module, registry.check_method(method, f"{name}: method"))
        reason = (f"method {method!r} {NO_FORM} {job.entry.kind} layers" if job.cls is None
                  else job.cls.unsupported(module))
    if reason is not None:
        job.keep_dense(reason)
        return job
    if job.rank_spec is not None and not isinstance(job.rank_spec, (float, Energy, VBMF)):
        job.cls.check_rank(module, job.rank_spec, name)
    if not decompose.all_finite(module.weight.detach()):
        raise ValueError(f"{name}: weight {tuple(module.weight.shape)} has NaN or Inf values")
    return job


def select(model: nn.Module, settings: CompressSettings) -> list[LayerJob]:
    """Every dense layer of ``model`` with the decision made before any rank is known.

    Raises:
        ValueError: for a model without dense layers, a bad rank or method (naming the layer) or
            non-finite weights.
    """
    found = list(walk.named_layers(model))
    if not found:
        done = sum(isinstance(m, Factorized) for m in model.modules())
        kinds = ", ".join(k.name for k in registry.kinds())
        raise ValueError(f"{type(model).__name__} has no dense layers to compress"
                         + (f": its {done} layers are already factorized" if done else f" ({kinds})"))
    rule = None if settings.ranks is None else RankRule(settings.ranks)
    ties = walk.shared_parameters(model)
    jobs = [_select(name, module, parent, rule, settings, ties) for name, module, parent in found]
    if rule is not None:
        for key in rule.unused_keys():
            warnings.warn(f"ranks: pattern '{key}' matches no layer of {type(model).__name__}", stacklevel=3)
    missing = sorted({j.entry.kind for j in jobs if NO_FORM in (j.entry.reason or "")})
    if missing and all(j.cls is None for j in jobs):
        raise ValueError(f"{type(model).__name__}: nothing to compress: no registered method has a form for its "
                         f"{', '.join(missing)} layers under method {settings.method!r} (registered: "
                         f"{', '.join(f'{m} for {k}' for m, k, _ in registry.forms()) or 'none'}); was a method "
                         f"or kind unregistered?")
    return jobs


def why_none(jobs: list[LayerJob]) -> str:
    """Why no layer is factorized: the commonest reasons, with how many layers each."""
    counts = Counter(j.entry.reason for j in jobs)
    return "; ".join(f"{n} layer{'s' if n > 1 else ''}: {reason}" for reason, n in counts.most_common(3))


def own_rank(job: LayerJob, multiple: int) -> Any:
    """The concrete rank from the layer's own spec (``ranks=``)."""
    cls, module, spec, name = job.cls, job.module, job.rank_spec, job.name
    if isinstance(spec, float):
        return rank_for_ratio(cls, module, spec, multiple)
    if isinstance(spec, (Energy, VBMF)):
        # Energy follows the whitened spectrum (output energy); VBMF models the weight's own noise.
        spectra = job.spectra if isinstance(spec, Energy) and job.spectra is not None else \
            cls.spectra(module, name=name)
        return rank_from_spectra(cls, module, spec, spectra, name)
    return cls.check_rank(module, spec, name)


def accept(job: LayerJob, rank: Any) -> None:
    """Record ``rank`` in the plan, or keep the layer dense if that would not save parameters."""
    if saves(job.cls, job.module, rank):
        job.entry.method, job.entry.rank = job.cls.method, rank
    else:
        job.keep_dense(f"{job.cls.method} at rank {rank} would have {layer_cost(Measure.PARAMS, job.module, job.cls, rank)} "
                       f"parameters, not fewer than the dense {dense_param_count(job.module)}")
