"""Saving and loading compressed models: one safetensors file with the weights and the plan.

A checkpoint is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: the tensors of
``model.state_dict()`` (a tensor shared under several names is stored once) and, in its string
metadata, the compression plan, each factorized layer's provenance and the tdnn and format
versions. Loading needs no pickle, so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tdnn.core.files import write_atomic
from tdnn.layers import registry, walk
from tdnn.layers.base import Factorized
from tdnn.planning.plan import PLAN_ATTR, LayerPlan, Plan
from tdnn.version import __version__

FORMAT = "tdnn-checkpoint"
FORMAT_VERSION = 1

PathLike = str | os.PathLike


def _kind(module: nn.Module) -> str:
    return module.kind.name if isinstance(module, Factorized) else registry.kind_of(module).name


def current_plan(model: nn.Module) -> Plan:
    """The plan describing ``model`` as it is now.

    Factorized layers are read off the modules themselves (so a hand-built or merged model is
    described correctly); entries of ``model.tdnn_plan`` that agree with the model are kept as
    they are, with their reasons and other details.
    """
    previous = getattr(model, PLAN_ATTR, None)
    entries = {e.name: e for e in previous.layers} if isinstance(previous, Plan) else {}
    layers = []
    for name, module, _ in walk.named_layers(model, walk.layer_or_factorized):
        old = entries.get(name)
        if isinstance(module, Factorized):
            agrees = old is not None and (old.method, old.rank) == (module.method, module.rank)
            layers.append(old if agrees else LayerPlan(name, _kind(module), module.method, module.rank))
        else:
            agrees = old is not None and not old.factorized and old.reason
            layers.append(old if agrees else LayerPlan(name, _kind(module), reason="not compressed"))
    if not isinstance(previous, Plan):
        return Plan(layers)
    return Plan(layers, list(previous.settings), list(previous.blocks), previous.allocation)


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once, and ``alias -> stored name`` for the rest."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0] or "<root>"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{owner}: state_dict entry {key!r} is a {type(value).__name__}, not a "
                            f"tensor; only tensors can be saved")
        if value.is_meta:
            raise ValueError(f"{owner}: {key!r} is on the meta device; there is nothing to save")
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                 tuple(value.stride()), value.dtype)
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        ptr = value.untyped_storage().data_ptr()
        # safetensors refuses overlapping storage; a partial view of another tensor is copied.
        tensors[key] = value.detach().cpu().contiguous() if ptr not in storages else value.detach().cpu().clone()
        storages.add(ptr)
    return tensors, aliases


BUFFERS = "tdnn.buffers:"  # prefix of the stored non-persistent buffers


def _transient_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (a rotary embedding's ``inv_freq``): outside the state dict, but a
    model built on the meta device has them on meta, so the checkpoint keeps them too."""
    persistent = model.state_dict().keys()
    return {name: b.detach().cpu().contiguous() for name, b in model.named_buffers()
            if name not in persistent and not b.is_meta}


def save(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and compression plan to one safetensors file, atomically.

    The file is written next to ``path`` under a temporary name and moved into place with
    :func:`os.replace`, so a crash mid-write never leaves a half-written file at ``path``: it
    holds either the old checkpoint or the new one.

    Args:
        model: a model from :func:`tdnn.compress_model` (or any model; factorized layers are read
            off the modules themselves).
        path: where to write; an existing file is replaced.

    Raises:
        TypeError: if the state dict holds a non-tensor entry (``get_extra_state``).
        ValueError: if a tensor is on the meta device.

    Example:
        >>> import os, tempfile, torch, tdnn
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> small = tdnn.compress_model(net, ranks=0.5).eval()
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     tdnn.save(small, os.path.join(tmp, "small.safetensors"))
        ...     fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        ...     loaded = tdnn.load(os.path.join(tmp, "small.safetensors"), fresh).eval()
        >>> x = torch.randn(3, 64)
        >>> torch.equal(loaded(x), small(x)), type(loaded[0]).__name__
        (True, 'SVDLinear')
    """
    plan = current_plan(model)
    layers = {name: {"class": type(m).__name__, "dense_kwargs": m.dense_kwargs, "rel_error": m.rel_error}
              for name, m, _ in walk.named_layers(model, walk.layer_or_factorized) if isinstance(m, Factorized)}
    tensors, aliases = _tensors(model)
    buffers = _transient_buffers(model)
    tensors.update({BUFFERS + name: b for name, b in buffers.items()})
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "tdnn_version": __version__,
                "torch_version": torch.__version__, "plan": json.dumps(plan.to_dict()),
                "layers": json.dumps(layers), "aliases": json.dumps(aliases)}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def add_aliases(path: PathLike, aliases: dict[str, str], table: dict[str, Any]) -> None:
    """Give each alias in a checkpoint's header the entry of the tensor it names in ``table``.

    Raises:
        ValueError: naming ``path``, if an alias names a tensor ``table`` does not hold.
    """
    for alias, stored in aliases.items():
        if stored not in table:
            raise ValueError(f"{path}: damaged tdnn checkpoint: 'aliases' maps {alias!r} to {stored!r}, which the "
                             f"file does not hold")
        table[alias] = table[stored]


def read_header(path: PathLike) -> dict[str, Any]:
    """The metadata of a tdnn checkpoint: versions, ``plan`` (a :class:`tdnn.Plan`) and ``layers``.

    Raises:
        ValueError: if ``path`` is not a tdnn checkpoint or was written by a newer format.
    """
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a tdnn checkpoint (cannot read it as safetensors: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tdnn checkpoint (safetensors metadata has no "
                         f"format={FORMAT!r}); write it with tdnn.save")
    try:
        return _header(meta)
    except ValueError as err:
        raise ValueError(f"{path}: damaged tdnn checkpoint header: {err}") from None


def _header(meta: dict[str, str]) -> dict[str, Any]:
    """The checked header fields; a ``ValueError`` names the first field that is missing or wrong."""
    for key in ("format_version", "tdnn_version", "plan", "layers", "aliases"):
        if key not in meta:
            raise ValueError(f"'{key}' is missing")
    if not meta["format_version"].isdigit():
        raise ValueError(f"'format_version' must be a whole number, got {meta['format_version']!r}")
    version = int(meta["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {version} (tdnn {meta['tdnn_version']}) is newer than this tdnn "
                         f"reads ({FORMAT_VERSION}); upgrade tdnn")
    parsed = {}
    for key in ("plan", "layers", "aliases"):
        try:
            parsed[key] = json.loads(meta[key])
        except json.JSONDecodeError as err:
            raise ValueError(f"'{key}' is not valid JSON ({err})") from None
        except RecursionError:
            raise ValueError(f"'{key}' is nested too deeply to be a tdnn header") from None
    layers, aliases = parsed["layers"], parsed["aliases"]
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in aliases.items()):
        raise ValueError("'aliases' must map tensor names to tensor names")
    if not isinstance(layers, dict):
        raise ValueError("'layers' must map layer names to their records")
    for name, info in layers.items():
        if not isinstance(info, dict) or not isinstance(info.get("class"), str) \
                or not isinstance(info.get("dense_kwargs"), dict):
            raise ValueError(f"'layers.{name}' must have a 'class' name and 'dense_kwargs'")
        error = info.get("rel_error")
        if error is not None and (isinstance(error, bool) or not isinstance(error, (int, float))):
            raise ValueError(f"'layers.{name}.rel_error' must be a number or null, got {error!r}")
    plan = Plan.from_dict(parsed["plan"])
    missing = [e.name for e in plan.factorized() if e.name not in layers]
    if missing:
        raise ValueError(f"'layers' has no record of the factorized layer {missing[0]!r}")
    return {"format_version": version, "tdnn_version": meta["tdnn_version"],
            "torch_version": meta.get("torch_version"), "plan": plan, "layers": layers, "aliases": aliases}


def _replacement(entry: LayerPlan, module: nn.Module | None, saved: Mapping[str, Any]) -> Factorized | None:
    """The uninitialised factorized module ``entry`` asks for in place of ``module``."""
    name = entry.name or "<root>"
    if module is None:
        raise ValueError(f"{name}: the plan has a {entry.kind} layer here that the model does not have")
    if isinstance(module, Factorized):
        if (entry.method, entry.rank) == (module.method, module.rank):
            return None  # already built as planned, e.g. loading into the compressed model itself
        raise ValueError(f"{name}: already factorized as {type(module).__name__} at rank {module.rank}, "
                         f"the plan has {entry.method!r} at rank {entry.rank}; give the dense model")
    if _kind(module) != entry.kind:
        raise ValueError(f"{name}: the plan has a {entry.kind} layer here, the model a {type(module).__name__}")
    if not entry.factorized:
        return None
    info = saved.get(entry.name)
    if info is not None and _jsonable(registry.kind_of(module).dense_kwargs(module)) != info["dense_kwargs"]:
        raise ValueError(f"{name}: the model's layer {module} does not match the saved layer "
                         f"{entry.kind}({info['dense_kwargs']})")
    cls = registry.factorized_class(module, registry.check_method(entry.method, f"{name}: method"))
    if cls is None or cls.method != entry.method:
        raise ValueError(f"{name}: the plan uses method {entry.method!r}, which does not apply to {module}")
    new = cls.structure(module, entry.rank, name=name)
    if info is not None:
        new.rel_error = info.get("rel_error")
    return new


def _check_state(model: nn.Module, replacements: Mapping[int, nn.Module],
                 state: Mapping[str, torch.Tensor]) -> None:
    """Check ``state`` against ``model`` as it will be once ``replacements`` are swapped in."""
    moved = {name: replacements[id(m)] for name, m in model.named_modules(remove_duplicate=False)
             if id(m) in replacements}
    expected = {key: value for key, value in model.state_dict(keep_vars=True).items()
                if not any(name == "" or key.startswith(name + ".") for name in moved)}
    for name, new in moved.items():
        expected.update(new.state_dict(prefix=f"{name}." if name else "", keep_vars=True))
    for key, value in expected.items():
        owner = key.rpartition(".")[0] or "<root>"
        if key not in state:
            raise ValueError(f"{owner}: the checkpoint has no {key!r}; is the model the same architecture?")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{owner}: {key!r} has shape {tuple(value.shape)} in the model but "
                             f"{tuple(state[key].shape)} in the checkpoint")
    for key in state:
        if key not in expected:
            raise ValueError(f"{key.rpartition('.')[0] or '<root>'}: the checkpoint has {key!r}, which the "
                             f"model does not")


def _apply(model: nn.Module, plan: Plan | Mapping[str, Any], saved: Mapping[str, Any],
           state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    if isinstance(plan, Mapping):
        plan = Plan.from_dict(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a tdnn.Plan or its to_dict(), got {type(plan).__name__}")
    layers = {name: module for name, module, _ in walk.named_layers(model, walk.layer_or_factorized)}
    replacements = {}
    for entry in plan.layers:  # check everything before touching the model
        module = layers.get(entry.name)
        new = _replacement(entry, module, saved)
        if new is not None:
            replacements[id(module)] = new
    if state is not None:
        _check_state(model, replacements, state)
    model = walk.swap(model, replacements)
    setattr(model, PLAN_ATTR, plan)
    return model


def apply_plan(model: nn.Module, plan: Plan | Mapping[str, Any]) -> nn.Module:
    """Rebuild the factorized structure of ``plan`` in a dense ``model``, without decomposing.

    The new layers are uninitialised: load a state dict of the compressed model next. The model is
    changed in place (its dense weights would be overwritten anyway); the return value is the
    root, which is a new module only when the plan factorizes the root itself. Train/eval mode,
    frozen parameters and hooks of the replaced layers carry over. Nothing is changed when the
    plan does not match.

    Args:
        model: a freshly built dense model of the architecture that was compressed.
        plan: ``compressed.tdnn_plan`` or its ``to_dict()`` (e.g. read back from JSON).

    Returns:
        ``model`` with the factorized structure and ``plan`` as its ``tdnn_plan``.

    Raises:
        ValueError: naming the first layer of the plan that the model lacks, has with another
            type, or cannot take at the planned rank or method.
        TypeError: if ``plan`` is neither a :class:`tdnn.Plan` nor a mapping.

    Example:
        >>> import torch, tdnn
        >>> def build():
        ...     return torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.Linear(64, 4))
        >>> small = tdnn.compress_model(build(), ranks=0.5)
        >>> state, plan = small.state_dict(), small.tdnn_plan.to_dict()
        >>> again = tdnn.apply_plan(build(), plan)
        >>> again.load_state_dict(state)
        <All keys matched successfully>
        >>> x = torch.randn(1, 8, 4, 4)
        >>> torch.equal(again(x), small(x))
        True
    """
    return _apply(model, plan, {}, None)


def load(path: PathLike, model: nn.Module, *, assign: bool = False) -> nn.Module:
    """Load a checkpoint written by :func:`save` into a freshly built dense ``model``.

    The factorized structure is rebuilt from the saved plan (no decomposition), then the weights
    are loaded with ``strict=True``; outputs are bit-identical to the saved model's. Every check
    runs before the model is touched.

    Args:
        path: a file written by :func:`save`.
        model: a dense model of the same architecture, e.g. built by the same constructor.
        assign: passed to :meth:`torch.nn.Module.load_state_dict`; with a model built on the meta
            device, ``assign=True`` loads without ever allocating the dense weights.

    Returns:
        The compressed model (``model`` itself unless its root was factorized), with its plan in
        ``tdnn_plan`` and each factorized layer's saved ``rel_error``.

    Raises:
        ValueError: if ``path`` is not a tdnn checkpoint, or naming the first layer where the plan
            or the weights do not match ``model``.
    """
    if not assign and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ValueError(f"{type(model).__name__} has tensors on the meta device, which loading would leave "
                         f"empty: pass assign=True to load the checkpoint's tensors into it")
    header = read_header(path)
    state = load_file(os.fspath(path), device="cpu")
    if assign:
        # safetensors hands out tensors at arbitrary byte offsets; kernels pick other code paths
        # for unaligned data, so outputs would differ in the last bit. Own, aligned copies fix that.
        state = {key: value.clone() for key, value in state.items()}
    buffers = {key[len(BUFFERS):]: state.pop(key) for key in [k for k in state if k.startswith(BUFFERS)]}
    add_aliases(path, header["aliases"], state)
    try:
        model = _apply(model, header["plan"], header["layers"], state)
        _check_buffers(model, buffers)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    ties = list(walk.shared_parameters(model).values())
    model.load_state_dict(state, strict=True, assign=assign)
    walk.tie(model, ties)  # assign=True gives every name its own Parameter: tie them again
    for name, value in buffers.items():  # non-persistent buffers, e.g. of a model built on meta
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._buffers:
            module.register_buffer(attr, value, persistent=False)
    return model


def _check_buffers(model: nn.Module, buffers: Mapping[str, torch.Tensor]) -> None:
    """Every stored non-persistent buffer belongs to a module of ``model``."""
    modules = dict(model.named_modules())
    for name in buffers:
        owner = name.rpartition(".")[0]
        if owner not in modules:
            raise ValueError(f"the checkpoint stores the buffer {name!r}, but the model has no module {owner!r}; "
                             f"is the model the same architecture?")
