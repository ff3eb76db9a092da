"""``nn.Conv2d``: its kind and its SVD, Tucker-2 and CP forms."""

from __future__ import annotations

from torch import nn

from tdnn.layers.conv import ConvKind
from tdnn.layers.cp import CP
from tdnn.layers.svd import SVD
from tdnn.layers.tucker2 import Tucker2


class Conv2dKind(ConvKind, dense_type=nn.Conv2d):
    """``nn.Conv2d``."""

    spatial = 2


class SVDConv2d(SVD, kind="Conv2d"):
    """A convolution as ``Conv(k×k, C → r)`` then ``Conv(1×1, r → S)`` from the SVD of its kernel
    unfolded to ``(S, C·kh·kw)`` (per group for grouped convolutions); see :class:`tdnn.layers.svd.SVD`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        >>> small = tdnn.SVDConv2d.from_dense(conv, 8)
        >>> small(torch.randn(1, 16, 10, 10)).shape
        torch.Size([1, 32, 5, 5])
    """


class Tucker2Conv2d(Tucker2, kind="Conv2d"):
    """A k×k convolution as ``Conv(1×1, C → r_in)``, ``Conv(k×k, r_in → r_out)``,
    ``Conv(1×1, r_out → S)``; see :class:`tdnn.layers.tucker2.Tucker2`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(32, 64, 3, padding=1)
        >>> small = tdnn.Tucker2Conv2d.from_dense(conv, (16, 8))
        >>> [tuple(m.weight.shape) for m in small]
        [(8, 32, 1, 1), (16, 8, 3, 3), (64, 16, 1, 1)]
    """


class CPConv2d(CP, kind="Conv2d"):
    """A k×k convolution as ``Conv(1×1, C → R)``, depthwise ``(kh×1)``, depthwise ``(1×kw)``,
    ``Conv(1×1, R → S)``; see :class:`tdnn.layers.cp.CP`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv2d(16, 32, (3, 5), padding=(1, 2))
        >>> small = tdnn.CPConv2d.from_dense(conv, 12)
        >>> small(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """
