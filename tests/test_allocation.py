"""The budget's allocation checked on held-out data (tdnn.compress.allocation): the candidate with the
lowest held-out output error wins, each candidate wins on a model built for it, held-out samples
never reach a statistic, the check off is the budget as it was, and the plan keeps what was measured."""

import json

import pytest
import torch
from torch import nn

import tdnn
from tdnn.analysis.report import checkpoint_report
from tdnn.compress.allocation import HOLD_OUT
from tdnn.planning.cost import model_flops
from tdnn.planning.plan import Plan
from models import tiny_llama, tiny_llama_tokens

DOUBLE = torch.float64


def orthogonal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DOUBLE))[0]


def with_spectrum(values, g, n=None):
    """A square weight with these singular values, random singular vectors."""
    s = torch.tensor(values, dtype=DOUBLE)
    n = n or len(values)
    return orthogonal(n, g) @ torch.diag(s) @ orthogonal(n, g).T


def linear(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=DOUBLE)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


class Amplified(nn.Module):
    """y = a(x) + 20 b(x), a and b equal: an error of b costs 400 times more, which the Fisher
    weights see and the flat and uniform allocations do not (sensitivity wins)."""

    def __init__(self, n=32):
        super().__init__()
        w = with_spectrum([0.85 ** i for i in range(n)], torch.Generator().manual_seed(0))
        self.a, self.b = linear(w), linear(w)

    def forward(self, x):
        return self.a(x) + 20 * self.b(x)


class Watched(nn.Module):
    """[a(x₁), b(x₂), 100 (b(x₂)₀ − its dense value)]: an error on b's channel 0 costs 10⁴ times more, so
    b's Fisher weight (a mean over its channels) is ~300 times a's. But channel 0 is b's largest
    singular direction and reads an input never correlated with the others, so any rank keeps it
    exactly: the sensitivity-aware budget starves a for nothing, and the flat one (a and the rest of
    b hold equal energy, so relative errors are absolute ones) wins."""

    def __init__(self, n=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        wa = with_spectrum([0.6 ** i for i in range(n)], g)
        wb = torch.zeros(n, n, dtype=DOUBLE)
        wb[0, 0] = 3.0
        wb[1:, 1:] = with_spectrum([0.9 ** i for i in range(n - 1)], g)
        self.a, self.b, self.n = linear(wa * wb[1:].norm() / wa.norm()), linear(wb), n
        self.register_buffer("watched", wb[0].clone())

    def forward(self, x):
        x1, x2 = x[:, :self.n], x[:, self.n:]
        y = self.b(x2)
        return torch.cat([self.a(x1), y, 100 * (y[:, :1] - x2 @ self.watched[:, None])], 1)

    @staticmethod
    def data(seed, n=32, rows=64):
        x = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)
        x[0::2, n + 1:] = 0  # each sample feeds b's channel 0 or its other channels, never both
        x[1::2, n] = 0
        return x


class Cancelling(nn.Module):
    """y = a(x) − b(x) with b = a + a small change: equal ranks truncate both alike, so their errors
    cancel; a budget sums the two errors as if independent and gives one branch a rank more, which
    no longer cancels (uniform wins)."""

    def __init__(self, n=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = with_spectrum([0.85 ** i for i in range(n)], g)
        self.a, self.b = linear(w), linear(w - 0.05 * torch.randn(n, n, generator=g, dtype=DOUBLE) / n ** 0.5)

    def forward(self, x):
        return self.a(x) - self.b(x)


def gaussian(seed, n=32, rows=64):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


CASES = {  # model, its calibration batches, the budget's fraction of parameters, who wins
    "sensitivity": (Amplified, [gaussian(1), gaussian(2)], 0.3),
    "flat": (Watched, [Watched.data(1), Watched.data(2)], 0.3),
    "uniform": (Cancelling, [gaussian(1), gaussian(2)], 0.35),
}


def relative_error(small, model, batches):
    x = torch.cat(batches)
    with torch.no_grad():
        return float((small(x) - model(x)).norm() / model(x).norm())


def uniform_rank(model, fraction):
    """The largest common rank of the model's two equal layers within ``fraction`` of its parameters."""
    n = model.a.weight.shape[0]
    total = sum(p.numel() for p in model.parameters())
    return max(r for r in range(1, n) if 2 * (2 * n * r) + total - 2 * n * n <= fraction * total)


@pytest.mark.parametrize("winner", list(CASES))
def test_each_candidate_wins_on_a_model_built_for_it(winner):
    build, batches, fraction = CASES[winner]
    model = build().eval()
    small = tdnn.compress_model(model, budget=tdnn.Budget(params=fraction), calibration=batches)
    allocation = small.tdnn_plan.allocation
    # recomputed apart: each candidate's ranks from the data the check kept, its error on the rest
    kept, held = tdnn.Calibration(batches).split(HOLD_OUT)
    alone = {name: tdnn.compress_model(model, budget=tdnn.Budget(params=fraction, sensitivity=name == "sensitivity"),
                                       calibration=kept.batches, check_allocation=False)
             for name in ("sensitivity", "flat")}
    alone["uniform"] = tdnn.compress_model(model, ranks=uniform_rank(model, fraction), calibration=kept.batches)
    errors = {name: relative_error(m, model, held) for name, m in alone.items()}
    assert allocation["held_out"] == sum(len(b) for b in held) == round(HOLD_OUT * 128)
    assert list(allocation["measured"]) == ["sensitivity", "flat", "uniform"]
    for name, error in errors.items():
        assert allocation["measured"][name] == pytest.approx(error, rel=1e-9), name
    assert allocation["chosen"] == min(errors, key=errors.get) == winner
    assert min(e for name, e in errors.items() if name != winner) > 1.2 * errors[winner]  # by a margin
    assert [e.rank for e in small.tdnn_plan.layers] == [e.rank for e in alone[winner].tdnn_plan.layers]
    # the factors at the winner's ranks from every sample, the held-out ones too
    ranks = {e.name: e.rank for e in small.tdnn_plan.layers}
    same = tdnn.compress_model(model, ranks=ranks, calibration=batches)
    assert all(torch.equal(p, q) for p, q in zip(small.state_dict().values(), same.state_dict().values()))


def test_sequential_and_refinement_go_on_from_the_winners_ranks():
    build, batches, fraction = CASES["uniform"]
    model = build().eval()
    for options in ({"sequential": True}, {"refine": 5}):
        small = tdnn.compress_model(model, budget=tdnn.Budget(params=fraction), calibration=batches, **options)
        rank = uniform_rank(model, fraction)
        assert small.tdnn_plan.allocation["chosen"] == "uniform"
        assert [e.rank for e in small.tdnn_plan.layers] == [rank, rank]


def count_samples(model):
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


def test_the_check_off_is_the_budget_alone():
    # one statistics pass and one for the sensitivities, over every sample; the factors from all of
    # them at the budget's ranks; nothing recorded
    build, batches, fraction = CASES["sensitivity"]
    model = build().eval()
    calls = count_samples(model)
    off = tdnn.compress_model(model, budget=tdnn.Budget(params=fraction), calibration=batches, check_allocation=False)
    assert sum(calls) == 2 * 128 and off.tdnn_plan.allocation is None
    assert off.tdnn_plan.settings[-1]["check_allocation"] is False
    ranks = {e.name: e.rank for e in off.tdnn_plan.layers}
    same = tdnn.compress_model(model, ranks=ranks, calibration=batches)
    assert all(torch.equal(p, q) for p, q in zip(off.state_dict().values(), same.state_dict().values()))
    calls.clear()
    tdnn.compress_model(model, budget=tdnn.Budget(params=fraction), calibration=batches)
    held = round(HOLD_OUT * 128)
    # on: both passes over the others; the dense model and each of the three candidates on the held-out
    # ones; then the factors at the chosen ranks from one pass over every sample
    assert sum(calls) == 2 * (128 - held) + 4 * held + 128


def test_a_kept_calibration_serves_checked_budgets_with_one_pass_over_the_kept_samples():
    build, batches, _ = CASES["sensitivity"]
    model = build().eval()
    data = tdnn.Calibration(batches)
    kept, held = data.split(HOLD_OUT)  # made once: the calls below use these very batches
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    smalls = [tdnn.compress_model(model, budget=tdnn.Budget(params=p), calibration=data) for p in (0.2, 0.3, 0.4)]
    trained = sum(x.shape[0] for x in seen if x is not held[0])
    # statistics and sensitivities of the kept samples, and the statistics of every sample (for the
    # factors at the chosen ranks), once for all three
    assert trained == 2 * sum(len(b) for b in kept.batches) + sum(len(b) for b in batches)
    # per call, on the held-out samples: the dense model, then each distinct allocation (equal errors: equal ranks)
    assert sum(x is held[0] for x in seen) == sum(1 + len(set(s.tdnn_plan.allocation["measured"].values()))
                                                 for s in smalls)


def test_held_out_samples_never_reach_the_statistics_that_choose_the_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).double().eval()
    batches = [gaussian(1, n=16), gaussian(2, n=16)]
    _, held = tdnn.Calibration(batches).split(HOLD_OUT)
    row = next(i for i, x in enumerate(batches[1]) if torch.equal(x, held[0][0]))  # the first batch stays whole
    outlier = [batches[0], batches[1].clone()]
    outlier[1][row] *= 1e3
    budget = tdnn.Budget(params=0.3)
    clean, spiked = (tdnn.compress_model(model, budget=budget, calibration=b) for b in (batches, outlier))
    assert clean.tdnn_plan.allocation["measured"] != spiked.tdnn_plan.allocation["measured"]  # it was measured
    assert [e.rank for e in clean.tdnn_plan.layers] == [e.rank for e in spiked.tdnn_plan.layers]
    # the factors, made after the choice, see every sample: the outlier too
    same = tdnn.compress_model(model, ranks={e.name: e.rank for e in clean.tdnn_plan.layers}, calibration=outlier)
    assert all(torch.equal(p, q) for p, q in zip(spiked.state_dict().values(), same.state_dict().values()))
    assert not torch.equal(spiked[0][0].weight, clean[0][0].weight)
    trained = [outlier[1], batches[0]]  # the same outlier in the first batch, which is never held out
    moved = tdnn.compress_model(model, budget=budget, calibration=trained)
    assert [e.rank for e in moved.tdnn_plan.layers] != [e.rank for e in clean.tdnn_plan.layers]


def test_the_plan_keeps_the_check_through_save_load_and_pretrained(tmp_path):
    model = tiny_llama()
    batches = [tiny_llama_tokens(0), tiny_llama_tokens(1, pad=3)]
    small = tdnn.compress_model(model, budget=tdnn.Budget(params=0.8), calibration=batches,
                                filter_fn=lambda m, name: ".layers." in name)
    allocation = small.tdnn_plan.allocation
    assert allocation["held_out"] == 1 and set(allocation["measured"]) == {"sensitivity", "flat", "uniform"}
    assert Plan.from_dict(json.loads(json.dumps(small.tdnn_plan.to_dict()))).allocation == allocation
    tdnn.save(small, tmp_path / "small.safetensors")
    assert tdnn.load(tmp_path / "small.safetensors", tiny_llama()).tdnn_plan.allocation == allocation
    assert checkpoint_report(tmp_path / "small.safetensors").allocation == allocation
    tdnn.save_pretrained(small, tmp_path / "pretrained")
    assert tdnn.from_pretrained(tmp_path / "pretrained").tdnn_plan.allocation == allocation
    line = str(tdnn.report(small)).splitlines()[-1]
    chosen = allocation["chosen"]
    assert line.startswith(f"allocation: {chosen}, of ") and f"{chosen} {allocation['measured'][chosen]:.4f}*" in line
    assert "on 1 held-out samples" in line


def test_a_single_sample_is_not_held_out():
    model = Amplified().eval()
    small = tdnn.compress_model(model, budget=tdnn.Budget(params=0.3), calibration=[gaussian(1, rows=1)])
    assert small.tdnn_plan.allocation["held_out"] == 0 and small.tdnn_plan.allocation["measured"] == {}
    assert "not checked" in str(tdnn.report(small)).splitlines()[-1]


def test_flop_and_latency_budgets_are_checked_too(flop_clock):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()
    batches = [torch.randn(16, 3, 6, 6), torch.randn(16, 3, 6, 6)]
    flops = tdnn.compress_model(net, budget=tdnn.Budget(flops=0.5), calibration=batches)
    assert set(flops.tdnn_plan.allocation["measured"]) == {"sensitivity", "flat", "uniform"}
    assert model_flops(flops, batches[0]) <= 0.51 * model_flops(net, batches[0])
    latency = tdnn.compress_model(net, budget=tdnn.Budget(latency=0.5, timer=flop_clock), calibration=batches)
    assert set(latency.tdnn_plan.allocation["measured"]) == {"sensitivity", "flat"}  # no uniform latency


def test_check_allocation_is_a_checked_recorded_setting():
    settings = tdnn.CompressSettings(budget=tdnn.Budget(params=0.5))
    assert settings.check_allocation is True and settings.to_dict()["check_allocation"] is True
    assert tdnn.CompressSettings.from_dict(settings.to_dict()) == settings
    old = {k: v for k, v in settings.to_dict().items() if k != "check_allocation"} | {"version": 1}
    assert tdnn.CompressSettings.from_dict(old).check_allocation is False  # made before the check existed
    with pytest.raises(TypeError, match="check_allocation must be True or False"):
        tdnn.CompressSettings(budget=tdnn.Budget(params=0.5), check_allocation="yes")
    with pytest.raises(ValueError, match="settings of version 9"):
        tdnn.CompressSettings.from_dict({**settings.to_dict(), "version": 9})
