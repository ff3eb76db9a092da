"""Wall-clock comparison of a factorized layer against its dense original."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

# (dense, factorized, example input) -> factorized latency / dense latency
LatencyTimer = Callable[[nn.Module, nn.Module, torch.Tensor], float]


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], x: torch.Tensor, *, warmup: int = 2,
              repeats: int = 9) -> dict[str, float]:
    """Median seconds per call of each module on ``x``, timed interleaved (A, B, A, B, ...) so
    drift and load from other processes hit every module alike.

    Example:
        >>> import torch
        >>> times = latencies({"a": torch.nn.Linear(8, 8), "b": torch.nn.Identity()}, torch.randn(2, 8))
        >>> sorted(times)
        ['a', 'b']
    """
    for module in models.values():
        for _ in range(warmup):
            module(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, module in models.items():
            _sync(x)
            start = time.perf_counter()
            module(x)
            _sync(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def latency_ratio(dense: nn.Module, factorized: nn.Module, x: torch.Tensor, *,
                  warmup: int = 2, repeats: int = 9) -> float:
    """Median latency of ``factorized(x)`` over median latency of ``dense(x)`` on ``x``'s device.

    The two run interleaved (:func:`latencies`). For a 4-D input both are timed again in
    ``channels_last`` (weights and input) and each counts in its faster layout, the one
    :func:`tdnn.optimize_for_inference` would pick. Below 1 the factorized layer is faster.

    Example:
        >>> import torch, tdnn
        >>> dense = torch.nn.Linear(512, 512)
        >>> small = tdnn.SVDLinear.from_dense(dense, 16)
        >>> latency_ratio(dense, small, torch.randn(64, 512)) > 0
        True
    """
    models = {"dense": dense, "factorized": factorized}
    runs = [latencies(models, x, warmup=warmup, repeats=repeats)]
    if x.dim() == 4:
        last = {name: copy.deepcopy(m).to(memory_format=torch.channels_last) for name, m in models.items()}
        runs.append(latencies(last, x.contiguous(memory_format=torch.channels_last), warmup=warmup, repeats=repeats))
    best = {name: min(run[name] for run in runs) for name in models}
    return best["factorized"] / max(best["dense"], 1e-12)
