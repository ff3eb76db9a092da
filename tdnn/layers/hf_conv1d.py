"""Hugging Face's ``Conv1D`` (GPT-2's layers: a Linear with the weight stored as ``(in, out)``): its
kind and its SVD form. Registered lazily (see :mod:`tdnn.layers`): imported the first time a model
with such a layer is compressed or loaded, so tdnn itself never imports transformers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tdnn.layers.registry import LayerKind
from tdnn.layers.svd import SVD


class HFConv1DKind(LayerKind, dense_type=Conv1D):
    """``transformers.pytorch_utils.Conv1D(nf, nx)``: ``y = x @ W + b`` with ``W`` of shape
    ``(nx, nf) = (in, out)`` (transposed against ``nn.Linear``) and always a bias."""

    def dense_kwargs(self, layer: nn.Module) -> dict[str, Any]:
        return {"nf": layer.nf, "nx": layer.nx}

    def build(self, kwargs: dict[str, Any], *, bias: bool | None = None, device: Any = None,
              dtype: torch.dtype | None = None) -> nn.Module:
        with torch.device(device or "cpu"):  # Conv1D takes no device or dtype of its own
            layer = Conv1D(kwargs["nf"], kwargs["nx"])
        return layer.to(dtype) if dtype is not None else layer

    def kernel(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.T

    def set_kernel(self, layer: nn.Module, kernel: torch.Tensor) -> None:
        layer.weight.copy_(kernel.T)


class SVDConv1D(SVD, kind="Conv1D"):
    """GPT-2's ``Conv1D(nf=out, nx=in)`` as ``Linear(in → r, no bias)`` then ``Linear(r → out)``
    from the truncated SVD of its weight; :meth:`to_dense` gives a ``Conv1D`` back.

    Example:
        >>> import torch, tdnn
        >>> from transformers.pytorch_utils import Conv1D
        >>> from tdnn.layers.hf_conv1d import SVDConv1D
        >>> layer = Conv1D(96, 32)                      # 32 -> 96, as GPT-2's c_attn
        >>> small = SVDConv1D.from_dense(layer, 32)     # full rank: exact up to rounding
        >>> x = torch.randn(2, 5, 32)
        >>> bool((small(x) - layer(x)).abs().max() < 1e-5), type(small.to_dense()).__name__
        (True, 'Conv1D')
    """
