"""Truncated SVD of a layer's weight as a matrix: two stock layers, ``in → r → out``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.algebra.whitening import Whitening
from tdnn.layers.base import Factorized, copy_into, grouped


class SVD(Factorized, method="svd"):
    """A layer as ``first`` (its kernel, ``in → r``) then ``last`` (pointwise, ``r → out``) from the
    truncated SVD of its weight unfolded to ``(out, in·k…)``; one form per layer kind.

    For a convolution, ``first`` carries the original kernel size, stride, padding, dilation and
    padding mode, ``last`` the bias; for ``groups > 1`` each group is decomposed on its own (rank
    ``r`` per group) and both stay grouped. At full rank the chain reproduces the layer exactly;
    below it, the weight error is the norm of the discarded singular values (Eckart–Young).
    """

    @classmethod
    def max_rank(cls, layer: nn.Module) -> int:
        kernel = cls.kind.kernel(layer)
        return min(kernel.shape[0] // cls.kind.groups(layer), kernel[0].numel())

    @classmethod
    def _build(cls, layer: nn.Module, rank: int, factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        kind, kernel = cls.kind, cls.kind.kernel(layer)
        g = kind.groups(layer)
        return OrderedDict(
            first=kind.factor(kernel.shape[1] * g, g * rank, kernel_size=tuple(kernel.shape[2:]), groups=g,
                              options=kind.conv_options(layer), **factory),
            last=kind.factor(g * rank, kernel.shape[0], groups=g, bias=layer.bias is not None, **factory),
        )

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        lefts, rights = [], []
        for weight, whitening in parts:
            left, right = decompose.svd(weight, self.rank)
            if whitening is not None:
                left, right = whitening.out_factor(left), whitening.in_factor(right.T).T
            lefts.append(left)
            rights.append(right)
        copy_into(self.first.weight, torch.cat(rights))
        copy_into(self.last.weight, torch.cat(lefts))

    def dense_weight(self) -> torch.Tensor:
        first = grouped(self.first.weight, self.groups).flatten(2)     # (G, r, in/G·k…)
        last = grouped(self.last.weight, self.groups).flatten(2)       # (G, out/G, r)
        return (last @ first).reshape(-1, *self.first.weight.shape[1:])
