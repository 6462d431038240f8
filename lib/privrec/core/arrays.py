"""Plumbing shared by the sampling mechanisms: data in, the same kind of data out.

(The noise samplers themselves live in :mod:`privrec.dp.primitives`, one per distribution.)

Every mechanism accepts a Python number, a NumPy array or a torch tensor and returns the same kind.
Randomness comes from an explicit ``generator`` (a :class:`numpy.random.Generator` or a
:class:`torch.Generator`) or a ``seed``; with neither, fresh operating-system entropy is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .checks import real_array
from .checks import seed as check_seed

__all__ = ["Generator", "rng_for", "as_data", "uniform", "combine"]

Generator = np.random.Generator | torch.Generator


def rng_for(value: object, generator: Generator | None, seed: int | None) -> Generator:
    """The generator to draw from: the one given, one built from ``seed``, or a fresh one.

    A seed builds a generator of the data's own library (torch for tensors, NumPy otherwise).
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, (np.random.Generator, torch.Generator)):
            raise TypeError("generator must be a numpy.random.Generator or a torch.Generator, got "
                            f"{type(generator).__name__}")
        return generator
    is_tensor = isinstance(value, torch.Tensor)
    if seed is not None:
        seed = check_seed("seed", seed)
        return torch.Generator().manual_seed(seed) if is_tensor else np.random.default_rng(seed)
    if is_tensor:
        gen = torch.Generator()
        gen.seed()  # operating-system entropy
        return gen
    return np.random.default_rng()


def as_data(value: object, name: str = "value") -> np.ndarray | torch.Tensor:
    """The data as a float64 ndarray or a floating tensor; NaN/inf rejected."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if not tensor.dtype.is_floating_point:
            tensor = tensor.to(torch.float64)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        return tensor
    array = real_array(name, value)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def uniform(gen: Generator, shape: tuple[int, ...]) -> np.ndarray | torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` from either kind of generator (float64)."""
    if isinstance(gen, torch.Generator):
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    return gen.random(shape)


def combine(value: object, data: np.ndarray | torch.Tensor,
            noise: np.ndarray | torch.Tensor) -> Any:
    """``data + noise`` returned in the kind of the original ``value``."""
    if isinstance(data, torch.Tensor):
        noise_t = noise if isinstance(noise, torch.Tensor) else torch.from_numpy(np.asarray(noise))
        return data + noise_t.to(device=data.device, dtype=data.dtype)
    noise_np = noise.numpy() if isinstance(noise, torch.Tensor) else noise
    out = data + noise_np
    if np.ndim(value) == 0 and not isinstance(value, np.ndarray):
        return float(out)
    return out
