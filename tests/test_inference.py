"""optimize_for_inference: BatchNorm folding that is exact and refuses unsafe folds (also into a layer
whose output is kept as a side effect); memory layouts of convolution and Linear weights."""

import types

import pytest
import torch
from torch import nn

import tdnn
from tdnn.deploy.inference import _foldable_pairs, optimize_for_inference


def _bn(n: int, cls=nn.BatchNorm2d, **kwargs) -> nn.Module:
    bn = cls(n, **kwargs)
    if bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            if bn.affine:
                bn.weight.normal_()
                bn.bias.normal_()
    return bn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, stride=(2, 1), padding=(1, 2), groups=2, bias=False), _bn(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 12, 6), _bn(6, nn.BatchNorm1d)).double().eval()


def _never(models, example, **kwargs):
    raise AssertionError("the timer must not run")


def test_folds_conv_and_linear_batchnorm_exactly():
    net, x = _net(), torch.randn(3, 4, 10, 10, dtype=torch.float64)
    fast = optimize_for_inference(net, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == [("0", "1"), ("4", "5")]
    assert isinstance(fast[1], nn.Identity) and isinstance(fast[5], nn.Identity)
    assert fast[0].groups == 2 and fast[0].stride == (2, 1) and fast[0].bias is not None
    assert (fast(x) - net(x)).abs().max() < 1e-12
    assert isinstance(net[1], nn.BatchNorm2d)  # the original is untouched (inplace=False)


def test_folds_into_the_last_factor_and_merge_keeps_the_bias():
    net, x = _net(), torch.randn(3, 4, 10, 10, dtype=torch.float64)
    small = tdnn.compress_model(net, ranks={"0": (3, 2), "4": 3}, method="tucker2")
    fast = optimize_for_inference(small, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == [("0.last", "1"), ("4.last", "5")]
    assert isinstance(fast[0], tdnn.Tucker2Conv2d) and len(fast[0]) == 3
    assert (fast(x) - small(x)).abs().max() < 1e-12
    assert (tdnn.merge(fast)(x) - small(x)).abs().max() < 1e-10


class _Reused(nn.Module):
    """The conv's raw output feeds the BatchNorm and a residual sum: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _Twice(nn.Module):
    """One conv called twice, each output with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), _bn(4), _bn(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


class _Tokens(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d over dim 1 (= L): not the Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), _bn(5, nn.BatchNorm1d)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("build, shape", [
    (lambda: _Reused(), (2, 4, 6, 6)),
    (lambda: _Twice(), (2, 4, 6, 6)),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True), _bn(4)), (2, 4, 6, 6)),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), _bn(4, track_running_stats=False)), (2, 4, 6, 6)),
    (lambda: _Tokens(), (2, 5, 5)),
])
def test_refuses_folds_that_would_change_the_output(build, shape):
    torch.manual_seed(1)
    net = build().double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    fast = optimize_for_inference(net, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == []
    assert (fast(x) - net(x)).abs().max() < 1e-12
    if not isinstance(net, _Reused):  # all but the reuse case are seen by the hooks already
        assert _foldable_pairs(net, x) == []


class _Mixed(nn.Module):
    """One foldable pair and one whose conv output is also read by a residual sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), _bn(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), _bn(4)

    def forward(self, x):
        y = self.b(torch.relu(self.bn_a(self.a(x))))
        return self.bn_b(y) + y


def test_keeps_the_safe_folds_when_one_is_unsafe():
    torch.manual_seed(2)
    net, x = _Mixed().double().eval(), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert _foldable_pairs(net, x) == [("a", "bn_a"), ("b", "bn_b")]  # the residual read is invisible to hooks
    fast = optimize_for_inference(net, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == [("a", "bn_a")]
    assert (fast(x) - net(x)).abs().max() < 1e-12


def test_low_precision_models_are_checked_in_float64():
    torch.manual_seed(3)
    net = _Reused().eval().to(torch.bfloat16)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    assert optimize_for_inference(net, x, memory_format="contiguous").tdnn_inference.folded == []
    ok = nn.Sequential(nn.Conv2d(4, 4, 3), _bn(4)).eval().to(torch.bfloat16)
    fast = optimize_for_inference(ok, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == [("0", "1")] and fast[0].weight.dtype == torch.bfloat16


def test_outputs_it_cannot_read_are_not_risked():
    class Boxed(_Reused):
        def forward(self, x):
            return {"boxed": [object(), super().forward(x)]}, object()

    class Opaque(_Reused):
        def forward(self, x):
            return types.SimpleNamespace(out=super().forward(x))

    x = torch.randn(2, 4, 6, 6)
    assert optimize_for_inference(Boxed().eval(), x, memory_format="contiguous").tdnn_inference.folded == []
    assert optimize_for_inference(Opaque().eval(), x, memory_format="contiguous").tdnn_inference.folded == []


def test_hooked_modules_are_left_alone():
    net, x = _net(), torch.randn(2, 4, 10, 10, dtype=torch.float64)
    seen = []
    net[0].register_forward_hook(lambda m, a, out: seen.append(out))  # a feature the user reads
    fast = optimize_for_inference(net, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == [("4", "5")]


def test_linear_with_a_batchnorm_without_affine_parameters():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), _bn(5, nn.BatchNorm1d, affine=False)).double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    fast = optimize_for_inference(net, x)
    assert fast.tdnn_inference.folded == [("0", "1")]
    assert (fast(x) - net(x)).abs().max() < 1e-12


def test_works_inside_a_callers_inference_mode():
    net, x = _net(), torch.randn(2, 4, 10, 10, dtype=torch.float64)
    with torch.inference_mode():
        fast = optimize_for_inference(net, x, memory_format="channels_last")
        assert len(fast.tdnn_inference.folded) == 2
        assert (fast(x) - net(x)).abs().max() < 1e-12
    assert not fast[0].weight.is_inference()


def test_meta_models_are_refused():
    with torch.device("meta"):
        net = _net()
    with pytest.raises(ValueError, match="meta device"):
        optimize_for_inference(net, torch.randn(1, 4, 10, 10))


@pytest.mark.parametrize("fastest", ["channels_last", "contiguous"])
def test_auto_layout_keeps_the_faster_one(fastest):
    net, x = _net().float(), torch.randn(3, 4, 10, 10)
    seen = {}

    def timer(models, example, **kwargs):
        seen.update(models)
        return {name: 1.0 if name == fastest else 2.0 for name in models}

    fast = optimize_for_inference(net.to(memory_format=torch.channels_last), x, timer=timer)
    assert sorted(seen) == ["channels_last", "contiguous"]
    assert seen["contiguous"][0].weight.is_contiguous()  # timed as it would run, whatever the input layout
    assert seen["channels_last"][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.tdnn_inference.memory_format == fastest
    assert fast.tdnn_inference.seconds == {fastest: 1.0, ({"channels_last", "contiguous"} - {fastest}).pop(): 2.0}
    weight = fast[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == (fastest == "channels_last")
    assert weight.is_contiguous() == (fastest == "contiguous")
    torch.testing.assert_close(fast(x), net(x), rtol=1e-4, atol=1e-5)


def test_real_timer_and_non_tensor_examples():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), _bn(8)

        def forward(self, x, scale):
            return self.bn(self.conv(x)) * scale

    torch.manual_seed(0)
    net = TwoInputs().eval()
    for example in [(torch.randn(2, 3, 12, 12), 2.0), {"x": torch.randn(2, 3, 12, 12), "scale": 2.0}]:
        fast = optimize_for_inference(net, example)
        form = fast.tdnn_inference
        assert form.folded == [("conv", "bn")] and set(form.seconds) == {"channels_last", "contiguous"}
        assert form.memory_format == min(form.seconds, key=form.seconds.get)
        args = example if isinstance(example, tuple) else tuple(example.values())
        torch.testing.assert_close(fast(*args), net(*args), rtol=1e-4, atol=1e-5)


def test_models_without_convolutions_skip_the_timing_and_training_mode_is_left():
    net = nn.Sequential(nn.Linear(4, 4), _bn(4, nn.BatchNorm1d)).train()
    fast = optimize_for_inference(net, torch.randn(3, 4), timer=_never)
    assert not fast.training and net.training
    assert fast.tdnn_inference.memory_format == "contiguous" and fast.tdnn_inference.seconds == {}
    assert fast.tdnn_inference.folded == [("0", "1")]


def test_inplace_and_no_folding():
    net, x = _net(), torch.randn(2, 4, 10, 10, dtype=torch.float64)
    same = optimize_for_inference(net, x, fold_batchnorm=False, memory_format="channels_last", inplace=True)
    assert same is net and isinstance(net[1], nn.BatchNorm2d) and same.tdnn_inference.folded == []
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_memory_format():
    with pytest.raises(ValueError, match="memory_format"):
        optimize_for_inference(_net(), torch.randn(1, 4, 10, 10), memory_format="nhwc")
    with pytest.raises(ValueError, match="linear_layout must be 'auto', 'rows' or 'columns', got 'nt'"):
        optimize_for_inference(_net(), torch.randn(1, 4, 10, 10), linear_layout="nt")


class TiedLM(nn.Module):
    """An embedding, a factorized (16 -> 4 -> 48) block and an LM head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(40, 16)
        self.ffn = tdnn.compress_model(nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)), ranks=4)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.ffn(self.embed(ids)))


@pytest.mark.parametrize("fastest", ["rows", "columns"])
def test_wide_linear_weights_by_columns_when_faster(fastest):
    net, ids = TiedLM().eval(), torch.randint(0, 40, (1, 1))
    seen = {}

    def timer(models, example, **kwargs):
        seen.update(models)
        return {name: 1.0 if name == fastest else 2.0 for name in models}

    fast = optimize_for_inference(net, ids, timer=timer)
    assert sorted(seen) == ["columns", "rows"] and fast.tdnn_inference.linear_layout == fastest
    assert fast.tdnn_inference.seconds == {"rows": 1.0 if fastest == "rows" else 2.0,
                                           "columns": 1.0 if fastest == "columns" else 2.0}
    # the timed copy had its own wide weights only: 16 -> 4 (narrow) is shared, 4 -> 48 is not
    rows, columns = seen["rows"], seen["columns"]
    assert columns.ffn[0].first.weight is rows.ffn[0].first.weight
    assert columns.ffn[0].last.weight is not rows.ffn[0].last.weight
    # wide: 4 -> 48, 4 -> 16 (second factors) and 16 -> 40 (the head, tied to the embedding)
    wide = [fast.ffn[0].last.weight, fast.ffn[2].last.weight, fast.head.weight]
    narrow = [fast.ffn[0].first.weight, fast.ffn[2].first.weight]  # 16 -> 4 and 48 -> 4
    assert all(w.t().is_contiguous() == (fastest == "columns") for w in wide)
    assert all(w.is_contiguous() for w in narrow)
    assert fast.head.weight is fast.embed.weight  # the tie holds
    assert net.head.weight.is_contiguous()  # the input model is left as it was
    torch.testing.assert_close(fast(torch.arange(40)[None]), net(torch.arange(40)[None]), rtol=1e-5, atol=1e-6)


def test_linear_layout_in_place_and_saved():
    net, ids = TiedLM().eval(), torch.arange(40)[None]
    want = net(ids)
    same = optimize_for_inference(net, ids, linear_layout="columns", inplace=True, timer=_never)
    assert same is net and net.ffn[0].last.weight.t().is_contiguous()
    assert isinstance(net.ffn[0].last.weight, nn.Parameter) and net.head.weight is net.embed.weight
    torch.testing.assert_close(net(ids), want, rtol=1e-5, atol=1e-6)
    copy = TiedLM().eval()
    with torch.no_grad():
        for p in copy.parameters():
            p.zero_()
    copy.load_state_dict(net.state_dict())
    torch.testing.assert_close(copy(ids), net(ids), rtol=1e-5, atol=1e-6)


# -- outputs kept as a side effect -------------------------------------------------------------

class KeepsFeature(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.feat = None

    def forward(self, x):
        y = self.conv(x)
        self.feat = y  # kept for a later reader, e.g. a feature-matching loss
        return self.bn(y)


def test_no_fold_into_a_layer_whose_output_is_kept_after_the_call():
    torch.manual_seed(0)
    model, x = KeepsFeature().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model(x)
    feature = model.feat.clone()
    fast = tdnn.optimize_for_inference(model, x, memory_format="contiguous")
    assert fast.tdnn_inference.folded == []
    with torch.no_grad():
        fast(x)
    torch.testing.assert_close(fast.feat, feature)
