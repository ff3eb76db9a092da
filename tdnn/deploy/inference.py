"""``optimize_for_inference``: the fastest form of a trained (compressed or dense) model for deployment."""

from __future__ import annotations

import copy
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_weights

from tdnn.core import temporary
from tdnn.core.batches import call, map_tensors
from tdnn.core.timing import Clock, latencies
from tdnn.layers import walk

INFERENCE_ATTR = "tdnn_inference"
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}

# (models by name, example input) -> median seconds per call of each


@dataclass
class InferenceForm:
    """What :func:`optimize_for_inference` did, kept on the model as ``model.tdnn_inference``.

    Attributes:
        folded: ``(layer, batchnorm)`` name pairs whose BatchNorm went into the layer.
        memory_format: ``"contiguous"`` or ``"channels_last"``, the layout of the 4-D weights.
        linear_layout: ``"rows"`` or ``"columns"``, the layout of the weights of Linear layers
            with more outputs than inputs.
        seconds: measured seconds per call of each layout on the example (``"auto"`` only).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    memory_format: str = "contiguous"
    linear_layout: str = "rows"
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
    output of a Conv2d (BatchNorm2d) or of a Conv1d or a Linear with 2-D output (BatchNorm1d), each
    module called once, the layer's weight not shared with another module, and the layer's output
    not kept anywhere after the call."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)  # a module under several names: its first, as in the plan
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    calls: Counter[str] = Counter()
    outputs: dict[str, tuple[weakref.ref, int]] = {}  # layer -> (its output, the output's version)
    pairs: list[tuple[str, str]] = []

    def layer_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        calls[names[id(module)]] += 1
        if isinstance(output, torch.Tensor) and (not isinstance(module, nn.Linear) or output.dim() == 2):
            outputs[names[id(module)]] = weakref.ref(output), output._version

    def bn_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls[names[id(module)]] += 1
        want = nn.Conv2d if isinstance(module, nn.BatchNorm2d) else (nn.Conv1d, nn.Linear)
        for name, (ref, version) in outputs.items():
            # an in-place op in between (ReLU(inplace=True)) keeps the tensor but bumps its version
            if args and ref() is args[0] and args[0]._version == version and isinstance(
                    model.get_submodule(name), want):
                pairs.append((name, names[id(module)]))

    handles = []
    for module in model.modules():
        if _hooked(module):  # a user's hook would see a different tensor after folding
            continue
        if type(module) in (nn.Conv1d, nn.Conv2d, nn.Linear) and owners[id(module.weight)] == 1:
            handles.append(module.register_forward_hook(layer_hook))
        elif (type(module) in (nn.BatchNorm2d, nn.BatchNorm1d) and module.running_mean is not None
              and module.running_var is not None):
            handles.append(module.register_forward_pre_hook(bn_hook))
    with temporary.hooks(handles), torch.no_grad():  # (not inference_mode: it has no version counters)
        call(model, example)  # (its result is dropped at once: see below)
    # A layer output still alive now is kept somewhere (self.feat = y): folding would change it.
    kept = {name for name, (ref, _) in outputs.items() if ref() is not None}
    return [(layer, bn) for layer, bn in pairs if calls[layer] == 1 and calls[bn] == 1 and layer not in kept]


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, attr) for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                                                  "_forward_pre_hooks_with_kwargs"))


def _fused(layer: nn.Module, bn: nn.Module) -> nn.Module:
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return fuse_conv_bn_eval(layer, bn)
    fused = copy.deepcopy(layer)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)  # affine=False
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    fused.weight, fused.bias = fuse_linear_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, gamma, beta)
    return fused


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """``model`` with each pair's BatchNorm folded into its layer (and replaced by ``nn.Identity``)."""
    replacements: dict[int, nn.Module] = {}
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        replacements[id(layer)], replacements[id(bn)] = _fused(layer, bn), nn.Identity()
    return walk.swap(model, replacements)


def _close(got: Any, want: list[torch.Tensor], tol: float) -> bool:
    got = _tensors(got)
    return len(got) == len(want) and all(
        a.shape == b.shape and bool((a.double() - b.double()).norm() <= tol * b.double().norm())
        for a, b in zip(got, want))


@torch.no_grad()
def _fold_checked(model: nn.Module, example: Any) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every foldable pair found on ``example`` if the outputs still match; a pair whose layer
    output is also read elsewhere (invisible to hooks) changes them: then each pair is checked
    alone, and the survivors together. Half-precision models are checked on a float64 copy."""
    probe, batch, tol = model, example, 1e-4
    if any(p.is_floating_point() and p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
        # floating-point inputs in float64 too (integer ones, e.g. token ids, as they are)
        probe = copy.deepcopy(model).double()
        batch = map_tensors(example, lambda t: t.double() if t.is_floating_point() else t)
    if next(probe.parameters(), torch.empty(0)).dtype == torch.float64:
        tol = 1e-9
    pairs = _foldable_pairs(probe, batch)
    want = _tensors(call(probe, batch))
    if not pairs or not want:  # nothing to fold, or no tensor output to check a fold against
        return model, []

    def good(chosen: list[tuple[str, str]]) -> bool:
        return _close(call(_fold(copy.deepcopy(probe), chosen), batch), want, tol)

    if not good(pairs):
        pairs = [p for p in pairs if good([p])]
        if pairs and not good(pairs):
            pairs = []
    return _fold(model, pairs), pairs


def _wide(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers with more outputs than inputs (a factorized layer's second factor, an FFN's
    up projection, an LM head)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features > m.in_features]


def _by_columns(model: nn.Module) -> None:
    """Store the weights of ``model``'s wide Linear layers column by column (same values, shape and
    Parameter objects, so ties hold): a product with one input row then streams rows of ``wᵀ``,
    which CPU kernels do up to twice as fast for such a matrix (measured with 2 threads: 256→1536,
    17 vs 8.4 GB/s); with many input rows either layout runs alike."""
    with torch.no_grad():
        for layer in _wide(model):
            layer.weight.data = layer.weight.data.t().contiguous().t()


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its own wide Linear weights, sharing every other tensor (memory: those weights)."""
    own = {id(layer.weight) for layer in _wide(model)}
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in own}
    return copy.deepcopy(model, memo)


def optimize_for_inference(model: nn.Module, example: Any, *, fold_batchnorm: bool = True,
                           memory_format: str = "auto", linear_layout: str = "auto", inplace: bool = False,
                           timer: Clock = latencies) -> nn.Module:
    """The model in eval mode, in the form that runs fastest: BatchNorm folded into the layer before
    it, and the memory layouts of convolution and Linear weights measured on ``example``.

    Works on any model, dense or compressed: a BatchNorm after a factorized layer folds into its
    last factor, so a Tucker-2 chain stays three convolutions. Folding is exact up to rounding.
    Which BatchNorm reads which layer is seen by running ``example`` (no tracing, so any Python
    control flow is fine); a fold is kept only if the outputs on ``example`` still match, and
    layers or BatchNorms carrying forward hooks are left alone. The result is a plain module for
    ``torch.save`` / ``torch.export``: ``tdnn.load`` rebuilds the unfolded architecture.
    The result is for inference and export (``torch.compile``, ``torch.export``, ONNX): it has no
    BatchNorm left to train. ``channels_last`` weights make convolutions produce channels_last
    outputs whatever the input layout; values are the same.

    Args:
        model: the trained model.
        example: one input batch in the shape you will deploy with (a tensor, a tuple of
            arguments or a dict of keyword arguments).
        fold_batchnorm: fold eval-mode ``BatchNorm2d`` after ``Conv2d`` and ``BatchNorm1d`` after
            ``Conv1d`` or ``Linear`` into the layer.
        memory_format: ``"auto"`` (time both layouts on ``example``, interleaved, keep the faster),
            ``"channels_last"`` or ``"contiguous"``.
        linear_layout: the weights of Linear layers with more outputs than inputs (a factorized
            layer's second factor, an FFN's up projection) stored ``"rows"`` (PyTorch's default)
            or ``"columns"`` (transposed in memory; the same values and shape) — for an LLM decoding
            at batch 1 on CPU, columns read these matrices up to twice as fast; ``"auto"`` times
            both on ``example`` (give a decoding-shaped one: ``input_ids`` of one token).
        inplace: modify ``model`` itself instead of a deep copy.
        timer: the clock layouts are timed with (:func:`tdnn.core.timing.latencies`, the wall
            clock: interleaved medians, short runs since whole models are slow).

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
    if linear_layout not in ("auto", "rows", "columns"):
        raise ValueError(f"linear_layout must be 'auto', 'rows' or 'columns', got {linear_layout!r}")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError("optimize_for_inference needs real weights; this model has tensors on the meta device")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    form = InferenceForm()
    with torch.inference_mode(False):  # new weights must be ordinary tensors, even in a caller's inference_mode
        if fold_batchnorm:
            model, form.folded = _fold_checked(model, example)
        if memory_format == "auto":
            if any(p.dim() == 4 for p in model.parameters()):
                layouts = {name: copy.deepcopy(model).to(memory_format=layout) for name, layout in FORMATS.items()}
                form.seconds = dict(timer(layouts, example, warmup=1, repeats=5))
                memory_format = min(form.seconds, key=form.seconds.__getitem__)
            else:
                memory_format = "contiguous"
        form.memory_format = memory_format
        model = model.to(memory_format=FORMATS[memory_format])
        if linear_layout == "auto":
            linear_layout = "rows"
            if _wide(model):
                columns = _sharing_copy(model)
                _by_columns(columns)
                seconds = dict(timer({"rows": model, "columns": columns}, example, warmup=1, repeats=5))
                form.seconds.update(seconds)
                linear_layout = min(seconds, key=seconds.__getitem__)
        form.linear_layout = linear_layout
        if linear_layout == "columns":
            _by_columns(model)
    setattr(model, INFERENCE_ATTR, form)
    return model
