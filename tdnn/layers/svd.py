"""Truncated-SVD layers: ``SVDLinear`` and ``SVDConv2d``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn import decompose
from tdnn.calibrate import Whitening
from tdnn.layers.base import Factorized, copy_into, grouped


def _svd_factors(parts: list[tuple[torch.Tensor, Whitening | None]], rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group truncated SVD of the (whitened) matrix, mapped back; groups stacked."""
    lefts, rights = [], []
    for weight, whitening in parts:
        left, right = decompose.svd(weight, rank)
        if whitening is not None:
            left, right = whitening.out_factor(left), whitening.in_factor(right.T).T
        lefts.append(left)
        rights.append(right)
    return torch.cat(lefts), torch.cat(rights)


class SVDLinear(Factorized):
    """``Linear(in → r, no bias)`` then ``Linear(r → out)`` from the truncated SVD of the weight.

    At ``rank = min(in, out)`` it reproduces the original layer exactly; below that, the weight
    error is the norm of the discarded singular values (Eckart–Young).

    Example:
        >>> import torch, tdnn
        >>> dense = torch.nn.Linear(64, 32)
        >>> small = tdnn.SVDLinear.from_dense(dense, 8)
        >>> small(torch.randn(5, 64)).shape
        torch.Size([5, 32])
        >>> small.to_dense().weight.shape
        torch.Size([32, 64])
    """

    method = "svd"
    dense_type = nn.Linear

    @classmethod
    def max_rank(cls, layer: nn.Linear) -> int:
        return min(layer.in_features, layer.out_features)

    @classmethod
    def _build(cls, layer: nn.Linear, rank: int, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        return OrderedDict(
            first=nn.Linear(layer.in_features, rank, bias=False, **factory),
            last=nn.Linear(rank, layer.out_features, bias=layer.bias is not None, **factory),
        )

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        left, right = _svd_factors(parts, self.rank)
        copy_into(self.first.weight, right)
        copy_into(self.last.weight, left)

    def dense_weight(self) -> torch.Tensor:
        return self.last.weight @ self.first.weight


class SVDConv2d(Factorized):
    """A convolution as ``Conv(k×k, C → r)`` then ``Conv(1×1, r → S)`` from the SVD of its kernel.

    The kernel is unfolded to ``(S, C·kh·kw)``; the first conv carries the original stride,
    padding, dilation and padding mode, the second the bias. For ``groups > 1`` each group is
    decomposed on its own (rank ``r`` per group) and both convs stay grouped. For a 1×1 conv this
    is the plain two-layer SVD.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        >>> small = tdnn.SVDConv2d.from_dense(conv, 8)
        >>> small(torch.randn(1, 16, 10, 10)).shape
        torch.Size([1, 32, 5, 5])
    """

    method = "svd"
    dense_type = nn.Conv2d

    @classmethod
    def max_rank(cls, layer: nn.Conv2d) -> int:
        per_group_out = layer.out_channels // layer.groups
        return min(per_group_out, layer.weight[0].numel())

    @classmethod
    def _build(cls, layer: nn.Conv2d, rank: int, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        g = layer.groups
        return OrderedDict(
            first=nn.Conv2d(layer.in_channels, g * rank, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=g, bias=False,
                            padding_mode=layer.padding_mode, **factory),
            last=nn.Conv2d(g * rank, layer.out_channels, 1, groups=g,
                           bias=layer.bias is not None, **factory),
        )

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        left, right = _svd_factors(parts, self.rank)
        copy_into(self.first.weight, right)
        copy_into(self.last.weight, left)

    def dense_weight(self) -> torch.Tensor:
        g = self.dense_kwargs["groups"]
        first = grouped(self.first.weight, g).flatten(2)       # (G, r, C/G·kh·kw)
        last = grouped(self.last.weight, g).flatten(2)         # (G, S/G, r)
        return (last @ first).reshape(self.dense_kwargs["out_channels"], *self.first.weight.shape[1:])
