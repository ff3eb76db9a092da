"""pytest: one torch thread per test process, no doctests of modules whose optional dependency is
not installed, and a deterministic clock for tests of latency budgets.

One thread, deliberately: CI machines are shared, and OpenMP threads that outnumber the free cores
spin at every barrier (a suite of 3 minutes took 21 beside two busy processes). Set
``TDNN_TEST_THREADS`` to use more on a machine of your own.
"""

import importlib.util
import os

THREADS = os.environ.get("TDNN_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS  # also for the subprocesses tests start (torchrun, the CLI)
os.environ["MKL_NUM_THREADS"] = THREADS

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(int(THREADS))

collect_ignore = [] if importlib.util.find_spec("transformers") else ["tdnn/layers/hf_conv1d.py", "tdnn/pretrained.py"]


def _flop_clock(models, batch, **kwargs):
    from tdnn.planning.cost import model_flops

    return {name: model_flops(m, batch) * 1e-9 for name, m in models.items()}


@pytest.fixture
def flop_clock():
    """Latency measured by a deterministic clock: a module takes as long as its FLOPs (1 GFLOP = 1 s).
    The real clock is noisy; a test of what a latency budget does must not depend on it (a target
    that a busy machine's timings put out of reach once failed CI). Pass it where tdnn takes a
    clock: ``Budget(latency=..., timer=flop_clock)``, ``optimize_for_inference(..., timer=flop_clock)``."""
    return _flop_clock
