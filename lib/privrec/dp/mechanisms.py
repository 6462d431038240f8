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

This module holds the central mechanisms (Laplace, Gaussian) and the clipping and sensitivity
helpers; randomized response (:mod:`privrec.dp.local_dp`), the discrete Laplace mechanism
(:mod:`privrec.dp.discrete`) and the empirical privacy-loss audit (:mod:`privrec.dp.empirical`) live in
their own modules and are importable from here too.

Examples
--------
>>> laplace_scale(sensitivity=4.0, epsilon=2.0)
2.0
>>> round(analytic_gaussian_sigma(sensitivity=1.0, epsilon=1.0, delta=1e-5), 3)
3.731
>>> round(randomized_response_keep_probability(epsilon=math.log(3)), 3)
0.75
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy import special

from ..core.arrays import Generator, as_data, combine, rng_for
from ..core.checks import check_delta, check_epsilon, choice, int_in, positive, real, real_array
from .discrete import discrete_laplace, discrete_laplace_mechanism
from .empirical import histogram_log_ratios, privacy_loss_lower_bound
from .local_dp import (
    k_randomized_response,
    k_rr_frequencies,
    k_rr_keep_probability,
    randomized_response,
    randomized_response_keep_probability,
    rr_debias_mean,
)
from .primitives import clip_rows, gaussian_noise, laplace_noise

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
    data = as_data(value)
    gen = rng_for(value, generator, seed)
    return combine(value, data, laplace_noise(tuple(data.shape), scale=scale, generator=gen))


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

    A one-off release with no privacy calibration (the caller picks ``std`` and records the
    release on a :class:`privrec.dp.ledger.PrivacyLedger`); the draw is
    :func:`privrec.dp.primitives.gaussian_noise`, the sampler the private trainers use too.
    """
    std = positive("std", std)
    data = as_data(value)
    gen = rng_for(value, generator, seed)
    return combine(value, data, gaussian_noise(tuple(data.shape), std=std, generator=gen,
                                               dtype=torch.float64))


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
    choice("calibration", calibration, ("analytic", "classic"))
    if calibration == "analytic":
        sigma = analytic_gaussian_sigma(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
    elif calibration == "classic":
        sigma = classic_gaussian_sigma(sensitivity=sensitivity, epsilon=epsilon, delta=delta)
    else:
        raise ValueError(f"calibration must be 'analytic' or 'classic', got {calibration!r}")
    return add_gaussian_noise(value, std=sigma, generator=generator, seed=seed)


# ----------------------------------------------------------------------------------------------
# Clipping and sensitivity helpers
# ----------------------------------------------------------------------------------------------

def _clip_rows(x: Any, clip_norm: float, order: int) -> Any:
    """:func:`privrec.dp.primitives.clip_rows` without the norms."""
    return clip_rows(x, clip_norm=clip_norm, order=order)[0]


def clip_rows_l2(x: Any, *, clip_norm: float) -> Any:
    """Scale every row (first axis; the rest flattened) to L2 norm at most ``clip_norm``.

    Rows already inside the ball are unchanged; the others are projected onto its surface
    (:math:`x \\cdot C/\\|x\\|_2`), with the one zero-guard of
    :func:`privrec.dp.primitives.clip_factors`. After clipping, a sum over rows has L2 sensitivity
    ``clip_norm`` under add/remove-one-row (see :func:`clipped_sum_sensitivity`). Works on arrays and
    tensors (differentiable).

    >>> clip_rows_l2(np.array([[3.0, 4.0], [0.3, 0.4]]), clip_norm=1.0)
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    return _clip_rows(x, clip_norm, 2)


def clip_rows_l1(x: Any, *, clip_norm: float) -> Any:
    """Scale every row to L1 norm at most ``clip_norm`` (for Laplace noise on a sum of rows)."""
    return _clip_rows(x, clip_norm, 1)


_RELATIONS = ("add_remove", "replace")


def _check_relation(relation: str) -> str:
    return choice("relation", relation, _RELATIONS)


def _check_bounds(lower: object, upper: object) -> tuple[float, float]:
    lower_f, upper_f = real("lower", lower), real("upper", upper)
    if not (math.isfinite(lower_f) and math.isfinite(upper_f)) or lower_f >= upper_f:
        raise ValueError(f"need finite lower < upper, got lower={lower!r}, upper={upper!r}")
    return lower_f, upper_f


def clipped_sum_sensitivity(*, clip_norm: float, relation: str = "add_remove") -> float:
    """Sensitivity of :math:`\\sum_i \\text{clip}(x_i)` when every row has norm at most ``clip_norm``.

    Adding or removing one row moves the sum by at most ``clip_norm`` (in the norm used for
    clipping); replacing one row by another moves it by up to ``2 * clip_norm`` (triangle
    inequality).

    >>> clipped_sum_sensitivity(clip_norm=1.5), clipped_sum_sensitivity(clip_norm=1.5, relation="replace")
    (1.5, 3.0)
    """
    clip_norm = positive("clip_norm", clip_norm)
    return clip_norm if _check_relation(relation) == "add_remove" else 2.0 * clip_norm


def count_sensitivity(*, max_contributions: int = 1, relation: str = "add_remove") -> float:
    """L1 sensitivity of a count when one privacy unit contributes at most ``max_contributions``.

    Example-level DP on ratings: one rating changes a movie's rating count by 1. User-level DP: a
    user with up to :math:`m` ratings changes the *vector* of per-movie counts by up to :math:`m` in
    L1 (at most one per movie), so the histogram's sensitivity is :math:`m`. Under "replace" a unit
    can move its contributions elsewhere, doubling it.
    """
    m = float(int_in("max_contributions", max_contributions, 1))
    return m if _check_relation(relation) == "add_remove" else 2.0 * m


def clamp(x: Any, *, lower: float, upper: float) -> Any:
    """Clamp values into ``[lower, upper]`` -- the step that gives a sum or mean a finite sensitivity."""
    lower_f, upper_f = _check_bounds(lower, upper)
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lower_f, upper_f)
    out = np.clip(real_array("x", x), lower_f, upper_f)
    return out if out.ndim else float(out)


def sum_sensitivity(*, lower: float, upper: float, relation: str = "add_remove") -> float:
    """Sensitivity of a sum of values clamped to ``[lower, upper]``.

    Add/remove one value: :math:`\\max(|\\text{lower}|, |\\text{upper}|)`. Replace one value:
    :math:`\\text{upper} - \\text{lower}`. Centering (clamping :math:`x - c` with
    :math:`c` the midpoint) makes the add/remove sensitivity :math:`(\\text{upper}-\\text{lower})/2`.
    """
    lower_f, upper_f = _check_bounds(lower, upper)
    if _check_relation(relation) == "add_remove":
        return max(abs(lower_f), abs(upper_f))
    return upper_f - lower_f
