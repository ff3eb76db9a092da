"""Factorized layers, each a chain of stock ``nn.Linear`` / ``nn.Conv*d`` modules; importing this
package registers the built-in kinds and methods (Hugging Face's ``Conv1D`` lazily)."""

# Registration order is the order methods are listed in: svd, tucker2, cp.
from tdnn import kinds as _kinds  # noqa: F401  (registers Linear and Conv2d)
from tdnn import registry
from tdnn.layers.base import Factorized
from tdnn.layers.svd import SVD, SVDConv2d, SVDLinear  # isort: skip
from tdnn.layers.tucker2 import Tucker2, Tucker2Conv2d  # isort: skip
from tdnn.layers.cp import CP, CPConv2d  # isort: skip
from tdnn.layers.conv1d import CPConv1d, SVDConv1d, Tucker2Conv1d  # isort: skip

registry.register_lazy_kind("transformers.pytorch_utils.Conv1D", "tdnn.layers.hf_conv1d")

__all__ = ["Factorized", "SVD", "Tucker2", "CP", "SVDLinear", "SVDConv2d", "Tucker2Conv2d", "CPConv2d",
           "SVDConv1d", "Tucker2Conv1d", "CPConv1d"]
