"""Finding layers in a model and swapping them: the one place that mutates a model."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from tdnn.layers.base import Factorized


def named_layers(model: nn.Module, types: tuple[type, ...] = (nn.Linear, nn.Conv2d)
                 ) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """Yield ``(name, module, parent)`` for each distinct module of ``types``, in definition order.

    A module reachable under several names is yielded once, with its first name. The walk does
    not enter :class:`~tdnn.layers.Factorized` modules, whose children are already factors.
    The root itself is yielded (with name ``""`` and parent ``None``) when it matches.
    """
    if isinstance(model, types):
        yield "", model, None
    seen: set[int] = {id(model)}

    def visit(prefix: str, parent: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
        if isinstance(parent, Factorized):
            return
        for key, child in parent._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(child, types):
                yield name, child, parent
            yield from visit(name, child)

    yield from visit("", model)


def swap(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Replace every occurrence of each module ``id -> new`` in ``model``; return the new root.

    A module shared under several names (or parents) is replaced everywhere by the same new
    module, so sharing survives.
    """
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, key, replacements[id(child)])
    return model
