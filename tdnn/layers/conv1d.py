"""``nn.Conv1d``: its kind and its SVD, Tucker-2 and CP forms (``1 → k → 1`` chains)."""

from __future__ import annotations

from torch import nn

from tdnn.layers.conv import ConvKind
from tdnn.layers.cp import CP
from tdnn.layers.svd import SVD
from tdnn.layers.tucker2 import Tucker2


class Conv1dKind(ConvKind, dense_type=nn.Conv1d):
    """``nn.Conv1d``: kernel ``(out, in / groups, k)``, inputs ``(N, C, L)``."""

    spatial = 1


class SVDConv1d(SVD, kind="Conv1d"):
    """``Conv1d(k, C → r)`` then ``Conv1d(1, r → S)`` from the SVD of the kernel unfolded to
    ``(S, C·k)``; see :class:`tdnn.layers.svd.SVD`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv1d(16, 32, 5, padding=2)
        >>> tdnn.SVDConv1d.from_dense(conv, 8)(torch.randn(2, 16, 40)).shape
        torch.Size([2, 32, 40])
    """


class Tucker2Conv1d(Tucker2, kind="Conv1d"):
    """``Conv1d(1, C → r_in)``, ``Conv1d(k, r_in → r_out)``, ``Conv1d(1, r_out → S)``; see
    :class:`tdnn.layers.tucker2.Tucker2`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv1d(16, 32, 3, stride=2)
        >>> [tuple(m.weight.shape) for m in tdnn.Tucker2Conv1d.from_dense(conv, (8, 4))]
        [(4, 16, 1), (8, 4, 3), (32, 8, 1)]
    """


class CPConv1d(CP, kind="Conv1d"):
    """``Conv1d(1, C → R)``, depthwise ``Conv1d(k)``, ``Conv1d(1, R → S)``; see :class:`tdnn.layers.cp.CP`.

    Example:
        >>> import torch, tdnn
        >>> conv = torch.nn.Conv1d(16, 32, 5, padding="same")
        >>> tdnn.CPConv1d.from_dense(conv, 12)(torch.randn(2, 16, 40)).shape
        torch.Size([2, 32, 40])
    """
