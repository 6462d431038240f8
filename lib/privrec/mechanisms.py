"""Differential-privacy mechanisms: Laplace, Gaussian, randomized response, and their helpers.

A randomized mechanism :math:`M` is :math:`(\\varepsilon, \\delta)`-differentially private if for all
neighbouring datasets :math:`D, D'` and every set of outputs :math:`S`

.. math:: \\Pr[M(D) \\in S] \\le e^{\\varepsilon} \\Pr[M(D') \\in S] + \\delta

(Dwork, McSherry, Nissim & Smith 2006; Dwork & Roth 2014, Definition 2.4). The noise must be scaled
to the query's *sensitivity* -- the most one record can change the answer -- divided by
:math:`\\varepsilon`; never to the range of an attribute, and never by multiplying by
:math:`\\varepsilon`.

Every sampling function takes the data as a Python number, a NumPy array or a torch tensor and returns
the same kind. Randomness comes from an explicit ``generator`` (a :class:`numpy.random.Generator` or a
:class:`torch.Generator`) or a ``seed``; with neither, fresh operating-system entropy is used (what a
deployment wants, never what a test or a chapter wants). Privacy parameters are keyword-only, and bad
values raise ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import math
import random
import secrets
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from scipy import special

from .checks import check_delta, check_epsilon
from .checks import positive

__all__ = [
    "add_gaussian_noise",
    "analytic_gaussian_sigma",
    "clamp",
    "classic_gaussian_sigma",
    "clip_rows_l1",
    "clip_rows_l2",
    "clipped_sum_sensitivity",
    "count_sensitivity",
    "discrete_laplace",
    "discrete_laplace_mechanism",
    "gaussian_delta",
    "gaussian_mechanism",
    "histogram_log_ratios",
    "k_randomized_response",
    "k_rr_frequencies",
    "k_rr_keep_probability",
    "laplace_mechanism",
    "laplace_scale",
    "privacy_loss_lower_bound",
    "randomized_response",
    "randomized_response_keep_probability",
    "rr_debias_mean",
    "sum_sensitivity",
]

Generator = np.random.Generator | torch.Generator


# ----------------------------------------------------------------------------------------------
# Checks and the numpy/torch plumbing
# ----------------------------------------------------------------------------------------------

def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _rng_for(value: object, generator: Generator | None, seed: int | None) -> Generator:
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
        seed = _check_seed(seed)
        return torch.Generator().manual_seed(seed) if is_tensor else np.random.default_rng(seed)
    if is_tensor:
        gen = torch.Generator()
        gen.seed()  # operating-system entropy
        return gen
    return np.random.default_rng()


def _as_data(value: object, name: str = "value") -> np.ndarray | torch.Tensor:
    """The data as float64 ndarray or a floating tensor; NaN/inf rejected."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if not tensor.dtype.is_floating_point:
            tensor = tensor.to(torch.float64)
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        return tensor
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _shape(data: np.ndarray | torch.Tensor) -> tuple[int, ...]:
    return tuple(data.shape)


def _uniform(gen: Generator, shape: tuple[int, ...]) -> np.ndarray | torch.Tensor:
    if isinstance(gen, torch.Generator):
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    return gen.random(shape)


def _standard_normal(gen: Generator, shape: tuple[int, ...]) -> np.ndarray | torch.Tensor:
    if isinstance(gen, torch.Generator):
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    return gen.standard_normal(shape)


def _standard_laplace(gen: Generator, shape: tuple[int, ...]) -> np.ndarray | torch.Tensor:
    if isinstance(gen, torch.Generator):
        # Difference of two unit exponentials is standard Laplace.
        e = torch.empty((2, *shape), dtype=torch.float64).exponential_(1.0, generator=gen)
        return e[0] - e[1]
    return gen.laplace(0.0, 1.0, shape)


def _combine(value: object, data: np.ndarray | torch.Tensor,
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


# ----------------------------------------------------------------------------------------------
# Laplace mechanism
# ----------------------------------------------------------------------------------------------

def laplace_scale(*, sensitivity: float, epsilon: float) -> float:
    """Scale :math:`b = \\Delta_1 / \\varepsilon` of the Laplace mechanism.

    ``sensitivity`` is the L1 sensitivity :math:`\\Delta_1 = \\max_{D \\sim D'} \\|f(D) - f(D')\\|_1`.
    Note the division: *smaller* :math:`\\varepsilon` (more privacy) means *more* noise.
    """
    return positive("sensitivity", sensitivity) / check_epsilon(epsilon)


def laplace_mechanism(value: Any, *, sensitivity: float, epsilon: float,
                      generator: Generator | None = None, seed: int | None = None) -> Any:
    """Laplace mechanism (Dwork, McSherry, Nissim & Smith 2006): ``value + Lap(sensitivity/epsilon)``.

    Adds independent Laplace noise of scale :math:`b = \\Delta_1/\\varepsilon` to every coordinate of
    ``value`` (a number, array or tensor: the *true* answer of a query whose L1 sensitivity is
    ``sensitivity``). The result is :math:`\\varepsilon`-DP for the neighbouring relation the
    sensitivity was computed under.

    .. warning::
       This is the *textbook* mechanism, sampled in floating point. Mironov (2012) showed that
       floating-point Laplace samples are not spread over the reals: the set of outputs that one input
       can produce differs from the set its neighbour can produce, so some outputs reveal the input
       exactly and the :math:`\\varepsilon` guarantee fails. Use it for teaching and for research
       prototypes; for a real release of integer-valued statistics use
       :func:`discrete_laplace_mechanism` (exact-arithmetic sampling, Canonne, Kamath & Steinke 2020)
       or a vetted library with a snapping / discrete implementation.
    """
    scale = laplace_scale(sensitivity=sensitivity, epsilon=epsilon)
    data = _as_data(value)
    gen = _rng_for(value, generator, seed)
    return _combine(value, data, scale * _standard_laplace(gen, _shape(data)))


# ----------------------------------------------------------------------------------------------
# Gaussian mechanism
# ----------------------------------------------------------------------------------------------

def classic_gaussian_sigma(*, sensitivity: float, epsilon: float, delta: float) -> float:
    """Classic Gaussian calibration :math:`\\sigma = \\Delta_2\\sqrt{2\\ln(1.25/\\delta)}/\\varepsilon`.

    Dwork & Roth (2014), Theorem A.1. The proof only covers :math:`\\varepsilon < 1`, so
    ``epsilon >= 1`` raises ``ValueError`` (use :func:`analytic_gaussian_sigma`, valid for every
    :math:`\\varepsilon` and never larger than needed). ``sensitivity`` is the L2 sensitivity.
    """
    sensitivity = positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    if epsilon >= 1.0:
        raise ValueError(f"epsilon must be < 1 for the classic Gaussian calibration (Dwork & Roth "
                         f"2014, Thm A.1), got {epsilon}; use the analytic calibration instead")
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def gaussian_delta(*, sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact :math:`\\delta` of the Gaussian mechanism with noise ``sigma`` at ``epsilon``.

    Balle & Wang (2018), Theorem 8: adding :math:`\\mathcal N(0, \\sigma^2 I)` to a query with L2
    sensitivity :math:`\\Delta` is :math:`(\\varepsilon, \\delta)`-DP if and only if

    .. math:: \\Phi\\Big(\\frac{\\Delta}{2\\sigma} - \\frac{\\varepsilon\\sigma}{\\Delta}\\Big)
              - e^{\\varepsilon}\\,
              \\Phi\\Big(-\\frac{\\Delta}{2\\sigma} - \\frac{\\varepsilon\\sigma}{\\Delta}\\Big)
              \\le \\delta .

    The left-hand side is returned (evaluated with log-CDFs so that large ``epsilon`` cannot overflow).
    """
    sigma = positive("sigma", sigma)
    sensitivity = positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    first = float(special.ndtr(a - b))
    second = math.exp(epsilon + float(special.log_ndtr(-a - b)))
    return max(0.0, first - second)


def analytic_gaussian_sigma(*, sensitivity: float, epsilon: float, delta: float,
                            rtol: float = 1e-12) -> float:
    """Smallest :math:`\\sigma` for which the Gaussian mechanism is :math:`(\\varepsilon, \\delta)`-DP.

    The analytic Gaussian mechanism of Balle & Wang (2018): bisection (in :math:`\\log\\sigma`) on the
    exact condition of :func:`gaussian_delta`, which decreases in :math:`\\sigma`. Valid for every
    :math:`\\varepsilon > 0`; the returned value is the upper end of the final bracket, so the
    condition holds at it.
    """
    sensitivity = positive("sensitivity", sensitivity)
    epsilon = check_epsilon(epsilon)
    delta = check_delta(delta)
    rtol = positive("rtol", rtol)

    def ok(sigma: float) -> bool:
        return gaussian_delta(sigma=sigma, sensitivity=sensitivity, epsilon=epsilon) <= delta

    high = sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    while not ok(high):
        high *= 2.0
    low = high / 2.0
    while ok(low):
        low /= 2.0
        if low < 1e-300:  # cannot happen for delta < 1; keeps the loop finite
            return low
    while high - low > rtol * high:
        mid = math.sqrt(low * high)
        if ok(mid):
            high = mid
        else:
            low = mid
    return high


def add_gaussian_noise(value: Any, *, std: float, generator: Generator | None = None,
                       seed: int | None = None) -> Any:
    """``value`` plus independent :math:`\\mathcal N(0, \\text{std}^2)` noise on every coordinate.

    The raw sampler, with no privacy calibration: DP-SGD and DP-FedAvg call it with
    ``std = noise_multiplier * clip_norm`` and account with :mod:`privrec.accounting`.
    """
    std = positive("std", std)
    data = _as_data(value)
    gen = _rng_for(value, generator, seed)
    return _combine(value, data, std * _standard_normal(gen, _shape(data)))


def gaussian_mechanism(value: Any, *, sensitivity: float, epsilon: float, delta: float,
                       calibration: str = "analytic", generator: Generator | None = None,
                       seed: int | None = None) -> Any:
    """Gaussian mechanism: ``value`` plus :math:`\\mathcal N(0, \\sigma^2)` noise;
    :math:`(\\varepsilon, \\delta)`-DP.

    ``sensitivity`` is the L2 sensitivity. ``calibration="analytic"`` (default) uses
    :func:`analytic_gaussian_sigma` (Balle & Wang 2018, valid for all :math:`\\varepsilon`);
    ``"classic"`` uses :func:`classic_gaussian_sigma` (requires :math:`\\varepsilon < 1`).
    The same floating-point caveat as :func:`laplace_mechanism` applies.
    """
    if calibration == "analytic":
        sigma = analytic_gaussian_sigma(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
    elif calibration == "classic":
        sigma = classic_gaussian_sigma(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic', got {calibration!r}")
    return add_gaussian_noise(value, std=sigma, generator=generator, seed=seed)


# ----------------------------------------------------------------------------------------------
# Randomized response (local DP)
# ----------------------------------------------------------------------------------------------

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
    gen = _rng_for(bits, generator, seed)
    flip = _uniform(gen, tuple(bits.shape)) >= keep
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
    return (reported_mean - (1.0 - p)) / (2.0 * p - 1.0)


def k_rr_keep_probability(*, k: int, epsilon: float) -> float:
    """Probability :math:`e^{\\varepsilon}/(e^{\\varepsilon}+k-1)` that k-ary randomized response
    reports the true category (Kairouz, Oh & Viswanath 2016)."""
    k = _check_k(k)
    epsilon = check_epsilon(epsilon)
    return 1.0 / (1.0 + (k - 1) * math.exp(-epsilon))


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    return int(k)


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
    if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() >= k)):
        raise ValueError(f"values must be integer categories in [0, {k}), got dtype {array.dtype}")
    gen = _rng_for(values, generator, seed)
    shape = tuple(array.shape)
    u = _uniform(gen, shape)
    v = _uniform(gen, shape)
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
    if array.size == 0:
        raise ValueError("reports must not be empty")
    share = np.bincount(array.ravel().astype(np.int64), minlength=k)[:k] / array.size
    return (share - q) / (p - q)


# ----------------------------------------------------------------------------------------------
# Clipping and sensitivity helpers (DP-SGD and DP-FedAvg build on these)
# ----------------------------------------------------------------------------------------------

def _row_norms(x: Any, order: int) -> tuple[Any, Any]:
    if isinstance(x, torch.Tensor):
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (rows)")
        flat = x.reshape(x.shape[0], -1)
        return flat, torch.linalg.vector_norm(flat, ord=order, dim=1)
    array = np.asarray(x, dtype=np.float64)
    if array.ndim < 1:
        raise ValueError("x must have at least one dimension (rows)")
    flat = array.reshape(array.shape[0], -1)
    return flat, np.linalg.norm(flat, ord=order, axis=1)


def _clip_rows(x: Any, max_norm: float, order: int) -> Any:
    max_norm = positive("max_norm", max_norm)
    flat, norms = _row_norms(x, order)
    if isinstance(flat, torch.Tensor):
        factor = max_norm / torch.clamp(norms, min=max_norm)
        return (flat * factor.unsqueeze(1)).reshape(x.shape)
    factor = max_norm / np.maximum(norms, max_norm)
    return (flat * factor[:, None]).reshape(np.shape(x))


def clip_rows_l2(x: Any, *, max_norm: float) -> Any:
    """Scale every row (first axis; the rest flattened) to L2 norm at most ``max_norm``.

    Rows already inside the ball are unchanged; the others are projected onto its surface
    (:math:`x \\cdot C/\\|x\\|_2`). After clipping, a sum over rows has L2 sensitivity ``max_norm``
    under add/remove-one-row (see :func:`clipped_sum_sensitivity`). Differentiable for tensors.
    """
    return _clip_rows(x, max_norm, 2)


def clip_rows_l1(x: Any, *, max_norm: float) -> Any:
    """Scale every row to L1 norm at most ``max_norm`` (for Laplace noise on a sum of rows)."""
    return _clip_rows(x, max_norm, 1)


_RELATIONS = ("add_remove", "replace")


def _check_relation(relation: str) -> str:
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")
    return relation


def clipped_sum_sensitivity(*, max_norm: float, relation: str = "add_remove") -> float:
    """Sensitivity of :math:`\\sum_i \\text{clip}(x_i)` when every row has norm at most ``max_norm``.

    Adding or removing one row moves the sum by at most ``max_norm`` (in the norm used for clipping);
    replacing one row by another moves it by up to ``2 * max_norm`` (triangle inequality).
    """
    max_norm = positive("max_norm", max_norm)
    return max_norm if _check_relation(relation) == "add_remove" else 2.0 * max_norm


def count_sensitivity(*, max_contributions: int = 1, relation: str = "add_remove") -> float:
    """L1 sensitivity of a count when one privacy unit contributes at most ``max_contributions``.

    Example-level DP on ratings: one rating changes a movie's rating count by 1. User-level DP: a
    user with up to :math:`m` ratings changes the *vector* of per-movie counts by up to :math:`m` in
    L1 (at most one per movie), so the histogram's sensitivity is :math:`m`. Under "replace" a unit
    can move its contributions elsewhere, doubling it.
    """
    if (isinstance(max_contributions, bool) or not isinstance(max_contributions, (int, np.integer))
            or max_contributions < 1):
        raise ValueError(f"max_contributions must be an int >= 1, got {max_contributions!r}")
    m = float(max_contributions)
    return m if _check_relation(relation) == "add_remove" else 2.0 * m


def clamp(x: Any, *, lower: float, upper: float) -> Any:
    """Clamp values into ``[lower, upper]`` -- the step that gives a sum or mean a finite sensitivity."""
    lower_f, upper_f = float(lower), float(upper)
    if not (math.isfinite(lower_f) and math.isfinite(upper_f)) or lower_f >= upper_f:
        raise ValueError(f"need finite lower < upper, got lower={lower!r}, upper={upper!r}")
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lower_f, upper_f)
    out = np.clip(np.asarray(x, dtype=np.float64), lower_f, upper_f)
    return out if out.ndim else float(out)


def sum_sensitivity(*, lower: float, upper: float, relation: str = "add_remove") -> float:
    """Sensitivity of a sum of values clamped to ``[lower, upper]``.

    Add/remove one value: :math:`\\max(|\\text{lower}|, |\\text{upper}|)`. Replace one value:
    :math:`\\text{upper} - \\text{lower}`. Centering (clamping :math:`x - c` with
    :math:`c` the midpoint) makes the add/remove sensitivity :math:`(\\text{upper}-\\text{lower})/2`.
    """
    lower_f, upper_f = float(lower), float(upper)
    if not (math.isfinite(lower_f) and math.isfinite(upper_f)) or lower_f >= upper_f:
        raise ValueError(f"need finite lower < upper, got lower={lower!r}, upper={upper!r}")
    if _check_relation(relation) == "add_remove":
        return max(abs(lower_f), abs(upper_f))
    return upper_f - lower_f


# ----------------------------------------------------------------------------------------------
# A safer option for integer-valued queries: the discrete Laplace mechanism
# ----------------------------------------------------------------------------------------------

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
    frac = Fraction(scale)
    if frac <= 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
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
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, np.integer)) or sensitivity < 1:
        raise ValueError(f"sensitivity must be an int >= 1 for integer queries, got {sensitivity!r}")
    epsilon = check_epsilon(epsilon)
    is_tensor = isinstance(value, torch.Tensor)
    array = value.detach().cpu().numpy() if is_tensor else np.asarray(value)
    if array.dtype.kind not in "iu":
        raise ValueError(f"value must be integer-valued, got dtype {array.dtype}")
    rand: random.Random = (secrets.SystemRandom() if seed is None
                           else random.Random(_check_seed(seed)))
    noise = discrete_laplace(scale=Fraction(int(sensitivity)) / Fraction(epsilon),
                             size=int(array.size), rand=rand).reshape(array.shape)
    out = array.astype(np.int64) + noise
    if is_tensor:
        return torch.from_numpy(out).to(value.device)
    return out if out.ndim else int(out)


# ----------------------------------------------------------------------------------------------
# Auditing: the empirical privacy loss between two output samples
# ----------------------------------------------------------------------------------------------

def histogram_log_ratios(samples_a: Any, samples_b: Any, *, bins: Any,
                         min_count: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per-bin estimates of :math:`\log(P_a(\text{bin}) / P_b(\text{bin}))` with standard errors.

    For an :math:`\varepsilon`-DP mechanism run on neighbours :math:`D_a, D_b`, every bin's true log
    ratio lies in :math:`[-\varepsilon, \varepsilon]` (a ratio of integrals is bounded by the
    pointwise ratio). Counts get +1 smoothing, which pulls estimates towards 0 -- so a violation found
    with it is real -- and the standard error is the delta-method :math:`\sqrt{1/(n_a+1)+1/(n_b+1)}`.
    Bins where *both* counts are below ``min_count`` are dropped; a bin full of outputs from one input
    and empty for the other is kept, because that is exactly what a broken mechanism produces.
    Returns ``(bin_centers, log_ratio, stderr)``.
    """
    a = np.asarray(samples_a, dtype=np.float64).ravel()
    b = np.asarray(samples_b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("samples_a and samples_b must be non-empty")
    counts_a, edges = np.histogram(a, bins=bins)
    counts_b, _ = np.histogram(b, bins=edges)
    keep = np.maximum(counts_a, counts_b) >= min_count
    centers = 0.5 * (edges[:-1] + edges[1:])
    ca = counts_a[keep].astype(np.float64) + 1.0
    cb = counts_b[keep].astype(np.float64) + 1.0
    log_ratio = np.log(ca / (a.size + 1.0)) - np.log(cb / (b.size + 1.0))
    stderr = np.sqrt(1.0 / ca + 1.0 / cb)
    return centers[keep], log_ratio, stderr


def privacy_loss_lower_bound(samples_a: Any, samples_b: Any, *, bins: Any, z: float = 4.0,
                             min_count: int = 100) -> float:
    r"""A high-confidence lower bound on the privacy loss :math:`\varepsilon` seen in two samples.

    :math:`\max_\text{bins}(|\widehat{\log\text{ratio}}| - z\cdot\text{se})` from
    :func:`histogram_log_ratios`. If it exceeds the claimed :math:`\varepsilon`, the mechanism (or its
    calibration) is not :math:`\varepsilon`-DP, up to a per-bin false-alarm probability of about
    :math:`\Phi(-z)` (3e-5 for ``z = 4``). A value below :math:`\varepsilon` proves nothing about
    other outputs or other neighbours: audits can refute privacy claims, not establish them.
    """
    _, log_ratio, stderr = histogram_log_ratios(samples_a, samples_b, bins=bins, min_count=min_count)
    if log_ratio.size == 0:
        return 0.0
    return float(np.max(np.abs(log_ratio) - positive("z", z) * stderr))
