"""tdnn: make trained PyTorch networks smaller and faster with low-rank factorized layers.

Example:
    >>> import torch, tdnn
    >>> net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> small = tdnn.compress_model(net, ranks=0.5)
    >>> print(tdnn.report(small).param_ratio < 0.55)
    True
"""

from tdnn.budget import Budget
from tdnn.calibrate import Calibration
from tdnn.compress import compress_model
from tdnn.config import Config, load_config
from tdnn.finetune import FinetuneResult, FinetuneSettings, finetune
from tdnn.inference import InferenceForm, optimize_for_inference
from tdnn.io import apply_plan, load, save
from tdnn import registry
from tdnn.layers import (CPConv1d, CPConv2d, Factorized, SVDConv1d, SVDConv2d, SVDLinear, Tucker2Conv1d,
                         Tucker2Conv2d)
from tdnn.merge import merge
from tdnn.plan import LayerPlan, Plan
from tdnn.pretrained import from_pretrained, save_pretrained
from tdnn.ranks import VBMF, Energy, LayerSpec
from tdnn.report import LayerRecord, Report, report
from tdnn.sweep import Sweep, SweepPoint, layer_errors, sweep

__version__ = "0.1.0"

__all__ = [
    "finetune", "FinetuneResult", "FinetuneSettings", "load_config", "Config",
    "compress_model", "Calibration", "Budget", "Energy", "VBMF", "report", "Report", "LayerRecord", "Plan", "LayerPlan", "LayerSpec",
    "save", "load", "apply_plan", "merge", "optimize_for_inference", "InferenceForm",
    "save_pretrained", "from_pretrained",
    "Factorized", "SVDLinear", "SVDConv2d", "Tucker2Conv2d", "CPConv2d", "SVDConv1d", "Tucker2Conv1d", "CPConv1d",
    "registry", "sweep", "Sweep", "SweepPoint", "layer_errors",
]
