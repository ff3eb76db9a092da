"""Fine-tuning checkpoints: ``checkpoint_dir/last.pt`` with the whole training state, written
atomically, checked before use, and the RNG states that make a resumed run identical."""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tdnn.core.files import Lock, remove_stale, write_atomic
from tdnn.finetune.distributed import Group

NAME = "last.pt"
LOCK = ".lock"
FORMAT = "tdnn.finetune/1"


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, Python, NumPy, CUDA) as tensors and plain values."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, seed, *rest = state["python"]
    random.setstate((version, tuple(seed), *rest))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}; delete it, use another checkpoint_dir, or pass resume=False "
                      f"(--no-resume) to start afresh")


# What a checkpoint was written for: the model it started from, and the data.
FINGERPRINTS = {"start_weights": "another model (the weights it started from differ)",
                "data": "other data (their number or first batch differ)"}


class Checkpointer:
    """Reads and writes ``directory/last.pt`` for one run (only the main process writes).

    Made before any training, so an unwritable directory fails at once, not after an epoch; the
    main process holds a lock on the directory for the whole run, so a second run on it is refused
    (naming the holder) instead of overwriting or deleting the first one's files.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, group: Group) -> None:
        self.group, self.lock = group, None
        self.path = None if directory is None else Path(directory) / NAME
        if self.path is None or not group.main:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path.parent):
                pass
        except OSError as err:
            raise ValueError(f"checkpoint_dir {self.path.parent} is not writable: {err}") from None
        self.lock = Lock(self.path.parent / LOCK, f"checkpoint_dir {self.path.parent}")
        remove_stale(self.path)  # left by a run killed while writing (the lock says none is writing)

    def close(self) -> None:
        """Let the directory go (the end of the run)."""
        if self.lock is not None:
            self.lock.release()

    def read(self, expected: dict[str, Any], *, total: int, epochs: int, per_epoch: int | None,
             device: torch.device) -> dict[str, Any] | None:
        """The saved state, checked against this run's ``expected`` settings and sizes; ``None``
        when there is no checkpoint yet.

        Raises:
            ValueError: naming the file, for a file that is not a readable tdnn.finetune checkpoint,
                one written with other settings, or one whose position does not fit this run.
        """
        state = self._load(device)
        if state is None:
            return None
        saved = state["settings"]
        for key, what in FINGERPRINTS.items():
            if key in expected and expected[key] != saved.get(key):
                raise _fail(self.path, f"was written for {what} than this run's")
        changed = sorted(k for k in expected.keys() | saved.keys() if expected.get(k) != saved.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {expected.get(k)!r}" for k in changed)
            raise _fail(self.path, f"written with different settings ({detail}); resume with the same arguments")
        step, epoch, in_epoch = state["step"], state["epoch"], state["in_epoch"]
        fits = (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, epoch, in_epoch))
                and step <= total and epoch <= epochs and (per_epoch is None or in_epoch <= per_epoch)
                and isinstance(state["losses"], list) and len(state["losses"]) == step
                and isinstance(state["evals"], list) and len(state["rng"]) == self.group.world)
        if not fits:
            raise _fail(self.path, f"its position (step {step!r}, epoch {epoch!r}, batch {in_epoch!r}) does "
                                   f"not fit this run ({total} steps, {epochs} epochs) or its records disagree")
        return state

    def _load(self, device: torch.device) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as err:  # torch raises many types for a torn or foreign file
            first = (str(err).strip().splitlines() or [""])[0]
            raise _fail(self.path, f"cannot be read as a checkpoint ({type(err).__name__}: {first})") from None
        keys = {"format", "settings", "model", "optimizer", "scheduler", "scaler", "step", "epoch", "in_epoch",
                "losses", "evals", "rng", "epoch_rng"}
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise _fail(self.path, "not a tdnn.finetune checkpoint")
        missing = keys - state.keys()
        if missing:
            raise _fail(self.path, f"incomplete tdnn.finetune checkpoint (no {', '.join(sorted(missing))})")
        return state

    def refuse_foreign(self, device: torch.device) -> None:
        """Before a fresh run (``resume=False``) overwrites ``last.pt``: refuse if tdnn did not write it."""
        if self.path is not None and self.group.main and self.path.exists():
            try:
                self._load(device)
            except ValueError:
                raise ValueError(f"{self.path} exists and is not a tdnn.finetune checkpoint; refusing to "
                                 f"overwrite it (move it away or use another checkpoint_dir)") from None

    def write(self, state: dict[str, Any], epoch_rng: dict[str, Any]) -> None:
        """Save ``state`` with every process's RNG states (now, and at the start of this epoch)."""
        if self.path is None:
            return
        rngs, epoch_rngs = self._gather(rng_state()), self._gather(epoch_rng)
        if self.group.main:
            full = {"format": FORMAT, **state, "rng": rngs, "epoch_rng": epoch_rngs}
            write_atomic(self.path, lambda tmp: torch.save(full, tmp))

    def _gather(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Every process's ``state``, in rank order. Sent as ``torch.save`` bytes: gloo's
        ``all_gather_object`` cannot unpickle the tensors inside an RNG state."""
        if self.group.world == 1:
            return [state]
        sent = io.BytesIO()
        torch.save(state, sent)
        received: list[Any] = [None] * self.group.world
        dist.all_gather_object(received, sent.getvalue())
        return [torch.load(io.BytesIO(data), weights_only=True) for data in received]
