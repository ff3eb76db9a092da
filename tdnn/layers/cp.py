"""CP convolution: pointwise → one depthwise convolution per spatial axis → pointwise."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.algebra.whitening import Whitening
from tdnn.layers.base import Factorized, copy_into
from tdnn.layers.registry import Geometry
from tdnn.layers.tucker2 import Tucker2

# The depthwise children's names, per number of spatial axes.
AXIS_NAMES = {1: ("depthwise",), 2: ("vertical", "horizontal"), 3: ("depth", "vertical", "horizontal")}


def _axis(value: Any, axis: int, neutral: int) -> Any:
    """One axis of a per-axis conv argument; the other axes get ``neutral``.

    String paddings (``'same'``, ``'valid'``) pass through: for a kh×1 kernel PyTorch's ``'same'``
    pads only the height, which is exactly what the separable chain needs.
    """
    if isinstance(value, str):
        return value
    return tuple(v if i == axis else neutral for i, v in enumerate(value))


class CP(Factorized, method="cp"):
    """A convolution as ``Conv(1, C → R)``, one depthwise conv per spatial axis (``k×1`` then
    ``1×k`` in 2-D), ``Conv(1, R → S)``, with factors from tensorly's ``initialize_cp`` (SVD start)
    and CP-ALS sweeps.

    Each depthwise conv carries the original stride, padding and dilation of its axis, with the
    original padding mode, so the chain computes exactly the convolution with the CP-reconstructed
    kernel (:meth:`to_dense`). Grouped convolutions are not supported.
    """

    geometry = Geometry.CHANNELS
    takes_matrices = False
    spectral_ranks = False  # the unfoldings' spectra give Tucker ranks, not CP ranks

    @classmethod
    def max_rank(cls, layer: nn.Module) -> int:
        # A tensor's rank never exceeds the product of all but its largest dimension.
        return int(torch.tensor(sorted(cls.kind.kernel(layer).shape)[:-1]).prod())

    @classmethod
    def unsupported(cls, layer: nn.Module) -> str | None:
        groups = cls.kind.groups(layer)
        if groups > 1:
            return f"cp does not support grouped convolutions (groups={groups})"
        return None

    @classmethod
    def _build(cls, layer: nn.Module, rank: int, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        kind, kernel = cls.kind, cls.kind.kernel(layer)
        sizes, options = tuple(kernel.shape[2:]), kind.conv_options(layer)
        children = OrderedDict(first=kind.factor(kernel.shape[1], rank, **factory))
        for axis, name in enumerate(AXIS_NAMES[len(sizes)]):
            children[name] = kind.factor(
                rank, rank, kernel_size=_axis(sizes, axis, 1), groups=rank, **factory,
                options={"stride": _axis(options["stride"], axis, 1), "padding": _axis(options["padding"], axis, 0),
                         "dilation": _axis(options["dilation"], axis, 1), "padding_mode": options["padding_mode"]})
        children["last"] = kind.factor(rank, kernel.shape[0], bias=layer.bias is not None, **factory)
        return children

    unfoldings = staticmethod(Tucker2.unfoldings)

    @classmethod
    def estimate_error(cls, spectra: list[torch.Tensor], rank: int) -> float:
        # CP at rank R is a Tucker-2 at (R, R) with a diagonal core, so the Tucker bound at that
        # rank is an optimistic estimate: it ranks CP layers by how compressible they are.
        return Tucker2.estimate_error(spectra, (rank, rank))

    def _spatial(self) -> list[nn.Module]:
        return list(self)[1:-1]

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        ((weight, whitening),) = parts
        out, inp, *axes = decompose.cp(weight, self.rank)
        if whitening is not None:
            out, inp = whitening.out_factor(out), whitening.in_factor(inp)
        copy_into(self.first.weight, inp.T)
        for conv, factor in zip(self._spatial(), axes):
            copy_into(conv.weight, factor.T)
        copy_into(self.last.weight, out)

    def dense_weight(self) -> torch.Tensor:
        first, last = self.first.weight.flatten(1), self.last.weight.flatten(1)       # (R, C), (S, R)
        # one (R, C·k…) rank-one stack, then one matmul: a many-operand einsum takes seconds here
        ones = first
        for conv in self._spatial():
            factor = conv.weight.flatten(1)                                           # (R, k_i)
            ones = ones[..., None] * factor.reshape(factor.shape[0], *[1] * (ones.dim() - 1), -1)
        return (last @ ones.flatten(1)).reshape(last.shape[0], *ones.shape[1:])
