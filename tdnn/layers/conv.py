"""What every convolution kind shares (``nn.Conv1d`` in :mod:`tdnn.layers.conv1d`, ``nn.Conv2d`` in
:mod:`tdnn.layers.conv2d`): the kernel, the conv hyper-parameters and the calibration vectors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdnn.layers.registry import Geometry, LayerKind


class ConvKind(LayerKind):
    """A convolution of :attr:`spatial` dimensions (``nn.Conv1d``, ``nn.Conv2d``, ...): the kernel
    is ``(out, in / groups, *kernel_size)`` and inputs are ``(N, C, *positions)`` (or unbatched)."""

    auto_method = "tucker2"

    def dense_kwargs(self, layer: nn.Module) -> dict[str, Any]:
        return {"in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": tuple(layer.kernel_size), "groups": layer.groups,
                "bias": layer.bias is not None, **self.conv_options(layer)}

    def conv_options(self, layer: nn.Module) -> dict[str, Any]:
        return {"stride": tuple(layer.stride), "dilation": tuple(layer.dilation),
                "padding": layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                "padding_mode": layer.padding_mode}

    def factor(self, cin: int, cout: int, *, kernel_size: tuple[int, ...] = (), groups: int = 1,
               bias: bool = False, options: dict[str, Any] | None = None, **factory: Any) -> nn.Module:
        return self.dense_type(cin, cout, tuple(kernel_size) or 1, groups=groups, bias=bias,
                               **(options or {}), **factory)

    def groups(self, layer: nn.Module) -> int:
        return layer.groups

    def vectors(self, layer: nn.Module, x: torch.Tensor, geometry: Geometry) -> torch.Tensor:
        if x.dim() == self.spatial + 1:  # unbatched, as the convolution itself accepts
            x = x.unsqueeze(0)
        if x.dim() != self.spatial + 2 or x.shape[1] != layer.in_channels:
            raise ValueError(f"{self.name} with {layer.in_channels} input channels got an input of "
                             f"shape {tuple(x.shape)}")
        if geometry is Geometry.CHANNELS:
            return x.transpose(0, 1).reshape(x.shape[1], -1).T
        # patches: pad exactly as the convolution does, then take every window with its stride and
        # dilation; rows are ordered like weight.flatten(1), i.e. (channel, *kernel offsets)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        for axis, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
            x = x.unfold(2 + axis, d * (k - 1) + 1, s)[..., ::d]
        # (N, C, *out positions, *k) -> (N, *out positions, C, *k)
        n = self.spatial
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
        return x.reshape(-1, layer.weight[0].numel())

    def vectors_key(self, layer: nn.Module, geometry: Geometry) -> tuple:
        if geometry is Geometry.CHANNELS:
            return (Geometry.CHANNELS,)
        return (self.name, tuple(layer.kernel_size), tuple(layer.dilation), tuple(layer.stride),
                tuple(layer._reversed_padding_repeated_twice), layer.padding_mode)

    def example_input(self, layer: nn.Module, batch: int = 1) -> torch.Tensor:
        weight = layer.weight
        return torch.randn(batch, layer.in_channels, *[32] * self.spatial, dtype=weight.dtype,
                           device=weight.device)
