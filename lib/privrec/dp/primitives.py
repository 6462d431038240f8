"""The building blocks every private release shares: norms, clipping, noise, Poisson sampling.

One implementation of each; every mechanism and trainer in ``privrec`` draws through these:

* :func:`row_norms` -- the L2 (or L1) norm of each row of a batch, or of each example's gradient
  split over several tensors; empty batches give an empty result;
* :func:`clip_factors` -- the factor :math:`\\min(1, C/\\lVert g\\rVert)` that clips a vector to
  norm :math:`C` (Abadi et al. 2016, Algorithm 1), with one zero-guard: a zero vector gets factor
  1 (it is already inside the ball);
* :func:`clip_rows` -- each row scaled by its clip factor (tensors or arrays);
* :func:`gaussian_noise` and :func:`laplace_noise` -- :math:`\\mathcal N(0, \\text{std}^2)` or
  :math:`\\mathrm{Lap}(0, b)` on every coordinate of a shape, from an explicit
  :class:`torch.Generator` (a tensor back) or :class:`numpy.random.Generator` (an array back);
  the Gaussian and Laplace mechanisms (:mod:`privrec.dp.mechanisms`), DP-SGD
  (:mod:`privrec.central.dpsgd`), the private statistics and DP-FedAvg all call them;
* :func:`poisson_sample` -- each of ``n`` records joins independently with probability :math:`q`,
  the sampling the RDP analysis of the subsampled Gaussian assumes. The sample may be empty; a
  private step on an empty sample still releases noise (the analysis counts that release too).

Security note: noise comes from Mersenne-Twister (torch) or PCG64 (NumPy) generators and
floating-point arithmetic, fine for teaching and measuring, not for a production release
(Mironov 2012 attacks textbook floating-point Laplace; Opacus's ``secure_mode`` uses a
cryptographic generator).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..core.checks import check_sample_rate, choice, instance, int_in, non_negative, positive

__all__ = ["clip_factors", "clip_rows", "gaussian_noise", "laplace_noise", "poisson_sample",
           "row_norms"]

_GENERATORS = (torch.Generator, np.random.Generator)
_CHUNK = 1 << 16  # records per chunk of the Poisson sampler


def _shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of ints >= 0 (an int is a 1-D shape)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    instance("shape", shape, (tuple, list, torch.Size))
    return tuple(int_in(f"shape[{i}]", s, 0) for i, s in enumerate(shape))


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, ...]`` as ``[B, k]`` (also for B = 0)."""
    if x.dim() < 1:
        raise ValueError("x must have a leading row dimension (at least 1-D)")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def row_norms(x: Any, *, order: int = 2) -> Any:
    """Norm of each row: ``[B]`` from ``x`` ``[B, ...]`` (the other axes flattened).

    ``x`` may be a tensor, an array, or a mapping / sequence of tensors sharing the leading
    dimension (one example's gradient split over parameter tables: the L2 norm of the rows put
    end to end). ``order`` is 2 (L2) or 1 (L1). An empty batch gives an empty result.

    >>> row_norms(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    tensor([5., 0.])
    """
    choice("order", order, (1, 2))
    if isinstance(x, (Mapping, list, tuple)):
        parts = list(x.values()) if isinstance(x, Mapping) else list(x)
        if order != 2 or not parts or not all(torch.is_tensor(p) for p in parts):
            raise TypeError("x given in parts must be a non-empty mapping or sequence of tensors "
                            "(L2 norm only)")
        sizes = {p.shape[0] if p.dim() else -1 for p in parts}
        if len(sizes) != 1 or -1 in sizes:
            raise ValueError(f"x's parts must share the leading dimension, got {sorted(sizes)}")
        return torch.stack([_flat_rows(p).square().sum(1) for p in parts]).sum(0).sqrt()
    if torch.is_tensor(x):
        return torch.linalg.vector_norm(_flat_rows(x), ord=order, dim=1)
    array = np.asarray(instance("x", x, (np.ndarray, list, tuple)), dtype=np.float64)
    return row_norms(torch.from_numpy(array), order=order).numpy()


def clip_factors(norms: torch.Tensor, *, clip_norm: float) -> torch.Tensor:
    """:math:`\\min(1, C/\\lVert g_j\\rVert)` for each norm; 1 where the norm is 0.

    >>> clip_factors(torch.tensor([0.0, 0.5, 2.0]), clip_norm=1.0)
    tensor([1.0000, 1.0000, 0.5000])
    """
    clip_norm = positive("clip_norm", clip_norm)
    instance("norms", norms, torch.Tensor)
    return clip_norm / torch.clamp(norms, min=clip_norm)


def clip_rows(x: Any, *, clip_norm: float, order: int = 2) -> tuple[Any, Any]:
    """Each row of ``x`` scaled to norm at most ``clip_norm``; returns ``(clipped, norms)``.

    Tensors (differentiable) or arrays; the result is of the same kind. After clipping, a sum over
    rows has sensitivity ``clip_norm`` (in the clipping norm) under add/remove one row.
    """
    clip_norm = positive("clip_norm", clip_norm)
    is_tensor = torch.is_tensor(x)
    if not is_tensor:
        instance("x", x, (np.ndarray, list, tuple))
    data = x if is_tensor else torch.from_numpy(np.asarray(x, dtype=np.float64))
    flat = _flat_rows(data)
    norms = row_norms(flat, order=order)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("x contains NaN or infinite values")
    out = (flat * clip_factors(norms, clip_norm=clip_norm).unsqueeze(1)).reshape(data.shape)
    return (out, norms) if is_tensor else (out.numpy(), norms.numpy())


def gaussian_noise(shape: Sequence[int] | int, *, std: float,
                   generator: torch.Generator | np.random.Generator,
                   dtype: torch.dtype | None = None) -> Any:
    """:math:`\\mathcal N(0, \\text{std}^2)` on every coordinate of ``shape`` (zeros if std = 0).

    A torch generator gives a tensor of ``dtype`` (default float32); a NumPy generator a float64
    array. A zero std draws nothing, so runs without noise leave the generator untouched.
    """
    std = non_negative("std", std)
    instance("generator", generator, _GENERATORS)
    shape = _shape(shape)
    if isinstance(generator, np.random.Generator):
        return np.zeros(shape) if std == 0 else generator.standard_normal(shape) * std
    dtype = torch.float32 if dtype is None else dtype
    if std == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(std)


def laplace_noise(shape: Sequence[int] | int, *, scale: float,
                  generator: torch.Generator | np.random.Generator,
                  dtype: torch.dtype | None = None) -> Any:
    """:math:`\\mathrm{Lap}(0, \\text{scale})` on every coordinate of ``shape`` (zeros if 0).

    A NumPy generator draws ``Generator.laplace`` (float64 array); a torch generator the
    difference of two unit exponentials, which is standard Laplace (float64 unless ``dtype``).
    """
    scale = non_negative("scale", scale)
    instance("generator", generator, _GENERATORS)
    shape = _shape(shape)
    if isinstance(generator, np.random.Generator):
        return np.zeros(shape) if scale == 0 else generator.laplace(0.0, 1.0, shape) * scale
    dtype = torch.float64 if dtype is None else dtype
    if scale == 0:
        return torch.zeros(shape, dtype=dtype)
    e = torch.empty((2, *shape), dtype=torch.float64).exponential_(1.0, generator=generator)
    return ((e[0] - e[1]) * scale).to(dtype)


def poisson_sample(n: int, *, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted ids in ``[0, n)``, each included independently with probability ``sample_rate``.

    The sample size is random and may be 0 (so may ``n``). ``sample_rate = 1`` returns every id
    without drawing.

    >>> poisson_sample(5, sample_rate=1.0, generator=torch.Generator().manual_seed(0))
    tensor([0, 1, 2, 3, 4])
    """
    n = int_in("n", n, 0)
    q = check_sample_rate(sample_rate)
    instance("generator", generator, torch.Generator)
    if q == 1.0:
        return torch.arange(n)
    # drawn in chunks that stay in cache; torch's uniform sampler gives the same numbers chunk by
    # chunk as in one draw (tested), so the sample does not depend on the chunk size
    return torch.cat([(torch.rand(min(_CHUNK, n - start), generator=generator) < q)
                      .nonzero().squeeze(1).add_(start) for start in range(0, max(n, 1), _CHUNK)])
