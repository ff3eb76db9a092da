"""Hostile inputs: random architectures and rank specs, odd modes, frozen layers, hooks,
parametrizations, half precision and the meta device.

The fuzz property: ``compress_model`` either returns a model whose outputs have the original
shapes and finite values, with every factorized layer computing exactly the convolution/matmul of
its reconstructed weight (same stride, padding, dilation, groups, padding mode, bias), or it
raises ``ValueError``/``TypeError``. The input model is never modified.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import tdnn
from tdnn.analysis.report import checkpoint_report

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


def snapshot(model):
    return ([(n, type(m), m.training) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def unchanged(model, snap):
    modules, state, grads = snapshot(model)
    return (modules == snap[0] and grads == snap[2] and state.keys() == snap[1].keys()
            and all(torch.equal(state[k], snap[1][k]) for k in state))


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


def test_fuzz_compress_model():
    """Run the property over 200 derandomized examples; check the count and the mix (not the time:
    the suite runs on busy machines)."""
    FUZZ_STATS.update(examples=0, compressed=0, refused=0, layers=0)
    fuzz_compress_model()
    print(f"fuzz: {FUZZ_STATS}")
    assert FUZZ_STATS["examples"] >= 200
    # both outcomes are exercised, and plenty of layers really were factorized
    assert FUZZ_STATS["compressed"] >= 50 and FUZZ_STATS["refused"] >= 50 and FUZZ_STATS["layers"] >= 50


# -- hostile calibration data ------------------------------------------------------------------

def calib_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@st.composite
def calibration_data(draw):
    """Good batches, or batches with NaN/Inf, wrong shapes or dtypes, odd containers."""
    n = draw(st.integers(0, 3))
    batches = []
    for _ in range(n):
        shape = draw(st.sampled_from([(4, 3, 6, 6), (3, 6, 6), (4, 4, 6, 6), (4, 3, 5, 5), (4, 108), (2, 3, 6, 6)]))
        x = torch.randn(shape)
        if draw(st.integers(0, 4)) == 0:
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
        form = draw(st.sampled_from(["tensor", "tensor", "tuple", "pair", "dict", "int", "half"]))
        batches.append({"tensor": x, "tuple": (x,), "pair": (x, torch.zeros(shape[0], dtype=torch.long)),
                        "dict": {"input": x}, "int": 3, "half": x.half()}[form])
    container = draw(st.sampled_from(["list", "tuple", "generator", "single"]))
    if container == "single":
        return torch.randn(4, 3, 6, 6)
    if container == "generator":
        return (b for b in batches)
    return batches if container == "list" else tuple(batches)


FUZZ_CALIB = settings(max_examples=120, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ_CALIB
@given(calibration_data(), st.sampled_from([0.5, "energy:0.9"]), st.sampled_from(["auto", "svd", "cp"]),
       st.booleans())
def test_fuzz_calibration_data(data, ranks, method, sequential):
    """Calibration data compresses to a finite, data-aware model or is refused with a clear
    ValueError/TypeError; the input model is never modified."""
    model = calib_net()
    snap = snapshot(model)
    try:
        small = tdnn.compress_model(model, ranks=ranks, method=method, calibration=data, sequential=sequential)
    except (ValueError, TypeError) as err:
        assert str(err) and type(err).__module__ == "builtins"
        assert unchanged(model, snap)
        return
    assert unchanged(model, snap)
    assert all(torch.isfinite(p).all() for p in small.parameters())
    assert all(e.data_aware for e in small.tdnn_plan.factorized())


# -- hostile checkpoint headers ----------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 12) | st.floats(allow_nan=False)
                           | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=6)


@st.composite
def header_damage(draw):
    """One change to a checkpoint's metadata: a key dropped, a value replaced by text or by JSON
    of another shape, or one field deep inside the plan or layer records replaced."""
    key = draw(st.sampled_from(["format_version", "tdnn_version", "plan", "layers", "aliases"]))
    how = draw(st.sampled_from(["drop", "text", "json", "plan_field", "layer_field"]))
    value = draw(JSON_VALUES)
    field = draw(st.sampled_from(["name", "kind", "method", "rank", "reason", "data_aware", "latency_ratio",
                                  "bogus", "class", "dense_kwargs", "rel_error"]))
    return key, how, value, field, draw(st.text(max_size=8))


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    torch.manual_seed(0)
    tdnn.save(tdnn.compress_model(calib_net(), ranks=0.5).eval(), path)
    return path


FUZZ_HEADER = settings(max_examples=150, deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ_HEADER
@given(damage=header_damage())
def test_fuzz_checkpoint_headers(saved_bytes, tmp_path_factory, damage):
    """A damaged header loads to the very model that was saved, or is refused with a ValueError
    naming the file; never a KeyError, AttributeError or a crash in repr or the report."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    key, how, value, field, text = damage
    with safe_open(str(saved_bytes), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if how == "drop":
        meta.pop(key)
    elif how == "text":
        meta[key] = text
    elif how == "json":
        meta[key] = json.dumps(value)
    elif how == "plan_field":
        plan = json.loads(meta["plan"])
        plan["layers"][0][field] = value
        meta["plan"] = json.dumps(plan)
    else:
        layers = json.loads(meta["layers"])
        next(iter(layers.values()))[field] = value
        meta["layers"] = json.dumps(layers)
    path = tmp_path_factory.mktemp("damaged") / "m.safetensors"
    save_file(tensors, str(path), metadata=meta)
    x = torch.randn(2, 3, 6, 6)
    try:
        loaded = tdnn.load(path, calib_net()).eval()
        repr(loaded)
        str(tdnn.report(loaded))
        str(checkpoint_report(path))
    except ValueError as err:
        assert str(err).startswith(f"{path}: ") or str(path) in str(err), err
        return
    reference = tdnn.load(saved_bytes, calib_net()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


# -- hostile models ----------------------------------------------------------------------------

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
