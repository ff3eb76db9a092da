"""Factorized layers, each a chain of stock ``nn.Linear`` / ``nn.Conv2d`` modules."""

from tdnn.layers.base import Factorized
from tdnn.layers.cp import CPConv2d
from tdnn.layers.svd import SVDConv2d, SVDLinear
from tdnn.layers.tucker2 import Tucker2Conv2d

__all__ = ["Factorized", "SVDLinear", "SVDConv2d", "Tucker2Conv2d", "CPConv2d"]
