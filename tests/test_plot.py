"""Pictures: the sweep's Pareto plot and the report's per-layer plot, drawn with Agg and read back."""

import sys

import pytest
import torch

import tdnn
from tdnn.analysis.report import LayerRecord, Report
from tdnn.analysis.sweep import SweepPoint
from models import DIGITS_CONFIG, small_resnet, tiny_llama, tiny_llama_tokens as tokens

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def row(mode, target, metric, params, latency_ratio):
    return SweepPoint(mode, None if mode == "original" else "auto", target, int(params * 1e6), params,
                      int(params * 3e9), params, latency_ratio * 0.02, latency_ratio, metric)


def swept(latency=True):
    rows = [row("original", None, 0.95, 1.0, 1.0),
            row("plain", 0.2, 0.10, 0.2, 0.7), row("plain", 0.5, 0.60, 0.5, 0.9), row("plain", 0.7, 0.90, 0.7, 1.1),
            row("data-aware", 0.2, 0.93, 0.2, 0.6), row("data-aware", 0.5, 0.96, 0.5, 0.8),
            row("data-aware", 0.7, 0.96, 0.7, 0.95)]
    if not latency:
        rows = [SweepPoint(**{**r.__dict__, "latency": None, "latency_ratio": None}) for r in rows]
    return tdnn.Sweep(tuple(rows), "top-1")


def lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_sweep_plot_draws_each_series_the_original_and_both_fronts(tmp_path):
    result = swept()
    fig = result.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_params, by_latency = fig.axes
    assert by_params.get_xlabel() == "parameters (fraction of the original's 1 M)"
    assert by_latency.get_xlabel() == "latency (fraction of the original's 20 ms)"
    assert by_params.get_ylabel() == "top-1 (higher is better)"
    drawn = lines(by_params)
    assert set(drawn) == {"plain", "data-aware", "original", "Pareto front"}
    assert list(drawn["plain"].get_xdata()) == [0.2, 0.5, 0.7]
    assert list(drawn["data-aware"].get_ydata()) == [0.93, 0.96, 0.96]
    assert (list(drawn["original"].get_xdata()), list(drawn["original"].get_ydata())) == ([1.0], [0.95])
    assert list(drawn["Pareto front"].get_xdata()) == [0.2, 0.5]  # the marked rows, cheapest first
    front = lines(by_latency)["Pareto front"]
    assert list(front.get_xdata()) == [r.latency_ratio for r in result.front("latency")] == [0.6, 0.8]
    assert [t.get_text() for t in by_params.get_legend().get_texts()] == list(drawn)


def test_without_latency_the_second_panel_is_flops_and_svg_works(tmp_path):
    fig = swept(latency=False).plot(tmp_path / "plots" / "sweep.svg", title="digits")
    text = (tmp_path / "plots" / "sweep.svg").read_text()
    assert "<svg" in text and fig.get_suptitle() == "digits"
    assert [ax.get_xlabel().split()[0] for ax in fig.axes] == ["parameters", "FLOPs"]


def record(name, method, after, **kw):
    return LayerRecord(name, "Conv2d", method, 4 if method else None, 100, after, **kw)


def layered():
    return Report([record("conv1", None, 100, note="rank None: kept dense"),
                   record("layer1.0.conv1", "tucker2", 30, rel_error=0.4, latency_ratio=0.7),
                   record("layer1.0.conv2", "tucker2", 50, rel_error=0.2, latency_ratio=1.2),
                   record("fc", None, 100, note="the budget keeps this layer dense " + "because " * 20)], 400, 280)


def test_report_plot_draws_a_bar_per_layer_in_model_order(tmp_path):
    rep = layered()
    fig = rep.plot(tmp_path / "layers.png", errors={"layer1.0.conv1": 0.1, "layer1.0.conv2": 0.05})
    kept, error, latency = fig.axes
    assert [t.get_text() for t in kept.get_yticklabels()] == [r.name for r in rep.layers]
    assert kept.get_ylim()[0] > kept.get_ylim()[1]  # first layer at the top
    assert [round(p.get_width(), 2) for p in kept.patches] == [1.0, 0.3, 0.5, 1.0]
    notes = [t.get_text() for t in kept.texts]
    assert notes[0] == "rank None: kept dense" and notes[1].endswith("…") and len(notes) == 2
    assert sorted(round(p.get_width(), 2) for p in error.patches) == [0.05, 0.1, 0.2, 0.4]  # weight and output
    assert [t.get_text() for t in error.get_legend().get_texts()] == ["weight error ‖W−W'‖/‖W‖",
                                                                      "output error, measured"]
    assert [p.get_width() for p in latency.patches] == [0.7, 1.2]
    assert (kept.get_xlabel(), error.get_xlabel(), latency.get_xlabel()) == (
        "kept fraction of parameters", "relative error", "latency, factorized / dense")
    assert fig.get_suptitle() == "2 of 4 layers factorized, parameters x0.700"


def test_report_plot_without_measurements_has_two_panels(tmp_path):
    records = [LayerRecord(**{**r.__dict__, "latency_ratio": None}) for r in layered().layers]
    fig = Report(records, 400, 280).plot(tmp_path / "layers.svg")
    assert len(fig.axes) == 2 and len(fig.axes[1].patches) == 2 and fig.axes[1].get_legend() is None
    assert "<svg" in (tmp_path / "layers.svg").read_text()


def test_plots_of_a_compressed_transformer(tmp_path):
    model = tiny_llama()
    calibration = [tokens(0), tokens(1)]
    result = tdnn.sweep(model, targets=(0.5, 0.7, 0.9), calibration=calibration, inputs=[tokens(4)])
    fig = result.plot(tmp_path / "sweep.png")
    assert len(lines(fig.axes[0])["Pareto front"].get_xdata()) == len(result.pareto) >= 1
    small = tdnn.compress_model(model, budget=tdnn.Budget(params=0.7), calibration=calibration)
    rep = tdnn.report(small, inputs=tokens(4))
    errors = tdnn.layer_errors(model, small, [tokens(4)])
    fig = rep.plot(tmp_path / "layers.png", errors=errors)
    kept, error = fig.axes
    assert [t.get_text() for t in kept.get_yticklabels()] == [r.name for r in rep.layers]
    assert len(kept.patches) == len(rep.layers) and len(error.patches) == 2 * len(errors)
    assert len(kept.texts) == sum(r.method is None for r in rep.layers) >= 1  # lm_head, kept by the budget


def test_report_plot_of_a_resnet_compressed_by_the_digits_config(tmp_path):
    net = small_resnet().eval()
    small = tdnn.compress_model(net, **tdnn.load_config(DIGITS_CONFIG).compress)
    fig = tdnn.report(small, inputs=torch.randn(1, 3, 16, 16)).plot(tmp_path / "layers.png")
    kept = fig.axes[0]
    assert [t.get_text() for t in kept.texts] == ["rank None: kept dense"] * 2  # the stem and fc
    assert len(kept.patches) == 7


def test_a_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r'pip install "tdnn\[plot\]"'):
        layered().plot(tmp_path / "layers.png")
    with pytest.raises(ImportError, match=r'pip install "tdnn\[plot\]"'):
        swept().plot(tmp_path / "sweep.png")
    assert not list(tmp_path.iterdir())


def test_a_file_type_matplotlib_is_not_asked_for_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sweep\.jpg'.*\.png, \.svg, \.pdf"):
        swept().plot(tmp_path / "sweep.jpg")
