"""Finding layers in a model and swapping them: the one place that mutates a model."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from tdnn.layers import registry
from tdnn.layers.base import Factorized


def layer_or_factorized(module: nn.Module) -> bool:
    """Whether ``module`` is a dense layer of a registered kind or a factorized one."""
    return isinstance(module, Factorized) or registry.is_layer(module)


def named_layers(model: nn.Module, match: Callable[[nn.Module], bool] = registry.is_layer
                 ) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """Yield ``(name, module, parent)`` for each distinct module for which ``match`` holds (by
    default: dense layers of a registered kind), in definition order.

    A module reachable under several names is yielded once, with its first name. The walk does
    not enter :class:`~tdnn.layers.Factorized` modules, whose children are already factors.
    The root itself is yielded (with name ``""`` and parent ``None``) when it matches.
    """
    if match(model):
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
            if match(child):
                yield name, child, parent
            yield from visit(name, child)

    yield from visit("", model)


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> its qualified names (``"head.weight"``), for parameters held by several
    modules (tied weights, e.g. an LLM's output layer sharing the embedding)."""
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            names.setdefault(id(param), []).append(f"{module_name}.{attr}" if module_name else attr)
    return {key: group for key, group in names.items() if len(group) > 1}


def tie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make each group of qualified parameter names one Parameter again: the first's."""
    for names in groups:
        param = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


# Forward and backward hooks act on a layer's inputs and outputs, which a replacement keeps.
_HOOK_ATTRS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _grad_flags(module: nn.Module) -> dict[bool, bool | None]:
    """Whether ``module``'s weights (key ``False``) and biases (key ``True``) require gradients."""
    flags: dict[bool, list[bool]] = {False: [], True: []}
    for name, param in module.named_parameters():
        flags[name.rsplit(".", 1)[-1] == "bias"].append(param.requires_grad)
    return {is_bias: any(values) if values else None for is_bias, values in flags.items()}


def carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` what the user set on ``old``: train/eval mode, frozen weights or biases, and
    forward/backward hooks.

    The hook dictionaries are shared rather than copied, so a ``RemovableHandle`` the user holds
    for a hook on ``old`` still removes it from ``new``.
    """
    new.train(old.training)
    flags = _grad_flags(old)
    for name, param in new.named_parameters():
        wanted = flags[name.rsplit(".", 1)[-1] == "bias"]
        if wanted is not None:
            param.requires_grad_(wanted)
    for attr in _HOOK_ATTRS:
        hooks, mine = getattr(old, attr), getattr(new, attr)
        if mine:
            mine.update(hooks)
        else:
            setattr(new, attr, hooks)
    new._is_full_backward_hook = old._is_full_backward_hook


def swap(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Replace every occurrence of each module ``id -> new`` in ``model``; return the new root.

    A module shared under several names (or parents) is replaced everywhere by the same new
    module, so sharing survives. Each new module takes over the old one's train/eval mode,
    frozen parameters and hooks (:func:`carry_over`).
    """
    olds = {id(m): m for m in model.modules() if id(m) in replacements}
    for key, old in olds.items():
        carry_over(old, replacements[key])
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, key, replacements[id(child)])
    return model
