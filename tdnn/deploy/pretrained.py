"""A Hugging Face round trip: a compressed ``transformers`` model saved to a directory and rebuilt
from it alone, at its compressed size (as peft does for adapters).

The directory holds the model's ``config.json`` (and ``generation_config.json``), the weights with
the compression plan in one safetensors file, ``tdnn_model.safetensors`` (written by
:func:`tdnn.save`), and ``tdnn_config.json`` naming the model class. The weights file is not called
``model.safetensors`` on purpose: ``transformers`` alone would load it into a dense model and leave
the factorized layers' weights random; it should fail loudly instead.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdnn.core.files import write_atomic
from tdnn.deploy.io import load, save
from tdnn.version import __version__

WEIGHTS = "tdnn_model.safetensors"
CONFIG = "tdnn_config.json"
FORMAT = "tdnn-pretrained"


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Write a compressed Hugging Face model to ``directory`` for :func:`from_pretrained`.

    Args:
        model: a ``transformers`` model (with ``.config``), compressed or not.
        directory: created if needed; existing files of the same names are replaced.

    Raises:
        TypeError: if ``model`` has no Hugging Face ``config``.

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
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    save(model, directory / WEIGHTS)
    info = {"format": FORMAT, "tdnn_version": __version__, "weights": WEIGHTS,
            "class": type(model).__qualname__, "module": type(model).__module__,
            "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
            "parameters": sum(p.numel() for p in model.parameters())}
    text = json.dumps(info, indent=2) + "\n"
    write_atomic(directory / CONFIG, lambda tmp: Path(tmp).write_text(text))


def from_pretrained(directory: str | os.PathLike[str], *, model_class: type[nn.Module] | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, from the directory alone.

    The model is built on the meta device from its config (no dense weights are ever allocated),
    the factorized structure is rebuilt from the plan and the stored tensors are loaded into it:
    outputs are bit-identical to the saved model's, tied weights are tied, and the parameter count
    is the compressed one.

    Args:
        directory: written by :func:`save_pretrained`.
        model_class: the ``transformers`` class to build (default: the one saved).
        device: where to put the loaded model (default: the CPU).

    Raises:
        FileNotFoundError: if the directory lacks ``tdnn_config.json`` or the weights.
        ValueError: if the files are not tdnn's, or the plan does not fit the model class.
    """
    from transformers import AutoConfig

    directory = Path(directory)
    info = json.loads((directory / CONFIG).read_text())
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG}: not written by tdnn.save_pretrained")
    cls = model_class or _class(info)
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = cls(config)
    model = load(directory / info["weights"], model, assign=True)
    if (directory / "generation_config.json").exists() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.to(device or "cpu").eval()


def _class(info: dict[str, Any]) -> type[nn.Module]:
    try:
        return getattr(importlib.import_module(info["module"]), info["class"])
    except (ImportError, AttributeError, KeyError) as err:
        raise ValueError(f"cannot find the model class {info.get('module')}.{info.get('class')} ({err}); "
                         f"pass model_class=") from None
