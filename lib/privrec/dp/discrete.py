"""The discrete Laplace mechanism: integer noise sampled in exact arithmetic.

Mironov (2012) showed that textbook floating-point Laplace noise leaks: the set of doubles one
input can produce differs from the set its neighbour can produce. For integer-valued queries
(counts, histograms) the discrete Laplace distribution sampled with exact rational arithmetic
(Canonne, Kamath & Steinke 2020) avoids the problem. Importable from :mod:`privrec.dp.mechanisms`.

Examples
--------
>>> noisy = discrete_laplace_mechanism([10, 20, 30], sensitivity=1, epsilon=1.0, seed=0)
>>> noisy.dtype, noisy.shape
(dtype('int64'), (3,))
"""

from __future__ import annotations

import random
import secrets
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from ..core.checks import check_epsilon, instance, int_in, positive
from ..core.checks import seed as check_seed

__all__ = ["discrete_laplace", "discrete_laplace_mechanism"]


def _bernoulli_fraction(p: Fraction, rand: random.Random) -> bool:
    """Exact Bernoulli(p) for rational p in [0, 1], from a uniform integer."""
    return rand.randrange(p.denominator) < p.numerator


def _bernoulli_exp_neg(gamma: Fraction, rand: random.Random) -> bool:
    """Exact Bernoulli(exp(-gamma)) for rational gamma >= 0 (Canonne, Kamath & Steinke 2020, Alg. 1).

    For gamma in [0, 1]: draw Bernoulli(gamma/k) for k = 1, 2, ... and stop at the first failure,
    at index K. Then P(K = k) = gamma^(k-1)/(k-1)! - gamma^k/k!, so P(K odd) is the alternating series
    1 - gamma + gamma^2/2! - ... = exp(-gamma). For gamma > 1, use
    exp(-gamma) = exp(-1)^floor(gamma) * exp(-frac(gamma)).
    """
    while gamma > 1:
        if not _bernoulli_exp_neg(Fraction(1), rand):
            return False
        gamma -= 1
    k = 1
    while _bernoulli_fraction(gamma / k, rand):
        k += 1
    return k % 2 == 1


def discrete_laplace(*, scale: Fraction | float, size: int, rand: random.Random) -> np.ndarray:
    """``size`` exact samples with :math:`P(z) \\propto e^{-|z|/\\text{scale}}` on the integers.

    Canonne, Kamath & Steinke (2020), Algorithm 2, in exact rational arithmetic (no floating point
    touches the distribution). ``scale`` is converted to an exact :class:`fractions.Fraction` t/s.
    Pure Python: thousands of samples per second, fine for a statistic, too slow for a model.
    """
    frac = scale if isinstance(scale, Fraction) else Fraction(positive("scale", scale))
    if frac <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    size = int_in("size", size, 0)
    instance("rand", rand, random.Random)
    t, s = frac.numerator, frac.denominator  # scale = t / s
    out = np.empty(size, dtype=np.int64)
    for n in range(size):
        while True:
            u = rand.randrange(t)
            if not _bernoulli_exp_neg(Fraction(u, t), rand):
                continue
            v = 0
            while _bernoulli_exp_neg(Fraction(1), rand):
                v += 1
            y = (u + t * v) // s  # geometric with parameter exp(-s/t)
            negative = rand.randrange(2) == 1
            if negative and y == 0:
                continue  # reject the duplicate zero
            out[n] = -y if negative else y
            break
    return out


def discrete_laplace_mechanism(value: Any, *, sensitivity: int, epsilon: float,
                               seed: int | None = None) -> Any:
    """:math:`\\varepsilon`-DP release of integer-valued ``value`` with discrete Laplace noise.

    Adds integer noise with :math:`P(z) \\propto e^{-\\varepsilon |z|/\\Delta_1}`, sampled exactly
    (:func:`discrete_laplace`), so outputs are integers and the privacy-loss ratio between neighbours
    is exactly bounded by :math:`e^{\\varepsilon}` -- no floating-point gaps (Mironov 2012) to
    exploit. ``epsilon`` is used as the exact rational value of its double.

    A **teaching implementation**: it follows the published algorithm but has not been audited for
    timing side channels, and ``seed`` makes it reproducible (a release would pass ``seed=None`` to use
    the operating system's cryptographic source).
    """
    sensitivity = int_in("sensitivity", sensitivity, 1)
    epsilon = check_epsilon(epsilon)
    is_tensor = isinstance(value, torch.Tensor)
    array = value.detach().cpu().numpy() if is_tensor else np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"value must be integer-valued, got dtype {array.dtype}")
    rand: random.Random = (secrets.SystemRandom() if seed is None
                           else random.Random(check_seed("seed", seed)))
    noise = discrete_laplace(scale=Fraction(int(sensitivity)) / Fraction(epsilon),
                             size=int(array.size), rand=rand).reshape(array.shape)
    out = array.astype(np.int64) + noise
    if is_tensor:
        return torch.from_numpy(out).to(value.device)
    return out if out.ndim else int(out)
