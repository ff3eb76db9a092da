"""``finetune``: win back accuracy after compression, from labels or by distillation from the original.

The loop is deliberately plain (one optimizer step per batch) but complete: a tqdm bar, an
evaluation callback per epoch, AMP on CUDA, atomic checkpoints with exact resume, and
DistributedDataParallel when launched by ``torchrun``.

Batch sizes are *global*: under ``torchrun`` each of the ``W`` processes takes ``1/W`` of every
batch, so the same call gives the same optimisation (up to float rounding) on any number of
processes. Exact resume and DDP sharding need to know the data order, so a ``DataLoader`` over a
map-style dataset with a plain sampler is re-created per epoch with a sampler driven by ``seed``
and the epoch number (shuffled when the original loader shuffled).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from tdnn.batches import call, map_tensors

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = "tdnn.finetune/1"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")
EvalFn = Callable[[nn.Module], Any]


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did.

    Attributes:
        steps: optimizer steps taken in total (including those before a resume).
        epochs: epochs completed.
        losses: this process's mean training loss of every step.
        evals: what ``eval_fn`` returned after each completed epoch.
        resumed_from: the step the run resumed from, ``None`` for a fresh run.
    """

    steps: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[Any] = field(default_factory=list)
    resumed_from: int | None = None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                      temperature: float = 4.0, reduction: str = "mean") -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` (Hinton et al., 2015).

    The ``T²`` factor keeps gradient magnitudes comparable across temperatures, so the loss can
    be mixed with a cross-entropy term without retuning the weight.

    Args:
        student_logits: ``(N, classes)`` (or ``(N, ..., classes)``) logits being trained.
        teacher_logits: logits of the same shape from the reference model.
        temperature: softening temperature ``T > 0``.
        reduction: ``"mean"`` (over samples), ``"sum"`` or ``"none"`` (one value per sample).

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
    per_sample = per_row.reshape(student_logits.shape[0], -1).sum(-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction={reduction!r}: choose 'mean', 'sum' or 'none'")


# --------------------------------------------------------------------------- batches


def _split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one batch; labels are ``None`` for an inputs-only batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.pop("labels", None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(f"a batch must be inputs or (inputs, labels), got a {type(batch).__name__} "
                         f"of {len(batch)} items; use a dict for several model arguments")
    raise TypeError(f"a batch must be a tensor, (inputs, labels) or a dict, got {type(batch).__name__}")


def _size(obj: Any) -> int:
    """The batch dimension: the length of the first tensor found."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else 1
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        size = _size(value)
        if size:
            return size
    return 0


def _logits(output: Any) -> torch.Tensor:
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


class _EpochBatchSampler(Sampler[list[int]]):
    """This process's share of each global batch of one epoch, from global batch ``start`` on.

    Global batch ``j`` holds positions ``j·B … (j+1)·B − 1`` of a permutation fixed by
    ``(seed, epoch)``; process ``r`` of ``W`` takes every ``W``-th of them, starting at ``r``.
    """

    def __init__(self, n: int, batch_size: int, *, world: int, rank: int, shuffle: bool,
                 drop_last: bool, seed: int, epoch: int, start: int) -> None:
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, epoch, start
        self.sizes = global_batch_sizes(n, batch_size, drop_last=drop_last, world=world)

    def __len__(self) -> int:
        return len(self.sizes) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        for j in range(self.start, len(self.sizes)):
            lo = j * self.batch_size
            yield order[lo + self.rank: lo + self.sizes[j]: self.world]


def global_batch_sizes(n: int, batch_size: int, *, drop_last: bool, world: int) -> list[int]:
    """Sizes of the global batches of one epoch over ``n`` samples.

    A last partial batch is kept unless ``drop_last``, or unless it has fewer samples than there
    are processes (every process must take part in each step).
    """
    sizes = [batch_size] * (n // batch_size)
    rest = n - len(sizes) * batch_size
    if rest and not drop_last and rest >= world:
        sizes.append(rest)
    return sizes


class _Data:
    """The data as :func:`finetune` reads it: per epoch, from a position, this process's share.

    ``epoch(e, start)`` yields ``(batch, global_batch_size)`` pairs.
    """

    def __init__(self, data: Iterable[Any], *, world: int, rank: int, seed: int) -> None:
        if isinstance(data, Iterator):
            raise TypeError("data must be re-iterable (a DataLoader, a list of batches, ...), not an "
                            "iterator or generator that is used up after one pass")
        self.data, self.world, self.rank, self.seed = data, world, rank, seed
        self.loader = data if self._reshardable(data) else None
        if self.loader is not None:
            self.batch_size = self.loader.batch_size
            if self.batch_size % world:
                raise ValueError(f"batch_size={self.batch_size} (the global batch) must be divisible "
                                 f"by the {world} processes")
            self.sizes = global_batch_sizes(len(self.loader.dataset), self.batch_size,
                                            drop_last=self.loader.drop_last, world=world)

    @staticmethod
    def _reshardable(data: Any) -> bool:
        return (isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
                and data.batch_size is not None
                and type(data.sampler) in (RandomSampler, SequentialSampler)
                and getattr(data.sampler, "replacement", False) is False
                and getattr(data.sampler, "_num_samples", None) is None)

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.sizes)
        return len(self.data)  # TypeError when the data has no length

    def describe(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        if self.loader is not None:
            return {"samples": len(self.loader.dataset), "batch_size": self.batch_size,
                    "shuffle": isinstance(self.loader.sampler, RandomSampler)}
        try:
            return {"batches": len(self.data)}
        except TypeError:
            return {}

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[Any, int]]:
        if self.loader is not None:
            yield from self._loader_epoch(epoch, start)
            return
        # Generic iterable: replay up to the start position, split each batch across processes.
        for j, batch in enumerate(self.data):
            if j < start:
                continue
            size = _size(_split(batch)[0])
            if size < self.world:
                continue
            yield map_tensors(batch, lambda t: t[self.rank::self.world] if t.dim() else t), size

    def _loader_epoch(self, epoch: int, start: int) -> Iterator[tuple[Any, int]]:
        src = self.loader
        sampler = _EpochBatchSampler(len(src.dataset), self.batch_size, world=self.world,
                                     rank=self.rank, shuffle=isinstance(src.sampler, RandomSampler),
                                     drop_last=src.drop_last, seed=self.seed, epoch=epoch, start=start)
        extra: dict[str, Any] = {}
        if src.num_workers:
            extra = {"prefetch_factor": src.prefetch_factor,
                     "persistent_workers": False, "multiprocessing_context": src.multiprocessing_context}
        # A generator seeded by (seed, epoch, rank) fixes the worker seeds without drawing from the
        # global RNG, which exact resume restores separately.
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + self.rank)
        loader = DataLoader(src.dataset, batch_sampler=sampler, num_workers=src.num_workers,
                            collate_fn=src.collate_fn, pin_memory=src.pin_memory, timeout=src.timeout,
                            worker_init_fn=src.worker_init_fn, generator=gen, **extra)
        yield from zip(loader, self.sizes[start:])


# --------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: torch.device, distributed: bool | None) -> _Dist:
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed is None:
        distributed = env_world > 1 or (dist.is_available() and dist.is_initialized()
                                        and dist.get_world_size() > 1)
    if not distributed:
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("distributed=True but torch.distributed is not available in this build")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("distributed=True needs a launcher that sets RANK, WORLD_SIZE, "
                               "MASTER_ADDR and MASTER_PORT, e.g. torchrun --nproc_per_node=2 ...")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), created)


# --------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, seed, *rest = state["python"]
    random.setstate((version, tuple(seed), *rest))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a reader (or a run resumed
    after a kill) sees either the old checkpoint or the new one, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_optimizer(optimizer: Any, params: list[nn.Parameter], *, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(params)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)} or pass a "
                     f"callable params -> torch.optim.Optimizer")


def _make_scheduler(scheduler: Any, opt: torch.optim.Optimizer, *, total: int,
                    warmup_steps: int) -> Any:
    if callable(scheduler):
        return scheduler(opt, total)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)} or pass a "
                         f"callable (optimizer, total_steps) -> scheduler")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _describe(value: Any) -> Any:
    """A comparable stand-in for a setting (callables by qualified name)."""
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return value


# --------------------------------------------------------------------------- the loop


def finetune(model: nn.Module, data: Iterable[Any], *, teacher: nn.Module | None = None,
             epochs: int = 1, max_steps: int | None = None, lr: float = 0.01,
             optimizer: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = "sgd",
             momentum: float = 0.9, weight_decay: float = 0.0,
             scheduler: str | Callable[[torch.optim.Optimizer, int], Any] = "cosine",
             warmup_steps: int = 0, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
             temperature: float = 4.0, alpha: float | None = None, max_grad_norm: float | None = None,
             eval_fn: EvalFn | None = None, checkpoint_dir: str | os.PathLike[str] | None = None,
             checkpoint_every: int | None = None, resume: bool = True, seed: int = 0,
             device: str | torch.device | None = None, amp: bool | None = None,
             distributed: bool | None = None, progress: bool = True) -> FinetuneResult:
    """Train ``model`` in place on ``data``, from labels, from a teacher, or both.

    The loss of one batch is ``alpha · KD + (1 − alpha) · CE`` where KD is
    :func:`distillation_loss` between ``model`` and ``teacher`` at ``temperature`` and CE is the
    cross-entropy with the labels (or ``loss_fn(output, labels)``). Without labels, distillation
    from the original (uncompressed) model recovers accuracy from unlabelled inputs alone.

    With ``checkpoint_dir``, the full training state (weights, optimizer, scheduler, AMP scaler,
    position in the data, RNG states) is written atomically to ``checkpoint_dir/last.pt`` every
    ``checkpoint_every`` steps, after each epoch and at the end. Calling ``finetune`` again with
    the same arguments continues from there and ends with the same weights as a run that was
    never interrupted (for a ``DataLoader``, batches before the checkpoint are skipped without
    being loaded; random augmentation inside DataLoader worker processes is then not replayed).

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), each process trains a
    ``DistributedDataParallel`` replica on its share of every global batch (gloo on CPU, NCCL on
    CUDA); only rank 0 writes checkpoints and shows progress. BatchNorm statistics are per
    process, as usual with DDP.

    Args:
        model: the model to train (modified in place), e.g. from :func:`tdnn.compress_model`.
        data: a ``DataLoader`` or any re-iterable of batches; a batch is ``inputs``,
            ``(inputs, labels)``, or a dict of model keyword arguments with optional ``"labels"``.
            ``inputs`` may be a tensor, a tuple of arguments or a dict. The batch size is the
            global batch, shared out among processes under ``torchrun``.
        teacher: the reference model for distillation (kept frozen, in eval mode).
        epochs: passes over ``data``.
        max_steps: stop after this many optimizer steps (required when ``data`` has no length).
        lr: learning rate (peak, with a scheduler).
        optimizer: ``"sgd"`` (with ``momentum``), ``"adamw"``, or ``params -> Optimizer``.
        momentum: SGD momentum.
        weight_decay: weight decay for the built-in optimizers.
        scheduler: ``"cosine"`` (to zero at the last step), ``"constant"``, or
            ``(optimizer, total_steps) -> scheduler`` (stepped once per optimizer step).
        warmup_steps: linear warm-up steps for the built-in schedulers.
        loss_fn: ``(model_output, labels) -> scalar`` replacing cross-entropy.
        temperature: distillation temperature.
        alpha: weight of the distillation term; default 1.0 with a teacher and unlabelled data,
            0.5 with a teacher and labels, 0.0 without a teacher.
        max_grad_norm: clip the gradient norm to this value.
        eval_fn: ``model -> value`` called after every epoch with the model in eval mode (on every
            process under ``torchrun``); values are kept in the result and the checkpoint.
        checkpoint_dir: directory for ``last.pt``; enables resume.
        checkpoint_every: also checkpoint every this many steps.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        seed: seed of the data order (shuffling) per epoch.
        device: where to train; default: the device of ``model``'s parameters (under torchrun
            with CUDA available, ``cuda:LOCAL_RANK``).
        amp: mixed precision (float16 autocast and gradient scaling); default on for CUDA.
        distributed: force DDP on or off; default: on when launched with ``WORLD_SIZE`` > 1.
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        A :class:`FinetuneResult` with per-step losses and per-epoch evaluations.

    Raises:
        ValueError: for bad settings, a batch without labels when there is no teacher, or a
            checkpoint written with different settings.
        TypeError: for data that is a one-shot iterator or batches of an unknown form.

    Example:
        >>> import torch, tdnn
        >>> _ = torch.manual_seed(0)
        >>> teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        >>> student = tdnn.compress_model(teacher, ranks=0.25)
        >>> batches = [torch.randn(16, 32) for _ in range(8)]    # unlabelled inputs
        >>> res = tdnn.finetune(student, batches, teacher=teacher, epochs=3, lr=0.05, progress=False)
        >>> res.steps, res.losses[-1] < res.losses[0]
        (24, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("epochs", epochs), ("max_steps", max_steps), ("checkpoint_every", checkpoint_every),
                        ("warmup_steps", warmup_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                  or (value == 0 and name != "warmup_steps")):
            raise ValueError(f"{name}={value!r} must be a positive int")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a positive number")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if alpha is not None and alpha > 0 and teacher is None:
        raise ValueError(f"alpha={alpha} weights a distillation loss, which needs a teacher")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir to write to")

    env_distributed = distributed if distributed is not None else int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device is None:
        if env_distributed and torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    ddp = _setup_distributed(device, distributed)
    batches = _Data(data, world=ddp.world, rank=ddp.rank, seed=seed)
    try:
        per_epoch: int | None = len(batches)
    except TypeError:
        per_epoch = None
    if per_epoch is None and max_steps is None:
        raise ValueError("data has no length: give max_steps")
    if per_epoch == 0:
        raise ValueError("data has no batches")
    total = epochs * per_epoch if per_epoch is not None else max_steps
    total = min(total, max_steps) if max_steps is not None else total

    model.to(device)
    teacher_was_training = teacher is not None and teacher.training
    if teacher is not None:
        teacher.to(device).eval()  # its outputs are computed under no_grad: it is never updated
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    opt = _make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = _make_scheduler(scheduler, opt, total=total, warmup_steps=warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    settings = {"epochs": epochs, "max_steps": max_steps, "lr": lr, "optimizer": _describe(optimizer),
                "momentum": momentum, "weight_decay": weight_decay, "scheduler": _describe(scheduler),
                "warmup_steps": warmup_steps, "loss_fn": _describe(loss_fn), "temperature": temperature,
                "alpha": alpha, "teacher": teacher is not None, "max_grad_norm": max_grad_norm,
                "seed": seed, "amp": amp, **batches.describe()}
    result = FinetuneResult()
    step, epoch, in_epoch = 0, 0, 0
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if path is not None and ddp.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{CHECKPOINT_NAME}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a run killed while writing
    rng_after_resume = None
    if path is not None and resume and path.exists():
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a tdnn.finetune checkpoint")
        changed = {k for k in settings.keys() | state["settings"].keys()
                   if settings.get(k) != state["settings"].get(k)}
        if changed:
            detail = ", ".join(f"{k}: {state['settings'].get(k)!r} -> {settings.get(k)!r}" for k in sorted(changed))
            raise ValueError(f"{path} was written with different settings ({detail}); resume with "
                             f"the same arguments, or use another checkpoint_dir or resume=False")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, in_epoch = state["step"], state["epoch"], state["in_epoch"]
        result = FinetuneResult(step, epoch, list(state["losses"]), list(state["evals"]), step)
        rngs = state["rng"]
        rng_after_resume = rngs[ddp.rank] if ddp.rank < len(rngs) else None

    def save() -> None:
        if path is None:
            return
        rng = _rng_state()
        rngs = [None] * ddp.world
        if ddp.world > 1:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if ddp.main:
            _write_atomic({"format": CHECKPOINT_FORMAT, "settings": settings, "model": model.state_dict(),
                           "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                           "in_epoch": in_epoch, "losses": result.losses, "evals": result.evals,
                           "rng": rngs}, path)

    net: nn.Module = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if alpha is None:
        alpha_label, alpha_nolabel = (0.5, 1.0) if teacher is not None else (0.0, 0.0)
    else:
        alpha_label = alpha_nolabel = alpha

    def train_step(batch: Any, global_n: int) -> float:
        inputs, labels = _split(batch)
        inputs = map_tensors(inputs, lambda t: t.to(device, non_blocking=True))
        labels = map_tensors(labels, lambda t: t.to(device, non_blocking=True))
        a = alpha_label if labels is not None else alpha_nolabel
        if labels is None and a < 1.0:
            raise ValueError("a batch has no labels: give a teacher for label-free distillation, "
                             "or data of (inputs, labels)")
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            output = call(net, inputs)
            loss = torch.zeros((), device=device)
            if a < 1.0:
                label_loss = (loss_fn(output, labels) if loss_fn is not None
                              else F.cross_entropy(_logits(output).float(), labels))
                loss = loss + (1.0 - a) * label_loss
            if a > 0.0:
                with torch.no_grad():
                    target = _logits(call(teacher, inputs))
                loss = loss + a * distillation_loss(_logits(output), target, temperature=temperature)
        # The mean over this process's share, rescaled so that DDP's average over processes is the
        # mean over the global batch even when the shares differ in size.
        scaled = loss * (_size(inputs) * ddp.world / global_n)
        opt.zero_grad(set_to_none=True)
        scaler.scale(scaled).backward()
        if max_grad_norm is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        value = loss.item()
        if not math.isfinite(value) and not amp:
            raise FloatingPointError(f"loss is {value}; try a lower lr than {lr} or max_grad_norm")
        return value

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=not progress or not ddp.main)
    was_training = model.training
    model.train()
    saved_at = step if rng_after_resume is not None else None
    try:
        while step < total and epoch < epochs:
            seen = 0
            for batch, global_n in batches.epoch(epoch, in_epoch):
                if rng_after_resume is not None:
                    # Only now: building the data iterator (and replaying a generic iterable up to
                    # the resume position) may draw from the global RNG.
                    _set_rng_state(rng_after_resume)
                    rng_after_resume = None
                seen += 1
                value = train_step(batch, global_n)
                step, in_epoch = step + 1, in_epoch + 1
                result.losses.append(value)
                result.steps = step
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}")
                if step >= total:
                    finished = per_epoch is not None and in_epoch >= per_epoch
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    save()
                    saved_at = step
            else:
                finished = True
            if rng_after_resume is not None:
                _set_rng_state(rng_after_resume)
                rng_after_resume = None
            if seen == 0 and in_epoch == 0:
                raise ValueError(f"data yielded no batches in epoch {epoch + 1}")
            if not finished:
                break
            epoch, in_epoch = epoch + 1, 0
            result.epochs = epoch
            if eval_fn is not None:
                model.eval()
                evaluation = eval_fn(model)
                model.train()
                result.evals.append(evaluation)
                if ddp.main:
                    bar.write(f"epoch {epoch}: {evaluation}")
            save()
            saved_at = step
        if saved_at != step:
            save()
    finally:
        bar.close()
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_was_training)
        if ddp.created:
            dist.destroy_process_group()
    return result
