"""A fine-tuning run as its own process, for tests that kill it or launch it under torchrun.

    python tests/finetune_worker.py OUT [--checkpoint-dir DIR] [--kill-after N] [--dropout]
    python -m torch.distributed.run --nproc_per_node=2 tests/finetune_worker.py OUT

Trains a compressed MLP on scikit-learn's digits (labels + distillation from the dense MLP) and
writes the final weights to OUT (rank 0). ``--kill-after N`` SIGKILLs the process when the N-th
sample is fetched: no cleanup, no exception handlers, as when a job is preempted.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tdnn


class Digits(Dataset):
    """scikit-learn's 8×8 digits as flat float vectors in [0, 1]."""

    def __init__(self, kill_after: int | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x, dtype=torch.float32) / 16.0
        self.y = torch.tensor(y)
        self.kill_after, self.fetched = kill_after, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.fetched += 1
        if self.kill_after is not None and self.fetched >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.x[i], self.y[i]


def build(dropout: bool) -> tuple[nn.Module, nn.Module]:
    """(student, teacher), the same in every process."""
    torch.manual_seed(0)
    extra = [nn.BatchNorm1d(128), nn.Dropout(0.2)] if dropout else []
    teacher = nn.Sequential(nn.Linear(64, 128), *extra, nn.ReLU(), nn.Linear(128, 10))
    student = tdnn.compress_model(teacher, ranks=0.3)
    return student, teacher


def train(*, checkpoint_dir: str | None = None, kill_after: int | None = None,
          dropout: bool = False, epochs: int = 2) -> dict[str, torch.Tensor]:
    """Run the fine-tuning on one thread; return the student's final state dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        student, teacher = build(dropout)
        data = DataLoader(Digits(kill_after), batch_size=64, shuffle=True)
        tdnn.finetune(student, data, teacher=teacher, epochs=epochs, lr=0.05, progress=False,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=5 if checkpoint_dir else None)
    finally:
        torch.set_num_threads(threads)
    return student.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--dropout", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    state = train(checkpoint_dir=args.checkpoint_dir, kill_after=args.kill_after, dropout=args.dropout,
                  epochs=args.epochs)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, args.out)


if __name__ == "__main__":
    main()
