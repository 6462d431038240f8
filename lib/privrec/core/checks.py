"""Argument checks shared by every module: bad input fails early with a message naming the
parameter and the allowed range (``TypeError`` for the wrong kind of value, ``ValueError`` for a
value out of range), never deep inside torch."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["real", "positive", "non_negative", "int_in", "in_range", "choice", "seed",
           "check_epsilon", "epsilon_or_inf", "check_delta", "check_sample_rate", "check_steps",
           "check_orders", "text", "flag", "member", "instance", "path_like", "real_array",
           "id_array", "function", "conforms", "tensor_dict", "untied"]

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
    values = np.atleast_1d(real_array("orders", orders))
    if values.ndim != 1 or values.size == 0:
        raise ValueError("orders must be a non-empty 1-D sequence of RDP orders > 1")
    if not np.all(np.isfinite(values)) or np.any(values <= 1):
        raise ValueError(f"orders must be finite and > 1, got {values.tolist()}")
    return values


# -- kinds of values beyond numbers (dp-core helper) ---------------------------------------------

def text(name: str, value: object) -> str:
    """A non-empty ``str`` (``TypeError`` for other kinds, ``ValueError`` when empty)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must be a non-empty str")
    return value


def flag(name: str, value: object) -> bool:
    """A ``bool`` (NumPy bools too); ``TypeError`` for ints, strings and the rest."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def member(name: str, value: object, kind: type) -> object:
    """A member of the enum ``kind``, given as the member or its string value."""
    if isinstance(value, kind):
        return value
    allowed = tuple(m.value for m in kind)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a {kind.__name__} or one of the strings {allowed}, "
                        f"got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return kind(value)


def instance(name: str, value: object, kind: type | tuple[type, ...]) -> object:
    """``value`` if it is an instance of ``kind``; ``TypeError`` naming what is allowed otherwise."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        allowed = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be a {allowed}, got {type(value).__name__}")
    return value


def untied(name: str, module: object) -> object:
    """``module`` (a torch ``nn.Module``) if none of its parameters is registered under two names
    (tied weights); ``ValueError`` naming both otherwise. Code that calls
    ``torch.func.functional_call(..., tie_weights=False)`` on it relies on this."""
    seen: dict[int, str] = {}
    for param_name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            raise ValueError(f"{name} must not tie parameters: {seen[id(param)]!r} and "
                             f"{param_name!r} are one tensor")
        seen[id(param)] = param_name
    return module


def path_like(name: str, value: object) -> Path:
    """A filesystem path given as ``str`` or ``os.PathLike`` (not bytes), as a :class:`Path`."""
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, got {type(value).__name__}")
    if isinstance(value, str) and not value:
        raise ValueError(f"{name} must be a non-empty path")
    return Path(value)


def _as_array(name: str, values: object) -> np.ndarray:
    """``values`` as an ndarray (torch tensors via ``.numpy()``), without numpy's own errors."""
    if hasattr(values, "detach") and hasattr(values, "numpy"):
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be a number or a sequence of numbers, "
                        f"got {type(values).__name__}")
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as err:  # ragged nesting and the like
        raise ValueError(f"{name} must be a rectangular array of numbers") from err


def real_array(name: str, values: object) -> np.ndarray:
    """Real numbers (a scalar, sequence, array or tensor) as float64; ``TypeError`` for strings,
    objects or bools, ``ValueError`` for NaN (infinities are left to the caller)."""
    array = _as_array(name, values)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN values")
    return array


def id_array(name: str, values: object, size: int | None = None) -> np.ndarray:
    """Integer ids (sequence, array or tensor) as int64, each in ``[0, size)`` when ``size`` is
    given; ``TypeError`` for floats, bools or strings (an id is never 2.0)."""
    array = _as_array(name, values)
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise TypeError(f"{name} must hold integer ids, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if size is not None and array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(f"{name} must be ids in [0, {size}), got values in "
                         f"[{array.min()}, {array.max()}]")
    return array


def function(name: str, value: object) -> object:
    """A callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


# -- structured arguments of the federated engine (federated helper) -----------------------------

def conforms(name: str, value: object, protocol: type) -> object:
    """``value`` if it has every member of the ``runtime_checkable`` ``protocol``; otherwise a
    ``TypeError`` naming the protocol and the members it lacks."""
    if isinstance(value, protocol):
        return value
    wanted: set[str] = set()
    for base in protocol.__mro__:
        if base.__dict__.get("_is_protocol") and base.__name__ != "Protocol":
            wanted |= {n for n in [*base.__dict__, *base.__dict__.get("__annotations__", {})]
                       if not n.startswith("_")}
    missing = sorted(n for n in wanted if not hasattr(value, n))
    raise TypeError(f"{name} must be a {protocol.__name__} (lacks {', '.join(missing)}), "
                    f"got {type(value).__name__}")


def tensor_dict(name: str, value: object) -> dict:
    """A non-empty ``dict`` of ``str`` names to floating-point tensors (shared parameters)."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of str to float tensors, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    for key, tensor in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {type(key).__name__}")
        if not callable(getattr(tensor, "is_floating_point", None)) or not tensor.is_floating_point():
            raise TypeError(f"{name}[{key!r}] must be a floating-point torch.Tensor, got "
                            f"{type(tensor).__name__}")
    return value
