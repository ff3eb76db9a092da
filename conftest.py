"""pytest: leave out doctests of modules whose optional dependency is not installed."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("transformers") else ["tdnn/layers/hf_conv1d.py"]
