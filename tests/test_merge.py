"""merge: factorized layers back to dense ones computing the same function."""

import pytest
import torch
from torch import nn

import tdnn
from models import resnet18


def build(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, (3, 5), stride=(2, 1), padding="valid", dilation=(1, 2), padding_mode="zeros"),
        nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=4, padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 3 * 4, 24), nn.ReLU(), nn.Linear(24, 5),
    ).to(dtype).eval()


def x_for(dtype=torch.float64):
    return torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_merged_outputs_equal_factorized_outputs(method):
    small = tdnn.compress_model(build(), ranks=0.4, method=method)
    assert len(small.tdnn_plan.factorized()) >= 5
    merged = tdnn.merge(small)
    assert not any(isinstance(m, tdnn.Factorized) for m in merged.modules())
    assert [type(m) for m in merged] == [type(m) for m in build()]
    x = x_for()
    torch.testing.assert_close(merged(x), small(x), rtol=1e-12, atol=1e-12)
    # each merged layer has exactly the original constructor arguments
    for entry in small.tdnn_plan.factorized():
        layer, original = merged.get_submodule(entry.name), build().get_submodule(entry.name)
        assert tdnn.registry.kind_of(layer).dense_kwargs(layer) == tdnn.registry.kind_of(original).dense_kwargs(original)
    assert all(e.reason == "merged back to dense by tdnn.merge" for e in merged.tdnn_plan.layers
               if e.name in {f.name for f in small.tdnn_plan.factorized()})
    assert isinstance(small[0], tdnn.Factorized)  # a copy by default


def test_merge_in_float32_and_on_resnet18():
    model = resnet18()
    small = tdnn.compress_model(model, ranks={"conv1": None, "fc": 4, "re:layer[12]\\..*": 8, "re:.*": None})
    merged = tdnn.merge(small)
    assert sum(isinstance(m, tdnn.Factorized) for m in small.modules()) == 10  # layer1: 4, layer2: 4 + 1×1 downsample, fc
    assert not any(isinstance(m, tdnn.Factorized) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(merged(x), small(x), rtol=1e-4, atol=1e-5)


def test_partial_inplace_merge_keeps_modes_frozen_and_hooks():
    small = tdnn.compress_model(build(torch.float32).train(), ranks=0.4)
    small[8].requires_grad_(False)
    seen = []
    small[8].register_forward_hook(lambda m, a, out: seen.append(type(m).__name__))
    merged = tdnn.merge(small, filter_fn=lambda module, name: name in ("4", "8"), inplace=True)
    assert merged is small
    assert type(merged[4]) is nn.Conv2d and type(merged[8]) is nn.Linear
    assert isinstance(merged[0], tdnn.Tucker2Conv2d) and isinstance(merged[10], tdnn.SVDLinear)
    assert merged[8].training and not merged[8].weight.requires_grad and not merged[8].bias.requires_grad
    merged(x_for(torch.float32))
    assert seen == ["Linear"]
    assert [e.name for e in merged.tdnn_plan.factorized()] == ["0", "2", "6", "10"]


def test_merge_then_save_load_and_nothing_to_merge(tmp_path):
    small = tdnn.compress_model(build(), ranks=0.4)
    half = tdnn.merge(small, filter_fn=lambda module, name: name == "0")
    tdnn.save(half, tmp_path / "m.safetensors")
    loaded = tdnn.load(tmp_path / "m.safetensors", build())
    assert type(loaded[0]) is nn.Conv2d and isinstance(loaded[2], tdnn.Factorized)
    assert torch.equal(loaded(x_for()), half(x_for()))
    dense = build()
    again = tdnn.merge(dense)
    assert torch.equal(again(x_for()), dense(x_for())) and again is not dense


def test_merged_root_layer():
    small = tdnn.compress_model(nn.Linear(30, 20).double(), ranks=3)
    merged = tdnn.merge(small)
    assert type(merged) is nn.Linear
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(merged(x), small(x), rtol=1e-12, atol=1e-12)
