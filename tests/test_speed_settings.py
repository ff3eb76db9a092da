"""Every configuration of benchmarks/speed.py: the optimised form computes what the plain form does."""

import importlib.util
import pathlib
import sys

import pytest
import torch
import torchvision
from torch import nn

import tdnn

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
_SPEC = importlib.util.spec_from_file_location("speed_benchmark", _PATH)
speed = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(speed)


def build(name):
    """The benchmark's model, with ResNet-50's 3×3 convolutions 4x narrower (width_per_group=16):
    the same layers, kinds and BatchNorms, so every setting is tried as it is, at a test's cost."""
    if name == "resnet50":
        torch.manual_seed(0)
        return torchvision.models.resnet50(width_per_group=16).eval()
    return speed.build(name)


@pytest.mark.parametrize("setting", speed.SETTINGS, ids=lambda s: f"{s.model}: {s.label}")
def test_optimised_forms_match_the_plain_forms(setting, flop_clock):
    # latency budgets and latency-aware rows time by a FLOP clock: what is tested is the optimised forms
    torch.manual_seed(0)
    dense = build(setting.model)
    x = speed.example(setting.model, 2, 64)
    small = setting.compress(dense, x[:1], flop_clock).eval()
    with torch.inference_mode():
        want = small(x)
    # a BatchNorm folds wherever a stock Conv2d feeds it (not into tensorly-torch's FactorizedConv)
    folds = (sum(isinstance(m, nn.BatchNorm2d) for m in dense.modules())
             - sum(type(m).__name__ == "FactorizedConv" for m in small.modules()))
    for layout in ("contiguous", "channels_last"):
        fast = tdnn.optimize_for_inference(small, x, memory_format=layout)
        assert len(fast.tdnn_inference.folded) == folds
        with torch.inference_mode():
            got = fast(x)
        assert ((got - want).norm() / want.norm()).item() < 1e-4, layout
