"""Randomized response: the local-DP mechanisms for bits and categories.

Each respondent perturbs their own answer before it leaves them, so no curator is trusted:
binary randomized response (Warner 1965) reports a bit truthfully with probability
:math:`e^\\varepsilon/(1+e^\\varepsilon)`; k-ary randomized response (Kairouz, Oh & Viswanath
2016) generalises it to ``k`` categories. Each report is :math:`\\varepsilon`-DP for the value it
reports (pure DP, no :math:`\\delta`). Importable from :mod:`privrec.dp.mechanisms`.

Examples
--------
>>> round(k_rr_keep_probability(k=2, epsilon=math.log(3)), 3)  # k = 2 is binary RR
0.75
>>> round(rr_debias_mean(0.25, epsilon=math.log(3)), 3)  # a quarter of the reports are 1: truth 0
0.0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..core.arrays import Generator, rng_for, uniform
from ..core.checks import check_epsilon, int_in, real_array

__all__ = ["randomized_response_keep_probability", "randomized_response", "rr_debias_mean",
           "k_rr_keep_probability", "k_randomized_response", "k_rr_frequencies"]


def randomized_response_keep_probability(*, epsilon: float) -> float:
    """Probability :math:`e^{\\varepsilon}/(1+e^{\\varepsilon})` that binary randomized response
    reports the true bit (Warner 1965; the ratio of keep to flip is exactly :math:`e^{\\varepsilon}`)."""
    epsilon = check_epsilon(epsilon)
    return 1.0 / (1.0 + math.exp(-epsilon))


def _check_bits(bits: Any) -> np.ndarray | torch.Tensor:
    if isinstance(bits, torch.Tensor):
        ok = bool(((bits == 0) | (bits == 1)).all())
    else:
        array = np.asarray(bits)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"bits must be 0/1 values, got dtype {array.dtype}")
        ok = bool(np.all((array == 0) | (array == 1)))
        bits = array
    if not ok:
        raise ValueError("bits must contain only 0 and 1 (or False/True)")
    return bits


def randomized_response(bits: Any, *, epsilon: float, generator: Generator | None = None,
                        seed: int | None = None) -> Any:
    """Binary randomized response: each bit is reported truthfully with probability
    :math:`e^{\\varepsilon}/(1+e^{\\varepsilon})` and flipped otherwise, independently.

    Each reported bit is :math:`\\varepsilon`-*locally* DP for that bit. A user who reports
    :math:`m` bits this way spends :math:`m\\varepsilon` on their whole vector (composition).
    Returns the same kind and dtype as ``bits``.
    """
    keep = randomized_response_keep_probability(epsilon=epsilon)
    bits = _check_bits(bits)
    gen = rng_for(bits, generator, seed)
    flip = uniform(gen, tuple(bits.shape)) >= keep
    if isinstance(bits, torch.Tensor):
        flip_t = flip if isinstance(flip, torch.Tensor) else torch.from_numpy(flip)
        flipped = torch.where(flip_t.to(bits.device), 1 - bits.long(), bits.long())
        return flipped.to(bits.dtype)
    flip_np = flip.numpy() if isinstance(flip, torch.Tensor) else flip
    out = np.where(flip_np, 1 - bits.astype(np.int64), bits.astype(np.int64))
    return out.astype(bits.dtype) if out.ndim else out.astype(bits.dtype).item()


def rr_debias_mean(reported_mean: Any, *, epsilon: float) -> Any:
    """Unbiased estimate of the true fraction of ones from the mean of randomized-response reports.

    With keep probability :math:`p`, :math:`E[\\text{report}] = (1-p) + (2p-1)\\,x`, so
    :math:`\\hat x = (\\bar r - (1-p))/(2p-1)`. (It can leave [0, 1]; clip only for display.)
    """
    p = randomized_response_keep_probability(epsilon=epsilon)
    if not isinstance(reported_mean, torch.Tensor):
        mean = real_array("reported_mean", reported_mean)
        reported_mean = mean if mean.ndim else float(mean)
    return (reported_mean - (1.0 - p)) / (2.0 * p - 1.0)


def k_rr_keep_probability(*, k: int, epsilon: float) -> float:
    """Probability :math:`e^{\\varepsilon}/(e^{\\varepsilon}+k-1)` that k-ary randomized response
    reports the true category (Kairouz, Oh & Viswanath 2016)."""
    k = _check_k(k)
    epsilon = check_epsilon(epsilon)
    return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))


def _check_k(k: object) -> int:
    return int_in("k", k, 2)


def k_randomized_response(values: Any, *, k: int, epsilon: float,
                          generator: Generator | None = None, seed: int | None = None) -> Any:
    """k-ary randomized response: report the true category in ``{0, ..., k-1}`` with probability
    :math:`e^{\\varepsilon}/(e^{\\varepsilon}+k-1)`, otherwise one of the other :math:`k-1`
    categories uniformly at random. Every pair of outputs has probability ratio at most
    :math:`e^{\\varepsilon}`, so each report is :math:`\\varepsilon`-locally DP.
    """
    keep = k_rr_keep_probability(k=k, epsilon=epsilon)
    k = int(k)
    is_tensor = isinstance(values, torch.Tensor)
    array = values.detach().cpu().numpy() if is_tensor else np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"values must be integer categories in [0, {k}), got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= k):
        raise ValueError(f"values must be integer categories in [0, {k}), got dtype {array.dtype}")
    gen = rng_for(values, generator, seed)
    shape = tuple(array.shape)
    u = uniform(gen, shape)
    v = uniform(gen, shape)
    u = u.numpy() if isinstance(u, torch.Tensor) else u
    v = v.numpy() if isinstance(v, torch.Tensor) else v
    other = np.minimum((v * (k - 1)).astype(np.int64), k - 2)  # uniform on {0, ..., k-2}
    other = other + (other >= array)  # skip the true category
    out = np.where(u < keep, array.astype(np.int64), other)
    if is_tensor:
        return torch.from_numpy(out).to(device=values.device, dtype=values.dtype)
    return out if out.ndim else int(out)


def k_rr_frequencies(reports: Any, *, k: int, epsilon: float) -> np.ndarray:
    """Unbiased estimate of the category frequencies behind k-RR ``reports``.

    :math:`E[\\hat f_c] = q + (p - q) f_c` with :math:`p` the keep probability and
    :math:`q = (1-p)/(k-1)`, so :math:`\\hat f_c = (\\text{share}_c - q)/(p - q)`.
    """
    p = k_rr_keep_probability(k=k, epsilon=epsilon)
    k = int(k)
    q = (1.0 - p) / (k - 1)
    array = np.asarray(reports.cpu() if isinstance(reports, torch.Tensor) else reports)
    if array.dtype.kind not in "iu":
        raise ValueError(f"reports must be integer categories, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError("reports must not be empty")
    share = np.bincount(array.ravel().astype(np.int64), minlength=k)[:k] / array.size
    return (share - q) / (p - q)
