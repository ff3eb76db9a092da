"""nn.Conv1d through the registry: the same guarantees as Conv2d (exactness on a grid of
hyper-parameters: in test_layers.py's full-rank grid over every kind; data-aware factors, budget,
save/load, merge, export)."""

import pytest
import torch
from torch import nn

import tdnn

def make(k, s, p, d, b, *, cin=6, cout=8, groups=1, padding_mode="zeros"):
    return nn.Conv1d(cin, cout, k, stride=s, padding=p, dilation=d, bias=b, groups=groups,
                     padding_mode=padding_mode, dtype=torch.float64)


def x1d(batch=2, channels=6, length=23):
    return torch.randn(batch, channels, length, dtype=torch.float64)


@pytest.mark.parametrize("cls,rank", [(tdnn.SVDConv1d, 3), (tdnn.Tucker2Conv1d, (3, 2)), (tdnn.CPConv1d, 5)])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("k,s,p,d", [(3, 2, 2, 1), (4, 1, "same", 2), (5, 1, "valid", 1)])
def test_factorized_conv1d_equals_its_dense_kernel(cls, rank, padding_mode, k, s, p, d):
    conv = make(k, s, p, d, True, padding_mode=padding_mode)
    small = cls.from_dense(conv, rank)
    dense = small.to_dense()
    x = x1d()
    torch.testing.assert_close(small(x), dense(x), atol=1e-10, rtol=0)
    assert type(dense) is nn.Conv1d and small(x).shape == conv(x).shape
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr)


@pytest.mark.parametrize("cls", [tdnn.SVDConv1d, tdnn.Tucker2Conv1d])
def test_grouped_conv1d_full_rank_exact(cls):
    conv = make(3, 2, 1, 2, True, cin=8, cout=12, groups=4)
    small = cls.from_dense(conv, cls.max_rank(conv))
    x = x1d(channels=8)
    torch.testing.assert_close(small(x), conv(x), atol=1e-9, rtol=0)
    assert all(child.groups == 4 for child in small)


def test_svd_conv1d_error_is_discarded_singular_values():
    conv = make(3, 1, 1, 1, True, cin=6, cout=16)
    s = torch.linalg.svdvals(conv.weight.detach().flatten(1))
    for rank in (1, 4, 9):
        error = (conv.weight - tdnn.SVDConv1d.from_dense(conv, rank).to_dense().weight).norm()
        torch.testing.assert_close(error, s[rank:].norm(), atol=1e-9, rtol=1e-9)


def test_cp_conv1d_recovers_an_exact_low_rank_kernel():
    g = torch.Generator().manual_seed(1)
    a, b, k = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (10, 8, 5))
    conv = nn.Conv1d(8, 10, 5, padding=2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("sr,cr,kr->sck", a, b, k))
    small = tdnn.CPConv1d.from_dense(conv, 4)
    assert small.rel_error < 1e-3  # ALS stops at a relative improvement of 1e-4 per sweep
    x = x1d(channels=8)
    assert float((small(x) - conv(x)).norm() / conv(x).norm()) < 1e-3
    assert [type(m).__name__ for m in small] == ["Conv1d"] * 3 and small.depthwise.groups == 4


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_gradients_reach_every_conv1d_factor(method):
    small = tdnn.compress_model(nn.Sequential(nn.Conv1d(6, 8, 3, padding=1)), ranks=0.5, method=method)
    small(torch.randn(2, 6, 9)).square().sum().backward()
    for name, p in small.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def audio_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(4, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding="same", dilation=2), nn.ReLU(),
        nn.Conv1d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 16, 10),
    ).eval()


def signals(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 6.28, 32)
    freq = torch.rand(n, 4, 1, generator=g) * 4
    return torch.sin(freq * t) + 0.1 * torch.randn(n, 4, 32, generator=g)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_conv1d_data_aware_beats_plain_on_the_data(method):
    net, x = audio_net(), signals()
    plain = tdnn.compress_model(net, ranks=0.3, method=method)
    aware = tdnn.compress_model(net, ranks=0.3, method=method, calibration=[x[:32], x[32:]])
    assert all(e.data_aware for e in aware.tdnn_plan.factorized())
    assert aware.tdnn_plan["0"].kind == "Conv1d"

    def error(model):
        with torch.no_grad():
            return float((model(x) - net(x)).norm() / net(x).norm())

    assert error(aware) < error(plain)


def test_conv1d_budget_save_load_merge_export(tmp_path):
    net, x = audio_net(), signals()
    small = tdnn.compress_model(net, budget=tdnn.Budget(params=0.4), calibration=[x]).eval()
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in net.parameters())
    assert kept == pytest.approx(0.4, abs=0.01)
    assert {type(m).__name__ for m in small} & {"Tucker2Conv1d", "SVDConv1d"}

    tdnn.save(small, tmp_path / "a.safetensors")
    loaded = tdnn.load(tmp_path / "a.safetensors", audio_net()).eval()
    assert torch.equal(loaded(x), small(x))

    merged = tdnn.merge(small)
    assert [type(m) for m in merged] == [type(m) for m in net]
    torch.testing.assert_close(merged(x), small(x), atol=1e-5, rtol=1e-5)

    program = torch.export.export(small, (x[:2],))
    torch.testing.assert_close(program.module()(x[:2]), small(x[:2]), atol=1e-6, rtol=0)
    fast = tdnn.optimize_for_inference(small, x[:8], memory_format="contiguous")
    assert [bn for _, bn in fast.tdnn_inference.folded] == ["1"] and isinstance(fast[1], nn.Identity)
    torch.testing.assert_close(fast(x), small(x), atol=1e-4, rtol=1e-4)
