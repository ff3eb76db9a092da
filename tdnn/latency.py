"""Wall-clock comparison of a factorized layer against its dense original."""

from __future__ import annotations

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
def latency_ratio(dense: nn.Module, factorized: nn.Module, x: torch.Tensor, *,
                  warmup: int = 2, repeats: int = 9) -> float:
    """Median latency of ``factorized(x)`` over median latency of ``dense(x)`` on ``x``'s device.

    The two run interleaved, so drift and noise on a busy machine hit both alike. Below 1 the
    factorized layer is faster.

    Example:
        >>> import torch, tdnn
        >>> dense = torch.nn.Linear(512, 512)
        >>> small = tdnn.SVDLinear.from_dense(dense, 16)
        >>> latency_ratio(dense, small, torch.randn(64, 512)) > 0
        True
    """
    for _ in range(warmup):
        dense(x)
        factorized(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for module, bucket in zip((dense, factorized), times):
            _sync(x)
            start = time.perf_counter()
            module(x)
            _sync(x)
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[1]) / max(statistics.median(times[0]), 1e-12)
