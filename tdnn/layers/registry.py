"""The registry: what each dense layer *kind* is, and which factorized class a *method* uses for it.

Two tables, filled by the classes themselves and read by everything else (compress, ranks, cost,
calibration, save/load, report, config and the command line):

* **kinds** — a :class:`LayerKind` subclass declared with ``dense_type=`` registers itself: how tdnn
  reads that dense layer (its weight as a kernel, constructor arguments, calibration vectors).
* **methods** — a :class:`tdnn.Factorized` subclass declared with ``method=`` and ``kind=``
  registers itself as that method's form for that kind.

A kind whose layer class lives in an optional package (Hugging Face's ``Conv1D``) is registered
*lazily*: by the qualified class name and the tdnn module that defines it, imported the first time
such a layer is met, so tdnn never imports the optional package itself.

Example — a method of your own, from outside the package (here: SVD that ignores calibration data):
    >>> import torch, tdnn
    >>> class PlainSVD(tdnn.SVDLinear, method="plainsvd", kind="Linear"):
    ...     @classmethod
    ...     def from_dense(cls, layer, rank, *, name="layer", whitening=None):
    ...         return super().from_dense(layer, rank, name=name)
    >>> "plainsvd" in tdnn.registry.method_names()
    True
    >>> net = torch.nn.Sequential(torch.nn.Linear(32, 32))
    >>> type(tdnn.compress_model(net, ranks=4, method="plainsvd")[0]).__name__
    'PlainSVD'
    >>> tdnn.registry.unregister_method("plainsvd")
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

AUTO = "auto"
# A method's class: a tdnn.Factorized subclass (named loosely here: tdnn.layers.base imports this module).
Form = type[nn.Module]
_KINDS: dict[str, LayerKind] = {}                       # kind name -> adapter
_BY_TYPE: dict[type, LayerKind | None] = {}             # lookup cache, reset on registration
_LAZY: dict[str, str] = {}                              # "module.Class" of a dense type -> tdnn module
_METHODS: dict[str, dict[str, Form]] = {}               # method -> kind name -> class


class Geometry(str, enum.Enum):
    """How a method reads a layer's kernel, and so which input vectors calibration collects.

    ``PATCHES``: the kernel unfolded to a matrix ``(out, in·k…)``, met by unfolded input patches (a
    Linear layer's input features; SVD of a convolution). ``CHANNELS``: the kernel as a tensor,
    whose input mode meets each position's channel vector (Tucker-2, CP).
    """

    PATCHES = "patches"
    CHANNELS = "channels"

    def __str__(self) -> str:
        return self.value


class LayerKind:
    """How tdnn reads one type of dense layer. Subclasses register themselves::

        class LinearKind(LayerKind, dense_type=nn.Linear): ...

    The defaults describe a layer with a ``weight`` of shape ``(out, in)`` and an optional ``bias``
    (``nn.Linear``); convolution kinds override the kernel view and the calibration vectors.

    Attributes:
        name: the kind's name in plans and checkpoints (the dense class name by default).
        dense_type: the dense layer class.
        auto_method: the method ``method="auto"`` uses for this kind.
        spatial: the number of spatial kernel dimensions (0 for a matrix layer).
    """

    name: ClassVar[str]
    dense_type: ClassVar[type[nn.Module]]
    auto_method: ClassVar[str] = "svd"
    spatial: ClassVar[int] = 0

    def __init_subclass__(cls, *, dense_type: type[nn.Module] | None = None, name: str | None = None,
                          replace: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if dense_type is not None:
            cls.dense_type, cls.name = dense_type, name or dense_type.__name__
            register_kind(cls(), replace=replace)

    # -- the layer's description -------------------------------------------------------------
    def dense_kwargs(self, layer: nn.Module) -> dict[str, Any]:
        """The constructor arguments that rebuild ``layer`` (JSON-friendly, without device/dtype)."""
        return {"in_features": layer.in_features, "out_features": layer.out_features,
                "bias": layer.bias is not None}

    def build(self, kwargs: dict[str, Any], *, bias: bool | None = None, device: Any = None,
              dtype: torch.dtype | None = None) -> nn.Module:
        """A new dense layer from :meth:`dense_kwargs` (values uninitialised), with or without a
        bias if ``bias`` is given."""
        kwargs = kwargs if bias is None else {**kwargs, "bias": bias}
        return self.dense_type(**kwargs, device=device, dtype=dtype)

    def factor(self, cin: int, cout: int, *, kernel_size: tuple[int, ...] = (), groups: int = 1,
               bias: bool = False, options: dict[str, Any] | None = None, **factory: Any) -> nn.Module:
        """A stock layer for one factor of a factorized form: ``nn.Linear`` for a matrix kind (no
        kernel, no groups), a convolution of the kind's dimension with ``options`` (stride, padding,
        dilation, padding mode; default: a pointwise convolution) for convolution kinds."""
        return nn.Linear(cin, cout, bias=bias, **factory)

    def conv_options(self, layer: nn.Module) -> dict[str, Any]:
        """The stride, padding, dilation and padding mode of a convolution (empty for a matrix kind)."""
        return {}

    def kernel(self, layer: nn.Module) -> torch.Tensor:
        """The weight as ``(out, in / groups, *kernel_size)``: output mode first, input mode second."""
        return layer.weight

    def set_kernel(self, layer: nn.Module, kernel: torch.Tensor) -> None:
        """Write a kernel in the :meth:`kernel` layout into ``layer``'s weight."""
        layer.weight.copy_(kernel.reshape(layer.weight.shape))

    def groups(self, layer: nn.Module) -> int:
        return 1

    def is_matrix(self, layer: nn.Module) -> bool:
        """Whether the layer is a plain matrix product (no spatial extent), where every method is an SVD."""
        return all(k == 1 for k in self.kernel(layer).shape[2:])

    # -- calibration -------------------------------------------------------------------------
    def vectors(self, layer: nn.Module, x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        """The input ``x`` as rows of the vectors the weight multiplies.

        ``geometry`` is what the method decomposes (:class:`Geometry`); a matrix layer reads
        both the same way.
        """
        return x.reshape(-1, x.shape[-1])

    def vectors_key(self, layer: nn.Module, geometry: Geometry) -> tuple:
        """Layers with equal keys reading the very same input get the same :meth:`vectors`."""
        return (self.name,)

    def example_input(self, layer: nn.Module, batch: int = 1) -> torch.Tensor:
        """A random input of the right shape and dtype (convolutions: 32 positions per axis)."""
        weight = layer.weight
        return torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def __repr__(self) -> str:
        return f"<kind {self.name}: {self.dense_type.__module__}.{self.dense_type.__qualname__}>"


# -- registration --------------------------------------------------------------------------------


def _same(old: type, new: type) -> bool:
    """The very class, or the same definition run again (a module reloaded)."""
    return old is new or (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def register_kind(kind: LayerKind, *, replace: bool = False) -> LayerKind:
    """Register a kind adapter (done by declaring a :class:`LayerKind` subclass with ``dense_type=``).

    Raises:
        ValueError: if another adapter is registered under that name or for that dense type,
            unless ``replace=True`` (``class MyLinear(LayerKind, dense_type=nn.Linear, replace=True)``).
    """
    clash = [k for k in _KINDS.values() if (k.name == kind.name or k.dense_type is kind.dense_type)
             and not _same(type(k), type(kind))]
    if clash and not replace:
        raise ValueError(f"{type(kind).__name__}: {clash[0].dense_type.__name__} layers already have the kind "
                         f"{clash[0]!r}; a second one would leave them without methods. Declare it with "
                         f"replace=True to replace it")
    for old in clash:
        unregister_kind(old.name)
    _KINDS[kind.name] = kind
    _BY_TYPE.clear()
    return kind


def register_lazy_kind(qualified_type: str, module: str) -> None:
    """Import the tdnn ``module`` (which registers a kind) when a layer of ``qualified_type``
    (``"package.module.Class"``) is first met, so the package is never imported before that."""
    _LAZY[qualified_type] = module
    _BY_TYPE.clear()


def register_method(cls: Form, *, replace: bool = False) -> None:
    """Register ``cls`` as method ``cls.method`` for kind ``cls.kind`` (done by declaring a
    :class:`tdnn.Factorized` subclass with ``method=`` and ``kind=``).

    Raises:
        TypeError: if ``cls`` is not a :class:`tdnn.Factorized` subclass with a method and a kind.
        ValueError: for the reserved name ``"auto"``, or if another class is that method's form for
            the kind already (tdnn's own SVD, say), unless ``replace=True``
            (``class MySVD(tdnn.SVDLinear, method="svd", kind="Linear", replace=True)``).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Sequential) and callable(getattr(cls, "from_dense", None))
            and isinstance(getattr(cls, "method", None), str) and isinstance(getattr(cls, "kind", None), LayerKind)):
        raise TypeError(f"register_method takes a tdnn.Factorized subclass declared with method= and kind=, "
                        f"got {cls!r}")
    if cls.method == AUTO:
        raise ValueError(f"{cls.__name__}: 'auto' is reserved; choose another method name")
    forms = _METHODS.setdefault(cls.method, {})
    old = forms.get(cls.kind.name)
    if old is not None and not _same(old, cls) and not replace:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}: method {cls.method!r} for {cls.kind.name} layers is "
                         f"{old.__module__}.{old.__qualname__} already; declare the class with replace=True to "
                         f"replace it, or choose another method name")
    forms[cls.kind.name] = cls


def unregister_method(method: str, kind: str | None = None) -> None:
    """Remove a method (only its form for ``kind`` if given), e.g. one registered in a test."""
    if kind is None:
        _METHODS.pop(method, None)
    else:
        _METHODS.get(method, {}).pop(kind, None)


def unregister_kind(name: str) -> None:
    """Remove a kind and every method's form for it."""
    _KINDS.pop(name, None)
    _BY_TYPE.clear()
    for by_kind in _METHODS.values():
        by_kind.pop(name, None)


# -- lookups -------------------------------------------------------------------------------------


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (also for subclasses of a registered dense type), or ``None``."""
    cls = type(module)
    if cls not in _BY_TYPE:
        _BY_TYPE[cls] = _find(cls)
    return _BY_TYPE[cls]


def _find(cls: type) -> LayerKind | None:
    by_type = {kind.dense_type: kind for kind in _KINDS.values()}
    for base in cls.__mro__:
        if base in by_type:
            return by_type[base]
        lazy = _LAZY.pop(f"{base.__module__}.{base.__qualname__}", None)
        if lazy is not None:
            importlib.import_module(lazy)  # registers the kind (and resets the cache)
            return _find(cls)
    return None


def kind_named(name: str) -> LayerKind:
    """The kind registered under ``name`` (as plans and checkpoints record it)."""
    if name not in _KINDS:
        raise ValueError(f"unknown layer kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a dense layer of a registered kind."""
    return kind_of(module) is not None


def kinds() -> list[LayerKind]:
    """The registered kinds (lazily registered ones once their package was met)."""
    return list(_KINDS.values())


def pending_kinds() -> dict[str, str]:
    """Lazily registered kinds not met yet: qualified dense type -> the tdnn module registering it."""
    return dict(_LAZY)


def method_names() -> list[str]:
    """The registered methods, plus ``"auto"``."""
    return [AUTO, *_METHODS]


def check_method(method: Any, where: str = "method") -> str:
    """Return ``method`` if it names a registered method (or ``"auto"``), else raise ``ValueError``."""
    if method != AUTO and method not in _METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(method_names())}")
    return method


def forms() -> Iterator[tuple[str, str, Form]]:
    """``(method, kind name, class)`` for every registered form."""
    for method, by_kind in _METHODS.items():
        for kind, cls in by_kind.items():
            yield method, kind, cls


def factorized_class(layer: nn.Module, method: str) -> Form | None:
    """The class that factorizes ``layer`` under ``method``, or ``None`` if the method has no form
    for the layer's kind.

    ``"auto"`` is the kind's :attr:`LayerKind.auto_method`. A layer that is a plain matrix (a Linear
    layer, a 1×1 convolution) uses ``"svd"`` under any method with no form that takes matrices:
    Tucker-2 and CP of a matrix *are* its SVD.
    """
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a layer kind tdnn knows; known kinds: "
                        f"{', '.join(sorted(_KINDS))}")
    check_method(method)
    cls = _METHODS.get(kind.auto_method if method == AUTO else method, {}).get(kind.name)
    if kind.is_matrix(layer) and (cls is None or not cls.takes_matrices):
        cls = _METHODS.get("svd", {}).get(kind.name, cls)
    return cls
