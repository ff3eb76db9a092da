"""tdnn.sweep: budgets in one calibration pass, the Pareto front, fidelity, layer errors, `tdnn sweep`;
numpy numbers and single names where sequences are expected, inputs and originals that do not fit."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import tdnn
from tdnn.cli import main
from tdnn.analysis.sweep import SweepPoint, pareto_mask
from models import small_resnet, tiny_llama, tiny_llama_tokens as tokens

TARGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def images(n, seed, size=16):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def count_calibration_passes(model, batches):
    """Calibration passes through ``model`` (or its copies, which carry the hook), in batches' worth
    of samples: a forward on (a slice of) one of ``batches`` adds its share of that batch."""
    calls = []

    def hook(module, args, kwargs):
        seen = args[0] if args else kwargs.get("input_ids")
        for b in batches:
            b = b["input_ids"] if isinstance(b, dict) else b
            if seen.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                calls.append(seen.shape[0] / b.shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_pareto_mask_on_a_constructed_example():
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 0.5]
    values = [0.5, 0.9, 0.7, 0.9, 0.95, 0.95, math.nan]
    # (2, 0.7) is beaten at the same cost, (3, 0.9) by a cheaper equal point, (5, 0.95) likewise; NaN never counts
    assert pareto_mask(costs, values) == [True, True, False, False, True, False, False]
    assert pareto_mask([1, 1], [0.5, 0.5]) == [True, True]  # ties dominate neither
    assert pareto_mask([1, 2, 3], [3.0, 1.0, 2.0], maximize=False) == [True, True, False]


def point(mode, target, params, metric, latency, pareto=False):
    return SweepPoint(mode, None if mode == "original" else "auto", target, params, params / 100, None, None,
                      latency / 1e3, latency, metric, pareto=pareto)


def test_the_sweep_marks_its_rows_and_chooses_from_them():
    rows = (point("original", None, 100, 0.99, 1.0, pareto=True),  # marks are the sweep's to set
            point("data-aware", 0.3, 30, 0.97, 0.8), point("data-aware", 0.5, 50, 0.99, 0.6),
            point("data-aware", 0.1, 10, 0.50, 0.9))
    result = tdnn.Sweep(rows, "top-1")
    assert [r.pareto for r in result.rows] == [False, True, True, True]
    assert [r.target for r in result.pareto] == [0.1, 0.3, 0.5]  # cheapest first
    assert [r.target for r in result.front("latency")] == [0.5]  # fastest and best at once
    assert result.cheapest(0.95).target == 0.3 and result.cheapest(0.999) is None
    assert result.original.params == 100
    head, rule, *lines = str(result).splitlines()
    assert head.split()[-4:] == ["top-1", "compress", "s", "pareto"] and set(rule) == {"-"}
    assert [line.endswith("*") for line in lines] == [False, True, True, True]
    with pytest.raises(ValueError, match="cost='memory'"):
        result.front("memory")


def test_a_six_point_sweep_costs_one_calibration_pass():
    net = small_resnet().eval()
    batches = [images(32, s) for s in range(2)]
    calls = count_calibration_passes(net, batches)
    evaluated = []

    def score(model):
        evaluated.append(model)
        with torch.no_grad():
            return -float((model(images(16, 9)) - net(images(16, 9))).square().mean())

    result = tdnn.sweep(net, score, targets=TARGETS, calibration=batches, inputs=[images(8, 7)], check_allocation=False)
    # one pass for the statistics, one for the budget's sensitivities: as many as a single point costs
    assert sum(calls) == 2 * len(batches)
    assert len(evaluated) == len(TARGETS) + 1 and evaluated[-1] is net
    assert result.metric == "score" and [r.target for r in result.rows] == [None, *TARGETS]
    for row, target in zip(result.rows[1:], TARGETS):
        assert abs(row.param_ratio - target) < 0.02 and row.flop_ratio < 1 and row.latency > 0
        assert row.mode == "data-aware" and row.metric <= 0
    marks = pareto_mask([r.param_ratio for r in result.rows], [r.metric for r in result.rows])
    assert [r.pareto for r in result.rows] == marks and result.rows[0].pareto  # nothing beats the original's 0
    assert result.rows[0].latency is not None and result.rows[0].latency_ratio == 1.0

    calls.clear()
    tdnn.sweep(net, score, targets=(0.5,), calibration=batches, inputs=[images(8, 7)], latency=False, check_allocation=False)
    assert sum(calls) == 2 * len(batches)


def test_the_original_is_left_as_it_was():
    net = small_resnet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tdnn.sweep(net, targets=(0.5,), calibration=[images(16, 0)], inputs=[images(8, 1)])
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_methods_and_modes_each_collect_what_they_need():
    net = small_resnet().eval()
    batches = [images(32, s) for s in range(2)]
    calls = count_calibration_passes(net, batches)
    result = tdnn.sweep(net, targets=(0.3, 0.6), calibration=batches, methods=("svd", "tucker2"),
                        modes=("plain", "data-aware"), inputs=[images(16, 5)], latency=False, check_allocation=False)
    # SVD reads a conv's unfolded patches, Tucker-2 its channels: statistics once each; sensitivities once
    assert sum(calls) == 3 * len(batches)
    assert [r.label for r in result.rows] == ["original"] + [f"{mode} {method}" for mode in ("plain", "data-aware")
                                                             for method in ("svd", "tucker2") for _ in (0.3, 0.6)]
    assert result.metric == "top-1 agreement" and result.rows[0].metric == 1.0
    calls.clear()
    tdnn.sweep(net, targets=(0.4, 0.6), calibration=batches, modes=("sequential",), latency=False)
    assert sum(calls) > 2 * len(batches)  # sequential fits behind compressed layers: its own passes


def test_one_calibration_keeps_the_statistics_of_every_method():
    # a Calibration keeps a conv's statistics per way of reading its inputs, so going back to a
    # method costs no pass (it once kept one geometry per layer name: the second overwrote the first)
    net = small_resnet().eval()
    batches = [images(16, s) for s in range(2)]
    calls = count_calibration_passes(net, batches)
    data = tdnn.Calibration(batches)
    first = tdnn.compress_model(net, ranks=0.5, method="svd", calibration=data)
    tdnn.compress_model(net, ranks=0.5, method="tucker2", calibration=data)
    assert sum(calls) == 2 * len(batches)
    again = tdnn.compress_model(net, ranks=0.5, method="svd", calibration=data)
    assert sum(calls) == 2 * len(batches)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert {how for kept in data.stats.values() for how in kept} == {"patches", "channels"}


def test_a_transformer_sweep_in_one_pass_with_token_fidelity():
    model = tiny_llama()
    batches = [tokens(0), tokens(1, pad=3)]
    calls = count_calibration_passes(model, batches)
    result = tdnn.sweep(model, targets=(0.5, 0.7, 0.9), calibration=batches, inputs=[tokens(5, pad=2)], check_allocation=False)
    assert sum(calls) == 2 * len(batches)
    assert result.metric == "top-1 agreement" and result.rows[0].metric == 1.0
    assert all(0 <= r.metric <= 1 for r in result.rows) and result.rows[1].metric < 1
    assert [round(r.param_ratio, 1) for r in result.rows] == [1.0, 0.5, 0.7, 0.9]


def test_fidelity_is_the_cosine_for_outputs_that_are_not_logits():
    encoder = tiny_llama().model  # no LM head: last_hidden_state
    result = tdnn.sweep(encoder, targets=(0.6, 0.8), calibration=[tokens(0)], inputs=[tokens(3)], latency=False)
    assert result.metric == "cosine to original" and result.rows[0].metric == pytest.approx(1.0)
    assert all(0 < r.metric < 1 for r in result.rows[1:])


def test_layer_errors_measure_each_layer_on_its_own_input():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    small = tdnn.compress_model(net, ranks={"0": 8, "2": 16})
    x = torch.randn(16, 32, dtype=torch.float64)
    errors = tdnn.layer_errors(net, small, [x, x[:4]])
    assert sorted(errors) == ["0", "2"]
    x = torch.cat([x, x[:4]])  # the errors sum over both batches
    with torch.no_grad():
        y = net[0](x)
        assert errors["0"] == pytest.approx(float((y - small[0](x)).norm() / y.norm()))
        h = small[1](small[0](x))  # layer 2 sees what the compressed layer 0 passes on
        assert errors["2"] == pytest.approx(float((net[2](h) - small[2](h)).norm() / net[2](h).norm()))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"targets": ()}, ValueError, "targets must be a non-empty"),
    ({"targets": (0.5, 1.5)}, ValueError, r"targets: 1.5 is not a fraction"),
    ({"measure": "bytes"}, ValueError, "measure='bytes'"),
    ({"modes": ("fast",)}, ValueError, "unknown mode 'fast'"),
    ({"methods": ("qr",)}, ValueError, "methods: unknown method 'qr'"),
    ({"calibration": None, "modes": ("data-aware",)}, ValueError, "'data-aware' needs calibration data"),
    ({"measure": "flops", "modes": ("plain",)}, ValueError, "measure='flops' needs calibration data"),
    ({"ranks": 0.5}, TypeError, "unexpected option 'ranks'"),
    ({"calibration": torch.randn(4, 8)}, TypeError, r"for one batch x pass calibration=\[x\]"),
    ({"calibration": None, "inputs": None}, ValueError, "give inputs="),
    ({"inputs": [torch.randn(4, 9)]}, ValueError, r"inputs batch 0: the model failed on it \(RuntimeError: "),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        tdnn.sweep(mlp8(), **{"calibration": [torch.randn(8, 8)], **kwargs})


def mlp8():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("targets", [(np.float32(0.3), np.float64(0.6)), np.array([0.3, 0.6], dtype=np.float32)],
                         ids=["scalars", "array"])
def test_numpy_targets_are_fractions(targets):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    result = tdnn.sweep(net, targets=targets, calibration=[torch.randn(16, 32)], latency=False)
    assert [type(r.target) for r in result.rows[1:]] == [float, float]
    assert [r.target for r in result.rows[1:]] == pytest.approx([0.3, 0.6])
    assert result.rows[1].param_ratio < result.rows[2].param_ratio < 1


def test_one_method_or_mode_is_one_name_not_its_letters():
    result = tdnn.sweep(mlp8(), targets=(0.5,), methods="svd", modes="plain", inputs=[torch.randn(8, 8)],
                        calibration=None, latency=False)
    assert [r.label for r in result.rows] == ["original", "plain svd"]


def test_layer_errors_refuse_an_original_the_model_was_not_compressed_from():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    small = tdnn.compress_model(net, ranks=0.5)
    unrelated = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    with pytest.raises(ValueError, match=r"layer_errors: 0: the original has no Linear\(in_features=32, "
                                         r"out_features=64, bias=True\) there; pass the dense model"):
        tdnn.layer_errors(unrelated, small, [torch.randn(4, 32)])


def test_evaluate_must_return_a_number():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(TypeError, match="evaluate must return a number, got str"):
        tdnn.sweep(net, lambda m: "good", targets=(0.5,), calibration=[torch.randn(8, 8)], latency=False)


def test_cli_sweep_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tmp_path / "sweep.yaml"
    config.write_text('compress:\n  method: tucker2\n  ranks: {conv1: null, fc: null, "re:layer.*": 0.5}\n')
    plot = tmp_path / "sweep.svg"
    assert main(["sweep", str(config), "--model", "models:small_resnet", "--data", "digits", "--image-size", "16",
                 "--targets", "0.3,0.6", "--calibration-batches", "1", "--batch-size", "32", "--latency-batch", "8",
                 "--plot", str(plot), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "target"] and "pareto" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["original", "data-aware", "data-aware"]
    assert "tucker2" in lines[3] and lines[-1] == f"plot written to {plot}"
    assert plot.read_text().lstrip().startswith("<?xml") and "<svg" in plot.read_text()
    assert main(["sweep", str(config), "--model", "models:small_resnet", "--methods", "qr"]) == 2
    assert "unknown method 'qr'" in capsys.readouterr().err


def test_cli_sweep_checks_the_plot_path_before_the_sweep(tmp_path, capsys, monkeypatch):
    swept = []
    monkeypatch.setattr(tdnn, "sweep", lambda *args, **kwargs: swept.append(1) or pytest.fail("the sweep ran"))
    config = tmp_path / "sweep.yaml"
    config.write_text("compress:\n  method: svd\n  ranks: 0.5\n")
    assert main(["sweep", str(config), "--model", "models:small_resnet", "--data", "digits", "--image-size", "16",
                 "--calibration-batches", "1", "--plot", str(tmp_path / "x.jpg"), "--no-progress"]) == 2
    assert "x.jpg': give a file ending in .png, .svg, .pdf" in capsys.readouterr().err and swept == []


def test_cli_sweep_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: tdnn sweep") and "--targets" in printed and "--plot" in printed
