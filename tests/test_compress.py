"""compress_model: the walker, rank specs, reasons for dense layers, the report; hostile inputs
(random architectures and rank specs, odd modes, frozen layers, hooks, parametrizations, half
precision and the meta device)."""

import copy
import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import tdnn
from models import TinyTransformer, Twice, dead_units, narrow_resnet18, snapshot, unchanged

torch.manual_seed(0)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def resnet18():
    return narrow_resnet18(32)  # ResNet-18 at half width: the same 21 layers, names and kinds


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


# -- non-finite factors, failures, compressed input, ranks callables ---------------------------

def test_non_finite_factors_are_refused_with_the_layer_named(monkeypatch):
    from tdnn.algebra import decompose

    real = decompose.svd
    monkeypatch.setattr(decompose, "svd", lambda m, r: tuple(f * float("nan") for f in real(m, r)))
    with pytest.raises(ValueError, match=r"^0: the svd factors .* NaN or Inf"):
        tdnn.compress_model(dead_units(), ranks=0.5)


def test_a_failure_leaves_an_in_place_model_as_it_was(monkeypatch):
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(64, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_children())
    real, calls = tdnn.SVDLinear.from_dense.__func__, []

    def failing(cls, layer, rank, **kwargs):
        calls.append(rank)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(cls, layer, rank, **kwargs)

    monkeypatch.setattr(tdnn.SVDLinear, "from_dense", classmethod(failing))
    with pytest.raises(RuntimeError, match="disk on fire"):
        tdnn.compress_model(model, ranks=0.5, calibration=[x], sequential=True, inplace=True)
    assert dict(model.named_children()) == modules and not hasattr(model, "tdnn_plan")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_compressing_a_compressed_model_says_so():
    small = tdnn.compress_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ranks=4)
    with pytest.raises(ValueError, match=r"already factorized"):
        tdnn.compress_model(small, ranks=2)


def test_errors_of_a_ranks_callable_name_the_layer():
    def ranks(name, module):
        return {"0": 4}[name]

    with pytest.raises(ValueError, match=r"^1: the ranks callable raised KeyError: '1'"):
        tdnn.compress_model(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), ranks=ranks)


# -- fuzz: random architectures and rank specs -------------------------------------------------
# The property: ``compress_model`` either returns a model whose outputs have the original shapes and
# finite values, with every factorized layer computing exactly the convolution/matmul of its
# reconstructed weight (same stride, padding, dilation, groups, padding mode, bias), or it raises
# ``ValueError``/``TypeError``. The input model is never modified.

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv(draw, channels, hw):
    """A Conv2d taking ``channels`` inputs of spatial size ``hw`` with a valid output; its output size."""
    groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if channels % g == 0]))
    out_channels = groups * draw(st.integers(1, 8))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(PADDING_MODES))
    style = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    stride = (1, 1) if style == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    top = 2 if mode == "zeros" else min(2, min(hw) - 1)  # reflect/circular pad less than the input
    if style in ("same", "valid"):
        padding = style
    else:
        padding = draw(st.integers(0, top)) if style == "int" else (draw(st.integers(0, top)),
                                                                    draw(st.integers(0, top)))
    if style == "same":
        if any(-(-d * (k - 1) // 2) > n - 1 for k, d, n in zip(kernel, dilation, hw)):
            mode = "zeros"  # 'same' would pad more than reflect/circular can
    else:
        pads = (0, 0) if style == "valid" else padding if style == "pair" else (padding, padding)
        if any(d * (k - 1) + 1 > n + 2 * p for k, d, n, p in zip(kernel, dilation, hw, pads)):
            kernel, dilation = (1, 1), (1, 1)  # would not fit: a 1×1 conv always does
    layer = nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=draw(st.booleans()), padding_mode=mode, dtype=torch.float64)
    out = layer(torch.zeros(1, channels, *hw, dtype=torch.float64)).shape[-2:]
    return layer, out_channels, tuple(out)


@st.composite
def architectures(draw):
    """A tiny model (convs, optionally nested, then a Linear head, or an MLP) and its input."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):  # MLP
        widths = draw(st.lists(st.integers(1, 40), min_size=2, max_size=4))
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b, bias=draw(st.booleans()), dtype=torch.float64), nn.Tanh()]
        if draw(st.booleans()):  # one module called twice: must stay one (shared) module
            shared = nn.Linear(widths[-1], widths[-1], dtype=torch.float64)
            layers += [shared, nn.Tanh(), shared]
        return nn.Sequential(*layers), torch.randn(3, widths[0], dtype=torch.float64)
    channels, hw = draw(st.integers(1, 12)), (draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    first_channels, first_hw = channels, hw
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        layer, channels, hw = draw(conv(channels, hw))
        blocks.append(nn.Sequential(layer, nn.ReLU()) if draw(st.booleans()) else layer)
    model = nn.Sequential(*blocks)
    if draw(st.booleans()):
        head = nn.Linear(channels * hw[0] * hw[1], draw(st.integers(1, 12)), dtype=torch.float64)
        model = nn.Sequential(model, nn.Flatten(), head)
    return model, torch.randn(2, first_channels, *first_hw, dtype=torch.float64)


GOOD_RANKS = st.integers(1, 6) | st.floats(0.05, 0.95) | st.tuples(st.integers(1, 4), st.integers(1, 4))
RANK_VALUES = st.one_of(
    GOOD_RANKS, GOOD_RANKS, GOOD_RANKS,
    st.integers(-2, 40), st.floats(-0.5, 1.5), st.sampled_from([float("nan"), float("inf"), 1.0]),
    st.tuples(st.integers(0, 9), st.integers(0, 9)), st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    st.lists(st.integers(1, 6), min_size=2, max_size=2), st.none(),
    st.sampled_from(["half", True, b"1", object(), [1.0, 2.0], {1, 2}]),
)
METHOD_NAMES = st.sampled_from(["auto", "svd", "tucker2", "cp", "tucker", None])


@st.composite
def rank_specs(draw, names):
    """An int, ratio, pair, None, bad value, mapping (names, patterns, typos, LayerSpec, dicts) or callable."""
    kind = draw(st.sampled_from(["value", "value", "mapping", "callable"]))
    if kind == "value":
        return draw(RANK_VALUES)
    if kind == "callable":
        value = draw(RANK_VALUES)
        return lambda name, module: value
    keys = st.sampled_from(names + ["re:.*", "re:0\\..*", "re:[", "nope", "re:.*\\.0"]) | st.just(3)
    specs = RANK_VALUES | st.builds(lambda r, m: {"rank": r, "method": m}, RANK_VALUES, METHOD_NAMES) \
        | st.builds(lambda r, m: {"rank": r, "mehtod": m}, RANK_VALUES, METHOD_NAMES)
    return draw(st.dictionaries(keys, specs, max_size=4))


@st.composite
def cases(draw):
    model, x = draw(architectures())
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.train(draw(st.booleans()))
    for name in names:
        if draw(st.integers(0, 4)) == 0:
            model.get_submodule(name).requires_grad_(False)
    return model, x, draw(rank_specs(names)), draw(st.sampled_from(["auto", "svd", "tucker2", "cp"]))


FUZZ_STATS = {"examples": 0, "compressed": 0, "refused": 0, "layers": 0}


@FUZZ
@given(cases())
def fuzz_compress_model(case):
    model, x, ranks, method = case
    FUZZ_STATS["examples"] += 1
    with torch.no_grad():
        expected = model(x)
    snap = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # patterns matching nothing
            small = tdnn.compress_model(model, ranks=ranks, method=method)
    except (ValueError, TypeError) as err:
        FUZZ_STATS["refused"] += 1
        assert str(err), "errors must say what is wrong"
        assert unchanged(model, snap)
        return
    FUZZ_STATS["compressed"] += 1
    assert unchanged(model, snap)
    assert small is not model
    shared = [m for m in model if isinstance(m, nn.Linear) and sum(m is o for o in model) > 1]
    if shared:
        assert small[-1] is small[-3]
    with torch.no_grad():
        out = small(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out).all()
    # every layer is where the plan says, and computes exactly what its reconstructed weight does
    for entry in small.tdnn_plan.layers:
        new, old = small.get_submodule(entry.name), model.get_submodule(entry.name)
        if not entry.factorized:
            assert type(new) is type(old) and entry.reason
            continue
        FUZZ_STATS["layers"] += 1
        assert isinstance(new, tdnn.Factorized) and new.rank == entry.rank
        assert new.dense_kwargs == tdnn.registry.kind_of(old).dense_kwargs(old)
        assert new.training == old.training and all(m.training == old.training for m in new.modules())
        assert {p.requires_grad for p in new.parameters()} == {old.weight.requires_grad}
        assert math.isfinite(new.rel_error) and sum(p.numel() for p in new.parameters()) < \
            sum(p.numel() for p in old.parameters())
        probe = torch.randn(2, *_input_shape(model, entry.name, x), dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(new(probe), new.to_dense()(probe), rtol=1e-9, atol=1e-9)
            assert new(probe).shape == old(probe).shape


def _input_shape(model, name, x):
    """The per-example input shape of layer ``name`` when ``model`` runs on ``x``."""
    shapes = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return shapes[0][1:]


@pytest.mark.slow
def test_fuzz_compress_model():
    """Run the property over 200 derandomized examples; check the count and the mix (not the time:
    the suite runs on busy machines)."""
    FUZZ_STATS.update(examples=0, compressed=0, refused=0, layers=0)
    fuzz_compress_model()
    print(f"fuzz: {FUZZ_STATS}")
    assert FUZZ_STATS["examples"] >= 200
    # both outcomes are exercised, and plenty of layers really were factorized
    assert FUZZ_STATS["compressed"] >= 50 and FUZZ_STATS["refused"] >= 50 and FUZZ_STATS["layers"] >= 50


# -- hostile models: modes, frozen layers, hooks, parametrizations, half precision, meta -------

def mixed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 6))


@pytest.mark.parametrize("training", [True, False])
def test_train_or_eval_mode_is_kept(training):
    model = mixed().train(training)
    small = tdnn.compress_model(model, ranks=0.5)
    assert len(small.tdnn_plan.factorized()) == 4
    assert all(m.training is training for m in small.modules())


def test_frozen_weights_and_biases_stay_frozen():
    model = mixed()
    model[0].requires_grad_(False)            # a frozen layer
    model[4].bias.requires_grad_(False)       # BitFit-style: only the bias frozen
    model[6].weight.requires_grad_(False)     # only the bias trains
    small = tdnn.compress_model(model, ranks=0.5)
    assert [p.requires_grad for p in small[0].parameters()] == [False, False, False, False]
    assert {n: p.requires_grad for n, p in small[4].named_parameters()} == {
        "first.weight": True, "last.weight": True, "last.bias": False}
    assert {n: p.requires_grad for n, p in small[6].named_parameters()} == {
        "first.weight": False, "last.weight": False, "last.bias": True}
    small(torch.randn(2, 4, 6, 6)).sum().backward()
    assert all(p.grad is None for p in small[0].parameters()) and small[6].last.bias.grad is not None
    assert small[6].first.weight.grad is None and small[4].first.weight.grad is not None


@pytest.mark.parametrize("inplace", [False, True])
def test_hooks_are_carried_over(inplace):
    model = mixed().eval()
    calls = []
    pre = model[4].register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__name__)))
    model[4].register_forward_hook(lambda m, args, out: calls.append(("post", type(m).__name__, out.shape)))
    model[6].register_forward_hook(lambda m, args, out: out * 0)  # a hook that changes the output
    small = tdnn.compress_model(model, ranks=0.5, inplace=inplace)
    assert isinstance(small[4], tdnn.SVDLinear)
    out = small(torch.randn(3, 4, 6, 6))
    assert calls == [("pre", "SVDLinear"), ("post", "SVDLinear", (3, 32))]
    assert torch.equal(out, torch.zeros(3, 6))
    pre.remove()  # the user's handle still works on the replacement when compressed in place
    calls.clear()
    small(torch.randn(1, 4, 6, 6))
    assert [c[0] for c in calls] == (["post"] if inplace else ["pre", "post"])


def test_parametrized_and_weight_norm_layers_stay_dense_with_a_reason():
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    torch.nn.utils.parametrizations.weight_norm(model[1])
    small = tdnn.compress_model(model, ranks=4)
    plan = small.tdnn_plan
    assert "weight is parametrized" in plan["0"].reason and "weight is parametrized" in plan["1"].reason
    assert parametrize.is_parametrized(small[0]) and isinstance(small[2], tdnn.SVDLinear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old_style = torch.nn.utils.weight_norm(nn.Linear(32, 32))
    inplace = tdnn.compress_model(nn.Sequential(old_style, nn.Linear(32, 32)), ranks=4, inplace=True)
    assert "weight_norm/spectral_norm hook" in inplace.tdnn_plan["0"].reason
    assert inplace[0] is old_style and isinstance(inplace[1], tdnn.SVDLinear)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "tucker2", "cp"])
def test_half_precision_decomposes_in_float64_and_keeps_its_dtype(dtype, method):
    model = mixed().to(dtype).eval()
    small = tdnn.compress_model(model, ranks=0.5, method=method)
    assert all(p.dtype == dtype for p in small.parameters())
    reference = tdnn.compress_model(mixed().double(), ranks=0.5, method=method)  # same weights, float64
    for entry in small.tdnn_plan.factorized():
        half, full = small.get_submodule(entry.name), reference.get_submodule(entry.name)
        assert type(half) is type(full) and half.rank == full.rank
        # rel_error is measured after the cast: float64 error plus rounding to the half type
        assert half.rel_error == pytest.approx(full.rel_error, abs=2 * torch.finfo(dtype).eps)
        expected = full.dense_weight().to(dtype)
        assert (half.dense_weight().double() - expected.double()).norm() <= 8 * torch.finfo(dtype).eps * \
            expected.double().norm()
    x = torch.randn(2, 4, 6, 6)
    out = small(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(x.double()), rtol=0.05, atol=0.05)


def test_meta_device_layers_stay_dense_with_a_reason():
    with torch.device("meta"):
        model = mixed()
    small = tdnn.compress_model(model, ranks=0.5)
    assert all(e.reason.startswith("weight is on the meta device") for e in small.tdnn_plan.layers)
    assert all(p.is_meta for p in small.parameters()) and small(torch.randn(2, 4, 6, 6, device="meta")).is_meta
    # a meta model can still take a plan: the structure is built without any memory
    plan = tdnn.compress_model(mixed(), ranks=0.5).tdnn_plan
    with torch.device("meta"):
        skeleton = tdnn.apply_plan(mixed(), plan)
    assert isinstance(skeleton[0], tdnn.Tucker2Conv2d) and all(p.is_meta for p in skeleton.parameters())


def test_input_model_untouched_by_hostile_setups():
    model = mixed().train()
    model[0].requires_grad_(False)
    model[4].register_forward_hook(lambda m, a, o: None)
    snap = snapshot(model)
    hooks = dict(model[4]._forward_hooks)
    tdnn.compress_model(model, ranks=0.5)
    assert unchanged(model, snap) and dict(model[4]._forward_hooks) == hooks
