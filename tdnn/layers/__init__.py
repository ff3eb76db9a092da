"""Level 2: the layers — the registry of layer kinds and methods, the factorized forms (each a chain
of stock ``nn.Linear`` / ``nn.Conv*d`` modules), one file per layer kind, and the walker that finds
and swaps layers in a model. Importing this package registers the built-in kinds and methods
(Hugging Face's ``Conv1D`` lazily)."""

# Registration order is the order methods are listed in: svd, tucker2, cp.
from tdnn.layers import registry
from tdnn.layers.base import Factorized

from tdnn.layers.svd import SVD  # isort: skip
from tdnn.layers.tucker2 import Tucker2  # isort: skip
from tdnn.layers.cp import CP  # isort: skip
from tdnn.layers.linear import SVDLinear  # isort: skip
from tdnn.layers.conv2d import CPConv2d, SVDConv2d, Tucker2Conv2d  # isort: skip
from tdnn.layers.conv1d import CPConv1d, SVDConv1d, Tucker2Conv1d  # isort: skip

registry.register_lazy_kind("transformers.pytorch_utils.Conv1D", "tdnn.layers.hf_conv1d")

__all__ = ["Factorized", "SVD", "Tucker2", "CP", "SVDLinear", "SVDConv2d", "Tucker2Conv2d", "CPConv2d",
           "SVDConv1d", "Tucker2Conv1d", "CPConv1d", "registry"]
