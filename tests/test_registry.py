"""The registry as a user extends it from outside the package: a method of their own, a layer kind
of their own; and what the package reads off it (config, CLI, load). Replacing a built-in takes
``replace=True``; a registry left with nothing to compress says so."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tdnn
from tdnn.layers.svd import SVD
from tdnn.layers.registry import LayerKind


@pytest.fixture
def randproj():
    # Declared here, not at import: declaring registers it, and other test files expect the
    # built-in methods only.
    class RandomProjection(tdnn.SVDLinear, method="randproj", kind="Linear"):
        """A toy method: ``first`` projects onto a random orthonormal basis of the input space,
        ``last`` is the least-squares fit of the weight in that basis (worse than SVD, exact at
        full rank)."""

        def _decompose(self, parts):
            ((weight, _),) = parts
            g = torch.Generator().manual_seed(0)
            basis = torch.linalg.qr(torch.randn(weight.shape[1], self.rank, generator=g, dtype=weight.dtype))[0]
            self.first.weight.copy_(basis.T)
            self.last.weight.copy_(weight @ basis)

    yield RandomProjection
    tdnn.registry.unregister_method("randproj")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).double().eval()


def test_a_method_registered_outside_compresses_saves_and_loads(randproj, tmp_path):
    RandomProjection = randproj
    net, x = mlp(), torch.randn(8, 32, dtype=torch.float64)
    assert "randproj" in tdnn.registry.method_names()
    small = tdnn.compress_model(net, ranks=8, method="randproj")
    assert [type(m) for m in small] == [RandomProjection, nn.ReLU, RandomProjection]
    assert [e.method for e in small.tdnn_plan.layers] == ["randproj", "randproj"]
    svd = tdnn.compress_model(net, ranks=8, method="svd")
    for ours, best in zip(small.tdnn_plan.layers, svd.tdnn_plan.layers):
        # Eckart–Young: no rank-8 factorization has a smaller weight error than the SVD's
        assert small.get_submodule(ours.name).rel_error > svd.get_submodule(best.name).rel_error
    exact = RandomProjection.from_dense(net[0], 32)
    torch.testing.assert_close(exact(x), net[0](x), atol=1e-10, rtol=0)

    tdnn.save(small, tmp_path / "r.safetensors")
    loaded = tdnn.load(tmp_path / "r.safetensors", mlp())
    assert type(loaded[0]) is RandomProjection and torch.equal(loaded(x), small(x))
    cfg = tdnn.Config.from_dict({"compress": {"ranks": 0.5, "method": "randproj"}})
    assert cfg.compress["method"] == "randproj"


def test_an_unregistered_method_is_refused_everywhere(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'randproj'; choose one of auto, svd, tucker2, cp"):
        tdnn.compress_model(mlp(), ranks=8, method="randproj")
    with pytest.raises(ValueError, match=r"'compress.method': .*unknown method 'randproj'"):
        tdnn.Config.from_dict({"compress": {"ranks": 0.5, "method": "randproj"}})


def test_a_method_without_a_form_for_a_kind_keeps_those_layers_dense(randproj):
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    small = tdnn.compress_model(net, ranks=4, method="randproj")
    assert small.tdnn_plan["0"].reason == "method 'randproj' has no form for Conv2d layers"
    assert type(small[2]) is randproj


class Dense(nn.Module):
    """A user's own dense layer: weight ``(out, in)`` and a bias, no nn.Linear underneath."""

    def __init__(self, n_in, n_out, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out, device=device, dtype=dtype))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@pytest.fixture
def dense_kind():
    class DenseKind(LayerKind, dense_type=Dense):
        def dense_kwargs(self, layer):
            return {"n_in": layer.weight.shape[1], "n_out": layer.weight.shape[0]}

        def build(self, kwargs, *, bias=None, device=None, dtype=None):
            return Dense(**kwargs, device=device, dtype=dtype)

    class SVDDense(SVD, kind="Dense"):
        """SVD of a Dense layer."""

    yield SVDDense
    tdnn.registry.unregister_kind("Dense")


def test_a_kind_registered_outside_is_found_compressed_calibrated_and_merged(dense_kind):
    torch.manual_seed(0)
    net = nn.Sequential(Dense(24, 24), nn.Tanh(), Dense(24, 4)).double()
    x = torch.randn(64, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    small = tdnn.compress_model(net, ranks=0.5, calibration=[x])
    assert [type(m) for m in small] == [dense_kind, nn.Tanh, dense_kind]
    assert small.tdnn_plan["0"].kind == "Dense" and small.tdnn_plan["0"].data_aware
    merged = tdnn.merge(small)
    assert type(merged[0]) is Dense
    torch.testing.assert_close(merged(x), small(x), atol=1e-10, rtol=0)
    full = dense_kind.from_dense(net[0], 24)
    torch.testing.assert_close(full(x), net[0](x), atol=1e-10, rtol=0)


def test_the_cli_lists_the_registry(capsys, randproj):
    from tdnn.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for method, kind, cls in tdnn.registry.forms():
        assert any(line.split()[:3] == [method, kind, cls.__name__] for line in out.splitlines())
    assert "randproj" in out and "Conv1d" in out


# -- hazards: replacing built-ins, a registry with nothing left ----------------------------------

@pytest.fixture
def registry_restored():
    """Undo whatever the test did to the registry (kinds and forms added, replaced or removed)."""
    registry = tdnn.registry
    kinds, forms = registry.kinds(), list(registry.forms())
    yield registry
    for kind in registry.kinds():
        if kind not in kinds:
            registry.unregister_kind(kind.name)
    for kind in kinds:
        if kind not in registry.kinds():
            registry.register_kind(kind, replace=True)
    for method, kind, cls in list(registry.forms()):
        if (method, kind, cls) not in forms:
            registry.unregister_method(method, kind)
    for _, _, cls in forms:
        registry.register_method(cls, replace=True)


def svd_of_linear():
    return tdnn.registry.factorized_class(nn.Linear(2, 2), "svd")


def test_a_class_named_like_a_builtin_replaces_it_only_when_asked(registry_restored):
    with pytest.raises(ValueError, match=r"method 'svd' for Linear layers is tdnn\.\S+\.SVDLinear already; declare "
                                         r"the class with replace=True"):
        class SVDLinear(tdnn.SVDLinear, method="svd", kind="Linear"):
            __qualname__ = "SVDLinear"  # as a user's module-level class is named
    assert svd_of_linear() is tdnn.SVDLinear

    class MySVD(tdnn.SVDLinear, method="svd", kind="Linear", replace=True):
        pass

    assert svd_of_linear() is MySVD and type(tdnn.compress_model(mlp(), ranks=0.5)[0]) is MySVD


def test_a_registry_that_leaves_nothing_to_compress_says_why(registry_restored):
    registry_restored.unregister_method("svd", "Linear")
    with pytest.raises(ValueError, match=r"Sequential: nothing to compress: no registered method has a form for its "
                                         r"Linear layers under method 'auto' .*was a method or kind unregistered\?"):
        tdnn.compress_model(mlp(), ranks=0.5)


@pytest.mark.parametrize("name", [None, "MyLinear"])
def test_a_second_kind_for_one_dense_type_is_refused(registry_restored, name):
    with pytest.raises(ValueError, match=r"Linear layers already have the kind .*Declare it with replace=True"):
        class MyLinearKind(LayerKind, dense_type=nn.Linear, name=name):
            pass
    assert type(tdnn.compress_model(mlp(), ranks=0.5)[0]) is tdnn.SVDLinear  # Linear layers keep their methods


@pytest.mark.parametrize("cls", [nn.Linear, tdnn.Factorized, int])
def test_only_a_factorized_class_with_method_and_kind_registers(registry_restored, cls):
    with pytest.raises(TypeError, match=r"register_method takes a tdnn.Factorized subclass declared with method= "
                                        r"and kind=, got "):
        registry_restored.register_method(cls)
