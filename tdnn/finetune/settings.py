"""``FinetuneSettings``: the settings of a fine-tuning run, checked when they are made (by
:func:`tdnn.finetune`, a YAML config or the command line) and compared when a run resumes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from tdnn.core.checks import count, number

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
TRAINABLE = ("all", "factorized")
PARALLEL = ("ddp", "fsdp")
WARMUP = 0.1  # the default linear warm-up: this fraction of the run's steps
# Settings that only take Python objects (optimizer and scheduler also take names).
NOT_IN_YAML = frozenset({"loss_fn"})


def _set(settings: Any, name: str, value: Any) -> None:
    object.__setattr__(settings, name, value)  # frozen: a checked value made plain, once, here


@dataclass(frozen=True)
class FinetuneSettings:
    """How :func:`tdnn.finetune` trains; every value is checked here (see that function for each
    argument's meaning).

    Example:
        >>> from tdnn.finetune import FinetuneSettings
        >>> FinetuneSettings(epochs=2, lr=1e-3, optimizer="adamw").optimizer
        'adamw'
        >>> FinetuneSettings(optimizer="adam")
        Traceback (most recent call last):
        ...
        ValueError: optimizer='adam': choose one of sgd, adamw or pass a callable params -> torch.optim.Optimizer
    """

    epochs: int = 1
    max_steps: int | None = None
    lr: float | None = None
    optimizer: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str | Callable[[torch.optim.Optimizer, int], Any] = "cosine"
    warmup_steps: int | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    temperature: float = 4.0
    alpha: float | None = None
    max_grad_norm: float | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    amp: bool | None = None
    keep_best: str | None = "auto"
    holdout: int | None = None
    freeze_batchnorm: bool | None = None
    dropout: bool | None = None
    trainable: str = "all"
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        _set(self, "epochs", count("epochs", self.epochs))
        for name in ("max_steps", "checkpoint_every"):
            if getattr(self, name) is not None:
                _set(self, name, count(name, getattr(self, name)))
        if self.warmup_steps is not None:
            _set(self, "warmup_steps", count("warmup_steps", self.warmup_steps, zero=True))
        _set(self, "seed", count("seed", self.seed, zero=True))
        if self.lr is not None:
            _set(self, "lr", number("lr", self.lr, low=0, open_low=True))
        if self.keep_best not in (None, "auto", "max", "min"):
            raise ValueError(f"keep_best={self.keep_best!r}: choose 'auto' (by the loss on held-out batches), 'max' "
                             f"or 'min' (by eval_fn: an accuracy, a loss) or None (the last weights)")
        if self.holdout is not None:
            _set(self, "holdout", count("holdout", self.holdout, zero=True))
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}: choose one of {', '.join(TRAINABLE)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r}: choose 'ddp' (a replica per process) or 'fsdp' "
                             f"(each process holds a shard of the model)")
        for name in ("freeze_batchnorm", "dropout", "amp"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true, false or null, got {getattr(self, name)!r}")
        _set(self, "momentum", number("momentum", self.momentum, low=0, high=1))
        _set(self, "weight_decay", number("weight_decay", self.weight_decay, low=0))
        _set(self, "temperature", number("temperature", self.temperature, low=0, open_low=True))
        if self.alpha is not None:
            _set(self, "alpha", number("alpha", self.alpha, low=0, high=1))
        if self.max_grad_norm is not None:
            _set(self, "max_grad_norm", number("max_grad_norm", self.max_grad_norm, low=0, open_low=True))
        if not callable(self.optimizer) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)} or pass a "
                             f"callable params -> torch.optim.Optimizer")
        if not callable(self.scheduler) and self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}: choose one of {', '.join(SCHEDULERS)} or pass a "
                             f"callable (optimizer, total_steps) -> scheduler")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable (output, labels) -> loss, got {type(self.loss_fn).__name__}")

    def resolved(self, *, teacher: bool) -> FinetuneSettings:
        """The settings with the defaults that depend on the run filled in: distilling from a
        teacher starts close to the goal, so small steps (lr 1e-3 instead of 1e-2), frozen
        BatchNorm statistics and no dropout (the student matches the teacher's eval-mode outputs)."""
        return replace(self, lr=self.lr if self.lr is not None else (1e-3 if teacher else 1e-2),
                       freeze_batchnorm=teacher if self.freeze_batchnorm is None else self.freeze_batchnorm,
                       dropout=not teacher if self.dropout is None else self.dropout)

    def held_out_batches(self, data: Any) -> int:
        """How many batches of ``data`` to hold out: ``holdout`` if given; else, for ``keep_best="auto"``,
        one per 8 batches (1 to 4; none below 4 batches; 2 for data without a length)."""
        if self.holdout is not None:
            return self.holdout
        if self.keep_best != "auto":
            return 0
        try:
            n = len(data)
        except TypeError:
            return 2
        return 0 if n < 4 else min(4, max(1, n // 8))

    def describe(self) -> dict[str, Any]:
        """A comparable record of the settings (callables by qualified name), kept in checkpoints."""
        return {key: _describe(value) for key, value in asdict(self).items()}

    def optimizer_for(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if callable(self.optimizer):
            return self.optimizer(params)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def scheduler_for(self, opt: torch.optim.Optimizer, total: int) -> Any:
        """The learning-rate schedule over ``total`` steps: linear warm-up (``warmup_steps``, by default
        a tenth of the run), then cosine to zero or constant."""
        if callable(self.scheduler):
            return self.scheduler(opt, total)
        constant = self.scheduler == "constant"
        warmup = self.warmup_steps if self.warmup_steps is not None else int(WARMUP * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if constant:
                return 1.0
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _describe(value: Any) -> Any:
    """A comparable stand-in for a setting (callables by qualified name)."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return value
