"""Every configuration of benchmarks/speed.py: the optimised form computes what the plain form does."""

import importlib.util
import pathlib
import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

import tdnn
from models import narrow_resnet18

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
_SPEC = importlib.util.spec_from_file_location("speed_benchmark", _PATH)
speed = sys.modules[_SPEC.name] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(speed)


def narrow_resnet50(width=32, base_width=32):
    """torchvision's ResNet-50 (its modules, layer names, forward and initialisation; identical at
    ``width=64, base_width=64``) with ``width`` channels in the stem and ``base_width / 64`` of each
    block's width in its 3×3 convolution; seeded."""
    with torch.device("meta"):  # the skeleton only: every layer with weights is replaced below
        model = torchvision.models.resnet50()
    torch.manual_seed(0)
    model.conv1, model.bn1 = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)
    channels = width
    for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), (3, 4, 6, 3)), 1):
        down = nn.Sequential(nn.Conv2d(channels, 4 * planes, 1, 1 if i == 1 else 2, bias=False),
                             nn.BatchNorm2d(4 * planes))
        layers = [Bottleneck(channels, planes, 1 if i == 1 else 2, down, base_width=base_width)]
        layers += [Bottleneck(4 * planes, planes, base_width=base_width) for _ in range(blocks - 1)]
        setattr(model, f"layer{i}", nn.Sequential(*layers))
        channels = 4 * planes
    model.fc = nn.Linear(channels, 1000)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model.eval()


def build(name):
    """The benchmark's model at a test's cost, with the same layers, kinds and BatchNorms, so every
    setting is tried as it is: ResNet-18 at half width, ResNet-50 at half width with its 3×3
    convolutions 4x narrower (what ``width_per_group=16`` gives at full width), the MLP stack at
    half width."""
    if name == "resnet50":
        return narrow_resnet50()
    if name == "resnet18":
        return narrow_resnet18(32)
    torch.manual_seed(0)
    return speed.MLPStack(dim=384, hidden=1536).eval()


def example(name):
    return torch.randn(2, 128, 384) if name == "mlp" else speed.example(name, 2, 64)


@pytest.mark.parametrize("setting", speed.SETTINGS, ids=lambda s: f"{s.model}: {s.label}")
def test_optimised_forms_match_the_plain_forms(setting, flop_clock):
    # latency budgets and latency-aware rows time by a FLOP clock: what is tested is the optimised forms
    torch.manual_seed(0)
    dense = build(setting.model)
    x = example(setting.model)
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
