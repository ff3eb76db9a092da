"""What compression changed: per-layer records and totals, read off the compressed model."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tdnn.core import temporary
from tdnn.core.batches import call
from tdnn.layers import registry, walk
from tdnn.layers.base import Factorized
from tdnn.planning.cost import model_flops
from tdnn.planning.plan import PLAN_ATTR, Plan
from tdnn.planning.ranks import dense_param_count


@dataclass
class LayerRecord:
    """One layer's numbers; FLOPs are ``None`` unless the report ran the model on an input."""

    name: str
    kind: str
    method: str | None
    rank: Any
    params_before: int
    params_after: int
    flops_before: int | None = None
    flops_after: int | None = None
    rel_error: float | None = None
    latency_ratio: float | None = None
    note: str | None = None


@dataclass
class Report:
    """Per-layer records and whole-model totals (before = the dense original), and what a budget's
    check on held-out data measured and chose (:attr:`tdnn.Plan.allocation`, or ``None``)."""

    layers: list[LayerRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    allocation: dict[str, Any] | None = None

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def flop_ratio(self) -> float | None:
        return None if self.flops_before is None else self.flops_after / self.flops_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "param_ratio": self.param_ratio, "flop_ratio": self.flop_ratio}

    def plot(self, path: str | os.PathLike[str], *, errors: dict[str, float] | None = None,
             title: str | None = None, dpi: int = 100) -> Any:
        """Draw the layers in model order into a ``.png``, ``.svg`` or ``.pdf`` file: each one's
        kept fraction of parameters (dense ones with the reason), relative weight error, measured
        output error when ``errors`` is given (:func:`tdnn.layer_errors`) and latency ratio when
        measured. Needs matplotlib (``pip install "tdnn[plot]"``). Returns the matplotlib ``Figure``.
        """
        from tdnn.analysis.plot import plot_report

        return plot_report(self, path, errors=errors, title=title, dpi=dpi)

    def __str__(self) -> str:
        flops = self.flops_before is not None
        head = ["layer", "type", "method", "rank", "params", "after"]
        head += ["MFLOPs", "after"] if flops else []
        latency = any(r.latency_ratio is not None for r in self.layers)
        head += ["rel.err"] + (["latency"] if latency else []) + ["note"]
        rows = []
        for r in self.layers:
            row = [r.name or "(model)", r.kind, r.method or "dense", _fmt_rank(r.rank),
                   f"{r.params_before:,}", f"{r.params_after:,}"]
            row += [_mflops(r.flops_before), _mflops(r.flops_after)] if flops else []
            row += ["-" if r.rel_error is None else f"{r.rel_error:.4f}"]
            row += [("-" if r.latency_ratio is None else f"x{r.latency_ratio:.2f}")] if latency else []
            row += [r.note or ""]
            rows.append(row)
        total = ["total", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}"]
        total += [_mflops(self.flops_before), _mflops(self.flops_after)] if flops else []
        total += [""] + ([""] if latency else []) + [f"params x{self.param_ratio:.3f}"
                  + (f", FLOPs x{self.flop_ratio:.3f}" if flops else ", pass inputs= for FLOPs")]
        table = format_table(head, rows, total, right={4, 5, 6, 7} if flops else {4, 5})
        return table if self.allocation is None else f"{table}\n{_allocation_line(self.allocation)}"


def _allocation_line(allocation: dict[str, Any]) -> str:
    """One line on a checked allocation: each candidate's held-out output error, the chosen one marked
    (``allocation: flat, of sensitivity 0.2100, flat 0.1800* (relative output error on 4 held-out samples)``)."""
    measured = ", ".join(f"{name} {error:.4f}{'*' if name == allocation['chosen'] else ''}"
                         for name, error in allocation.get("measured", {}).items())
    if not measured:
        return f"allocation: {allocation['chosen']}, not checked ({allocation.get('note', 'no held-out samples')})"
    return (f"allocation: {allocation['chosen']}, of {measured} (relative output error on "
            f"{allocation['held_out']} held-out samples)")


def format_table(head: list[str], rows: list[list[str]], total: list[str] | None = None, *,
                 right: set[int] = frozenset()) -> str:
    """A plain-text table: a head, a rule, the rows (and a rule and a total row); the columns in
    ``right`` are right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, *([total] if total else []))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * max(len(line(r)) for r in [head, *rows, *([total] if total else [])])
    return "\n".join([line(head), rule, *map(line, rows), *([rule, line(total)] if total else [])])


def _fmt_rank(rank: Any) -> str:
    if rank is None:
        return "-"
    return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)


def _mflops(flops: int | None) -> str:
    return "-" if flops is None else f"{flops / 1e6:,.2f}"


@torch.no_grad()
def report(model: nn.Module, inputs: Any = None) -> Report:
    """Summarise a (compressed) model: per-layer method, rank, parameters, FLOPs and weight error.

    Parameters are counted from the model itself; "before" counts come from each factorized
    layer's dense equivalent, so the totals equal the parameter counts of the original and the
    compressed model. FLOPs are measured with ``torch.utils.flop_counter`` when ``inputs`` (one
    batch: a tensor, a tuple of arguments or a dict of keyword arguments) is given.

    Args:
        model: a model returned by :func:`tdnn.compress_model` (any model works; layers that were
            never compressed show as dense).
        inputs: an example batch for FLOP counting, or ``None``.

    Returns:
        A :class:`Report`; ``str(report)`` is a readable table.

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> rep = tdnn.report(tdnn.compress_model(net, ranks=0.5), inputs=torch.randn(1, 64))
        >>> rep.params_before == sum(p.numel() for p in net.parameters())
        True
        >>> round(rep.param_ratio, 2)
        0.48
    """
    plan = getattr(model, PLAN_ATTR, None)
    entries = {entry.name: entry for entry in plan.layers} if isinstance(plan, Plan) else {}
    layers = list(walk.named_layers(model, walk.layer_or_factorized))
    records, seen_inputs = [], {}
    for name, module, _ in layers:
        entry = entries.get(name)
        if isinstance(module, Factorized):
            after = sum(p.numel() for p in module.parameters())
            before = dense_param_count(module.kind.build(module.dense_kwargs, device="meta"))
            records.append(LayerRecord(name, module.kind.name, module.method, module.rank,
                                       before, after, rel_error=module.rel_error,
                                       latency_ratio=getattr(entry, "latency_ratio", None)))
        else:
            count = dense_param_count(module)
            records.append(LayerRecord(name, registry.kind_of(module).name, None, None, count, count,
                                       note=getattr(entry, "reason", None),
                                       latency_ratio=getattr(entry, "latency_ratio", None)))

    rep = Report(records, allocation=plan.allocation if isinstance(plan, Plan) else None)
    rep.params_after = sum(p.numel() for p in model.parameters())
    rep.params_before = rep.params_after + sum(r.params_before - r.params_after for r in records)
    if inputs is None:
        return rep

    def remember(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen_inputs.setdefault(id(module), args)

    with temporary.hooks(module.register_forward_pre_hook(remember) for _, module, _ in layers), \
            FlopCounterMode(display=False) as counter:
        call(model, inputs)
    rep.flops_after = counter.get_total_flops()
    for record, (_, module, _) in zip(records, layers):
        args = seen_inputs.get(id(module))
        if args is None:
            record.note = (record.note + "; " if record.note else "") + "not called on this input"
            continue
        record.flops_after = model_flops(module, args)
        dense = module.to_dense() if isinstance(module, Factorized) else module
        record.flops_before = model_flops(dense, args)
    rep.flops_before = rep.flops_after + sum(
        r.flops_before - r.flops_after for r in records if r.flops_after is not None)
    return rep


def checkpoint_report(path: str | os.PathLike[str]) -> Report:
    """What a checkpoint written by :func:`tdnn.save` says, without the model: per layer the method,
    rank, saved weight error and parameters before and after (read off the stored tensor shapes and
    each factorized layer's original constructor arguments). Totals cover the listed layers only;
    :func:`report` on the loaded model gives whole-model totals and FLOPs.

    Raises:
        ValueError: if ``path`` is not a tdnn checkpoint or is damaged (the file named).
    """
    from safetensors import safe_open

    from tdnn.deploy.io import BUFFERS, add_aliases, read_header

    header = read_header(path)
    with safe_open(os.fspath(path), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys() if not key.startswith(BUFFERS)}
    add_aliases(path, header["aliases"], shapes)
    records = []
    for entry in header["plan"].layers:
        prefix = f"{entry.name}." if entry.name else ""
        after = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefix)
                    and (entry.factorized or "." not in key[len(prefix):]))
        saved = header["layers"].get(entry.name, {})
        before = after
        if entry.factorized:
            dense = registry.kind_named(entry.kind).build(saved["dense_kwargs"], device="meta")
            before = dense_param_count(dense)
        records.append(LayerRecord(entry.name, entry.kind, entry.method, entry.rank, before, after,
                                   rel_error=saved.get("rel_error"), latency_ratio=entry.latency_ratio,
                                   note=entry.reason))
    return Report(records, sum(r.params_before for r in records), sum(r.params_after for r in records),
                  allocation=header["plan"].allocation)
