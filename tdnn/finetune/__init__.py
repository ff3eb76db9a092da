"""``finetune``: win back accuracy after compression, from labels or by distillation from the original.

The loop is deliberately plain (one optimizer step per batch) but complete: a tqdm bar, an
evaluation callback per epoch, AMP on CUDA, atomic checkpoints with exact resume, and
DistributedDataParallel or FSDP2 when launched by ``torchrun``. Its parts: :class:`FinetuneSettings`
(checked settings), :class:`~tdnn.finetune.data.EpochData` (the data order per epoch and process),
:class:`~tdnn.finetune.step.TrainStep` (one optimizer step),
:class:`~tdnn.finetune.checkpoint.Checkpointer` (``last.pt``) and :mod:`~tdnn.finetune.parallel`
(how processes hold the model: replicas or shards).

Batch sizes are *global*: under ``torchrun`` each of the ``W`` processes takes ``1/W`` of every
batch, so the same call gives the same optimisation (up to float rounding) on any number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tdnn.core import temporary
from tdnn.core.digest import model_digest
from tdnn.finetune import distributed as ddp
from tdnn.finetune.best import Best
from tdnn.finetune.checkpoint import Checkpointer, rng_state, set_rng_state
from tdnn.finetune.data import EpochData, global_batch_sizes
from tdnn.finetune.parallel import holder
from tdnn.finetune.settings import FinetuneSettings
from tdnn.finetune.step import TrainStep, distillation_loss
from tdnn.layers.base import Factorized

EvalFn = Callable[[nn.Module], Any]

__all__ = ["finetune", "FinetuneResult", "FinetuneSettings", "distillation_loss", "global_batch_sizes"]


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did.

    Attributes:
        steps: optimizer steps taken in total (including those before a resume).
        epochs: epochs completed.
        losses: this process's mean training loss of every step.
        evals: what ``eval_fn`` returned after each completed epoch.
        resumed_from: the step the run resumed from, ``None`` for a fresh run.
        best_step: the step whose weights the model ends with (0: those before training), ``None``
            when the last weights are kept without comparing.
        best_eval: the measure of those weights (held-out loss, or ``eval_fn``'s value).
        held_out: the measure on the held-out slice before training and after each epoch (and at
            a step limit), when a slice was held out.
        kept: which weights the model ends with, and why.
    """

    steps: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[Any] = field(default_factory=list)
    resumed_from: int | None = None
    best_step: int | None = None
    best_eval: Any = None
    held_out: list[float] = field(default_factory=list)
    kept: str = ""


def _holdout(settings: FinetuneSettings, data: Iterable[Any], held_out: Iterable[Any] | None) -> int:
    """How many batches of ``data`` to hold out: none when held-out batches are given, or when
    ``data`` cannot be split soundly (:meth:`EpochData.splittable`) and no count was asked for."""
    if held_out is not None:
        return 0
    count = settings.held_out_batches(data)
    if count and not EpochData.splittable(data):
        if settings.holdout:
            raise ValueError(f"holdout={settings.holdout}: batches cannot be held out of this data soundly (its "
                             f"sampler may draw any sample in any epoch); give held_out= batches of your own, or "
                             f"a list of batches or a DataLoader with a plain sampler")
        return 0
    return count


def _drops(module: nn.Module) -> bool:
    """Whether ``module`` drops activations at random in train mode: dropout, and stochastic depth
    (torchvision's ``StochasticDepth``, timm's ``DropPath``)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ in ("StochasticDepth", "DropPath")


class _Run:
    """One fine-tuning run: the model on its device, the data, the step, the checkpoints and the position."""

    def __init__(self, model: nn.Module, data: Iterable[Any], teacher: nn.Module | None, settings: FinetuneSettings,
                 *, eval_fn: EvalFn | None, held_out: Iterable[Any] | None, device: Any, distributed: bool | None,
                 checkpoint_dir: Any, resume: bool) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        settings = settings.resolved(teacher=teacher is not None)
        if settings.alpha is not None and settings.alpha > 0 and teacher is None:
            raise ValueError(f"alpha={settings.alpha} weights a distillation loss, which needs a teacher")
        if settings.checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
        device = torch.device(device or ddp.Launch.from_env().default_device(distributed)
                              or next((p.device for p in model.parameters()), "cpu"))
        amp = device.type == "cuda" if settings.amp is None else settings.amp
        if settings.keep_best in ("max", "min") and eval_fn is None:
            raise ValueError(f"keep_best={settings.keep_best!r} keeps the best weights by eval_fn: give one "
                             f"(or keep_best='auto': by the loss on batches held out of the data)")
        self.group = ddp.join(device, distributed)
        self.data = EpochData(data, world=self.group.world, rank=self.group.rank, seed=settings.seed,
                              holdout=_holdout(settings, data, held_out), held=held_out)
        try:
            self.per_epoch: int | None = len(self.data)
        except TypeError:
            self.per_epoch = None
        if self.per_epoch is None and settings.max_steps is None:
            raise ValueError("data has no length: give max_steps")
        if self.per_epoch == 0:
            raise ValueError("data has no batches")
        total = settings.epochs * self.per_epoch if self.per_epoch is not None else settings.max_steps
        self.total = min(total, settings.max_steps or total)
        self.model, self.teacher, self.settings, self.device = model, teacher, settings, device
        # trainable="factorized": everything else frozen for the run (restored at the end)
        factors = {id(p) for m in model.modules() if isinstance(m, Factorized) for p in m.parameters()}
        self.frozen = [p for p in model.parameters()
                       if settings.trainable == "factorized" and p.requires_grad and id(p) not in factors]
        for p in self.frozen:
            p.requires_grad_(False)
        self.held = holder(model, self.group, device, settings.parallel)
        self.step = TrainStep(self.held.net, self.held.teacher(teacher, device) if teacher is not None else None,
                              settings, device=device, amp=amp, world=self.group.world, total=self.total)
        self.record = {**settings.describe(), "amp": amp, "teacher": teacher is not None, **self.data.describe()}
        if checkpoint_dir is not None:  # what a resume must find again (before any weight changes)
            self.record |= {"start_weights": model_digest(model), "data": self.data.fingerprint()}
        self.checkpoints = Checkpointer(checkpoint_dir, self.group)
        self.result, self.in_epoch, self.saved_at = FinetuneResult(), 0, None
        self.eval_fn, self.by_eval = eval_fn, settings.keep_best in ("max", "min")
        self.best = self._best(settings, teacher is not None)
        self.rng_at = {"epoch": None, "step": None}  # states to restore on resume, see epoch()
        self.epoch_rng: dict[str, Any] | None = None  # the RNG state at the current epoch's start
        if resume:
            self._resume()
        else:
            self.checkpoints.refuse_foreign(device)

    def _resume(self) -> None:
        state = self.checkpoints.read(self.record, total=self.total, epochs=self.settings.epochs,
                                      per_epoch=self.per_epoch, device=self.held.load_device)
        if state is None:
            return
        try:
            self.held.load_model_state(state["model"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"{self.checkpoints.path}: its weights do not fit this model ({str(err)[:300]}); "
                             f"resume with the same model, or pass resume=False to start afresh") from None
        self.held.load_optimizer_state(self.step.opt, state["optimizer"])
        self.step.load_state_dict(state)
        self.result = FinetuneResult(state["step"], state["epoch"], list(state["losses"]), list(state["evals"]),
                                     resumed_from=state["step"], held_out=list(state.get("held_out", [])))
        self.in_epoch, self.saved_at = state["in_epoch"], state["step"]
        self.best.load_state_dict(state.get("best"))
        rank = self.group.rank
        self.rng_at = {"epoch": state["epoch_rng"][rank], "step": state["rng"][rank]}

    def save(self) -> None:
        r = self.result
        self.checkpoints.write({"settings": self.record, "model": self.held.model_state(),
                                "optimizer": self.held.optimizer_state(self.step.opt), **self.step.state_dict(),
                                "step": r.steps, "epoch": r.epochs, "in_epoch": self.in_epoch,
                                "losses": r.losses, "evals": r.evals, "held_out": r.held_out, "best": self.best.state_dict()},
                               self.epoch_rng)
        self.saved_at = r.steps

    def _resumed(self) -> None:
        """Once the data iterator of the resumed epoch stands where the checkpoint was: the RNG as it was then."""
        if self.rng_at["step"] is not None:
            set_rng_state(self.rng_at["step"])
        self.rng_at = {"epoch": None, "step": None}

    def epoch(self, bar: tqdm) -> bool:
        """Train the rest of the current epoch (up to the step limit); whether it was completed."""
        # The data order may be drawn from the global RNG when the iterator is made: on resume,
        # make it from the state saved at this epoch's start (then restore the state at the step).
        self.epoch_rng = self.rng_at["epoch"] or rng_state()
        set_rng_state(self.epoch_rng)
        r, every, seen = self.result, self.settings.checkpoint_every, 0
        for batch, global_n in self.data.epoch(r.epochs, self.in_epoch):
            self._resumed()
            seen += 1
            r.losses.append(self.step(batch, global_n))
            r.steps, self.in_epoch = r.steps + 1, self.in_epoch + 1
            bar.update(1)
            bar.set_postfix(epoch=r.epochs + 1, loss=f"{r.losses[-1]:.4f}")
            if r.steps >= self.total:
                return self.per_epoch is not None and self.in_epoch >= self.per_epoch
            if every and r.steps % every == 0:
                self.save()
        self._resumed()
        if seen == 0 and self.in_epoch == 0:
            raise ValueError(f"data yielded no batches in epoch {r.epochs + 1}")
        return True

    def _best(self, settings: FinetuneSettings, teacher: bool) -> Best:
        """What the run keeps the best weights by: ``eval_fn`` (``keep_best="max"|"min"``), else the
        loss on the held-out slice (``"auto"``, when one could be held out), else nothing."""
        if self.by_eval:
            return Best("eval_fn value", settings.keep_best, self.group, self.held)
        measure = "held-out KL to the teacher at T=1" if teacher else "held-out label loss"
        return Best(measure, "min" if settings.keep_best == "auto" and self.data.held else None, self.group, self.held)

    def measure(self, step: int, *, epoch_end: bool) -> None:
        """Evaluate at ``step``: ``eval_fn`` (after an epoch, or when it is the measure) and the
        held-out loss; the best weights noted."""
        r = self.result
        evaluated = self.eval_fn is not None and (epoch_end or self.by_eval)
        value = self._evaluate(self.eval_fn) if evaluated else None
        if evaluated and epoch_end:
            r.evals.append(value)
            if self.group.main:
                self.bar.write(f"epoch {r.epochs}: {value}")
        if self.data.held:
            r.held_out.append(self._held_out_loss())
            value = value if self.by_eval else r.held_out[-1]
        if value is not None and self.best.step != step:
            self.best.consider(value, step)

    def loop(self, progress: bool) -> FinetuneResult:
        r, finished = self.result, False
        self.bar = tqdm(total=self.total, initial=r.steps, desc="finetune", unit="step", dynamic_ncols=True,
                        disable=not progress or not self.group.main)
        try:
            # the teacher's outputs are computed under no_grad: it is never updated
            with temporary.modes({self.model: True, self.teacher: False, self.step.teacher: False}):
                self._train_mode()
                if r.steps == 0:
                    self.measure(0, epoch_end=False)  # the weights before training compete too
                self._train()
            self._end()
            finished = True
        except BaseException:
            if self.held.restores_locally:  # whatever went wrong, the best weights so far are the model's
                self.best.restore()
            raise
        finally:
            self.bar.close()
            for p in self.frozen:
                p.requires_grad_(True)
            self.checkpoints.close()
            self._release(finished)
        return r

    def _release(self, finished: bool) -> None:
        """Drop what holds the process group (DDP/FSDP wrappers, the teacher's shards, the
        optimizer), then end the group (see :meth:`Group.close`)."""
        self.held = self.step = self.best = None  # type: ignore[assignment]
        self.group.close(wait=finished)

    def _train(self) -> None:
        r = self.result
        while r.steps < self.total and r.epochs < self.settings.epochs:
            if not self.epoch(self.bar):
                self.measure(r.steps, epoch_end=False)  # stopped inside an epoch (max_steps): it competes
                break
            r.epochs, self.in_epoch = r.epochs + 1, 0
            self.measure(r.steps, epoch_end=True)
            self.epoch_rng = rng_state()  # the next epoch starts here
            self.save()
        if self.saved_at != r.steps:
            self.save()

    def _end(self) -> None:
        r = self.result
        if self.best.restore():
            r.best_step, r.best_eval = self.best.step, self.best.value
        r.kept = self.best.verdict(r.steps)
        self.held.finish()

    def _train_mode(self) -> None:
        """Train mode, with BatchNorm statistics frozen and dropout off (eval mode) if asked."""
        self.held.module.train()
        for module in self.held.module.modules():
            if (self.settings.freeze_batchnorm and isinstance(module, nn.modules.batchnorm._BatchNorm)) \
                    or (not self.settings.dropout and _drops(module)):
                module.eval()

    def _evaluate(self, eval_fn: EvalFn) -> Any:
        self.held.module.eval()
        try:
            return eval_fn(self.held.module)
        finally:
            self._train_mode()

    def _held_out_loss(self) -> float:
        """The mean measure (:meth:`TrainStep.held_out`) on the held-out slice, in eval mode."""
        self.held.module.eval()
        try:
            parts = [self.step.held_out(self.held.module, batch) for batch in self.data.held]
        finally:
            self._train_mode()
        return sum(s for s, _ in parts) / max(1, sum(n for _, n in parts))


def finetune(model: nn.Module, data: Iterable[Any], settings: FinetuneSettings | None = None, *,
             teacher: nn.Module | None = None, eval_fn: EvalFn | None = None, held_out: Iterable[Any] | None = None,
             checkpoint_dir: str | os.PathLike[str] | None = None, resume: bool = True,
             device: str | torch.device | None = None, distributed: bool | None = None,
             progress: bool = True, **options: Any) -> FinetuneResult:
    """Train ``model`` in place on ``data``, from labels, from a teacher, or both.

    The loss of one batch is ``alpha · KD + (1 − alpha) · CE`` where KD is
    :func:`distillation_loss` between ``model`` and ``teacher`` at ``temperature`` and CE is the
    cross-entropy with the labels (or ``loss_fn(output, labels)``). Without labels, distillation
    from the original (uncompressed) model recovers accuracy from unlabelled inputs alone.

    With ``checkpoint_dir``, the full training state (weights, optimizer, scheduler, AMP scaler,
    position in the data, RNG states) is written atomically to ``checkpoint_dir/last.pt`` every
    ``checkpoint_every`` steps, after each epoch and at the end. Calling ``finetune`` again with
    the same arguments continues from there and ends with the same weights as a run that was
    never interrupted — also for samplers that draw their order from the global RNG, whose state at
    the epoch's start is restored (for a ``DataLoader`` with a plain sampler, batches before the
    checkpoint are skipped without being loaded; random augmentation inside DataLoader worker
    processes is then not replayed).

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains a
    ``DistributedDataParallel`` replica (or, with ``parallel="fsdp"``, an FSDP2 shard) on its share
    of every global batch (gloo on CPU, NCCL on CUDA); only rank 0 writes checkpoints and shows
    progress. BatchNorm statistics are per process, as usual with DDP.

    Args:
        model: the model to train (modified in place), e.g. from :func:`tdnn.compress_model`.
        data: a ``DataLoader`` or any re-iterable of batches; a batch is ``inputs``,
            ``(inputs, labels)``, or a dict of model keyword arguments with optional ``"labels"``.
            ``inputs`` may be a tensor, a tuple of arguments or a dict. The batch size is the
            global batch, shared out among processes under ``torchrun``.
        settings: a :class:`FinetuneSettings`; keyword ``options`` override its fields.
        teacher: the reference model for distillation (kept frozen, in eval mode).
        eval_fn: ``model -> value`` called after every epoch (and before training, with
            ``keep_best="max"|"min"``) with the model in eval mode (on every process under
            ``torchrun``); values are kept in the result and the checkpoint. Evaluate the model it
            is given: with ``parallel="fsdp"`` that is the sharded copy being trained, not ``model``.
        held_out: batches to judge the weights by (``keep_best="auto"``) instead of batches held
            out of ``data``; never trained on.
        checkpoint_dir: directory for ``last.pt``; enables resume. Checked for writing at once.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists; ``False`` starts afresh
            and overwrites it (never a file tdnn did not write).
        device: where to train; default: the device of ``model``'s parameters (under torchrun
            with CUDA available, ``cuda:LOCAL_RANK``).
        distributed: force DDP on or off; default: on when launched with ``WORLD_SIZE`` > 1.
        progress: show a tqdm progress bar (rank 0 only).
        **options: the fields of :class:`FinetuneSettings`:

            - ``epochs`` (1): passes over ``data``; ``max_steps``: stop after this many optimizer
              steps (required when ``data`` has no length);
            - ``lr``: learning rate (peak, with a scheduler), by default 0.01, or 0.001 with a
              teacher (a compressed student starts close to it: small steps); ``optimizer``:
              ``"sgd"`` (with ``momentum``, 0.9), ``"adamw"``, or ``params -> Optimizer``;
              ``weight_decay`` (0);
            - ``scheduler``: ``"cosine"`` (to zero at the last step), ``"constant"``, or
              ``(optimizer, total_steps) -> scheduler``; ``warmup_steps``: linear warm-up, by
              default over the first tenth of the run;
            - ``loss_fn``: ``(model_output, labels) -> scalar`` replacing cross-entropy;
            - ``temperature`` (4.0): distillation temperature; ``alpha``: weight of the
              distillation term, by default 1.0 with a teacher and unlabelled data, 0.5 with a
              teacher and labels, 0.0 without a teacher;
            - ``max_grad_norm``: clip the gradient norm; ``checkpoint_every``: also checkpoint
              every this many steps; ``seed`` (0): the data order per epoch;
            - ``amp``: mixed precision (float16 autocast and gradient scaling); default on for CUDA;
            - ``keep_best`` (``"auto"``): the run ends with the best weights by a measure, the
              weights before training included, so fine-tuning never leaves the model worse by it —
              also when it ends in an error (a NaN loss, an interrupt). ``"auto"`` holds batches
              out of ``data`` (never trained on; ``holdout`` of them, by default one per 8 batches,
              1 to 4, none below 4; only from a list of batches or a DataLoader with a plain
              sampler, or pass ``held_out=``) and keeps the weights with the lowest KL to the
              teacher at T=1 there (without a teacher, the label loss), measured before training,
              after each epoch and at a step limit; ``"max"`` (an accuracy) or ``"min"`` (a loss)
              keep the best by ``eval_fn``; ``None`` keeps the last weights. The result says which
              were kept and why (``kept``);
            - ``freeze_batchnorm``: BatchNorm layers keep their running statistics (eval mode),
              by default when distilling from a teacher;
            - ``dropout``: dropout and stochastic depth (``StochasticDepth``, ``DropPath``) stay
              active while training; by default off when distilling from a teacher (its targets are
              its eval-mode outputs), on otherwise;
            - ``trainable`` (``"all"``): ``"factorized"`` trains only the factors of factorized
              layers;
            - ``parallel`` (``"ddp"``): under ``torchrun``, ``"ddp"`` trains a full replica per
              process; ``"fsdp"`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) shards each
              parameter, its gradient and optimizer state over the processes (the teacher too), for
              models whose replicas do not fit one device. Each block (the longest ``nn.ModuleList``
              of one module type) and the root are sharded (a model without such a list is one
              group, gathered whole for each forward); the model passed in stays a plain
              module and gets the trained weights at the end; checkpoints hold full tensors. One
              process trains the model as it is.

    A batch that is a dict with ``"labels"`` for a model whose ``forward`` takes ``labels`` (a
    Hugging Face model) uses the model's own loss (for a causal LM: next-token cross-entropy, labels
    shifted, ``-100`` ignored); a dict's ``attention_mask`` keeps padding out of distillation.

    Returns:
        A :class:`FinetuneResult` with per-step losses and per-epoch evaluations.

    Raises:
        ValueError: for bad settings, a batch without labels when there is no teacher, an
            unwritable checkpoint directory, or a checkpoint that is unreadable, foreign, written
            with different settings or does not fit this run.
        TypeError: for unknown options, data that is a one-shot iterator or batches of an unknown form.

    Example:
        >>> import torch, tdnn
        >>> _ = torch.manual_seed(0)
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> student = tdnn.compress_model(teacher, ranks=0.25)
        >>> batches = [torch.randn(16, 32) for _ in range(8)]    # unlabelled inputs
        >>> res = tdnn.finetune(student, batches, teacher=teacher, epochs=3, lr=0.05, progress=False)
        >>> res.steps, res.losses[-1] < res.losses[0]   # one batch of the 8 held out, never trained on
        (21, True)
        >>> res.held_out[-1] < res.held_out[0], res.kept.startswith("the weights at step")
        (True, True)
    """
    known = {f.name for f in dataclasses.fields(FinetuneSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"finetune: unknown option {unknown[0]!r}; the settings are {', '.join(sorted(known))}")
    settings = dataclasses.replace(settings or FinetuneSettings(), **options)
    run = _Run(model, data, teacher, settings, eval_fn=eval_fn, held_out=held_out, device=device,
               distributed=distributed, checkpoint_dir=checkpoint_dir, resume=resume)
    return run.loop(progress)
