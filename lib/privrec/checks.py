"""Argument checks shared by every module: bad input fails early with a message naming the
parameter and the allowed range (``TypeError`` for the wrong kind of value, ``ValueError`` for a
value out of range), never deep inside torch."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["real", "positive", "non_negative", "int_in", "in_range", "choice"]

_REAL_TYPES = (int, float, np.integer, np.floating)


def real(name: str, value: object) -> float:
    """``value`` as a float; ``TypeError`` unless it is a real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, _REAL_TYPES):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    v = real(name, value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    v = real(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def int_in(name: str, value: object, low: int, high: int | None = None) -> int:
    """An int in ``[low, high]`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")
    return int(value)


def in_range(name: str, value: object, low: float, high: float, *, closed_high: bool) -> float:
    """A finite number in ``[low, high]`` or ``[low, high)``."""
    v = real(name, value)
    ok = low <= v <= high if closed_high else low <= v < high
    if not (math.isfinite(v) and ok):
        raise ValueError(f"{name} must be in [{low}, {high}{']' if closed_high else ')'}, "
                         f"got {value!r}")
    return v


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return str(value)
