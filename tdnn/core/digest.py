"""Fingerprints: short digests of a model (its structure and every tensor) or of a batch, to tell
whether two runs saw the same thing without keeping it."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from tdnn.core.batches import map_tensors

_CHUNK = 1 << 22  # elements hashed at a time: no full-size copy of a large tensor


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    if tensor.numel() and not tensor.is_meta:
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            digest.update(flat[start:start + _CHUNK].cpu().contiguous().view(torch.uint8).numpy().tobytes())


def model_digest(model: nn.Module) -> str:
    """A digest of ``model``: the module tree (names and types) and the bytes, shapes and dtypes of
    every parameter and buffer. Models with equal digests compute the same function.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> model_digest(a) == model_digest(a), model_digest(a) == model_digest(b)
        (True, False)
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules(remove_duplicate=False):
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        _update(digest, name, tensor)
    return digest.hexdigest()


def batch_digest(batch: Any) -> str:
    """A digest of a batch (tensors, tuples, lists and dicts of them; other values by their repr)."""
    digest = hashlib.blake2b(digest_size=16)
    tensors: list[torch.Tensor] = []
    skeleton = map_tensors(batch, lambda t: tensors.append(t) or len(tensors) - 1)
    digest.update(repr(skeleton).encode())
    for i, tensor in enumerate(tensors):
        _update(digest, str(i), tensor)
    return digest.hexdigest()
