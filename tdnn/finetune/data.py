"""The data as fine-tuning reads it: per epoch, from a position, this process's share of each global batch.

Exact resume and DDP sharding need to know the data order, so a ``DataLoader`` over a map-style
dataset with a plain sampler is re-created per epoch with a sampler driven by ``seed`` and the
epoch number (shuffled when the original loader shuffled); any other re-iterable is read as it is,
each batch split across processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler, Subset

from tdnn.core.batches import batch_size, map_tensors, split_labels
from tdnn.core.digest import batch_digest


def global_batch_sizes(n: int, batch: int, *, drop_last: bool, world: int) -> list[int]:
    """Sizes of the global batches of one epoch over ``n`` samples.

    A last partial batch is kept unless ``drop_last``, or unless it has fewer samples than there
    are processes (every process must take part in each step).

    Example:
        >>> global_batch_sizes(130, 64, drop_last=False, world=2)
        [64, 64, 2]
    """
    sizes = [batch] * (n // batch)
    rest = n - len(sizes) * batch
    if rest and not drop_last and rest >= world:
        sizes.append(rest)
    return sizes


class _EpochBatchSampler(Sampler[list[int]]):
    """This process's share of each global batch of one epoch, from global batch ``start`` on.

    Global batch ``j`` holds positions ``j·B … (j+1)·B − 1`` of a permutation of the training
    ``indices`` fixed by ``(seed, epoch)``; process ``r`` of ``W`` takes every ``W``-th of them,
    starting at ``r``.
    """

    def __init__(self, indices: list[int], batch: int, *, world: int, rank: int, shuffle: bool,
                 drop_last: bool, seed: int, epoch: int, start: int) -> None:
        self.indices, self.batch, self.world, self.rank = indices, batch, world, rank
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, epoch, start
        self.sizes = global_batch_sizes(len(indices), batch, drop_last=drop_last, world=world)

    def __len__(self) -> int:
        return len(self.sizes) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = self.indices
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=gen).tolist()]
        for j in range(self.start, len(self.sizes)):
            lo = j * self.batch
            yield order[lo + self.rank: lo + self.sizes[j]: self.world]


class EpochData:
    """``data`` for one process of ``world``: ``epoch(e, start)`` yields ``(batch, global batch size)``.

    With ``holdout`` batches held out, those are never trained on: for a reshardable loader, that
    many batches' worth of samples drawn once by ``seed`` (:attr:`held`, batched as the loader
    batches); for a list or tuple of batches, its first ``holdout`` batches (:meth:`splittable`
    says which data can be split). Batches given as ``held`` are the held-out slice instead.
    :attr:`held` is the same, whole, on every process.
    """

    def __init__(self, data: Iterable[Any], *, world: int, rank: int, seed: int, holdout: int = 0,
                 held: Iterable[Any] | None = None) -> None:
        if isinstance(data, Iterator):
            raise TypeError("data must be re-iterable (a DataLoader, a list of batches, ...), not an "
                            "iterator or generator that is used up after one pass")
        self.data, self.world, self.rank, self.seed, self.holdout = data, world, rank, seed, holdout
        self.loader = data if self._reshardable(data) else None
        self.held: list[Any] = [] if held is None else list(held)
        if self.loader is not None:
            self.batch = self.loader.batch_size
            if self.batch % world:
                raise ValueError(f"batch_size={self.batch} (the global batch) must be divisible "
                                 f"by the {world} processes")
            self.indices = self._split_samples()
            self.sizes = global_batch_sizes(len(self.indices), self.batch, drop_last=self.loader.drop_last,
                                            world=world)
        elif holdout:
            self.held = [batch for _, batch in zip(range(holdout), data)]

    def _split_samples(self) -> list[int]:
        """The training sample indices; the held-out ones, drawn once by the seed, go to :attr:`held`."""
        n, k = len(self.loader.dataset), self.holdout * self.batch
        if k >= n:
            raise ValueError(f"holdout={self.holdout} batches of {self.batch} leave none of the {n} samples to train on")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(2**31 + self.seed)).tolist()  # not an epoch order
        if k:
            src = self.loader
            held = Subset(src.dataset, sorted(order[:k]))
            self.held = list(DataLoader(held, batch_size=self.batch, collate_fn=src.collate_fn))
        return sorted(order[k:]) if k else list(range(n))

    @classmethod
    def splittable(cls, data: Any) -> bool:
        """Whether batches can be held out of ``data`` soundly: the same samples every epoch (a
        reshardable loader, or a list or tuple of batches; a sampler of its own may draw any sample)."""
        return cls._reshardable(data) or isinstance(data, (list, tuple))

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
        return len(self.data) - self.holdout  # TypeError when the data has no length

    def describe(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        if self.loader is not None:
            return {"samples": len(self.loader.dataset), "batch_size": self.batch, "held_out": self.holdout,
                    "shuffle": isinstance(self.loader.sampler, RandomSampler)}
        try:
            return {"batches": len(self.data), "held_out": self.holdout}
        except TypeError:
            return {"held_out": self.holdout}

    def fingerprint(self) -> str:
        """A digest of the data cheap to take and sound to compare: the number of samples and the
        first and last sample of a reshardable loader's dataset, else the number of batches and
        the first batch."""
        if self.loader is not None:
            dataset = self.loader.dataset
            return batch_digest([len(dataset), dataset[0], dataset[len(dataset) - 1]])
        first = next(iter(self.data), None)
        return batch_digest([len(self), first])

    def epoch(self, epoch: int, start: int) -> Iterator[tuple[Any, int]]:
        if self.loader is not None:
            yield from self._loader_epoch(epoch, start)
            return
        # Any other iterable: read up to the start position (the caller restores the global RNG
        # first, so a sampler drawing from it replays the same order), split each batch.
        for j, batch in enumerate(self.data):
            if j < self.holdout + start:  # held out, or before the start position
                continue
            size = batch_size(split_labels(batch)[0])
            if size < self.world:
                continue
            yield map_tensors(batch, lambda t: t[self.rank::self.world] if t.dim() else t), size

    def _loader_epoch(self, epoch: int, start: int) -> Iterator[tuple[Any, int]]:
        src = self.loader
        sampler = _EpochBatchSampler(self.indices, self.batch, world=self.world,
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
