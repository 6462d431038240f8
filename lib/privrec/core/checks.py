"""Argument checks shared by every module: bad input fails early with a message naming the
parameter and the allowed range (``TypeError`` for the wrong kind of value, ``ValueError`` for a
value out of range), never deep inside torch."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["real", "positive", "non_negative", "int_in", "in_range", "choice", "seed",
           "check_epsilon", "epsilon_or_inf", "check_delta", "check_sample_rate", "check_steps",
           "check_orders"]

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


def seed(name: str, value: object) -> int:
    """A seed: an int >= 0 (``TypeError`` for other kinds, ``ValueError`` for negatives)."""
    return int_in(name, value, 0)


def check_epsilon(epsilon: object, *, name: str = "epsilon") -> float:
    """A privacy budget: a finite number > 0."""
    return positive(name, epsilon)


def epsilon_or_inf(name: str, value: object) -> float:
    """A privacy budget, finite > 0, or ``math.inf`` meaning "no noise"."""
    v = real(name, value)
    if math.isnan(v) or v <= 0:
        raise ValueError(f"{name} must be > 0 (math.inf for no privacy), got {value!r}")
    return v


def check_delta(delta: object, *, name: str = "delta") -> float:
    """A delta in the open interval (0, 1)."""
    value = real(name, delta)
    if not (0.0 < value < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in the open interval (0, 1), got {delta!r}")
    return value


def check_sample_rate(sample_rate: object, *, name: str = "sample_rate") -> float:
    """A Poisson sampling probability in (0, 1]."""
    value = real(name, sample_rate)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {sample_rate!r}")
    return value


def check_steps(steps: object, *, name: str = "steps") -> int:
    """A number of steps: an int >= 1."""
    return int_in(name, steps, 1)


def check_orders(orders: object) -> np.ndarray:
    """RDP orders: a non-empty 1-D sequence of finite numbers > 1, as a float64 array."""
    values = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError("orders must be a non-empty 1-D sequence of RDP orders > 1")
    if not np.all(np.isfinite(values)) or np.any(values <= 1):
        raise ValueError(f"orders must be finite and > 1, got {values.tolist()}")
    return values
