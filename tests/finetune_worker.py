"""A fine-tuning run as its own process, for tests that kill it or launch it under torchrun.

    python tests/finetune_worker.py OUT [--checkpoint-dir DIR] [--kill-after N] [--slow SECONDS] [--dropout]
    python -m torch.distributed.run --nproc_per_node=2 tests/finetune_worker.py OUT [--parallel fsdp]
    python tests/finetune_worker.py OUT --llama [--parallel fsdp]

Trains a compressed MLP on scikit-learn's digits (labels + distillation from the dense MLP) and
writes the final weights to OUT (rank 0); ``--llama`` distils a tiny tied-embedding LLaMA instead. ``--kill-after N`` SIGKILLs the process when the N-th
sample is fetched: no cleanup, no exception handlers, as when a job is preempted. ``--slow SECONDS``
sleeps at every sample fetched, so that another process can meet the run under way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tdnn
from tdnn.finetune import distillation_loss
from models import digits, digits_mlp, tiny_llama  # tests/ is on sys.path: pytest's, or this script's own


class Digits(Dataset):
    """scikit-learn's 8×8 digits as flat float vectors in [0, 1]."""

    def __init__(self, kill_after: int | None = None, slow: float = 0.0) -> None:
        self.x, self.y = digits()
        self.kill_after, self.slow, self.fetched = kill_after, slow, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.fetched += 1
        if self.kill_after is not None and self.fetched >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.slow)
        return self.x[i], self.y[i]


def build(dropout: bool) -> tuple[nn.Module, nn.Module]:
    """(student, teacher), the same in every process."""
    torch.manual_seed(0)
    teacher = digits_mlp(dropout)
    student = tdnn.compress_model(teacher, ranks=0.3)
    return student, teacher


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one torch thread (as the torchrun processes do), then restore the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_plain(model: nn.Module) -> None:
    """Sharded training leaves the model passed in as it was: plain tensors, no DTensors."""
    assert all(type(t) in (torch.Tensor, nn.Parameter) for t in model.state_dict().values())


def train(*, checkpoint_dir: str | None = None, kill_after: int | None = None, slow: float = 0.0,
          dropout: bool = False, epochs: int = 2, parallel: str = "ddp") -> dict[str, torch.Tensor]:
    """Run the fine-tuning on one thread; return the student's final state dict."""
    with one_thread():
        student, teacher = build(dropout)
        data = DataLoader(Digits(kill_after, slow), batch_size=64, shuffle=True)
        tdnn.finetune(student, data, teacher=teacher, epochs=epochs, lr=0.05, progress=False,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=5 if checkpoint_dir else None,
                      parallel=parallel)
    assert type(student) is nn.Sequential, type(student)
    assert_plain(student)
    return student.state_dict()


def train_llama(parallel: str = "ddp") -> dict[str, object]:
    """Distil the factors of a compressed tiny LLaMA (tied embeddings and norms frozen, rotary
    buffers, 3 blocks) on random tokens, keeping the weights of the best held-out distillation
    loss; its state dict and what the run reports."""
    with one_thread():
        teacher = tiny_llama(layers=3, tied=True, positions=None)  # seeded
        student = tdnn.compress_model(teacher, ranks=0.5)
        tokens = torch.randint(0, 64, (17, 8, 12))
        data, held_out = [{"input_ids": t} for t in tokens[:16]], tokens[16]

        def held_out_loss(model: nn.Module) -> float:  # how far from the teacher on unseen tokens
            with torch.no_grad():
                return distillation_loss(model(held_out).logits, teacher(held_out).logits).item()

        result = tdnn.finetune(student, data, teacher=teacher, epochs=3, lr=0.5,
                               eval_fn=held_out_loss, keep_best="min", progress=False, parallel=parallel,
                               trainable="factorized")
    assert student.lm_head.weight is student.model.embed_tokens.weight, "the tie is kept"
    assert_plain(student)
    return {"state": student.state_dict(), "evals": result.evals, "best_step": result.best_step,
            "final_loss": held_out_loss(student)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep at each sample fetched")
    parser.add_argument("--dropout", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parallel", default="ddp")
    parser.add_argument("--llama", action="store_true")
    args = parser.parse_args()
    if args.llama:
        state = train_llama(args.parallel)
    else:
        state = train(checkpoint_dir=args.checkpoint_dir, kill_after=args.kill_after, slow=args.slow,
                      dropout=args.dropout, epochs=args.epochs, parallel=args.parallel)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, args.out)


if __name__ == "__main__":
    main()
