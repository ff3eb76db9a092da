"""YAML configs: compression and fine-tuning settings, checked against the functions they feed.

A config has up to three top-level keys::

    description: ResNet-18, Tucker-2 at half the parameters, classifier kept dense
    compress:            # settings of tdnn.compress_model (tdnn.CompressSettings)
      method: tucker2
      ranks:
        conv1: null
        "re:layer\\d\\.\\d\\.conv\\d": 0.5
        "re:.*": {rank: 0.5, method: svd}
    finetune:            # settings of tdnn.finetune (tdnn.finetune.FinetuneSettings)
      epochs: 2
      lr: 1.0e-3

The keys of each section are the fields of the settings it feeds (minus those that cannot be
written in YAML, listed in :data:`NOT_IN_YAML`): :class:`tdnn.CompressSettings` and
:class:`tdnn.FinetuneSettings`, so a new setting is accepted without touching this module; a
mapping given for a field annotated with a dataclass is turned into that dataclass
(``budget: {params: 0.5}`` becomes ``tdnn.Budget(params=0.5)``). Values are type-checked against
the annotations, rank specs are validated and both settings are built (so ``epochs: 0`` or an
unknown optimizer fail) when the file is read, with the file and key named, before any work.
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from tdnn.compress.settings import CompressSettings
from tdnn.finetune.settings import NOT_IN_YAML as NOT_IN_FINETUNE_YAML
from tdnn.finetune.settings import FinetuneSettings
from tdnn.layers.registry import check_method
from tdnn.planning.ranks import RankRule

# Section -> the settings class whose fields it holds.
SECTIONS: dict[str, type] = {"compress": CompressSettings, "finetune": FinetuneSettings}
# Settings that take Python objects (callables) and have no YAML form.
NOT_IN_YAML: dict[str, frozenset[str]] = {
    "compress": frozenset({"filter_fn"}),
    "finetune": NOT_IN_FINETUNE_YAML,
}
# Extra checks for values whose type alone says little; each raises ValueError / TypeError.
VALIDATORS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("compress", "ranks"): RankRule,
    ("compress", "method"): check_method,
}
TOP_LEVEL = ("description", *SECTIONS)


@dataclass(frozen=True)
class Config:
    """Keyword arguments for :func:`tdnn.compress_model` and :func:`tdnn.finetune`, from YAML.

    Attributes:
        compress: keyword arguments of :func:`tdnn.compress_model` (always has ``ranks``).
        finetune: keyword arguments of :func:`tdnn.finetune` (may be empty).
        description: free text from the file.
        source: the file it was read from (for messages).

    Example:
        >>> import torch, tdnn
        >>> cfg = tdnn.Config.from_dict({"compress": {"ranks": {"re:.*": 0.5}, "method": "svd"},
        ...                              "finetune": {"epochs": 2}})
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> small = tdnn.compress_model(net, **cfg.compress)
        >>> [type(m).__name__ for m in small], cfg.finetune
        (['SVDLinear', 'ReLU', 'SVDLinear'], {'epochs': 2})
    """

    compress: dict[str, Any]
    finetune: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Config:
        """Check ``data`` (as parsed from YAML) and build a :class:`Config`.

        Raises:
            ValueError: naming ``source`` and the key, for unknown or missing keys and bad values.
            TypeError: naming ``source`` and the key, for values of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a config must be a mapping with keys {', '.join(TOP_LEVEL)}, "
                             f"got {type(data).__name__}")
        unknown = [k for k in data if k not in TOP_LEVEL]
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r}; a config has the keys "
                             f"{', '.join(TOP_LEVEL)}")
        description = data.get("description")
        if description is not None and not isinstance(description, str):
            raise TypeError(f"{source}: 'description' must be text, got {type(description).__name__}")
        if "compress" not in data:
            raise ValueError(f"{source}: missing key 'compress' (with at least 'ranks')")
        sections = {name: _section(name, data.get(name) or {}, source) for name in SECTIONS}
        return cls(sections["compress"], sections["finetune"], description, source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a YAML config file.

    Args:
        path: a YAML file with ``compress`` (and optionally ``finetune`` and ``description``).

    Returns:
        The checked :class:`Config`.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for malformed YAML, duplicate keys, unknown keys or bad values, naming the
            file and the key (or line).

    Example:
        >>> import tempfile, pathlib, tdnn
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = path.write_text("compress:\\n  ranks: {fc: 16, 're:.*': 0.5}\\nfinetune:\\n  lr: 1e-3\\n")
        >>> cfg = tdnn.load_config(path)
        >>> cfg.compress["ranks"], cfg.finetune["lr"]
        ({'fc': 16, 're:.*': 0.5}, 0.001)
        >>> _ = path.write_text("compress:\\n  ranks: 0.5\\n  rank_method: svd\\n")
        >>> tdnn.load_config(path)
        Traceback (most recent call last):
        ...
        ValueError: ...c.yaml: unknown key 'compress.rank_method'; known keys: ranks, method, ...
    """
    source = os.fspath(path)
    with open(source, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    return Config.from_dict(_parse(text, source), source=source)


MAX_VALUES = 10_000  # values a config may hold once its aliases are expanded


def _parse(text: str, source: str) -> Any:
    """The YAML document, refused if its aliases expand past :data:`MAX_VALUES` values."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded(node, {}) > MAX_VALUES:
            raise ValueError(f"{source}: its aliases expand to more than {MAX_VALUES} values; a config is "
                             f"not that large (an alias bomb?)")
        return loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source}: invalid YAML{where}: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML: {err}") from None
    except RecursionError:
        raise ValueError(f"{source}: nested too deeply to be a config") from None
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values ``node`` stands for with every alias expanded (each shared node counted once
    per use, computed once)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts as nothing more
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(_expanded(c, sizes) for c in children)
    return sizes[id(node)]


def known_keys(section: str) -> list[str]:
    """The keys a config section accepts: its settings' fields, in order."""
    return [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name not in NOT_IN_YAML[section]]


def _section(name: str, values: Any, source: str) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: '{name}' must be a mapping of the fields of "
                         f"{SECTIONS[name].__name__}, got {type(values).__name__}")
    keys = known_keys(name)
    hints = _type_hints(SECTIONS[name])
    out = dict(values)
    for key, value in values.items():
        if key not in keys:
            raise ValueError(f"{source}: unknown key '{name}.{key}'; known keys: {', '.join(keys)}")
        value = out[key] = _from_mapping(value, hints.get(key), f"{source}: '{name}.{key}'")
        if key in hints and not _matches(value, hints[key]):
            raise TypeError(f"{source}: '{name}.{key}' must be {_hint_text(hints[key])}, "
                            f"got {_short(value)} ({type(value).__name__})")
        validator = VALIDATORS.get((name, key))
        if validator is not None:
            try:
                validator(value)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{source}: '{name}.{key}': {_clip(err)}") from None
    try:  # the settings check their values together
        SECTIONS[name](**out)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{source}: '{name}': {_clip(err)}") from None
    return out


def _from_mapping(value: Any, hint: Any, where: str) -> Any:
    """A YAML mapping given for an argument annotated with a dataclass (e.g. ``budget:
    {params: 0.5}`` for :class:`tdnn.Budget`) becomes an instance of that dataclass."""
    if not isinstance(value, Mapping) or hint is None:
        return value
    for member in _members(hint):
        if dataclasses.is_dataclass(member) and isinstance(member, type):
            try:
                return member(**value)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{where}: {_clip(err)}") from None
    return value


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve at runtime: skip type checks, keep validators
        return {}


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits an annotation; parts that YAML cannot express are not checked."""
    members = _members(hint)
    plain = [m for m in members
             if isinstance(m, type) and m is not typing.Any and typing.get_origin(m) is None]
    if len(plain) < len(members):
        return True  # Any, Callable, generics: leave it to the function
    if isinstance(value, bool):
        return bool in plain
    if isinstance(value, int) and float in plain:
        return True
    return isinstance(value, tuple(plain))


def _hint_text(hint: Any) -> str:
    return " or ".join("null" if m is type(None) else getattr(m, "__name__", str(m)) for m in _members(hint))


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-3`` as a float (YAML 1.2 style)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are plain values and unique (merge keys ``<<: *base`` are standard YAML:
    the mapping's own keys win over merged ones)."""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a name or a number, got a {type(key).__name__}", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_short(key)} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


def _clip(err: Exception, limit: int = 300) -> str:
    """An error's message, at most ``limit`` characters (a bad value may be long)."""
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def _short(value: Any) -> str:
    """A bounded repr of a value from a file (never the whole of a huge one)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
