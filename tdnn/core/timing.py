"""Wall-clock timing of modules against each other, interleaved so machine noise hits all alike.

Everything that times takes a *clock*: a function ``(models, batch, *, warmup, repeats) -> {name:
seconds}`` with :func:`latencies`' signature. :func:`latencies` is the real one; a test (or a
user with a profiler of their own) passes another, e.g. one that counts FLOPs, and every latency
decision downstream (``Budget(latency=..., timer=...)``, ``optimize_for_inference(..., timer=...)``)
uses it instead of the wall clock."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tdnn.core.batches import call

# (dense, factorized, example input) -> factorized latency / dense latency
LatencyTimer = Callable[[nn.Module, nn.Module, torch.Tensor], float]
# (models by name, batch, *, warmup, repeats) -> seconds per call by name: see latencies()
Clock = Callable[..., dict[str, float]]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Bound(nn.Module):
    """A module bound to its own input, so modules with different inputs can be timed together:
    ``Bound(m, batch)()`` runs ``m`` on ``batch`` (a tensor, tuple of arguments or dict of keywords)."""

    def __init__(self, module: nn.Module, batch: Any) -> None:
        super().__init__()
        self.module, self.batch = module, batch

    def forward(self) -> Any:
        return call(self.module, self.batch)


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], batch: Any, *, warmup: int = 2,
              repeats: int = 9) -> dict[str, float]:
    """Median seconds per call of each module on ``batch`` (a tensor, a tuple of arguments or a
    dict of keyword arguments), timed interleaved (A, B, A, B, ...) so drift and load from other
    processes hit every module alike. CUDA work is synchronised around each call.

    Example:
        >>> import torch
        >>> times = latencies({"a": torch.nn.Linear(8, 8), "b": torch.nn.Identity()}, torch.randn(2, 8))
        >>> sorted(times)
        ['a', 'b']
    """
    for module in models.values():
        for _ in range(warmup):
            call(module, batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, module in models.items():
            _sync()
            start = time.perf_counter()
            call(module, batch)
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def best_latencies(models: dict[str, nn.Module], x: Any, *, warmup: int = 2, repeats: int = 9,
                   clock: Clock = latencies) -> dict[str, float]:
    """``clock`` (:func:`latencies`), each module in its faster memory layout: for a 4-D tensor ``x``
    every module is timed contiguous and ``channels_last`` (weights and input; all interleaved) —
    as :func:`tdnn.optimize_for_inference` would deploy it — and counts in the faster one.

    Example:
        >>> import torch
        >>> times = best_latencies({"conv": torch.nn.Conv2d(8, 8, 3)}, torch.randn(1, 8, 16, 16))
        >>> times["conv"] > 0
        True
    """
    if not (isinstance(x, torch.Tensor) and x.dim() == 4):
        return clock(models, x, warmup=warmup, repeats=repeats)
    layouts = (torch.contiguous_format, torch.channels_last)
    bound = {f"{name} {layout}": Bound(copy.deepcopy(m).to(memory_format=layout), x.contiguous(memory_format=layout))
             for name, m in models.items() for layout in layouts}
    times = clock(bound, (), warmup=warmup, repeats=repeats)
    return {name: min(times[f"{name} {layout}"] for layout in layouts) for name in models}


def latency_ratio(dense: nn.Module, factorized: nn.Module, x: torch.Tensor, *,
                  warmup: int = 2, repeats: int = 9, clock: Clock = latencies) -> float:
    """Median latency of ``factorized(x)`` over median latency of ``dense(x)`` on ``x``'s device.

    The two run interleaved, each in its faster memory layout (:func:`best_latencies`). Below 1
    the factorized layer is faster.

    Example:
        >>> import torch, tdnn
        >>> dense = torch.nn.Linear(512, 512)
        >>> small = tdnn.SVDLinear.from_dense(dense, 16)
        >>> latency_ratio(dense, small, torch.randn(64, 512)) > 0
        True
    """
    times = best_latencies({"dense": dense, "factorized": factorized}, x, warmup=warmup, repeats=repeats,
                           clock=clock)
    return times["factorized"] / max(times["dense"], 1e-12)
