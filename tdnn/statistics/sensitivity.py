"""How much each layer's output error costs at the model's output: a Fisher weight per layer.

For a model output ``z`` and a perturbation ``δy`` of layer ``l``'s output, the expected change of
the output (KL for logits, squared error otherwise) is to second order ``½ δyᵀ F δy`` with ``F``
the Fisher (Gauss–Newton) matrix of ``y``. Backpropagating one random vector ``ε`` from the output
per batch, with ``E[ε εᵀ]`` the output metric (``diag(p) − p pᵀ`` for logits: ``ε = onehot(k) − p``
with ``k ~ p``; the identity otherwise), gives gradients ``g`` at every layer's output with
``E[g gᵀ] = F``. Kept per output channel, ``f_c = Σ g_c²``: an output error spread over the channels
with energy ``E`` (per vector, summed over channels) costs about ``mean_c(f_c) · E``, what the global
budget weighs each layer's discarded (whitened) spectral energy by. (Where a BatchNorm scales the
output by ``D``, the whitened error is the scaled one, so the weight is ``mean_c(f_c / D_c²)``.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tdnn.core import temporary
from tdnn.core.batches import batch_mask, batch_size, map_tensors
from tdnn.layers import registry
from tdnn.statistics.hooks import run

SEED = 0


def output_of(output: Any) -> tuple[torch.Tensor, bool]:
    """The tensor a model's output is judged by, and whether it holds logits: ``.logits``, a
    2-D tensor (a classifier) or else the first tensor (e.g. ``last_hidden_state``)."""
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits, True
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"cannot find an output tensor in a {type(output).__name__}")
    return output, output.dim() == 2


def _probe(z: torch.Tensor, logits: bool, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The random output direction ε (zero on masked tokens)."""
    z = z.detach().float()
    if logits:
        eps = -z.softmax(-1)
        k = torch.multinomial(-eps.reshape(-1, eps.shape[-1]), 1, generator=generator)
        eps.reshape(-1, eps.shape[-1]).scatter_add_(1, k, torch.ones_like(k, dtype=eps.dtype))  # onehot(k) - p
    else:
        eps = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    if mask is not None and tuple(z.shape[:2]) == tuple(mask.shape):
        eps = eps * mask.to(eps.dtype).reshape(*mask.shape, *[1] * (eps.dim() - 2))
    return eps


def fisher_weights(model: nn.Module, batches: Sequence[Any], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The Fisher weight ``w`` (see the module docstring) of each of ``layers`` on ``batches``: one
    forward and one backward of ``model`` per chunk of samples (as many as keep the chunk's output
    within :data:`OUTPUT_ELEMENTS`; in eval mode; parameters get no gradients).

    Raises:
        ValueError: if no layer's output reaches the model's output.
    """
    outputs: list[tuple[str, torch.Tensor]] = []

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:  # nothing upstream needs gradients: start the graph here
                output = output.detach().requires_grad_()
            outputs.append((name, output))
            return output
        return hook

    total: dict[str, torch.Tensor | None] = {name: None for name in layers}
    generator = torch.Generator().manual_seed(SEED)
    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    # no parameter needs a gradient: autograd then keeps only what flows back to layer outputs
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        _accumulate(model, batches, outputs, total, generator, handles, layers)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    # A layer whose output does not reach the judged output (a pooler beside last_hidden_state)
    # counts as the most sensitive one: nothing says its errors are cheap.
    top = max((float(v.mean()) for v in total.values() if v is not None and v.sum() > 0), default=0.0)
    return {name: v if v is not None and v.sum() > 0 else torch.full((_out_channels(layers[name]),), top,
                                                                     dtype=torch.float64)
            for name, v in total.items()}


def _accumulate(model: nn.Module, batches: Sequence[Any], outputs: list[tuple[str, torch.Tensor]],
                total: dict[str, torch.Tensor | None], generator: torch.Generator, handles: list[Any],
                layers: dict[str, nn.Module]) -> None:
    """Σ g² per layer over ``batches``: one forward and one backward per chunk of samples."""
    chunk = [1]  # samples per forward: one, until the first output says how large a sample's is
    with temporary.hooks(handles), temporary.modes({model: False}), torch.enable_grad():
        for i, batch in _chunks(batches, chunk):
            outputs.clear()
            z, logits = output_of(run(model, batch, i))
            if not z.requires_grad:
                raise ValueError("no layer to compress reaches the model's output")
            chunk[0] = max(1, OUTPUT_ELEMENTS // max(1, z.numel() // max(1, batch_size(batch))))
            eps = _probe(z, logits, batch_mask(batch), generator).to(z.device)
            grads = torch.autograd.grad(z, [y for _, y in outputs], grad_outputs=eps.to(z.dtype),
                                        allow_unused=True)
            for (name, y), g in zip(outputs, grads):
                if g is not None:  # Σ g² per output channel: dim 1 of a conv's output, the last of a matrix's
                    channels = 1 if registry.kind_of(layers[name]).spatial else -1
                    term = g.double().square().movedim(channels, 0).reshape(g.shape[channels], -1).sum(1)
                    total[name] = term if total[name] is None else total[name] + term


OUTPUT_ELEMENTS = 1 << 24  # model outputs per backward pass: a chunk's logits stay within 64 MiB


def _chunks(batches: Sequence[Any], size: list[int]) -> Iterator[tuple[int, Any]]:
    """Each batch in chunks of ``size[0]`` samples (read anew for every chunk) as ``(index, chunk)``:
    the sums are the same as a batch's, and the graph a backward pass keeps is a chunk's (a whole
    batch of an LLM's logits would not fit)."""
    for i, batch in enumerate(batches):
        n, j = batch_size(batch), 0
        while j < n:
            k = min(n, j + size[0])
            yield i, map_tensors(batch, lambda t: t[j:k] if t.dim() and t.shape[0] == n else t)
            j = k


def _out_channels(layer: nn.Module) -> int:
    return registry.kind_of(layer).kernel(layer).shape[0]
