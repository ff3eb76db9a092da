"""CP convolution: 1×1 → depthwise k×1 → depthwise 1×k → 1×1."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn import decompose
from tdnn.calibrate import Whitening
from tdnn.layers.base import Factorized, copy_into
from tdnn.layers.tucker2 import Tucker2Conv2d


def _axis(value: Any, axis: int, neutral: int) -> Any:
    """One axis of a per-axis conv argument; the other axis gets ``neutral``.

    String paddings (``'same'``, ``'valid'``) pass through: for a kh×1 kernel PyTorch's ``'same'``
    pads only the height, which is exactly what the separable chain needs.
    """
    if isinstance(value, str):
        return value
    return (value[0], neutral) if axis == 0 else (neutral, value[1])


class CPConv2d(Factorized):
    """A k×k convolution as ``Conv(1×1, C → R)``, depthwise ``(kh×1)``, depthwise ``(1×kw)``,
    ``Conv(1×1, R → S)``, with factors from tensorly's ``parafac`` (ALS from an SVD start).

    The vertical depthwise conv carries the original stride, padding and dilation of the height
    axis, the horizontal one those of the width axis, both with the original padding mode, so the
    chain computes exactly the convolution with the CP-reconstructed kernel (:meth:`to_dense`).
    Grouped convolutions are not supported.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(16, 32, (3, 5), padding=(1, 2))
        >>> small = tdnn.CPConv2d.from_dense(conv, 12)
        >>> small(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    method = "cp"
    dense_type = nn.Conv2d
    flat = False

    @classmethod
    def max_rank(cls, layer: nn.Conv2d) -> int:
        # A 4-way tensor's rank never exceeds the product of all but its largest dimension.
        dims = sorted(layer.weight.shape)
        return dims[0] * dims[1] * dims[2]

    @classmethod
    def unsupported(cls, layer: nn.Conv2d) -> str | None:
        if layer.groups > 1:
            return f"cp does not support grouped convolutions (groups={layer.groups})"
        return None

    @classmethod
    def _build(cls, layer: nn.Conv2d, rank: int, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        kh, kw = layer.kernel_size
        separable = {"groups": rank, "bias": False, "padding_mode": layer.padding_mode, **factory}
        return OrderedDict(
            first=nn.Conv2d(layer.in_channels, rank, 1, bias=False, **factory),
            vertical=nn.Conv2d(rank, rank, (kh, 1), stride=_axis(layer.stride, 0, 1),
                               padding=_axis(layer.padding, 0, 0),
                               dilation=_axis(layer.dilation, 0, 1), **separable),
            horizontal=nn.Conv2d(rank, rank, (1, kw), stride=_axis(layer.stride, 1, 1),
                                 padding=_axis(layer.padding, 1, 0),
                                 dilation=_axis(layer.dilation, 1, 1), **separable),
            last=nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None, **factory),
        )

    unfoldings = staticmethod(Tucker2Conv2d.unfoldings)

    @classmethod
    def estimate_error(cls, spectra: list[torch.Tensor], rank: int) -> float:
        # CP at rank R is a Tucker-2 at (R, R) with a diagonal core, so the Tucker bound at that
        # rank is an optimistic estimate: it ranks CP layers by how compressible they are.
        return Tucker2Conv2d.estimate_error(spectra, (rank, rank))

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        ((weight, whitening),) = parts
        out, inp, vertical, horizontal = decompose.cp(weight, self.rank)
        if whitening is not None:
            out, inp = whitening.out_factor(out), whitening.in_factor(inp)
        copy_into(self.first.weight, inp.T)
        copy_into(self.vertical.weight, vertical.T)
        copy_into(self.horizontal.weight, horizontal.T)
        copy_into(self.last.weight, out)

    def dense_weight(self) -> torch.Tensor:
        first, last = self.first.weight.flatten(1), self.last.weight.flatten(1)       # (R, C), (S, R)
        vertical, horizontal = self.vertical.weight.flatten(1), self.horizontal.weight.flatten(1)
        # one (R, C·kh·kw) rank-one stack, then one matmul: a 4-operand einsum takes seconds here
        ones = first[:, :, None, None] * vertical[:, None, :, None] * horizontal[:, None, None, :]
        return (last @ ones.flatten(1)).reshape(last.shape[0], *ones.shape[1:])
