"""The compression plan: what happened to each layer, in a JSON-friendly form, and the record a
layer carries on its way through :func:`tdnn.compress_model`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

PLAN_ATTR = "tdnn_plan"  # where compress_model leaves the plan on the model


@dataclass
class LayerPlan:
    """One layer's fate.

    Attributes:
        name: fully-qualified module name (the first one, for a module shared under several).
        kind: ``"Linear"`` or ``"Conv2d"``.
        method: ``"svd"``, ``"tucker2"`` or ``"cp"`` when factorized, ``None`` when left dense.
        rank: the concrete rank when factorized.
        reason: why the layer was left dense.
        data_aware: whether the factors were fitted to calibration data.
        latency_ratio: factorized / dense latency, when measured (``latency_aware``).
    """

    name: str
    kind: str
    method: str | None = None
    rank: Any = None
    reason: str | None = None
    data_aware: bool = False
    latency_ratio: float | None = None

    @property
    def factorized(self) -> bool:
        return self.method is not None


@dataclass
class LayerJob:
    """A layer on its way through :func:`tdnn.compress_model`: its plan entry, the dense module (let
    go once replaced), the factorized class chosen for it and what calibration told about it."""

    name: str
    module: nn.Module | None
    entry: LayerPlan
    cls: type | None = None  # the tdnn.Factorized subclass; None: the layer stays dense
    rank_spec: Any = None  # from ranks=; None under a budget
    spectra: list[torch.Tensor] | None = None  # of the whitened weight, from a survey of the data
    input_shape: tuple[int, ...] | None = None
    out_scale: torch.Tensor | None = None  # of a BatchNorm reading the layer's output

    def keep_dense(self, reason: str) -> None:
        """Leave the layer dense, saying why."""
        self.entry.reason, self.entry.method, self.entry.rank, self.entry.data_aware = reason, None, None, False
        self.cls = None


@dataclass
class Plan:
    """Per-layer decisions of :func:`tdnn.compress_model`, in walk order, the settings of each call
    that made them (:meth:`tdnn.CompressSettings.to_dict`, oldest first), what each refined
    block's held-out output error was before and after refinement (``block``, ``before``,
    ``after``, ``best_step``, ``steps``) and, for a budget checked on held-out data, what was
    measured and chosen (``allocation``: ``held_out`` samples, ``measured`` — each candidate's
    relative output error there — and the ``chosen`` candidate; :mod:`tdnn.compress.allocation`)."""

    layers: list[LayerPlan] = field(default_factory=list)
    settings: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    allocation: dict[str, Any] | None = None

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def factorized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.factorized]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "settings": list(self.settings),
                "blocks": list(self.blocks), "allocation": _copied(self.allocation)}

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """The plan written by :meth:`to_dict` (e.g. read back from JSON), every field checked.

        Raises:
            ValueError: naming the first field (``'plan.layers[3].rank'``) that is missing or wrong.
        """
        if not isinstance(data, dict) or "layers" not in data:
            raise ValueError("'plan': a plan is a mapping with a 'layers' list")
        if not isinstance(data["layers"], list):
            raise ValueError(f"'plan.layers' must be a list, got {type(data['layers']).__name__}")
        settings, blocks = data.get("settings", []), data.get("blocks", [])
        for key, value in (("settings", settings), ("blocks", blocks)):
            if not isinstance(value, list) or not all(isinstance(s, dict) and all(isinstance(k, str) for k in s)
                                                      for s in value):
                raise ValueError(f"'plan.{key}' must be a list of mappings")
        return cls([_entry(entry, f"plan.layers[{i}]") for i, entry in enumerate(data["layers"])], settings, blocks,
                   _allocation(data.get("allocation")))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# LayerPlan field -> (check, what it must be)
_FIELDS = {
    "name": (lambda v: isinstance(v, str), "text"),
    "kind": (lambda v: isinstance(v, str), "text"),
    "method": (lambda v: v is None or isinstance(v, str), "text or null"),
    "rank": (lambda v: v is None or _is_int(v) or (isinstance(v, (list, tuple)) and v and all(map(_is_int, v))),
             "an int, a list of ints or null"),
    "reason": (lambda v: v is None or isinstance(v, str), "text or null"),
    "data_aware": (lambda v: isinstance(v, bool), "true or false"),
    "latency_ratio": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
                      "a number or null"),
}


def _entry(entry: Any, where: str) -> LayerPlan:
    if not isinstance(entry, dict):
        raise ValueError(f"'{where}' must be a mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _FIELDS.keys())
    if unknown:
        raise ValueError(f"'{where}' has the unknown field {unknown[0]!r}")
    for key in ("name", "kind"):
        if key not in entry:
            raise ValueError(f"'{where}.{key}' is missing")
    for key, value in entry.items():
        check, what = _FIELDS[key]
        if not check(value):
            raise ValueError(f"'{where}.{key}' must be {what}, got {value!r}")
    rank = entry.get("rank")
    return LayerPlan(**{**entry, "rank": tuple(rank) if isinstance(rank, (list, tuple)) else rank})


def _copied(allocation: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if allocation is None else {**allocation, "measured": dict(allocation.get("measured", {}))}


def _allocation(data: Any) -> dict[str, Any] | None:
    """``plan.allocation`` as :meth:`Plan.to_dict` wrote it, checked."""
    if data is None:
        return None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError("'plan.allocation' must be a mapping or null")
    measured = data.get("measured", {})
    if not isinstance(measured, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                 and not isinstance(v, bool) for k, v in measured.items()):
        raise ValueError("'plan.allocation.measured' must map candidate names to numbers")
    if not isinstance(data.get("chosen"), str) or not _is_int(data.get("held_out")):
        raise ValueError("'plan.allocation' needs 'chosen' (text) and 'held_out' (an int)")
    return _copied(data)
