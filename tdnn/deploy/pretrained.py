"""A Hugging Face round trip: a compressed ``transformers`` model saved to a directory and rebuilt
from it alone, at its compressed size (as peft does for adapters).

The directory holds the model's ``config.json`` (and ``generation_config.json``), the weights with
the compression plan in one safetensors file, ``tdnn_model.safetensors`` (written by
:func:`tdnn.save`), and ``tdnn_config.json`` naming the model class. The weights file is not called
``model.safetensors`` on purpose: ``transformers`` alone would load it into a dense model and leave
the factorized layers' weights random; it should fail loudly instead.

A model directory is data: loading never imports a module named by a file. The class is one of
transformers' own model classes for the config's ``model_type`` (as its auto classes resolve
them), or the class the caller passes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdnn.core.files import replace_directory
from tdnn.deploy.io import load, save
from tdnn.version import __version__

WEIGHTS = "tdnn_model.safetensors"
CONFIG = "tdnn_config.json"
FORMAT = "tdnn-pretrained"
OWN = ("config.json", "generation_config.json", CONFIG, WEIGHTS)  # what save_pretrained writes
# Weights a plain Hugging Face directory holds, which transformers would load instead of tdnn's.
DENSE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write a compressed Hugging Face model to ``directory`` for :func:`from_pretrained`.

    The directory is written whole into a temporary sibling and put in place in one step, so a
    failure (a tensor on the meta device, a full disk) leaves the previous save — or nothing —
    there, never a mix; files of the directory that tdnn does not write (a tokenizer, a README) are
    carried over, symbolic links as links. A directory holding a dense model's weights
    (``model.safetensors``, ``pytorch_model.bin``, ...) is refused: ``transformers`` would load
    those instead of the compressed model.

    Args:
        model: a ``transformers`` model (with ``.config``), compressed or not.
        directory: created if needed.

    Raises:
        TypeError: if ``model`` has no Hugging Face ``config``.
        ValueError: if ``directory`` holds a dense model's weights, or is not a directory.

    Example:
        >>> import tempfile, torch, tdnn, transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
        >>> small = tdnn.compress_model(transformers.GPT2LMHeadModel(config).eval(), ranks=0.5)
        >>> directory = tempfile.mkdtemp()
        >>> tdnn.save_pretrained(small, directory)
        >>> again = tdnn.from_pretrained(directory)
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> torch.equal(again(ids).logits, small(ids).logits)
        True
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model (no .config); use tdnn.save")
    directory = Path(directory)
    kept = _carried_over(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, directory.stat().st_mode if directory.exists() else _new_directory_mode())
        _write(model, config, tmp)
        for name in kept:
            source = directory / name
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, tmp / name, symlinks=True)
            else:
                shutil.copy2(source, tmp / name, follow_symlinks=False)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_directory_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _carried_over(directory: Path) -> list[str]:
    """The files of an existing ``directory`` that the new save keeps beside its own."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    names = sorted(p.name for p in directory.iterdir())
    dense = [n for n in names if n in DENSE_WEIGHTS or (n.startswith("model-") and n.endswith(".safetensors"))]
    if dense:
        raise ValueError(f"{directory} holds {dense[0]}, a dense model's weights, which transformers would load "
                         f"instead of the compressed model: save into another directory, or remove it first")
    return [n for n in names if n not in OWN]


def _write(model: nn.Module, config: Any, directory: Path) -> None:
    save(model, directory / WEIGHTS)  # first: it checks every tensor
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    plan = getattr(model, "tdnn_plan", None)
    info = {"format": FORMAT, "tdnn_version": __version__, "weights": WEIGHTS, "class": type(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "parameters": sum(p.numel() for p in model.parameters()),
            "compress_settings": list(getattr(plan, "settings", []))}
    (directory / CONFIG).write_text(json.dumps(info, indent=2) + "\n")


def from_pretrained(directory: str | os.PathLike[str], *, model_class: type[nn.Module] | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, from the directory alone.

    The model is built on the meta device from its config (no dense weights are ever allocated),
    the factorized structure is rebuilt from the plan and the stored tensors are loaded into it:
    outputs are bit-identical to the saved model's, tied weights are tied, and the parameter count
    is the compressed one. Nothing the files name is imported: the class is the transformers model
    class ``tdnn_config.json`` names, if it is one of transformers' classes for the config's
    ``model_type``; the weights file must lie in the directory.

    Args:
        directory: written by :func:`save_pretrained`.
        model_class: the ``transformers`` model class to build (default: the one saved).
        device: where to put the loaded model (default: the CPU).

    Raises:
        FileNotFoundError: if the directory lacks ``tdnn_config.json`` or the weights.
        TypeError: if ``model_class`` is not a class.
        ValueError: naming the file, if the files are not tdnn's, are damaged, name a class that is
            not a transformers model for the config, or the plan does not fit the model class.
    """
    directory = Path(directory)
    info = _info(directory / CONFIG)
    weights = _weights(directory, info)
    config = _config(directory)
    cls = _checked_class(model_class, directory) if model_class is not None else _class(directory, info, config)
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as err:  # transformers raises many kinds on a value it cannot use
        raise ValueError(f"{directory / 'config.json'}: a {type(config).__name__} cannot build {cls.__name__} "
                         f"({type(err).__name__}: {err}); pass the model_class the directory was saved from") from None
    model = load(weights, model, assign=True)
    if (directory / "generation_config.json").exists() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.to(device or "cpu").eval()


def _info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({type(err).__name__}); not written by tdnn.save_pretrained") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: not written by tdnn.save_pretrained")
    return info


def _weights(directory: Path, info: dict[str, Any]) -> Path:
    """The weights file ``tdnn_config.json`` names: a file name inside ``directory``, nothing else."""
    name = info.get("weights")
    where = directory / CONFIG
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'weights' must name the weights file, got {str(name)[:60]!r}")
    path = directory / name
    if Path(name).name != name or name in (".", "..") or path.resolve().parent != directory.resolve():
        raise ValueError(f"{where}: 'weights' must be a file name inside the directory, got {name[:60]!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the weights file {where} names does not exist")
    return path


def _config(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)  # trust_remote_code stays False: no code from the directory
    except Exception as err:  # transformers raises many kinds on a value it cannot use
        raise ValueError(f"{directory / 'config.json'}: not a transformers config this installation reads "
                         f"({type(err).__name__}: {str(err)[:200]})") from None


def _known_classes(model_type: str) -> set[str]:
    """transformers' model class names for ``model_type``, from its own auto-model mappings."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.endswith("_MAPPING_NAMES") and attr.startswith("MODEL"):
            found = getattr(modeling_auto, attr).get(model_type)
            names |= set(found) if isinstance(found, (list, tuple)) else {found} if found else set()
    return names


def _class(directory: Path, info: dict[str, Any], config: Any) -> type[nn.Module]:
    import transformers

    name = info.get("class")
    known = _known_classes(getattr(config, "model_type", None) or "")
    if not isinstance(name, str) or name not in known:
        raise ValueError(f"{directory / CONFIG}: 'class' names {str(name)[:60]!r}, not one of transformers' model "
                         f"classes for model_type {getattr(config, 'model_type', None)!r}; pass model_class=")
    return _checked_class(getattr(transformers, name), directory)


def _checked_class(cls: Any, directory: Path) -> type[nn.Module]:
    from transformers import PreTrainedModel

    if not isinstance(cls, type):
        raise TypeError(f"model_class must be a class (a transformers model), got {type(cls).__name__} {cls!r:.60}")
    if not issubclass(cls, nn.Module) or not issubclass(cls, PreTrainedModel):
        raise ValueError(f"{directory}: {cls.__name__} is not a transformers model class (a PreTrainedModel)")
    return cls
