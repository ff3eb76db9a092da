"""The one mutation of :func:`tdnn.compress_model`: factorized layers put in place, with an undo."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from tdnn.layers import walk


class Swapper:
    """Puts factorized layers in place (the one mutation), remembering how to undo it.

    With ``park`` (compressing in place) each replaced dense layer's tensors move to a temporary
    file, their memory freed, so an undo can bring them back exactly while memory stays that of
    the compressed model; without, replaced layers are simply let go.
    """

    def __init__(self, model: nn.Module, *, park: bool) -> None:
        self.model, self.done = model, {}
        self.directory = tempfile.TemporaryDirectory(prefix="tdnn-undo-") if park else None

    def __call__(self, old: nn.Module, new: nn.Module) -> nn.Module:
        self.model = walk.swap(self.model, {id(old): new})
        if self.directory is not None:
            tensors = [*old.parameters(), *old.buffers()]
            path = os.path.join(self.directory.name, f"{len(self.done)}.pt")
            torch.save([t.detach() for t in tensors], path)
            for t in tensors:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.done[id(new)] = (old, tensors, path)
        return self.model

    def undo(self) -> None:
        """Put every replaced layer back, with its tensors as they were."""
        for old, tensors, path in self.done.values():
            for t, saved in zip(tensors, torch.load(path, weights_only=True)):
                t.data = saved
        walk.swap(self.model, {key: old for key, (old, _, _) in self.done.items()})

    def close(self) -> None:
        if self.directory is not None:
            self.directory.cleanup()
