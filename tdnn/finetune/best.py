"""The best weights of a fine-tuning run by one measure — the weights before training included —
kept so that the run ends with them, also when it ends in an error."""

from __future__ import annotations

from typing import Any

import torch

from tdnn.core.checks import plain_number
from tdnn.finetune.distributed import Group
from tdnn.finetune.parallel import Replicas


class Best:
    """The best weights so far by ``measure`` (``direction`` ``"max"`` or ``"min"``).

    Args:
        measure: what is compared, for messages ("the held-out KL to the teacher at T=1", "eval_fn").
        direction: ``"max"``, ``"min"``, or ``None`` to keep nothing (the last weights win).
        group: the process group (under torchrun every process keeps rank 0's verdict).
        holder: how the processes hold the model (to read and restore its weights).
    """

    def __init__(self, measure: str, direction: str | None, group: Group, holder: Replicas) -> None:
        self.measure, self.direction, self.group, self.holder = measure, direction, group, holder
        self.step: int | None = None
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, float]] = []  # (step, value) of every evaluation

    def consider(self, value: Any, step: int) -> None:
        """Keep the weights as they are at ``step`` if ``value`` is the best yet.

        Raises:
            ValueError: if ``value`` is not a finite number (the best weights are then restored by the caller).
        """
        if self.direction is None:
            return
        plain = plain_number(value)
        if plain is None or plain != plain or plain in (float("inf"), float("-inf")):
            raise ValueError(f"{self.measure} gave {value!r} at step {step}, not a finite number; the weights of "
                             f"step {self.step} are restored")
        if self.group.world > 1:  # every process keeps the same weights: rank 0's verdict
            shared = [plain]
            torch.distributed.broadcast_object_list(shared, src=0)
            plain = shared[0]
        self.history.append((step, float(plain)))
        better = self.value is None or (plain > self.value if self.direction == "max" else plain < self.value)
        if better:
            self.step, self.value = step, float(plain)
            self.weights = {k: v.detach().clone() for k, v in self.holder.model_state().items()}

    def state_dict(self) -> dict[str, Any] | None:
        if self.weights is None:
            return None
        return {"step": self.step, "value": self.value, "model": self.weights, "history": self.history}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.step, self.value, self.weights = state["step"], state["value"], state["model"]
            self.history = [tuple(h) for h in state.get("history", [])]

    def restore(self) -> bool:
        """Put the best weights back; whether there were any."""
        if self.weights is None:
            return False
        self.holder.load_model_state(self.weights)
        return True

    def verdict(self, last_step: int) -> str:
        """Which weights the run ends with, and why."""
        if self.direction is None:
            return f"the last weights (step {last_step}): keep_best=None"
        if self.weights is None:
            return f"the last weights (step {last_step}): nothing was measured"
        when = "before training" if self.step == 0 else f"at step {self.step}"
        first = self.history[0][1] if self.history else self.value
        return (f"the weights {when}: the {'highest' if self.direction == 'max' else 'lowest'} {self.measure} "
                f"({self.value:.4g}; {first:.4g} before training, {len(self.history)} measurements)")
