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
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

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

    Global batch ``j`` holds positions ``j·B … (j+1)·B − 1`` of a permutation fixed by
    ``(seed, epoch)``; process ``r`` of ``W`` takes every ``W``-th of them, starting at ``r``.
    """

    def __init__(self, n: int, batch: int, *, world: int, rank: int, shuffle: bool,
                 drop_last: bool, seed: int, epoch: int, start: int) -> None:
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, epoch, start
        self.sizes = global_batch_sizes(n, batch, drop_last=drop_last, world=world)

    def __len__(self) -> int:
        return len(self.sizes) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        for j in range(self.start, len(self.sizes)):
            lo = j * self.batch
            yield order[lo + self.rank: lo + self.sizes[j]: self.world]


class EpochData:
    """``data`` for one process of ``world``: ``epoch(e, start)`` yields ``(batch, global batch size)``."""

    def __init__(self, data: Iterable[Any], *, world: int, rank: int, seed: int) -> None:
        if isinstance(data, Iterator):
            raise TypeError("data must be re-iterable (a DataLoader, a list of batches, ...), not an "
                            "iterator or generator that is used up after one pass")
        self.data, self.world, self.rank, self.seed = data, world, rank, seed
        self.loader = data if self._reshardable(data) else None
        if self.loader is not None:
            self.batch = self.loader.batch_size
            if self.batch % world:
                raise ValueError(f"batch_size={self.batch} (the global batch) must be divisible "
                                 f"by the {world} processes")
            self.sizes = global_batch_sizes(len(self.loader.dataset), self.batch,
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
            return {"samples": len(self.loader.dataset), "batch_size": self.batch,
                    "shuffle": isinstance(self.loader.sampler, RandomSampler)}
        try:
            return {"batches": len(self.data)}
        except TypeError:
            return {}

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
            if j < start:
                continue
            size = batch_size(split_labels(batch)[0])
            if size < self.world:
                continue
            yield map_tensors(batch, lambda t: t[self.rank::self.world] if t.dim() else t), size

    def _loader_epoch(self, epoch: int, start: int) -> Iterator[tuple[Any, int]]:
        src = self.loader
        sampler = _EpochBatchSampler(len(src.dataset), self.batch, world=self.world,
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
