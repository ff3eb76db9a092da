"""Pictures: a sweep's metric against size and latency, and a report's layers (needs matplotlib).

matplotlib is optional (``pip install "tdnn[plot]"``) and imported only here, when a picture is
drawn. Figures are made with ``matplotlib.figure.Figure`` directly, not ``pyplot``: no global
state, no GUI backend, nothing to close. The file type follows the suffix: ``.png``, ``.svg``, ``.pdf``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdnn.planning.cost import Measure

# What is drawn: a tdnn.Sweep (its rows are tdnn.SweepPoint) and a tdnn.Report. Named loosely here:
# they import this module to draw themselves, and this one draws them by their attributes alone.
Sweep = SweepPoint = Report = Any

SUFFIXES = (".png", ".svg", ".pdf")
DENSE, FACTORIZED, MEASURED = "#b8b8b8", "#3a6ea5", "#e07b39"
NOTE_CHARS = 70  # a dense layer's reason, shortened to fit beside its bar


def _figure(**kwargs: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('drawing plots needs matplotlib: pip install "tdnn[plot]"') from None
    return Figure(**kwargs)


def checked_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if a picture can be written there: its suffix names a format, and matplotlib is installed.

    Raises:
        ValueError: for a suffix other than ``.png``, ``.svg`` or ``.pdf``.
        ImportError: without matplotlib.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"path {str(path)!r}: give a file ending in {', '.join(SUFFIXES)}")
    _figure()
    return path


def save(figure: Any, path: str | os.PathLike[str], *, dpi: int = 100) -> Path:
    """Write ``figure`` to ``path`` (its directory is created), in the format its suffix names.

    Raises:
        ValueError: for a suffix other than ``.png``, ``.svg`` or ``.pdf``.
    """
    path = checked_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _count(n: float) -> str:
    """``11.2 M``, ``22.7 k``, ``512``."""
    for scale, unit in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def _axis_label(cost: str, sweep: Sweep) -> str:
    original = sweep.original
    if Measure(cost) is Measure.PARAMS:
        return f"parameters (fraction of the original's {_count(original.params)})"
    if Measure(cost) is Measure.FLOPS:
        return f"FLOPs (fraction of the original's {_count(original.flops)})"
    return f"latency (fraction of the original's {original.latency * 1e3:.3g} ms)"


def _sweep_axes(ax: Any, sweep: Sweep, cost: str, pareto: tuple[SweepPoint, ...]) -> None:
    """One panel: a line per (mode, method) in budget order (points only for latency, which is
    measured, so noisy), the original as a star, the front as a dashed step line."""
    series: dict[str, list[SweepPoint]] = {}
    for row in sweep.rows:
        if row.mode != "original":
            series.setdefault(row.label, []).append(row)
    markers = "osD^vP"
    for i, (label, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r.target)
        ax.plot([r.cost(cost) for r in rows], [r.metric for r in rows], marker=markers[i % len(markers)],
                linestyle="none" if Measure(cost) is Measure.LATENCY else "-", linewidth=1.2, markersize=5, label=label)
    ax.plot([1.0], [sweep.original.metric], marker="*", markersize=14, color="black", linestyle="none",
            label="original")
    ax.plot([r.cost(cost) for r in pareto], [r.metric for r in pareto], drawstyle="steps-post",
            linestyle="--", color="#555555", marker="o", markersize=10, markerfacecolor="none",
            label="Pareto front")
    ax.set_xlabel(_axis_label(cost, sweep))
    ax.set_ylabel(f"{sweep.metric} ({'higher' if sweep.maximize else 'lower'} is better)")
    ax.grid(True, alpha=0.3)


def sweep_figure(sweep: Sweep, *, title: str | None = None) -> Any:
    """The figure :meth:`tdnn.Sweep.plot` writes: the metric against parameters, and against
    latency (else FLOPs) when measured; the original marked, each Pareto front drawn."""
    costs = [sweep.measure] + [c for c in ("latency", "flops") if c != sweep.measure
                               and all(r.cost(c) is not None for r in sweep.rows)][:1]
    fig = _figure(figsize=(5.2 * len(costs), 4.0), layout="constrained")
    axes = fig.subplots(1, len(costs), sharey=True, squeeze=False)[0]
    for ax, cost in zip(axes, costs):
        _sweep_axes(ax, sweep, cost, sweep.pareto if cost == sweep.measure else sweep.front(cost))
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title or f"{sweep.metric} against size: {len(sweep.rows) - 1} compressed models")
    return fig


def plot_sweep(sweep: Sweep, path: str | os.PathLike[str], *, title: str | None = None, dpi: int = 100) -> Any:
    """Draw :func:`sweep_figure` into ``path``; returns the figure."""
    checked_path(path)  # before the work of drawing
    fig = sweep_figure(sweep, title=title)
    save(fig, path, dpi=dpi)
    return fig


def _kept_axes(ax: Any, report: Report) -> None:
    """Kept fraction of each layer's parameters; dense layers grey, with the reason they stayed dense."""
    n = len(report.layers)
    kept = [r.params_after / max(r.params_before, 1) for r in report.layers]
    colors = [DENSE if r.method is None else FACTORIZED for r in report.layers]
    ax.barh(range(n), kept, color=colors, height=0.7)
    for i, r in enumerate(report.layers):
        if r.method is None:
            note = r.note or "dense"
            ax.text(0.02, i, note if len(note) <= NOTE_CHARS else note[:NOTE_CHARS - 1] + "…",
                    va="center", fontsize=6.5)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("kept fraction of parameters")
    ax.set_yticks(range(n), [r.name or "(model)" for r in report.layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_ylabel("layer (model order)")


def _error_axes(ax: Any, report: Report, errors: Mapping[str, float] | None) -> None:
    """Weight error of each factorized layer and, when given, its measured output error."""
    rows = [(i, r) for i, r in enumerate(report.layers) if r.method is not None]
    height = 0.38 if errors else 0.7
    shift = height / 2 if errors else 0.0
    ax.barh([i - shift for i, _ in rows], [r.rel_error or 0.0 for _, r in rows], height=height,
            color=FACTORIZED, label="weight error ‖W−W'‖/‖W‖")
    if errors:
        measured = [(i, errors[r.name]) for i, r in rows if r.name in errors]
        ax.barh([i + shift for i, _ in measured], [e for _, e in measured], height=height, color=MEASURED,
                label="output error, measured")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("relative error")
    ax.grid(True, axis="x", alpha=0.3)


def _latency_axes(ax: Any, report: Report) -> None:
    rows = [(i, r.latency_ratio) for i, r in enumerate(report.layers) if r.latency_ratio is not None]
    ax.barh([i for i, _ in rows], [v for _, v in rows], height=0.7,
            color=[FACTORIZED if v < 1 else DENSE for _, v in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("latency, factorized / dense")
    ax.grid(True, axis="x", alpha=0.3)


def report_figure(report: Report, *, errors: Mapping[str, float] | None = None, title: str | None = None) -> Any:
    """The figure :meth:`tdnn.Report.plot` writes: one row per layer in model order, with the kept
    fraction of its parameters (dense layers grey, with the reason), its relative weight error and,
    when ``errors`` is given (:func:`tdnn.layer_errors`), its measured output error, and the
    factorized/dense latency ratio when it was measured (``latency_aware=True``).

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> figure = report_figure(tdnn.report(tdnn.compress_model(net, ranks={"0": 8})))
        >>> [ax.get_xlabel() for ax in figure.axes], len(figure.axes[0].patches)
        (['kept fraction of parameters', 'relative error'], 2)
    """
    if not report.layers:
        raise ValueError("the report has no layers to draw")
    latency = any(r.latency_ratio is not None for r in report.layers)
    panels = 3 if latency else 2
    fig = _figure(figsize=(3.6 * panels + 1.6, 1.2 + 0.24 * len(report.layers)), layout="constrained")
    axes = fig.subplots(1, panels, sharey=True, width_ratios=[1.6] + [1] * (panels - 1))
    _kept_axes(axes[0], report)
    _error_axes(axes[1], report, errors)
    if latency:
        _latency_axes(axes[2], report)
    factorized = sum(r.method is not None for r in report.layers)
    fig.suptitle(title or f"{factorized} of {len(report.layers)} layers factorized, "
                          f"parameters x{report.param_ratio:.3f}")
    return fig


def plot_report(report: Report, path: str | os.PathLike[str], *, errors: Mapping[str, float] | None = None,
                title: str | None = None, dpi: int = 100) -> Any:
    """Draw :func:`report_figure` into ``path``; returns the figure."""
    checked_path(path)
    fig = report_figure(report, errors=errors, title=title)
    save(fig, path, dpi=dpi)
    return fig
