"""``optimize_for_inference``: the fastest form of a trained (compressed or dense) model for deployment."""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from tdnn import walk
from tdnn.batches import call
from tdnn.latency import latencies

INFERENCE_ATTR = "tdnn_inference"
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# (models by name, example input) -> median seconds per call of each
ModelTimer = Callable[[dict[str, nn.Module], Any], dict[str, float]]


@dataclass
class InferenceForm:
    """What :func:`optimize_for_inference` did, kept on the model as ``model.tdnn_inference``.

    Attributes:
        folded: ``(layer, batchnorm)`` name pairs whose BatchNorm went into the layer.
        memory_format: ``"contiguous"`` or ``"channels_last"``, the layout of the 4-D weights.
        seconds: measured seconds per call of each layout on the example (``"auto"`` only).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    memory_format: str = "contiguous"
    seconds: dict[str, float] = field(default_factory=dict)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _foldable_pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where, on ``example``, a BatchNorm's input *is* the unmodified
    output of a Conv2d (BatchNorm2d) or of a Linear with 2-D output (BatchNorm1d), each module
    called once, the layer's weight not shared with another module."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    calls: Counter[str] = Counter()
    outputs: dict[str, tuple[weakref.ref, int]] = {}  # layer -> (its output, the output's version)
    pairs: list[tuple[str, str]] = []

    def layer_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calls[names[id(module)]] += 1
        if isinstance(output, torch.Tensor) and (isinstance(module, nn.Conv2d) or output.dim() == 2):
            outputs[names[id(module)]] = weakref.ref(output), output._version

    def bn_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[names[id(module)]] += 1
        want = nn.Conv2d if isinstance(module, nn.BatchNorm2d) else nn.Linear
        for name, (ref, version) in outputs.items():
            # an in-place op in between (ReLU(inplace=True)) keeps the tensor but bumps its version
            if args and ref() is args[0] and args[0]._version == version and isinstance(
                    model.get_submodule(name), want):
                pairs.append((name, names[id(module)]))

    handles = []
    for module in model.modules():
        if type(module) in (nn.Conv2d, nn.Linear) and owners[id(module.weight)] == 1:
            handles.append(module.register_forward_hook(layer_hook))
        elif (type(module) in (nn.BatchNorm2d, nn.BatchNorm1d) and module.running_mean is not None
              and module.running_var is not None):
            handles.append(module.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return [(layer, bn) for layer, bn in pairs if calls[layer] == 1 and calls[bn] == 1]


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """``model`` with each pair's BatchNorm folded into its layer (and replaced by ``nn.Identity``)."""
    replacements: dict[int, nn.Module] = {}
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        replacements[id(layer)], replacements[id(bn)] = fuse(layer, bn), nn.Identity()
    return walk.swap(model, replacements)


def _close(got: Any, want: list[torch.Tensor]) -> bool:
    got = _tensors(got)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        tol = max(1e-4, 50 * torch.finfo(b.dtype).eps) if b.is_floating_point() else 0.0
        err = (a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)
        if a.shape != b.shape or not err <= tol:
            return False
    return True


@torch.no_grad()
def _fold_checked(model: nn.Module, example: Any) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every foldable pair, then check the outputs on ``example``. A pair whose layer output is
    also read elsewhere (invisible to hooks) changes them: then each pair is checked alone."""
    pairs = _foldable_pairs(model, example)
    if not pairs:
        return model, []
    want = _tensors(call(model, example))
    if _close(call(_fold(copy.deepcopy(model), pairs), example), want):
        return _fold(model, pairs), pairs
    pairs = [p for p in pairs if _close(call(_fold(copy.deepcopy(model), [p]), example), want)]
    return _fold(model, pairs), pairs


def _timed(models: dict[str, nn.Module], example: Any) -> dict[str, float]:
    """The default :data:`ModelTimer`: interleaved median latency, short (whole models are slow)."""
    if isinstance(example, torch.Tensor):
        return latencies(models, example, warmup=1, repeats=5)
    wrapped = {name: _Caller(model, example) for name, model in models.items()}
    return latencies(wrapped, torch.empty(0), warmup=1, repeats=5)


class _Caller(nn.Module):
    """Calls a model on a fixed (tuple or dict) example, so the tensor timer can run it."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        super().__init__()
        self.model, self.example = model, example

    def forward(self, _: torch.Tensor) -> Any:
        return call(self.model, self.example)


def optimize_for_inference(model: nn.Module, example: Any, *, fold_batchnorm: bool = True,
                           memory_format: str = "auto", inplace: bool = False,
                           timer: ModelTimer | None = None) -> nn.Module:
    """The model in eval mode, in the form that runs fastest: BatchNorm folded into the layer before
    it, and the memory layout (``channels_last`` or contiguous) measured on ``example``.

    Works on any model, dense or compressed: a BatchNorm after a factorized layer folds into its
    last factor, so a Tucker-2 chain stays three convolutions. Folding is exact up to rounding.
    Which BatchNorm reads which layer is seen by running ``example`` (no tracing, so any Python
    control flow is fine); a fold is kept only if the outputs on ``example`` still match.
    The result is for inference and export (``torch.compile``, ``torch.export``, ONNX): it has no
    BatchNorm left to train. ``channels_last`` weights make convolutions produce channels_last
    outputs whatever the input layout; values are the same.

    Args:
        model: the trained model.
        example: one input batch in the shape you will deploy with (a tensor, a tuple of
            arguments or a dict of keyword arguments).
        fold_batchnorm: fold eval-mode ``BatchNorm2d`` after ``Conv2d`` and ``BatchNorm1d`` after
            ``Linear`` into the layer.
        memory_format: ``"auto"`` (time both layouts on ``example``, interleaved, keep the faster),
            ``"channels_last"`` or ``"contiguous"``.
        inplace: modify ``model`` itself instead of a deep copy.
        timer: ``(models, example) -> seconds per model`` to replace the clock (for tests).

    Returns:
        The optimised model, with an :class:`InferenceForm` in ``model.tdnn_inference``.

    Example:
        >>> import torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 16, 16)
        >>> fast = tdnn.optimize_for_inference(net, x, memory_format="channels_last")
        >>> fast.tdnn_inference.folded, type(fast[1]).__name__
        ([('0', '1')], 'Identity')
        >>> torch.allclose(fast(x), net(x), atol=1e-5)
        True
    """
    if memory_format not in ("auto", *FORMATS):
        raise ValueError(f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {memory_format!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    form = InferenceForm()
    if fold_batchnorm:
        model, form.folded = _fold_checked(model, example)
    if memory_format == "auto":
        if any(p.dim() == 4 for p in model.parameters()):
            layouts = {"contiguous": model, "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
            form.seconds = dict((timer or _timed)(layouts, example))
            memory_format = min(form.seconds, key=form.seconds.__getitem__)
        else:
            memory_format = "contiguous"
    form.memory_format = memory_format
    model = model.to(memory_format=FORMATS[memory_format])
    setattr(model, INFERENCE_ATTR, form)
    return model
