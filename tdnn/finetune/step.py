"""One training step: the distillation and label losses, AMP, clipping, the optimizer and the schedule."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdnn.core.batches import batch_size, call, map_tensors, split_labels
from tdnn.finetune.settings import FinetuneSettings


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 4.0, reduction: str = "mean",
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al., 2015).

    The ``T²`` factor keeps gradient magnitudes comparable across temperatures, so the loss can
    be mixed with a cross-entropy term without retuning the weight.

    Args:
        student_logits: ``(N, classes)`` (or ``(N, ..., classes)``) logits being trained.
        teacher_logits: logits of the same shape from the reference model.
        temperature: softening temperature ``T > 0``.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (one value per sample).
        mask: ``(N, tokens)`` of the positions to count (a transformer batch's ``attention_mask``:
            padding is left out), for logits of shape ``(N, tokens, classes)``.

    Returns:
        The loss, reduced as asked.

    Example:
        >>> import torch
        >>> from tdnn.finetune import distillation_loss
        >>> t = torch.randn(4, 10)
        >>> distillation_loss(t, t).item() == 0.0
        True
        >>> bool(distillation_loss(torch.zeros(4, 10), t) > 0)
        True
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
    per_row = F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * temperature ** 2
    if mask is not None:
        if tuple(mask.shape) != tuple(student_logits.shape[:-1]):
            raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
        per_row = per_row * mask.reshape(-1).to(per_row.dtype)
    per_sample = per_row.reshape(student_logits.shape[0], -1).sum(-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}: choose 'mean', 'sum' or 'none'")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: a tensor, ``.logits``, ``["logits"]`` or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    f"return a tensor, a tuple starting with the logits, or an object with .logits")


class TrainStep:
    """One optimizer step on one batch: the loss ``alpha · KD + (1 − alpha) · CE`` (or the user's
    ``loss_fn``), AMP scaling, gradient clipping, the optimizer and the scheduler."""

    def __init__(self, net: nn.Module, teacher: nn.Module | None, settings: FinetuneSettings, *,
                 device: torch.device, amp: bool, world: int, total: int) -> None:
        self.net, self.teacher, self.settings = net, teacher, settings
        self.device, self.amp, self.world = device, amp, world
        inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
        # a Hugging Face model computes its own label loss (shifted for a causal LM, -100 ignored)
        self.model_takes_labels = "labels" in inspect.signature(inner.forward).parameters
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(net).__name__} has no trainable parameters")
        self.opt = settings.optimizer_for(self.params)
        self.sched = settings.scheduler_for(self.opt, total)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        if settings.alpha is not None:
            self.alpha_labelled = self.alpha_unlabelled = settings.alpha
        else:  # distill only from a teacher: half and half with labels, all of it without
            self.alpha_labelled, self.alpha_unlabelled = (0.5, 1.0) if teacher is not None else (0.0, 0.0)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's and the AMP scaler's state (the optimizer's depends on how the model is
        held: :mod:`tdnn.finetune.parallel`)."""
        return {"scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def loss(self, inputs: Any, labels: Any) -> torch.Tensor:
        a = self.alpha_labelled if labels is not None else self.alpha_unlabelled
        if labels is None and a < 1.0:
            raise ValueError("a batch has no labels: give a teacher for label-free distillation, "
                             "or data of (inputs, labels)")
        output, label_loss = self._forward(self.net, inputs, labels if a < 1.0 else None)
        loss = torch.zeros((), device=self.device)
        if a < 1.0:
            loss = loss + (1.0 - a) * label_loss
        if a > 0.0:
            loss = loss + a * self._distillation(output, inputs, self.settings.temperature)
        return loss

    def _forward(self, net: nn.Module, inputs: Any, labels: Any) -> tuple[Any, torch.Tensor | None]:
        """``net``'s output on ``inputs`` and, with ``labels``, the label loss: the model's own
        (a Hugging Face model given ``labels``), ``loss_fn`` or the cross-entropy."""
        own = labels is not None and self.settings.loss_fn is None and isinstance(inputs, Mapping) \
            and self.model_takes_labels
        output = call(net, {**inputs, "labels": labels} if own else inputs)
        if labels is None:
            return output, None
        if own:
            return output, output.loss
        if self.settings.loss_fn is not None:
            return output, self.settings.loss_fn(output, labels)
        return output, F.cross_entropy(logits_of(output).float(), labels)

    def _distillation(self, output: Any, inputs: Any, temperature: float) -> torch.Tensor:
        """The distillation loss of ``output`` against the teacher on ``inputs`` (padding left out)."""
        with torch.no_grad():
            target = logits_of(call(self.teacher, inputs))
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == target.dim() - 1 else None
        return distillation_loss(logits_of(output), target, temperature=temperature, mask=mask)

    @torch.no_grad()
    def held_out(self, net: nn.Module, batch: Any) -> tuple[float, int]:
        """What a held-out batch says of ``net``, as ``(sum, count)``: with a teacher the KL to it at
        T=1 summed over samples, else the label loss summed over samples."""
        inputs, labels = split_labels(batch)
        inputs = map_tensors(inputs, lambda t: t.to(self.device))
        labels = map_tensors(labels, lambda t: t.to(self.device))
        n = batch_size(inputs)
        if self.teacher is not None:
            output, _ = self._forward(net, inputs, None)
            return float(self._distillation(output, inputs, 1.0)) * n, n
        if labels is None:
            raise ValueError("a held-out batch has no labels: give a teacher, or data of (inputs, labels)")
        return float(self._forward(net, inputs, labels)[1]) * n, n

    def __call__(self, batch: Any, global_n: int) -> float:
        """Train on this process's share of a global batch of ``global_n`` samples; the loss value."""
        inputs, labels = split_labels(batch)
        inputs = map_tensors(inputs, lambda t: t.to(self.device, non_blocking=True))
        labels = map_tensors(labels, lambda t: t.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self.loss(inputs, labels)
        value = loss.item()
        if not math.isfinite(value) and not self.amp:  # before any step: the weights stay finite
            raise FloatingPointError(f"loss is {value}; try a lower lr than {self.settings.lr} or max_grad_norm")
        # The mean over this process's share, rescaled so that DDP's average over processes is the
        # mean over the global batch even when the shares differ in size.
        scaled = loss * (batch_size(inputs) * self.world / global_n)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(scaled).backward()
        if self.settings.max_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return value
