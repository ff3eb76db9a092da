"""Tucker-2 convolution: 1×1 → k×k core → 1×1."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from tdnn import decompose
from tdnn.calibrate import Whitening
from tdnn.layers.base import RANK_HINT, Factorized, copy_into, grouped


class Tucker2Conv2d(Factorized):
    """A k×k convolution as ``Conv(1×1, C → r_in)``, ``Conv(k×k, r_in → r_out)``, ``Conv(1×1, r_out → S)``.

    Factors come from tensorly's ``partial_tucker`` over the two channel modes of the kernel.
    The core conv carries the original stride, padding (ints, per-axis tuples, ``'same'`` or
    ``'valid'``), dilation and padding mode, and the last conv the bias; since the first 1×1 conv
    has no bias it commutes with every padding mode, so at full rank ``(S, C)`` the chain is exact.
    For ``groups > 1`` each group is decomposed on its own and all three convs stay grouped.

    ``rank`` is ``(r_out, r_in)``; an int ``r`` means ``(r, r)``.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(32, 64, 3, padding=1)
        >>> small = tdnn.Tucker2Conv2d.from_dense(conv, (16, 8))
        >>> [tuple(m.weight.shape) for m in small]
        [(8, 32, 1, 1), (16, 8, 3, 3), (64, 16, 1, 1)]
    """

    method = "tucker2"
    dense_type = nn.Conv2d
    flat = False

    @classmethod
    def max_rank(cls, layer: nn.Conv2d) -> tuple[int, int]:
        return layer.out_channels // layer.groups, layer.in_channels // layer.groups

    @classmethod
    def check_rank(cls, layer: nn.Conv2d, rank: Any, name: str = "layer") -> tuple[int, int]:
        pair = (rank, rank) if isinstance(rank, int) and not isinstance(rank, bool) else rank
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in pair)):
            raise TypeError(f"{name}: tucker2 rank must be an int or a pair (r_out, r_in), got {rank!r}")
        top = cls.max_rank(layer)
        if min(pair) < 1:
            raise ValueError(f"{name}: rank={rank} must be at least 1")
        if pair[0] > top[0] or pair[1] > top[1]:
            raise ValueError(f"{name}: rank={rank} exceeds the full rank {top} (out, in channels per "
                             f"group) of weight {tuple(layer.weight.shape)} for method 'tucker2'"
                             f"{RANK_HINT}")
        return tuple(pair)

    @classmethod
    def rank_levels(cls, layer: nn.Conv2d) -> list[tuple[int, int]]:
        # Shrink both channel ranks in proportion to the channel counts.
        out, inp = cls.max_rank(layer)
        top = max(out, inp)
        return [(max(1, round(t * out / top)), max(1, round(t * inp / top))) for t in range(1, top + 1)]

    @classmethod
    def _build(cls, layer: nn.Conv2d, rank: tuple[int, int],
               factory: dict[str, Any]) -> OrderedDict[str, nn.Module]:
        g, (r_out, r_in) = layer.groups, rank
        return OrderedDict(
            first=nn.Conv2d(layer.in_channels, g * r_in, 1, groups=g, bias=False, **factory),
            core=nn.Conv2d(g * r_in, g * r_out, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, groups=g, bias=False,
                           padding_mode=layer.padding_mode, **factory),
            last=nn.Conv2d(g * r_out, layer.out_channels, 1, groups=g,
                           bias=layer.bias is not None, **factory),
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
        g = self.dense_kwargs["groups"]
        first = grouped(self.first.weight, g).flatten(2)       # (G, r_in, C/G)
        core = grouped(self.core.weight, g)                     # (G, r_out, r_in, kh, kw)
        last = grouped(self.last.weight, g).flatten(2)         # (G, S/G, r_out)
        dense = torch.einsum("gsq,gqphw,gpc->gschw", last, core, first)
        return dense.flatten(0, 1)
