"""Factorized layers: exactness at full rank for every kind (Linear, Conv2d, Conv1d, Hugging Face's
Conv1D), truncation error, hyper-parameters, gradients."""

import importlib
import importlib.util
import itertools

import pytest
import torch
from torch import nn

import tdnn
from tdnn.algebra import decompose

torch.manual_seed(0)

KERNELS = [1, 3, (3, 5)]
STRIDES = [(1, 1), (2, 1)]
PADDINGS = [0, (1, 2), "same"]
DILATIONS = [1, (2, 1)]
BIASES = [True, False]
# nn.Conv1d: one axis
KERNELS_1D = [1, 3, 4]
STRIDES_1D = [1, 2]
PADDINGS_1D = [0, 2, "same"]
DILATIONS_1D = [1, 2]


def conv_grid(kernels=KERNELS, strides=STRIDES, paddings=PADDINGS, dilations=DILATIONS, unit=(1, 1)):
    for k, s, p, d, b in itertools.product(kernels, strides, paddings, dilations, BIASES):
        if p == "same" and s != unit:
            continue  # PyTorch itself rejects padding='same' with stride > 1
        yield k, s, p, d, b


def make_conv(k, s, p, d, b, *, cin=6, cout=8, groups=1, padding_mode="zeros"):
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=b, groups=groups,
                     padding_mode=padding_mode, dtype=torch.float64)


def full_rank(cls, conv):
    return cls.max_rank(conv)


# -- full rank is exact: every kind × its conv hyper-parameters × every method that applies ------

def make_conv1d(k, s, p, d, b):
    return nn.Conv1d(6, 8, k, stride=s, padding=p, dilation=d, bias=b, dtype=torch.float64)


def make_linear(b):
    return nn.Linear(20, 13, bias=b, dtype=torch.float64)


def make_hf_conv1d(b):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(13, 20).double()  # 20 -> 13, always with a bias (zeros as built: make it count)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# kind: (layer builder, input builder, the grid of its hyper-parameters, method -> factorized class,
#        the type of every factor, atol of the output at full rank)
KINDS = {
    "Linear": (make_linear, lambda: torch.randn(4, 7, 20, dtype=torch.float64), [(b,) for b in BIASES],
               {"svd": "SVDLinear"}, nn.Linear, 1e-6),
    "Conv2d": (make_conv, lambda: torch.randn(2, 6, 11, 12, dtype=torch.float64), list(conv_grid()),
               {"svd": "SVDConv2d", "tucker2": "Tucker2Conv2d"}, nn.Conv2d, 1e-6),
    "Conv1d": (make_conv1d, lambda: torch.randn(2, 6, 23, dtype=torch.float64),
               list(conv_grid(KERNELS_1D, STRIDES_1D, PADDINGS_1D, DILATIONS_1D, unit=1)),
               {"svd": "SVDConv1d", "tucker2": "Tucker2Conv1d"}, nn.Conv1d, 1e-9),
    "Conv1D": (make_hf_conv1d, lambda: torch.randn(4, 7, 20, dtype=torch.float64), [(True,)],
               {"svd": "SVDConv1D"}, nn.Linear, 1e-9),
}


def full_rank_cases():
    for kind, (_, _, grid, methods, _, _) in KINDS.items():
        marks = [pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")] \
            if kind == "Conv1D" else []
        for hyper in grid:
            for method in methods:
                name = "-".join(str(v).replace(" ", "") for v in hyper)
                yield pytest.param(kind, hyper, method, marks=marks, id=f"{kind}-{name}-{method}")


def form(name):
    """A factorized class by name: tdnn's, or the Hugging Face Conv1D form (imported on demand)."""
    return getattr(tdnn, name, None) or getattr(importlib.import_module("tdnn.layers.hf_conv1d"), name)


@pytest.mark.parametrize("kind,hyper,method", list(full_rank_cases()))
def test_full_rank_is_exact(kind, hyper, method):
    build, inputs, _, methods, factor, atol = KINDS[kind]
    layer = build(*hyper)
    cls = form(methods[method])  # the class itself: a 1×1 conv takes Tucker-2 too (compress_model gives it SVD)
    small = cls.from_dense(layer, cls.max_rank(layer))
    x = inputs()
    torch.testing.assert_close(small(x), layer(x), atol=atol, rtol=0)
    assert small.rel_error < 1e-10
    assert all(isinstance(child, factor) for child in small)


# -- truncated factors, hyper-parameters, groups -------------------------------------------------

@pytest.mark.parametrize("cls,rank", [(tdnn.SVDConv2d, 3), (tdnn.Tucker2Conv2d, (3, 2)), (tdnn.CPConv2d, 5)])
@pytest.mark.parametrize("k,s,p,d,b", [g for g in conv_grid() if g[0] != 1])
def test_factorized_conv_equals_its_dense_kernel(cls, rank, k, s, p, d, b):
    # The chain must compute exactly the conv with the reconstructed kernel, whatever the
    # hyper-parameters: this is what catches a stride/padding/dilation carried to the wrong axis.
    conv = make_conv(k, s, p, d, b)
    x = torch.randn(2, 6, 11, 12, dtype=torch.float64)
    small = cls.from_dense(conv, rank)
    dense = small.to_dense()
    torch.testing.assert_close(small(x), dense(x), atol=1e-10, rtol=0)
    assert small(x).shape == conv(x).shape
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("cls", [tdnn.SVDConv2d, tdnn.Tucker2Conv2d, tdnn.CPConv2d])
def test_padding_modes(cls, padding_mode):
    conv = make_conv((3, 5), (2, 1), (1, 2), (1, 1), True, padding_mode=padding_mode)
    x = torch.randn(2, 6, 11, 12, dtype=torch.float64)
    rank = 40 if cls is tdnn.CPConv2d else full_rank(cls, conv)
    small = cls.from_dense(conv, rank)
    torch.testing.assert_close(small(x), small.to_dense()(x), atol=1e-10, rtol=0)
    if cls is not tdnn.CPConv2d:
        torch.testing.assert_close(small(x), conv(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls,rank", [(tdnn.SVDConv2d, None), (tdnn.Tucker2Conv2d, None)])
@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_full_rank_exact(cls, rank, groups):
    conv = make_conv(3, (2, 1), (1, 2), (2, 1), True, cin=8, cout=12, groups=groups)
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    small = cls.from_dense(conv, cls.max_rank(conv))
    torch.testing.assert_close(small(x), conv(x), atol=1e-6, rtol=0)
    assert all(child.groups == groups for child in small)


@pytest.mark.parametrize("cls,rank", [(tdnn.SVDConv2d, 2), (tdnn.Tucker2Conv2d, (2, 1))])
def test_grouped_conv_truncated_matches_dense_kernel(cls, rank):
    conv = make_conv(3, 1, 1, 1, False, cin=8, cout=12, groups=4)
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    small = cls.from_dense(conv, rank)
    torch.testing.assert_close(small(x), small.to_dense()(x), atol=1e-10, rtol=0)
    assert 0 < small.rel_error < 1


@pytest.mark.parametrize("shape", [(40, 25), (25, 40)])
@pytest.mark.parametrize("rank", [1, 5, 17])
def test_svd_linear_error_is_discarded_singular_values(shape, rank):
    lin = nn.Linear(shape[1], shape[0], dtype=torch.float64)
    s = torch.linalg.svdvals(lin.weight.detach())
    small = tdnn.SVDLinear.from_dense(lin, rank)
    error = (lin.weight - small.to_dense().weight).norm()
    torch.testing.assert_close(error, s[rank:].norm(), atol=1e-9, rtol=1e-9)
    assert small.rel_error == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-9)


def test_svd_conv_error_is_discarded_singular_values():
    conv = make_conv(3, 1, 1, 1, True, cin=6, cout=16)
    s = torch.linalg.svdvals(conv.weight.detach().flatten(1))
    for rank in (1, 4, 9):
        small = tdnn.SVDConv2d.from_dense(conv, rank)
        error = (conv.weight - small.to_dense().weight).norm()
        torch.testing.assert_close(error, s[rank:].norm(), atol=1e-9, rtol=1e-9)


def test_tucker2_error_never_above_truncated_hosvd():
    w = torch.randn(24, 20, 3, 3, dtype=torch.float64)
    core, out, inp = decompose.tucker2(w, (10, 8))
    hooi = (w - torch.einsum("qphw,sq,cp->schw", core, out, inp)).norm()
    # HOSVD: leading singular vectors of each unfolding, core by projection
    u = torch.linalg.svd(w.flatten(1), full_matrices=False)[0][:, :10]
    v = torch.linalg.svd(w.transpose(0, 1).flatten(1), full_matrices=False)[0][:, :8]
    hosvd_core = torch.einsum("schw,sq,cp->qphw", w, u, v)
    hosvd = (w - torch.einsum("qphw,sq,cp->schw", hosvd_core, u, v)).norm()
    assert hooi <= hosvd + 1e-9
    assert torch.allclose(out.T @ out, torch.eye(10, dtype=torch.float64), atol=1e-10)


def test_cp_recovers_an_exact_low_rank_kernel():
    g = torch.Generator().manual_seed(1)
    a, b, h, v = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (10, 8, 3, 3))
    weight = torch.einsum("sr,cr,ir,jr->scij", a, b, h, v)
    conv = nn.Conv2d(8, 10, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight)
    small = tdnn.CPConv2d.from_dense(conv, 4)
    assert small.rel_error < 1e-5
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(small(x), conv(x), atol=1e-4, rtol=1e-4)


def test_cp_error_falls_with_rank():
    conv = make_conv(3, 1, 1, 1, False, cin=8, cout=8)
    errors = [tdnn.CPConv2d.from_dense(conv, r).rel_error for r in (2, 8, 32, 64)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.25 * errors[0]


@pytest.mark.parametrize("make", [
    lambda: tdnn.SVDLinear.from_dense(nn.Linear(12, 9), 4),
    lambda: tdnn.SVDConv2d.from_dense(nn.Conv2d(6, 8, 3, padding=1), 3),
    lambda: tdnn.Tucker2Conv2d.from_dense(nn.Conv2d(6, 8, 3, padding=1), (4, 3)),
    lambda: tdnn.CPConv2d.from_dense(nn.Conv2d(6, 8, 3, padding=1), 5),
])
def test_gradients_reach_every_factor(make):
    small = make()
    x = torch.randn(3, 12) if isinstance(small, tdnn.SVDLinear) else torch.randn(2, 6, 7, 7)
    small(x).square().sum().backward()
    for name, p in small.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_through_a_factorized_conv():
    small = tdnn.Tucker2Conv2d.from_dense(make_conv(3, (2, 1), (1, 2), 1, True), (3, 2))
    x = torch.randn(1, 6, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(small, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls,rank", [(tdnn.SVDConv2d, 4), (tdnn.Tucker2Conv2d, (4, 3)), (tdnn.CPConv2d, 6)])
def test_children_keep_dtype_and_device(dtype, cls, rank):
    conv = nn.Conv2d(6, 8, 3, padding=1, dtype=dtype)
    small = cls.from_dense(conv, rank)
    for p in small.parameters():
        assert p.dtype == dtype and p.device == conv.weight.device
    assert small.to_dense().weight.dtype == dtype


def test_repr_shows_method_and_rank():
    small = tdnn.Tucker2Conv2d.from_dense(nn.Conv2d(6, 8, 3), (4, 3))
    assert "method='tucker2', rank=(4, 3)" in repr(small)


def test_structure_builds_without_decomposing():
    conv = nn.Conv2d(6, 8, 3, padding=1)
    meta = tdnn.Tucker2Conv2d.structure(conv, (4, 3), device="meta")
    assert all(p.is_meta for p in meta.parameters()) and meta.rel_error is None
