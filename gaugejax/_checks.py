"""Argument checks shared by the public functions (clear errors that name the argument)."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def integer(value: Any, name: str, minimum: int = 1, *, where: str = "") -> int:
    """`value` as an `int`, or a `ValueError`: an integer (Python or NumPy, not a bool) of
    at least `minimum`. `where` prefixes the message (the function's name)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{where + ': ' if where else ''}`{name}` must be {what}, got {value!r}.")
    return int(value)


def tolerance(value: Any, name: str) -> None:
    """`None` or a finite number >= 0, else a `ValueError`."""
    if value is None:
        return
    if isinstance(value, jax.core.Tracer):
        return
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number >= 0 or None, got {value!r}.") from None
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0 or None, got {value!r}.")
