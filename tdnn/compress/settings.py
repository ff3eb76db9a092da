"""``CompressSettings``: every option of :func:`tdnn.compress_model`, checked when made (by the call, a
YAML config, the command line or a sweep) and recorded in the plan, so a checkpoint says how it was made."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from tdnn.compress.budget import Budget
from tdnn.core.checks import count, number
from tdnn.core.timing import LatencyTimer
from tdnn.layers.registry import check_method
from tdnn.planning.cost import Measure
from tdnn.planning.ranks import VBMF, Energy, LayerSpec, RankRule
from tdnn.statistics.refine import Refine

FilterFn = Callable[[nn.Module, str], bool]
VERSION = 2  # of the dict form (to_dict / from_dict); 2 added check_allocation
# what a field absent from an older version's dict meant then (version 1 never checked an allocation)
BEFORE = {1: {"check_allocation": False}}


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_blocks(blocks: Any) -> None:
    if blocks is None:
        return
    names = [blocks] if isinstance(blocks, str) else blocks
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"blocks must be a module name, a list of names, a 're:' pattern or None, got {blocks!r}")
    if isinstance(blocks, str) and blocks.startswith("re:"):
        try:
            re.compile(blocks[3:])
        except re.error as err:
            raise ValueError(f"blocks={blocks!r}: invalid regular expression: {err}") from None


@dataclass(frozen=True)
class CompressSettings:
    """How :func:`tdnn.compress_model` compresses; every value is checked here (see that function for
    each option's meaning). The data (``calibration``) and how the call runs (``inplace``,
    ``progress``) are arguments of the call, not settings.

    Example:
        >>> import tdnn
        >>> settings = tdnn.CompressSettings(budget=tdnn.Budget(params=0.5), sequential=True)
        >>> settings.to_dict()["budget"]
        {'params': 0.5, 'sensitivity': True}
        >>> tdnn.CompressSettings.from_dict(settings.to_dict()) == settings
        True
        >>> tdnn.CompressSettings(ranks=0.5, damping=-1)
        Traceback (most recent call last):
        ...
        ValueError: damping=-1 must be a number >= 0
    """

    ranks: Any = None
    method: str = "auto"
    filter_fn: FilterFn | None = None
    sequential: bool = False
    blocks: str | list[str] | None = None
    budget: Budget | None = None
    damping: float = 0.01
    latency_aware: bool | LatencyTimer = False
    rank_multiple: int = 1
    refine: bool | int | Refine = False
    check_allocation: bool = True

    def __post_init__(self) -> None:
        check_method(self.method)
        if (self.ranks is None) == (self.budget is None):
            raise ValueError("give exactly one of ranks= or budget= (choose layers for a budget with "
                             "filter_fn and the method with method=)")
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise TypeError(f"budget must be a tdnn.Budget, got {type(self.budget).__name__}")
        if self.ranks is not None:
            RankRule(self.ranks)  # checks every spec and pattern
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable (module, name) -> bool, got {type(self.filter_fn).__name__}")
        _flag("sequential", self.sequential)
        _check_blocks(self.blocks)
        object.__setattr__(self, "damping", number("damping", self.damping, low=0))  # frozen: made plain once
        if not isinstance(self.latency_aware, bool) and not callable(self.latency_aware):
            raise TypeError(f"latency_aware must be True, False or a callable (dense, factorized, x) -> ratio, "
                            f"got {self.latency_aware!r}")
        object.__setattr__(self, "rank_multiple", count("rank_multiple", self.rank_multiple))
        Refine.of(self.refine)  # checks it
        _flag("check_allocation", self.check_allocation)

    def data_needed(self) -> str | None:
        """Why these settings need calibration data, or ``None`` if they do not."""
        if self.sequential:
            return "sequential=True needs calibration data"
        if self.budget is not None and self.budget.measure is not Measure.PARAMS:
            return f"Budget({self.budget.measure}=...) needs calibration data: it depends on the input size"
        if self.latency_aware is not False:
            return "latency_aware needs calibration data: its first batch sets each layer's input size"
        if Refine.of(self.refine) is not None:
            return "refine needs calibration data: blocks are refined on their cached inputs"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-friendly data (kept in the plan and in checkpoints); a callable is
        recorded by its qualified name (``{"callable": "module.name"}``), not restorable."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self)}
        out["budget"] = None if self.budget is None else self.budget.to_dict()
        refine = Refine.of(self.refine)
        out["refine"] = False if refine is None else asdict(refine)
        return {"version": VERSION, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressSettings:
        """The settings :meth:`to_dict` wrote (a checkpoint's ``plan.settings`` entry).

        Raises:
            ValueError: for an unknown version or field, or a setting that was a callable (pass it again).
        """
        data = dict(data)
        version = data.pop("version", VERSION)
        if version != VERSION and not (isinstance(version, int) and version in BEFORE):
            raise ValueError(f"settings of version {version!r}; this tdnn reads versions up to {VERSION}")
        data = {**BEFORE.get(version, {}), **data}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"settings: unknown field {unknown[0]!r}")
        for key, value in data.items():
            if isinstance(value, Mapping) and set(value) == {"callable"}:
                raise ValueError(f"settings: {key} was the callable {value['callable']}; pass it again")
        if isinstance(data.get("budget"), Mapping):
            data["budget"] = Budget(**data["budget"])
        if isinstance(data.get("refine"), Mapping):
            data["refine"] = Refine(**data["refine"])
        return cls(**data)


def make_settings(settings: CompressSettings | None = None, **options: Any) -> CompressSettings:
    """``settings`` (or the defaults) with ``options`` changed, checked: how :func:`tdnn.compress_model`
    makes its settings from what it was given.

    Raises:
        TypeError: for a name that is not a setting, or ``settings`` of another type.
    """
    if settings is not None and not isinstance(settings, CompressSettings):
        raise TypeError(f"settings must be a tdnn.CompressSettings, got {type(settings).__name__}")
    names = [f.name for f in fields(CompressSettings)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"compress_model got an unexpected option {unknown[0]!r}; the settings are {', '.join(names)}")
    return CompressSettings(**options) if settings is None else replace(settings, **options)


def _plain(value: Any) -> Any:
    """A setting as JSON-friendly data: rank rules by their YAML form, tuples as lists."""
    if isinstance(value, Energy):
        return f"energy:{value.fraction}"
    if isinstance(value, VBMF):
        return "vbmf"
    if isinstance(value, LayerSpec):
        return {"rank": _plain(value.rank), "method": value.method}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return {"callable": f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"}
    return value
