"""The compression plan: what happened to each layer, in a JSON-friendly form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
class Plan:
    """Per-layer decisions of one :func:`tdnn.compress_model` call, in walk order."""

    layers: list[LayerPlan] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def factorized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.factorized]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        layers = []
        for entry in data["layers"]:
            rank = entry.get("rank")
            layers.append(LayerPlan(**{**entry, "rank": tuple(rank) if isinstance(rank, list) else rank}))
        return cls(layers)
