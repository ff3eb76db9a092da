"""Changes to a model that last for one block: forward hooks, and train/eval mode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def hooks(handles: Iterable[Any]) -> Iterator[None]:
    """Remove these hook handles when the block ends, however it ends.

    Example:
        >>> import torch
        >>> layer, seen = torch.nn.Linear(2, 2), []
        >>> with hooks([layer.register_forward_hook(lambda m, a, out: seen.append(out.shape))]):
        ...     _ = layer(torch.zeros(3, 2))
        >>> _ = layer(torch.zeros(1, 2)); seen
        [torch.Size([3, 2])]
    """
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def modes(wanted: Mapping[nn.Module | None, bool]) -> Iterator[None]:
    """Put each model in train (``True``) or eval (``False``) mode for the block, then give every
    submodule back its own flag (``None`` keys are skipped)."""
    models = [m for m in wanted if m is not None]
    flags = {module: module.training for m in models for module in m.modules()}
    try:
        for model in models:
            model.train(wanted[model])
        yield
    finally:
        for module, flag in flags.items():
            module.train(flag)
