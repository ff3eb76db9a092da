"""Level 5: the pipeline of :func:`tdnn.compress_model` — its settings, which layers to factorize,
the global budget, the one mutation (with undo) and the whole sequence."""

from tdnn.compress.budget import Budget
from tdnn.compress.pipeline import compress_model
from tdnn.compress.settings import CompressSettings

__all__ = ["Budget", "CompressSettings", "compress_model"]
