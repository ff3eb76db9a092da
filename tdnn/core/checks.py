"""Checks of values users give, shared by every settings object: numbers and counts (numpy scalars
accepted and made plain Python values), each error naming the setting."""

from __future__ import annotations

import math
import numbers
from typing import Any


def plain_number(value: Any) -> int | float | None:
    """``value`` as a Python ``int`` or ``float`` if it is a real number (numpy scalars and 0-d
    arrays included, ``bool`` not), else ``None``.

    Example:
        >>> import numpy as np
        >>> plain_number(np.float32(0.5)), plain_number(np.int64(3)), plain_number(True), plain_number("1")
        (0.5, 3, None, None)
    """
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()  # a numpy scalar or a 0-d array / tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def count(name: str, value: Any, *, zero: bool = False) -> int:
    """``value`` as a positive (or, with ``zero``, non-negative) ``int``.

    Raises:
        ValueError: naming the setting, for anything else.
    """
    plain = plain_number(value)
    if not isinstance(plain, int) or plain < (0 if zero else 1):
        raise ValueError(f"{name}={value!r} must be a {'non-negative' if zero else 'positive'} int")
    return plain


def number(name: str, value: Any, *, low: float, high: float = math.inf, open_low: bool = False) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``open_low``).

    Raises:
        ValueError: naming the setting and the bounds, for anything else.
    """
    plain = plain_number(value)
    ok = plain is not None and math.isfinite(plain) and (plain > low if open_low else plain >= low) and plain <= high
    if not ok:
        bounds = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ValueError(f"{name}={value!r} must be a number {bounds}")
    return float(plain)
