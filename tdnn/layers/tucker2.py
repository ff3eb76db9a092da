"""Tucker-2 convolution: pointwise → k×k core → pointwise."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn.algebra import decompose
from tdnn.algebra.whitening import Whitening
from tdnn.layers.base import Factorized, copy_into, grouped
from tdnn.layers.registry import Geometry


class Tucker2(Factorized, method="tucker2"):
    """A convolution as ``Conv(1, C → r_in)``, ``Conv(k, r_in → r_out)``, ``Conv(1, r_out → S)``.

    Factors come from tensorly's ``partial_tucker`` over the two channel modes of the kernel. The
    core carries the original stride, padding (ints, per-axis tuples, ``'same'`` or ``'valid'``),
    dilation and padding mode, and the last conv the bias; since the first pointwise conv has no
    bias it commutes with every padding mode, so at full rank ``(S, C)`` the chain is exact. For
    ``groups > 1`` each group is decomposed on its own and all three convs stay grouped.

    ``rank`` is ``(r_out, r_in)``; an int ``r`` means ``(r, r)``.
    """

    geometry = Geometry.CHANNELS
    takes_matrices = False
    rank_arity = 2

    @classmethod
    def max_rank(cls, layer: nn.Module) -> tuple[int, int]:
        g = cls.kind.groups(layer)
        kernel = cls.kind.kernel(layer)
        return kernel.shape[0] // g, kernel.shape[1]

    @classmethod
    def rank_levels(cls, layer: nn.Module) -> list[tuple[int, int]]:
        # Shrink both channel ranks in proportion to the channel counts.
        out, inp = cls.max_rank(layer)
        top = max(out, inp)
        return [(max(1, round(t * out / top)), max(1, round(t * inp / top))) for t in range(1, top + 1)]

    @classmethod
    def _build(cls, layer: nn.Module, rank: tuple[int, int],
               factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        kind, kernel = cls.kind, cls.kind.kernel(layer)
        g, (r_out, r_in) = kind.groups(layer), rank
        return OrderedDict(
            first=kind.factor(kernel.shape[1] * g, g * r_in, groups=g, **factory),
            core=kind.factor(g * r_in, g * r_out, kernel_size=tuple(kernel.shape[2:]), groups=g,
                             options=kind.conv_options(layer), **factory),
            last=kind.factor(g * r_out, kernel.shape[0], groups=g, bias=layer.bias is not None, **factory),
        )

    @staticmethod
    def unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
        return [weight.flatten(1), weight.transpose(0, 1).flatten(1)]

    @classmethod
    def estimate_error(cls, spectra: list[torch.Tensor], rank: Any) -> float:
        # HOSVD bound: the squared error is at most the energy each mode's truncation discards.
        out, inp = (s.square() for s in spectra)
        return float((out[rank[0]:].sum() + inp[rank[1]:].sum()) / out.sum().clamp_min(1e-300))

    def _decompose(self, parts: list[tuple[torch.Tensor, Whitening | None]]) -> None:
        cores, outs, ins = [], [], []
        for weight, whitening in parts:
            core, out, inp = decompose.tucker2(weight, self.rank)
            if whitening is not None:
                out, inp = whitening.out_factor(out), whitening.in_factor(inp)
            cores.append(core)
            outs.append(out)
            ins.append(inp.T)
        copy_into(self.first.weight, torch.cat(ins))
        copy_into(self.core.weight, torch.cat(cores))
        copy_into(self.last.weight, torch.cat(outs))

    def dense_weight(self) -> torch.Tensor:
        g = self.groups
        first = grouped(self.first.weight, g).flatten(2)       # (G, r_in, C/G)
        core = grouped(self.core.weight, g)                     # (G, r_out, r_in, *k)
        last = grouped(self.last.weight, g).flatten(2)         # (G, S/G, r_out)
        return torch.einsum("gsq,gqp...,gpc->gsc...", last, core, first).flatten(0, 1)
