"""pytest: one torch thread per test process, and no doctests of modules whose optional
dependency is not installed.

One thread, deliberately: CI machines are shared, and OpenMP threads that outnumber the free cores
spin at every barrier (a suite of 3 minutes took 21 beside two busy processes). Set
``TDNN_TEST_THREADS`` to use more on a machine of your own.
"""

import importlib.util
import os

THREADS = os.environ.get("TDNN_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS  # also for the subprocesses tests start (torchrun, the CLI)
os.environ["MKL_NUM_THREADS"] = THREADS

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(int(THREADS))

collect_ignore = [] if importlib.util.find_spec("transformers") else ["tdnn/layers/hf_conv1d.py", "tdnn/pretrained.py"]
