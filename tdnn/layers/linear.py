"""``nn.Linear``: its kind and its SVD form."""

from __future__ import annotations

from torch import nn

from tdnn.layers.registry import LayerKind
from tdnn.layers.svd import SVD


class LinearKind(LayerKind, dense_type=nn.Linear):
    """``nn.Linear``: a ``(out, in)`` weight applied to the last input dimension."""


class SVDLinear(SVD, kind="Linear"):
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
