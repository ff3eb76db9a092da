"""compress_model: the walker, rank specs, reasons for dense layers, the report."""

import copy
import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import tdnn
from models import TinyTransformer

torch.manual_seed(0)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def resnet18_half(resnet18):
    return tdnn.compress_model(resnet18, ranks=0.5)


def test_resnet18_every_layer_replaced_at_requested_ratio(resnet18, resnet18_half):
    small = resnet18_half
    kinds = {name: type(m).__name__ for name, m in small.named_modules()}
    assert kinds["layer1.0.conv1"] == "Tucker2Conv2d"
    assert kinds["layer2.0.downsample.0"] == "SVDConv2d"  # 1×1 conv: SVD
    assert kinds["fc"] == "SVDLinear"
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in small.modules()
                   if not any(m is c for f in small.modules() if isinstance(f, tdnn.Factorized) for c in f))
    ratio = n_params(small) / n_params(resnet18)
    assert ratio == pytest.approx(0.5, abs=0.02)
    x = torch.randn(2, 3, 64, 64)
    assert small.eval()(x).shape == resnet18(x).shape


def test_resnet18_plan_and_report_agree_with_real_counts(resnet18, resnet18_half):
    rep = tdnn.report(resnet18_half, inputs=torch.randn(1, 3, 64, 64))
    assert rep.params_before == n_params(resnet18)
    assert rep.params_after == n_params(resnet18_half)
    assert len(rep.layers) == 21 and all(r.method is not None for r in rep.layers)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        resnet18(torch.randn(1, 3, 64, 64))
    assert rep.flops_before == counter.get_total_flops()
    assert rep.flop_ratio < 0.6
    text = str(rep)
    assert "layer4.1.conv2" in text and "tucker2" in text and "params x0.49" in text


def test_input_model_is_untouched(resnet18):
    before = copy.deepcopy(resnet18.state_dict())
    tdnn.compress_model(resnet18, ranks=0.3, method="cp", filter_fn=lambda m, n: n.startswith("layer1.0"))
    after = resnet18.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(resnet18.layer1[0].conv1) is nn.Conv2d


def test_inplace_modifies_and_returns_the_same_model():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    out = tdnn.compress_model(net, ranks=4, inplace=True)
    assert out is net and isinstance(net[0], tdnn.SVDLinear)


def test_transformer_linears_replaced_out_proj_skipped():
    model = TinyTransformer().eval()
    tokens = torch.randint(0, 100, (3, 12))
    small = tdnn.compress_model(model, ranks=0.5)
    plan = small.tdnn_plan
    assert isinstance(small.blocks[0].mlp[0], tdnn.SVDLinear)
    assert isinstance(small.heads["lm"], tdnn.SVDLinear)
    assert type(small.blocks[1].attn.out_proj) is not tdnn.SVDLinear
    assert "never calls it" in plan["blocks.0.attn.out_proj"].reason
    cls, lm = small(tokens)
    assert cls.shape == (3, 10) and lm.shape == (3, 12, 100)
    # MHA's packed in_proj is a Parameter, not a module; only Linear modules count.
    replaced = [n for n, m in small.named_modules() if isinstance(m, tdnn.SVDLinear)]
    assert replaced == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2",
                        "heads.cls", "heads.lm"]
    compressible = sum(n_params(model.get_submodule(n)) for n in replaced)
    factorized = sum(n_params(small.get_submodule(n)) for n in replaced)
    assert factorized / compressible == pytest.approx(0.5, abs=0.03)


def test_full_rank_int_on_a_small_net_is_exact_in_float64():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.Flatten(),
                        nn.Linear(16 * 25, 4)).double()
    small = tdnn.compress_model(net, ranks={"0": (16, 3), "2": 16, "4": 4})
    # full rank has more parameters than dense: left dense, with the reason
    assert all("not fewer" in e.reason for e in small.tdnn_plan.layers)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(small(x), net(x))


def test_shared_module_is_replaced_once_and_stays_shared():
    shared = nn.Linear(32, 32)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    net.alias = shared
    small = tdnn.compress_model(net, ranks=8)
    assert small[0] is small[2] is small.alias
    assert isinstance(small[0], tdnn.SVDLinear)
    assert [e.name for e in small.tdnn_plan.layers] == ["0"]


def test_root_layer_is_compressed():
    small = tdnn.compress_model(nn.Linear(40, 30), ranks=5)
    assert isinstance(small, tdnn.SVDLinear) and small.rank == 5


def test_mapping_regex_method_and_callable():
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 1))
    small = tdnn.compress_model(net, ranks={"0": None, "re:[12]": {"rank": 0.25, "method": "cp"}})
    assert type(small[0]) is nn.Conv2d and small.tdnn_plan["0"].reason == "rank None: kept dense"
    assert isinstance(small[1], tdnn.CPConv2d)
    assert isinstance(small[2], tdnn.SVDConv2d)  # 1×1: SVD whatever the method
    assert n_params(small[1]) <= 0.25 * n_params(net[1])

    exact_wins = tdnn.compress_model(net, ranks={"re:.*": 4, "1": tdnn.LayerSpec(0.5, "svd")})
    assert isinstance(exact_wins[1], tdnn.SVDConv2d) and isinstance(exact_wins[0], tdnn.Tucker2Conv2d)

    by_fn = tdnn.compress_model(net, ranks=lambda name, m: 8 if m.kernel_size == (3, 3) else None)
    assert [type(m).__name__ for m in by_fn] == ["Tucker2Conv2d", "Tucker2Conv2d", "Conv2d"]


def test_unmatched_layers_and_filter_get_reasons():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    small = tdnn.compress_model(net, ranks={"0": 8}, filter_fn=lambda m, name: name != "1")
    reasons = {e.name: e.reason for e in small.tdnn_plan.layers}
    assert reasons == {"0": None, "1": "excluded by filter_fn", "2": "no entry in ranks matches this layer"}
    assert "excluded by filter_fn" in str(tdnn.report(small))


def test_grouped_convs_per_group_or_reason():
    net = nn.Sequential(nn.Conv2d(32, 64, 3, groups=4), nn.Conv2d(64, 64, 3, groups=64))
    small = tdnn.compress_model(net, ranks=0.5)
    assert isinstance(small[0], tdnn.Tucker2Conv2d) and small[0].core.groups == 4
    assert type(small[1]) is nn.Conv2d and "not fewer" in small.tdnn_plan["1"].reason
    cp = tdnn.compress_model(net, ranks=0.5, method="cp")
    assert "grouped" in cp.tdnn_plan["0"].reason and type(cp[0]) is nn.Conv2d


def test_ratio_one_keeps_dense_and_small_layers_stay_dense():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(2, 2))
    small = tdnn.compress_model(net, ranks={"0": 1.0, "1": 0.5})
    assert type(small[0]) is nn.Linear and "ratio 1.0" in small.tdnn_plan["0"].reason
    assert type(small[1]) is nn.Linear and "not fewer" in small.tdnn_plan["1"].reason


def test_subclass_with_custom_forward_is_left_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    small = tdnn.compress_model(nn.Sequential(Scaled(64, 64), nn.Linear(64, 64)), ranks=8)
    assert type(small[0]) is Scaled and "overrides forward" in small.tdnn_plan["0"].reason
    assert isinstance(small[1], tdnn.SVDLinear)


def test_compressing_twice_keeps_earlier_layers():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    once = tdnn.compress_model(net, ranks={"0": 8})
    twice = tdnn.compress_model(once, ranks={"1": 8})
    assert all(isinstance(m, tdnn.SVDLinear) for m in twice)
    assert [e.name for e in twice.tdnn_plan.factorized()] == ["0", "1"]


# -- bad input ---------------------------------------------------------------------------------

def net3():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("ranks,exc,match", [
    (0, ValueError, r"rank=0 must be at least 1"),
    (9, ValueError, r"^0: rank=9 exceeds the full rank \(8, 3\) .* own entry in a ranks mapping"),
    (-3, ValueError, r"rank=-3 must be at least 1"),
    (0.0, ValueError, r"ratio=0.0 must be in \(0, 1\]"),
    (1.5, ValueError, r"ratio=1.5 must be in \(0, 1\]"),
    (float("nan"), ValueError, r"ratio=nan must be in \(0, 1\]"),
    ("half", ValueError, r"unknown rank rule 'half'; use 'vbmf' or 'energy:<fraction>'"),
    ("energy:2", ValueError, r"fraction=2.0 must be in \(0, 1\]"),
    ([3], TypeError, r"rank must be an int"),
    (True, TypeError, r"rank must be an int"),
    ({"3": 11}, ValueError, r"3: rank=11 exceeds the full rank 10 of weight \(10, 128\)"),
    ({"0": 9}, ValueError, r"0: rank=9 exceeds the full rank \(8, 3\)"),
    ({"0": (2, 2, 2)}, TypeError, r"rank must be an int"),
    ({"0": {"rank": 2, "mehtod": "cp"}}, ValueError, r"unknown keys \['mehtod'\]"),
    ({"re:(": 2}, ValueError, r"invalid regular expression"),
])
def test_bad_ranks(ranks, exc, match):
    with pytest.raises(exc, match=match):
        tdnn.compress_model(net3(), ranks=ranks)


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown method 'tucker'; choose one of auto, svd, tucker2, cp"):
        tdnn.compress_model(net3(), ranks=2, method="tucker")
    with pytest.raises(ValueError, match=r"unknown method 'cpd'"):
        tdnn.compress_model(net3(), ranks={"0": {"rank": 2, "method": "cpd"}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_layer(bad):
    net = net3()
    with torch.no_grad():
        net[3].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"^3: weight \(10, 128\) has NaN or Inf values"):
        tdnn.compress_model(net, ranks=2)


def test_pattern_matching_nothing_warns():
    with pytest.warns(UserWarning, match=re.escape("pattern 're:encoder\\..*' matches no layer")):
        tdnn.compress_model(net3(), ranks={"re:encoder\\..*": 2, "3": 2})


def test_every_pattern_used_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tdnn.compress_model(net3(), ranks={"re:.*": 2})


def test_nothing_to_compress():
    with pytest.raises(ValueError, match=r"Sequential has no dense layers to compress \(Linear, Conv2d, Conv1d"):
        tdnn.compress_model(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), ranks=2)


def test_layer_errors_from_constructors():
    with pytest.raises(ValueError, match=r"fc: rank=0 must be at least 1"):
        tdnn.SVDLinear.from_dense(nn.Linear(4, 4), 0, name="fc")
    with pytest.raises(ValueError, match=r"conv: cp does not support grouped convolutions \(groups=2\)"):
        tdnn.CPConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 3, name="conv")
    with pytest.raises(ValueError, match=r"meta device"):
        tdnn.SVDLinear.from_dense(nn.Linear(4, 4, device="meta"), 2)


def test_uncopyable_model_gets_a_clear_error():
    with pytest.warns(FutureWarning):
        legacy = nn.utils.weight_norm(nn.Linear(16, 16))  # its weight cannot be deep-copied
    with pytest.raises(ValueError, match="cannot copy Sequential .* pass inplace=True"):
        tdnn.compress_model(nn.Sequential(legacy, nn.Linear(16, 16)), ranks=4)


def test_transformer_encoder_layers_keep_their_fast_path_layers_dense():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    small = tdnn.compress_model(model, ranks=0.5)
    plan = small.tdnn_plan
    assert "fast path reads linear1.weight" in plan["layers.0.linear1"].reason
    with torch.no_grad():  # eval mode takes the fused fast path, which reads the weights directly
        assert small(torch.randn(2, 5, 32)).shape == (2, 5, 32)
