"""Image-classification plumbing shared by the ``tdnn`` command and ``examples/compress_resnet.py``:
torchvision models by name (with weights by enum name or local file), datasets, top-1 and latency.

Needs torchvision (``pip install tdnn[examples]``); scikit-learn for the embedded digits data.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError:
        raise ImportError("this needs torchvision: pip install 'tdnn[examples]'") from None
    return torchvision


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    # Checkpoints saved from DataParallel / DDP carry a "module." prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    for name in ("fc", "classifier", "head"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Sequential):
            name, layer = f"{name}.{len(layer) - 1}", layer[-1]
        if isinstance(layer, nn.Linear):
            return name, layer
    raise ValueError(f"{type(model).__name__}: cannot find the classifier (fc / classifier / head)")


def set_num_classes(model: nn.Module, num_classes: int, image_size: int = 32) -> bool:
    """Give ``model`` a new, freshly initialised classifier when its class count differs (a model
    without a classifier tdnn can find is accepted when its output already has ``num_classes``)."""
    try:
        name, head = _head(model)
    except ValueError as err:
        with torch.no_grad():
            classes = model.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1]
        if classes == num_classes:
            return False
        raise ValueError(f"{err}; the model gives {classes} classes, not {num_classes}") from None
    if head.out_features == num_classes:
        return False
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(head.in_features, num_classes))
    return True


def build_model(name: str, *, weights: str | None = None, num_classes: int | None = None,
                image_size: int = 32) -> nn.Module:
    """A model by torchvision name (``resnet18``) or import path (``package.module:factory``).

    Args:
        name: a ``torchvision.models`` name, or ``module:callable`` returning an ``nn.Module``.
        weights: a torchvision weights name (``IMAGENET1K_V1``, ``ResNet18_Weights.DEFAULT``;
            downloads on first use) or a local state-dict file (``.pt``/``.pth``/``.safetensors``).
        num_classes: replace the classifier by a new one when the class count differs.
        image_size: the input size, to count a model's classes when it has no classifier tdnn finds.
    """
    state = _load_state_dict(weights) if weights is not None and os.path.exists(weights) else None
    if ":" in name:
        module, _, attr = name.partition(":")
        if weights is not None and state is None:
            raise ValueError(f"weights {weights!r}: not a file; named weights need a torchvision model")
        factory = getattr(importlib.import_module(module), attr, None)
        if not callable(factory):
            raise ValueError(f"--model {name}: module {module} has no {attr!r} to call")
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"--model {name}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    else:
        models = _torchvision().models
        if name not in models.list_models():
            raise ValueError(f"unknown model {name!r}; torchvision has e.g. resnet18, resnet34, resnet50, "
                             f"or give module:callable")
        if weights is not None and state is None:  # a torchvision weights name: downloads once
            model = models.get_model(name, weights=weights)
        else:  # size the classifier as the local weights have it
            classes = next((v.shape[0] for k, v in (state or {}).items()
                            if k in ("fc.weight", "classifier.weight")), num_classes)
            model = models.get_model(name, **({"num_classes": classes} if classes else {}))
    if state is not None:
        model.load_state_dict(state)
    if num_classes is not None:
        set_num_classes(model, num_classes, image_size)
    return model


@dataclass
class Data:
    """Train and test loaders of an image-classification dataset."""

    train: DataLoader
    test: DataLoader
    num_classes: int
    image_size: int
    name: str


def digits(*, image_size: int = 32, batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0) -> Data:
    """scikit-learn's handwritten digits (1,797 real 8×8 scans, 10 classes), upsampled to
    ``image_size`` × ``image_size`` RGB and normalised; a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)

    def images(a: Any) -> torch.Tensor:
        t = torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        t = nn.functional.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return ((t - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()

    train = TensorDataset(images(x_train), torch.tensor(y_train))
    test = TensorDataset(images(x_test), torch.tensor(y_test))
    return Data(DataLoader(train, batch_size=batch_size, shuffle=True),
                DataLoader(test, batch_size=256), 10, image_size, "digits")


def image_data(spec: str, *, image_size: int | None = None, batch_size: int = 64, workers: int = 2,
               root: str = "data") -> Data:
    """``"digits"`` (embedded, offline), ``"cifar10"`` (downloaded to ``root``) or an ImageFolder
    directory with ``train/`` and ``val/`` (or ``test/``) subdirectories."""
    if spec == "digits":
        return digits(image_size=image_size or 32, batch_size=batch_size)
    tv = _torchvision()
    t = tv.transforms
    if spec == "cifar10":
        size = image_size or 32
        norm = t.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        train_tf = t.Compose([t.Resize(size), t.RandomCrop(size, padding=size // 8), t.RandomHorizontalFlip(),
                              t.ToTensor(), norm])
        test_tf = t.Compose([t.Resize(size), t.ToTensor(), norm])
        train = tv.datasets.CIFAR10(root, train=True, download=True, transform=train_tf)
        test = tv.datasets.CIFAR10(root, train=False, download=True, transform=test_tf)
        classes = 10
    elif os.path.isdir(spec):
        size = image_size or 224
        norm = t.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        val = next((os.path.join(spec, d) for d in ("val", "test") if os.path.isdir(os.path.join(spec, d))), None)
        if not os.path.isdir(os.path.join(spec, "train")) or val is None:
            raise ValueError(f"{spec}: an ImageFolder dataset needs train/ and val/ (or test/) subdirectories")
        train = tv.datasets.ImageFolder(os.path.join(spec, "train"), t.Compose(
            [t.RandomResizedCrop(size), t.RandomHorizontalFlip(), t.ToTensor(), norm]))
        test = tv.datasets.ImageFolder(val, t.Compose(
            [t.Resize(int(size * 256 / 224)), t.CenterCrop(size), t.ToTensor(), norm]))
        classes = len(train.classes)
    else:
        raise ValueError(f"--data {spec!r}: give 'digits', 'cifar10' or an ImageFolder directory")
    return Data(DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=workers),
                DataLoader(test, batch_size=batch_size, num_workers=workers), classes, size, spec)


@torch.inference_mode()
def top1(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) over ``loader``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / total


def top1_fn(loader: DataLoader) -> Callable[[nn.Module], float]:
    """An ``eval_fn`` for :func:`tdnn.finetune`."""
    return lambda model: round(top1(model, loader), 4)
