"""tdnn: make trained PyTorch networks smaller and faster with low-rank factorized layers.

Example:
    >>> import torch, tdnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> small = tdnn.compress_model(net, ranks=0.5)
    >>> print(tdnn.report(small).param_ratio < 0.55)
    True
"""

from tdnn.analysis.report import LayerRecord, Report, report
from tdnn.analysis.sweep import Sweep, SweepPoint, layer_errors, sweep
from tdnn.compress import Budget, CompressSettings, compress_model
from tdnn.config import Config, load_config
from tdnn.deploy.inference import InferenceForm, optimize_for_inference
from tdnn.deploy.io import apply_plan, load, save
from tdnn.deploy.merge import merge
from tdnn.deploy.pretrained import from_pretrained, save_pretrained
from tdnn.finetune import FinetuneResult, FinetuneSettings, finetune
from tdnn.layers import (
                         CPConv1d,
                         CPConv2d,
                         Factorized,
                         SVDConv1d,
                         SVDConv2d,
                         SVDLinear,
                         Tucker2Conv1d,
                         Tucker2Conv2d,
                         registry,
)
from tdnn.planning.plan import LayerPlan, Plan
from tdnn.planning.ranks import VBMF, Energy, LayerSpec
from tdnn.statistics.calibration import Calibration
from tdnn.statistics.refine import Refine
from tdnn.version import __version__

__all__ = [
    "compress_model", "CompressSettings", "Calibration", "Budget", "Refine", "Energy", "VBMF", "LayerSpec",
    "finetune", "FinetuneResult", "FinetuneSettings", "load_config", "Config",
    "report", "Report", "LayerRecord", "Plan", "LayerPlan",
    "save", "load", "apply_plan", "merge", "optimize_for_inference", "InferenceForm",
    "save_pretrained", "from_pretrained",
    "Factorized", "SVDLinear", "SVDConv2d", "Tucker2Conv2d", "CPConv2d", "SVDConv1d", "Tucker2Conv1d", "CPConv1d",
    "registry", "sweep", "Sweep", "SweepPoint", "layer_errors", "__version__",
]
