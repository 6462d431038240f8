"""Statistical tests of privrec.dp.mechanisms. Every test is seeded and uses bounds a wrong scale fails.

Tolerances are z = 5 standard errors unless stated (false-alarm probability ~6e-7 per check).
"""

from __future__ import annotations

import doctest
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from privrec.dp import discrete, empirical, local_dp, mechanisms
from privrec.dp.mechanisms import (
    add_gaussian_noise,
    analytic_gaussian_sigma,
    clamp,
    classic_gaussian_sigma,
    clip_rows_l1,
    clip_rows_l2,
    clipped_sum_sensitivity,
    count_sensitivity,
    discrete_laplace,
    discrete_laplace_mechanism,
    gaussian_delta,
    gaussian_mechanism,
    histogram_log_ratios,
    k_randomized_response,
    k_rr_frequencies,
    k_rr_keep_probability,
    laplace_mechanism,
    laplace_scale,
    privacy_loss_lower_bound,
    randomized_response,
    randomized_response_keep_probability,
    rr_debias_mean,
    sum_sensitivity,
)

Z = 5.0
N = 200_000


def _check_mean_var(x: np.ndarray, mean: float, var: float, fourth_central: float) -> None:
    n = x.size
    assert abs(x.mean() - mean) < Z * math.sqrt(var / n)
    # Var of the sample variance ~ (mu4 - var^2) / n
    assert abs(x.var() - var) < Z * math.sqrt((fourth_central - var**2) / n)


# ------------------------------------------------------------------------------------------- Laplace

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_laplace_mean_and_variance(kind):
    sensitivity, epsilon, true = 2.0, 0.5, 3.0
    b = sensitivity / epsilon
    value = np.full(N, true) if kind == "numpy" else torch.full((N,), true, dtype=torch.float64)
    out = laplace_mechanism(value, sensitivity=sensitivity, epsilon=epsilon, seed=1)
    assert type(out) is type(value)
    x = np.asarray(out)
    _check_mean_var(x, true, 2 * b**2, 24 * b**4)
    # the whole distribution, not only two moments
    assert stats.kstest(x - true, stats.laplace(scale=b).cdf).pvalue > 1e-4


def test_laplace_scale_divides_by_epsilon():
    assert laplace_scale(sensitivity=1.0, epsilon=0.1) == pytest.approx(10.0)
    assert laplace_scale(sensitivity=4.0, epsilon=2.0) == pytest.approx(2.0)


def test_doctests_of_the_mechanism_modules():
    for module in (mechanisms, local_dp, discrete, empirical):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__
    assert doctest.testmod(mechanisms).attempted >= 4


def test_public_names_are_importable_from_mechanisms():
    for name in mechanisms.__all__:
        assert callable(getattr(mechanisms, name)), name
    assert mechanisms.randomized_response is local_dp.randomized_response


def test_laplace_keeps_kind_dtype_and_is_reproducible():
    assert isinstance(laplace_mechanism(1.0, sensitivity=1, epsilon=1, seed=0), float)
    t = torch.zeros(5, dtype=torch.float32)
    out = laplace_mechanism(t, sensitivity=1, epsilon=1, seed=0)
    assert out.dtype == torch.float32 and out.shape == (5,)
    assert torch.equal(out, laplace_mechanism(t, sensitivity=1, epsilon=1, seed=0))
    assert not torch.equal(out, laplace_mechanism(t, sensitivity=1, epsilon=1, seed=1))
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(laplace_mechanism(np.zeros(4), sensitivity=1, epsilon=1, generator=g1),
                                  laplace_mechanism(np.zeros(4), sensitivity=1, epsilon=1, generator=g2))
    # a torch generator works on numpy data and vice versa
    out = laplace_mechanism(np.zeros(3), sensitivity=1, epsilon=1, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, np.ndarray)


# ----------------------------------------------------------------------- empirical privacy loss

def _neighbour_samples(scale: float, shift: float, n: int = 400_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.laplace(0.0, scale, n), shift + rng.laplace(0.0, scale, n)


def test_empirical_privacy_loss_of_correct_laplace_is_within_epsilon():
    epsilon, sensitivity = 1.0, 4.0  # e.g. a sum of one rating in [1, 5] under replace-one
    rng = np.random.default_rng(0)
    n = 400_000
    a = laplace_mechanism(np.zeros(n), sensitivity=sensitivity, epsilon=epsilon, generator=rng)
    b = laplace_mechanism(np.full(n, sensitivity), sensitivity=sensitivity, epsilon=epsilon, generator=rng)
    bins = np.linspace(-12, 16, 57)
    _, log_ratio, se = histogram_log_ratios(a, b, bins=bins)
    assert log_ratio.size > 30
    assert np.all(np.abs(log_ratio) <= epsilon + Z * se)
    # and the loss really reaches epsilon in the tails (the calibration is not over-conservative)
    assert np.max(np.abs(log_ratio)) > epsilon - 0.1
    assert privacy_loss_lower_bound(a, b, bins=bins) <= epsilon


@pytest.mark.parametrize("name, scale", [
    ("article: 1/(eps * range)", 1.0 / (1.0 * 4.0)),  # the article's b = 1/(eps * Delta_s)
    ("half the correct scale", 4.0 / 2.0),
    ("range of [1,5] confused with sensitivity 4 -> 1/eps", 1.0),
])
def test_mis_scaled_laplace_fails_the_same_test(name, scale):
    epsilon, sensitivity = 1.0, 4.0
    a, b = _neighbour_samples(scale, sensitivity)
    bins = np.linspace(-12, 16, 57)
    _, log_ratio, se = histogram_log_ratios(a, b, bins=bins)
    assert not np.all(np.abs(log_ratio) <= epsilon + Z * se), name
    assert privacy_loss_lower_bound(a, b, bins=bins) > epsilon


# ------------------------------------------------------------------------------------------ Gaussian

def test_classic_gaussian_sigma_and_its_epsilon_condition():
    sigma = classic_gaussian_sigma(sensitivity=2.0, epsilon=0.5, delta=1e-5)
    assert sigma == pytest.approx(2.0 * math.sqrt(2 * math.log(1.25e5)) / 0.5)
    with pytest.raises(ValueError, match="epsilon must be < 1"):
        classic_gaussian_sigma(sensitivity=1.0, epsilon=1.0, delta=1e-5)


def _hockey_stick_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """Tight delta by quadrature of the definition: int max(0, p(x) - e^eps q(x)) dx."""
    def integrand(x: float) -> float:
        p = stats.norm.pdf(x, 0.0, sigma)
        q = stats.norm.pdf(x, sensitivity, sigma)
        return max(0.0, p - math.exp(epsilon) * q)

    # p > e^eps q  iff  x < sensitivity/2 - eps sigma^2 / sensitivity
    cut = sensitivity / 2 - epsilon * sigma**2 / sensitivity
    value, _ = integrate.quad(integrand, cut - 40 * sigma, cut, epsabs=1e-15, epsrel=1e-10, limit=200)
    return value


@pytest.mark.parametrize("sigma, sensitivity, epsilon", [(1.0, 1.0, 0.5), (3.0, 1.0, 1.0),
                                                         (0.5, 2.0, 2.0), (1.0, 1.0, 8.0)])
def test_gaussian_delta_matches_definition(sigma, sensitivity, epsilon):
    exact = _hockey_stick_delta(sigma, sensitivity, epsilon)
    assert gaussian_delta(sigma=sigma, sensitivity=sensitivity, epsilon=epsilon) == pytest.approx(
        exact, rel=1e-6, abs=1e-14)


@pytest.mark.parametrize("epsilon, delta", [(0.1, 1e-5), (0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-8), (20.0, 1e-3)])
def test_analytic_gaussian_is_tight_and_beats_classic(epsilon, delta):
    sigma = analytic_gaussian_sigma(sensitivity=1.0, epsilon=epsilon, delta=delta)
    assert gaussian_delta(sigma=sigma, sensitivity=1.0, epsilon=epsilon) <= delta
    assert gaussian_delta(sigma=sigma * (1 - 1e-6), sensitivity=1.0, epsilon=epsilon) > delta
    if epsilon < 1:
        assert sigma < classic_gaussian_sigma(sensitivity=1.0, epsilon=epsilon, delta=delta)


def test_analytic_sigma_scales_with_sensitivity():
    s1 = analytic_gaussian_sigma(sensitivity=1.0, epsilon=1.0, delta=1e-5)
    s3 = analytic_gaussian_sigma(sensitivity=3.0, epsilon=1.0, delta=1e-5)
    assert s3 == pytest.approx(3 * s1, rel=1e-9)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_gaussian_mechanism_distribution(kind):
    sigma = analytic_gaussian_sigma(sensitivity=1.0, epsilon=1.0, delta=1e-5)
    value = np.zeros(N) if kind == "numpy" else torch.zeros(N, dtype=torch.float64)
    x = np.asarray(gaussian_mechanism(value, sensitivity=1.0, epsilon=1.0, delta=1e-5, seed=2))
    _check_mean_var(x, 0.0, sigma**2, 3 * sigma**4)
    x = np.asarray(gaussian_mechanism(value, sensitivity=1.0, epsilon=0.5, delta=1e-5,
                                      calibration="classic", seed=2))
    s = classic_gaussian_sigma(sensitivity=1.0, epsilon=0.5, delta=1e-5)
    _check_mean_var(x, 0.0, s**2, 3 * s**4)


def test_add_gaussian_noise_std():
    gen = torch.Generator().manual_seed(0)
    x = add_gaussian_noise(torch.zeros(N), std=0.7, generator=gen).double().numpy()
    _check_mean_var(x, 0.0, 0.49, 3 * 0.49**2)


# --------------------------------------------------------------------------- randomized response

@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_randomized_response_flip_probability(kind, epsilon):
    p_flip = 1.0 / (1.0 + math.exp(epsilon))
    assert randomized_response_keep_probability(epsilon=epsilon) == pytest.approx(1 - p_flip)
    for bit in (0, 1):
        bits = np.full(N, bit, dtype=np.int8) if kind == "numpy" else torch.full((N,), bit, dtype=torch.int8)
        out = np.asarray(randomized_response(bits, epsilon=epsilon, seed=7 + bit))
        flipped = np.mean(out != bit)
        assert abs(flipped - p_flip) < Z * math.sqrt(p_flip * (1 - p_flip) / N)
    # the ratio of report probabilities is exactly e^eps: keep / flip
    assert (1 - p_flip) / p_flip == pytest.approx(math.exp(epsilon))


def test_randomized_response_debiasing_is_unbiased():
    rng = np.random.default_rng(0)
    truth = (rng.random(N) < 0.2).astype(np.int8)
    reports = randomized_response(truth, epsilon=1.0, generator=rng)
    estimate = rr_debias_mean(reports.mean(), epsilon=1.0)
    p = randomized_response_keep_probability(epsilon=1.0)
    se = math.sqrt(0.25 / N) / (2 * p - 1)
    assert abs(estimate - truth.mean()) < Z * se


def test_k_rr_probabilities_and_frequency_estimates():
    k, epsilon = 6, 1.0
    p = k_rr_keep_probability(k=k, epsilon=epsilon)
    q = (1 - p) / (k - 1)
    assert p / q == pytest.approx(math.exp(epsilon))
    out = k_randomized_response(np.full(N, 2, dtype=np.int64), k=k, epsilon=epsilon, seed=0)
    share = np.bincount(out, minlength=k) / N
    expected = np.full(k, q)
    expected[2] = p
    assert np.all(np.abs(share - expected) < Z * np.sqrt(expected * (1 - expected) / N))
    # unbiased frequencies from a skewed population, torch input
    rng = np.random.default_rng(1)
    truth = rng.choice(k, size=N, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    reports = k_randomized_response(torch.from_numpy(truth), k=k, epsilon=epsilon, seed=3)
    assert isinstance(reports, torch.Tensor)
    est = k_rr_frequencies(reports, k=k, epsilon=epsilon)
    true_freq = np.bincount(truth, minlength=k) / N
    se = np.sqrt(0.25 / N) / (p - q)
    assert np.all(np.abs(est - true_freq) < Z * se)


# --------------------------------------------------------------------- discrete Laplace (safer)

def test_discrete_laplace_pmf():
    scale = Fraction(2)
    z = discrete_laplace(scale=scale, size=40_000, rand=random.Random(5))
    a = math.exp(-1 / 2)
    for v in range(-3, 4):
        p = (1 - a) / (1 + a) * a ** abs(v)
        assert abs(np.mean(z == v) - p) < Z * math.sqrt(p * (1 - p) / z.size)


def test_discrete_laplace_mechanism_privacy_loss_per_output():
    epsilon = 0.5
    n = 40_000
    a = discrete_laplace_mechanism(np.zeros(n, dtype=np.int64), sensitivity=1, epsilon=epsilon, seed=1)
    b = discrete_laplace_mechanism(np.ones(n, dtype=np.int64), sensitivity=1, epsilon=epsilon, seed=2)
    assert a.dtype == np.int64
    bins = np.arange(-8, 10) - 0.5  # one bin per integer output
    _, log_ratio, se = histogram_log_ratios(a, b, bins=bins)
    assert np.all(np.abs(log_ratio) <= epsilon + Z * se)
    assert isinstance(discrete_laplace_mechanism(3, sensitivity=1, epsilon=1.0, seed=0), int)


# ------------------------------------------------------------------------- clipping, sensitivity

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_clip_rows(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 2)) * rng.uniform(0.1, 5, size=(50, 1, 1))
    data = x if kind == "numpy" else torch.from_numpy(x)
    for clip, order in ((clip_rows_l2, 2), (clip_rows_l1, 1)):
        out = np.asarray(clip(data, clip_norm=1.5))
        norms_in = np.linalg.norm(x.reshape(50, -1), ord=order, axis=1)
        norms_out = np.linalg.norm(out.reshape(50, -1), ord=order, axis=1)
        assert np.all(norms_out <= 1.5 + 1e-12)
        inside = norms_in <= 1.5
        np.testing.assert_allclose(out[inside], x[inside])
        np.testing.assert_allclose(norms_out[~inside], 1.5)
        # direction preserved
        cos = np.sum(out.reshape(50, -1) * x.reshape(50, -1), axis=1) / (
            np.linalg.norm(out.reshape(50, -1), axis=1) * np.linalg.norm(x.reshape(50, -1), axis=1))
        np.testing.assert_allclose(cos, 1.0)


def test_clip_rows_is_differentiable():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], requires_grad=True)
    out = clip_rows_l2(x, clip_norm=1.0)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the zero row stays zero (the one zero-guard of privrec.dp.primitives.clip_factors)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_sensitivity_helpers():
    assert clipped_sum_sensitivity(clip_norm=2.0) == 2.0
    assert clipped_sum_sensitivity(clip_norm=2.0, relation="replace") == 4.0
    assert count_sensitivity() == 1.0 and count_sensitivity(max_contributions=20) == 20.0
    assert sum_sensitivity(lower=1.0, upper=5.0) == 5.0
    assert sum_sensitivity(lower=1.0, upper=5.0, relation="replace") == 4.0
    assert sum_sensitivity(lower=-2.0, upper=2.0) == 2.0
    np.testing.assert_array_equal(clamp(np.array([0.0, 3.0, 9.0]), lower=1, upper=5), [1.0, 3.0, 5.0])


# ----------------------------------------------------------------------------- parameter checks

BAD_EPSILON = [0.0, -1.0, math.nan, math.inf]
BAD_DELTA = [0.0, 1.0, -1e-5, math.nan]
BAD_SENSITIVITY = [0.0, -1.0, math.nan, math.inf]


@pytest.mark.parametrize("epsilon", BAD_EPSILON)
def test_bad_epsilon(epsilon):
    for call in (lambda: laplace_mechanism(0.0, sensitivity=1.0, epsilon=epsilon, seed=0),
                 lambda: gaussian_mechanism(0.0, sensitivity=1.0, epsilon=epsilon, delta=1e-5, seed=0),
                 lambda: analytic_gaussian_sigma(sensitivity=1.0, epsilon=epsilon, delta=1e-5),
                 lambda: randomized_response([0, 1], epsilon=epsilon, seed=0),
                 lambda: k_randomized_response([0, 1], k=3, epsilon=epsilon, seed=0),
                 lambda: discrete_laplace_mechanism(np.array([1]), sensitivity=1, epsilon=epsilon)):
        with pytest.raises(ValueError, match="epsilon"):
            call()


@pytest.mark.parametrize("delta", BAD_DELTA)
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        gaussian_mechanism(0.0, sensitivity=1.0, epsilon=1.0, delta=delta, seed=0)
    with pytest.raises(ValueError, match="delta"):
        classic_gaussian_sigma(sensitivity=1.0, epsilon=0.5, delta=delta)


@pytest.mark.parametrize("sensitivity", BAD_SENSITIVITY)
def test_bad_sensitivity(sensitivity):
    with pytest.raises(ValueError, match="sensitivity"):
        laplace_mechanism(0.0, sensitivity=sensitivity, epsilon=1.0, seed=0)
    with pytest.raises(ValueError, match="sensitivity"):
        gaussian_mechanism(0.0, sensitivity=sensitivity, epsilon=1.0, delta=1e-5, seed=0)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="generator or seed"):
        laplace_mechanism(0.0, sensitivity=1, epsilon=1, seed=0, generator=np.random.default_rng(0))
    with pytest.raises(TypeError, match="generator"):
        laplace_mechanism(0.0, sensitivity=1, epsilon=1, generator=42)
    with pytest.raises(ValueError, match="seed"):
        laplace_mechanism(0.0, sensitivity=1, epsilon=1, seed=-1)
    with pytest.raises(ValueError, match="value"):
        laplace_mechanism(np.array([0.0, np.nan]), sensitivity=1, epsilon=1, seed=0)
    with pytest.raises(ValueError, match="bits"):
        randomized_response(np.array([0, 2]), epsilon=1.0, seed=0)
    with pytest.raises(ValueError, match="k must"):
        k_randomized_response(np.array([0]), k=1, epsilon=1.0, seed=0)
    with pytest.raises(ValueError, match="values"):
        k_randomized_response(np.array([0, 3]), k=3, epsilon=1.0, seed=0)
    with pytest.raises(ValueError, match="calibration"):
        gaussian_mechanism(0.0, sensitivity=1, epsilon=1, delta=1e-5, calibration="textbook")
    with pytest.raises(ValueError, match="clip_norm"):
        clip_rows_l2(np.ones((2, 2)), clip_norm=0.0)
    with pytest.raises(ValueError, match="relation"):
        clipped_sum_sensitivity(clip_norm=1.0, relation="swap")
    with pytest.raises(ValueError, match="sensitivity"):
        discrete_laplace_mechanism(np.array([1]), sensitivity=0, epsilon=1.0)
    with pytest.raises(ValueError, match="integer"):
        discrete_laplace_mechanism(np.array([1.5]), sensitivity=1, epsilon=1.0)
    with pytest.raises(ValueError, match="lower"):
        clamp(np.ones(2), lower=5, upper=1)
    with pytest.raises(TypeError):
        laplace_mechanism(0.0, 1.0, 1.0)  # privacy parameters are keyword-only
