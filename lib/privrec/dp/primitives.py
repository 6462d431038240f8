"""The three building blocks every private trainer shares: clip, add Gaussian noise, Poisson-sample.

One implementation of each, used by DP-SGD (:mod:`privrec.central.dpsgd`), the private statistics
(:mod:`privrec.central.private_stats`) and DP-FedAvg (:mod:`privrec.federated.strategies`):

* :func:`clip_factors` -- the factor :math:`\\min(1, C/\\lVert g\\rVert)` that clips a vector to
  L2 norm :math:`C` (Abadi et al. 2016, Algorithm 1), with one zero-guard: a zero vector gets
  factor 1 (it is already inside the ball);
* :func:`gaussian_noise` -- :math:`\\mathcal N(0, \\text{std}^2)` on every coordinate of a shape,
  from an explicit generator;
* :func:`poisson_sample` -- each of ``n`` records joins independently with probability :math:`q`,
  the sampling the RDP analysis of the subsampled Gaussian assumes. The sample may be empty; a
  private step on an empty sample still releases noise (the analysis counts that release too).

Security note: noise comes from torch's Mersenne-Twister generator and floating-point arithmetic,
fine for teaching and measuring, not for a production release (Mironov 2012 attacks textbook
floating-point Laplace; Opacus's ``secure_mode`` uses a cryptographic generator).
"""

from __future__ import annotations

import torch

from ..core.checks import check_sample_rate, int_in, non_negative, positive

__all__ = ["clip_factors", "clip_rows", "gaussian_noise", "poisson_sample", "row_norms"]


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of ``x`` (first axis; the other axes flattened): ``[B]``."""
    if not torch.is_tensor(x) or x.dim() < 1:
        raise TypeError("x must be a tensor with a leading row dimension")
    return x.reshape(x.shape[0], -1).square().sum(1).sqrt()


def clip_factors(norms: torch.Tensor, *, clip_norm: float) -> torch.Tensor:
    """:math:`\\min(1, C/\\lVert g_j\\rVert)` for each norm; 1 where the norm is 0.

    >>> clip_factors(torch.tensor([0.0, 0.5, 2.0]), clip_norm=1.0)
    tensor([1.0000, 1.0000, 0.5000])
    """
    clip_norm = positive("clip_norm", clip_norm)
    return clip_norm / torch.clamp(norms, min=clip_norm)


def clip_rows(x: torch.Tensor, *, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` scaled to L2 norm at most ``clip_norm``; returns ``(clipped, norms)``.

    After clipping, a sum over rows has L2 sensitivity ``clip_norm`` under add/remove one row.
    """
    norms = row_norms(x)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("x contains NaN or infinite values")
    factor = clip_factors(norms, clip_norm=clip_norm)
    return x * factor.reshape(-1, *([1] * (x.dim() - 1))), norms


def gaussian_noise(shape: tuple[int, ...] | torch.Size, *, std: float,
                   generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:math:`\\mathcal N(0, \\text{std}^2)` on every coordinate of ``shape`` (zeros if std = 0).

    A zero std draws nothing, so runs without noise leave the generator untouched.
    """
    std = non_negative("std", std)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if std == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.randn(shape, generator=generator, dtype=dtype).mul_(std)


def poisson_sample(n: int, *, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted ids in ``[0, n)``, each included independently with probability ``sample_rate``.

    The sample size is random and may be 0. ``sample_rate = 1`` returns every id without drawing.

    >>> poisson_sample(5, sample_rate=1.0, generator=torch.Generator().manual_seed(0))
    tensor([0, 1, 2, 3, 4])
    """
    n = int_in("n", n, 1)
    q = check_sample_rate(sample_rate)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if q == 1.0:
        return torch.arange(n)
    return (torch.rand(n, generator=generator) < q).nonzero().squeeze(1)
