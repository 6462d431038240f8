"""Private selection (privrec.dp.selection): statistical tests against exact distributions.

The samplers are compared with the exact probabilities by chi-square goodness-of-fit tests on many
seeded draws (a fixed seed makes each test deterministic; the threshold p > 1e-4 would fail a
correct sampler once in 10,000 seeds). Each comparison also has a *power* check: the same test
rejects a sampler with the wrong temperature, so the tests can fail.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from privrec.dp.selection import (
    exponential_mechanism,
    exponential_mechanism_probabilities,
    gumbel_noise,
    gumbel_top_k,
    peeling_top_k,
    private_quantile,
    report_noisy_max,
    top_k_sequence_probability,
)

SCORES = np.array([3.0, 1.0, 2.5, 0.0, 2.0])
EPS = 1.2
DRAWS = 20_000


def _chi2_pvalue(observed_labels, expected_probabilities):
    labels = np.asarray(observed_labels)
    observed = np.bincount(labels, minlength=len(expected_probabilities))
    expected = np.asarray(expected_probabilities) * len(labels)
    return stats.chisquare(observed, expected).pvalue


def _ordered_outcomes(n, k):
    return list(itertools.permutations(range(n), k))


def _sequence_labels(draws, outcomes):
    index = {o: j for j, o in enumerate(outcomes)}
    return [index[tuple(int(x) for x in d)] for d in draws]


# -- the exponential mechanism and report-noisy-max ---------------------------------------------

def test_probabilities_are_the_softmax_of_eps_u_over_two_delta():
    expected = special.softmax(EPS * SCORES / 2.0)
    assert np.allclose(exponential_mechanism_probabilities(SCORES, epsilon=EPS), expected)
    monotone = special.softmax(EPS * SCORES / 1.0)
    assert np.allclose(exponential_mechanism_probabilities(SCORES, epsilon=EPS, monotonic=True),
                       monotone)


def test_probabilities_do_not_overflow_for_large_utilities():
    p = exponential_mechanism_probabilities([1e6, 1e6 - 1.0, 0.0], epsilon=2.0)
    assert np.all(np.isfinite(p)) and math.isclose(p.sum(), 1.0)
    assert math.isclose(p[0] / p[1], math.e)


def test_sensitivity_and_epsilon_enter_only_as_their_ratio():
    a = exponential_mechanism_probabilities(SCORES, epsilon=0.5, sensitivity=1.0)
    b = exponential_mechanism_probabilities(SCORES, epsilon=2.0, sensitivity=4.0)
    c = exponential_mechanism_probabilities(SCORES, epsilon=1.0, sensitivity=1.0)
    assert np.allclose(a, b) and not np.allclose(a, c)
    # the log-odds of two candidates is eps * (u_i - u_j) / (2 Delta)
    assert math.isclose(math.log(c[0] / c[1]), 1.0 * (3.0 - 1.0) / 2.0)


def test_exponential_mechanism_is_epsilon_dp_on_neighbouring_utilities():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(2000):
        u = rng.integers(0, 20, size=6).astype(float)
        v = u + rng.integers(-1, 2, size=6)  # every utility moves by at most Delta = 1
        p = exponential_mechanism_probabilities(u, epsilon=EPS)
        q = exponential_mechanism_probabilities(v, epsilon=EPS)
        worst = max(worst, np.max(np.abs(np.log(p / q))))
    assert worst <= EPS + 1e-12
    assert worst > 0.9 * EPS  # the bound is nearly reached: the factor 2 is needed in general


def test_monotone_form_is_dp_only_for_same_direction_changes():
    u = np.array([5.0, 5.0, 0.0])
    up = u + np.array([1.0, 0.0, 1.0])  # one user added: counts only go up
    mixed = u + np.array([1.0, -1.0, 0.0])  # not a neighbour under add/remove of a user
    p = exponential_mechanism_probabilities(u, epsilon=EPS, monotonic=True)
    q_up = exponential_mechanism_probabilities(up, epsilon=EPS, monotonic=True)
    q_mixed = exponential_mechanism_probabilities(mixed, epsilon=EPS, monotonic=True)
    assert np.max(np.abs(np.log(p / q_up))) <= EPS + 1e-12
    assert np.max(np.abs(np.log(p / q_mixed))) > EPS  # the flag is not free


@pytest.mark.parametrize("monotonic", [False, True])
def test_exponential_mechanism_sampler_matches_its_probabilities(monotonic):
    gen = np.random.default_rng(1)
    draws = [exponential_mechanism(SCORES, epsilon=EPS, monotonic=monotonic, generator=gen)
             for _ in range(DRAWS)]
    p = exponential_mechanism_probabilities(SCORES, epsilon=EPS, monotonic=monotonic)
    assert _chi2_pvalue(draws, p) > 1e-4


def test_report_noisy_max_with_gumbel_noise_is_the_exponential_mechanism():
    gen = np.random.default_rng(2)
    draws = [report_noisy_max(SCORES, epsilon=EPS, generator=gen) for _ in range(DRAWS)]
    assert _chi2_pvalue(draws, exponential_mechanism_probabilities(SCORES, epsilon=EPS)) > 1e-4
    # power: the same draws are clearly not the monotone (half-temperature) distribution
    wrong = exponential_mechanism_probabilities(SCORES, epsilon=EPS, monotonic=True)
    assert _chi2_pvalue(draws, wrong) < 1e-12


def test_report_noisy_max_with_laplace_noise_is_a_different_distribution():
    gen = np.random.default_rng(3)
    draws = [report_noisy_max(SCORES, epsilon=EPS, noise="laplace", generator=gen)
             for _ in range(DRAWS)]
    assert _chi2_pvalue(draws, exponential_mechanism_probabilities(SCORES, epsilon=EPS)) < 1e-6
    assert report_noisy_max(SCORES, epsilon=1e4, noise="laplace", seed=0) == 0


def test_ties_are_picked_uniformly():
    tied = np.array([2.0, 2.0, 2.0, 0.0])
    p = exponential_mechanism_probabilities(tied, epsilon=1.0)
    assert np.allclose(p[:3], p[0]) and p[3] < p[0]
    gen = np.random.default_rng(4)
    draws = [report_noisy_max(tied, epsilon=50.0, generator=gen) for _ in range(6000)]
    assert set(draws) == {0, 1, 2}
    assert _chi2_pvalue(draws, [1 / 3, 1 / 3, 1 / 3, 0.0][:3]) > 1e-4
    first = [int(gumbel_top_k(np.zeros(4), k=4, epsilon=1.0, generator=gen)[0]) for _ in range(8000)]
    assert _chi2_pvalue(first, np.full(4, 0.25)) > 1e-4


# -- private top-k --------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [gumbel_top_k, peeling_top_k])
def test_top_k_samplers_match_the_exact_peeling_distribution(sampler):
    outcomes = _ordered_outcomes(len(SCORES), 2)
    exact = [top_k_sequence_probability(SCORES, o, epsilon=EPS) for o in outcomes]
    assert math.isclose(sum(exact), 1.0)
    gen = np.random.default_rng(5)
    draws = [sampler(SCORES, k=2, epsilon=EPS, generator=gen) for _ in range(DRAWS)]
    labels = _sequence_labels(draws, outcomes)
    assert _chi2_pvalue(labels, exact) > 1e-4
    hotter = [top_k_sequence_probability(SCORES, o, epsilon=2 * EPS) for o in outcomes]
    assert _chi2_pvalue(labels, hotter) < 1e-12  # power: a wrong temperature is rejected


def test_gumbel_top_k_selection_probabilities_match_the_exponential_mechanism():
    """The probability that each item is among the k picked, exact vs 20,000 one-shot draws."""
    k = 3
    inclusion = np.zeros(len(SCORES))
    for order in _ordered_outcomes(len(SCORES), k):
        inclusion[list(order)] += top_k_sequence_probability(SCORES, order, epsilon=EPS)
    assert math.isclose(inclusion.sum(), k)
    gen = np.random.default_rng(6)
    hits = np.zeros(len(SCORES))
    for _ in range(DRAWS):
        hits[gumbel_top_k(SCORES, k=k, epsilon=EPS, generator=gen)] += 1
    freq = hits / DRAWS
    se = np.sqrt(inclusion * (1 - inclusion) / DRAWS)
    assert np.all(np.abs(freq - inclusion) <= 4.5 * se)
    # the first pick alone is the exponential mechanism
    firsts = [int(gumbel_top_k(SCORES, k=1, epsilon=EPS, generator=gen)[0]) for _ in range(DRAWS)]
    assert _chi2_pvalue(firsts, exponential_mechanism_probabilities(SCORES, epsilon=EPS)) > 1e-4


def test_top_k_costs_k_times_epsilon_on_neighbours():
    u = np.array([4.0, 3.0, 3.0, 1.0, 0.0])
    v = u + np.array([1.0, 0.0, 1.0, 1.0, 0.0])  # one added user rated items 0, 2 and 3
    worst = max(abs(math.log(top_k_sequence_probability(u, o, epsilon=EPS, monotonic=True)
                             / top_k_sequence_probability(v, o, epsilon=EPS, monotonic=True)))
                for o in _ordered_outcomes(5, 3))
    assert worst <= 3 * EPS + 1e-9  # k * epsilon, however many counts the user touched


def test_same_seed_same_list_and_deterministic_at_huge_epsilon():
    counts = np.array([50.0, 10.0, 40.0, 30.0, 20.0])
    assert np.array_equal(gumbel_top_k(counts, k=3, epsilon=1.0, seed=7),
                          gumbel_top_k(counts, k=3, epsilon=1.0, seed=7))
    assert gumbel_top_k(counts, k=3, epsilon=1e3, seed=0).tolist() == [0, 2, 3]
    assert peeling_top_k(counts, k=3, epsilon=1e3, seed=0).tolist() == [0, 2, 3]
    assert exponential_mechanism(counts, epsilon=1e3, seed=0) == 0


# -- the private quantile ---------------------------------------------------------------------------

def test_private_quantile_is_accurate_at_large_epsilon_and_noisy_at_small():
    values = np.arange(1, 101)
    grid = np.arange(1, 301)
    assert abs(private_quantile(values, q=0.5, epsilon=50.0, candidates=grid, seed=0) - 50) <= 1
    picks = [private_quantile(values, q=0.5, epsilon=0.01, candidates=grid, seed=s) for s in range(30)]
    assert np.std(picks) > 20


def test_private_quantile_utility_has_sensitivity_one():
    rng = np.random.default_rng(8)
    values = rng.integers(1, 50, size=40)
    grid = np.arange(1, 60)

    def utility(data):
        return -np.abs(np.searchsorted(np.sort(data, kind="stable"), grid, side="right")
                       - 0.75 * data.size)
    for i in range(values.size):
        assert np.max(np.abs(utility(values) - utility(np.delete(values, i)))) <= 1.0


# -- bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, error, words", [
    (lambda: exponential_mechanism_probabilities("abc", epsilon=1.0), TypeError, "scores"),
    (lambda: exponential_mechanism_probabilities([[1.0, 2.0]], epsilon=1.0), ValueError, "1-D"),
    (lambda: exponential_mechanism_probabilities([], epsilon=1.0), ValueError, "non-empty"),
    (lambda: exponential_mechanism_probabilities([1.0, np.inf], epsilon=1.0), ValueError, "finite"),
    (lambda: exponential_mechanism_probabilities([1.0, np.nan], epsilon=1.0), ValueError, "NaN"),
    (lambda: exponential_mechanism_probabilities([1.0], epsilon=0.0), ValueError, "epsilon"),
    (lambda: exponential_mechanism_probabilities([1.0], epsilon="1"), TypeError, "epsilon"),
    (lambda: exponential_mechanism_probabilities([1.0], epsilon=1.0, sensitivity=0), ValueError,
     "sensitivity"),
    (lambda: exponential_mechanism_probabilities([1.0], epsilon=1.0, monotonic=1), TypeError,
     "monotonic"),
    (lambda: gumbel_top_k(SCORES, k=0, epsilon=1.0), ValueError, "k"),
    (lambda: gumbel_top_k(SCORES, k=6, epsilon=1.0), ValueError, "k"),
    (lambda: peeling_top_k(SCORES, k=2.0, epsilon=1.0), TypeError, "k"),
    (lambda: report_noisy_max(SCORES, epsilon=1.0, noise="normal"), ValueError, "noise"),
    (lambda: report_noisy_max(SCORES, epsilon=1.0, generator=torch.Generator()), TypeError,
     "generator"),
    (lambda: report_noisy_max(SCORES, epsilon=1.0, generator=np.random.default_rng(0), seed=1),
     ValueError, "seed"),
    (lambda: gumbel_noise(3, scale=-1.0, generator=np.random.default_rng(0)), ValueError, "scale"),
    (lambda: top_k_sequence_probability(SCORES, [1, 1], epsilon=1.0), ValueError, "distinct"),
    (lambda: top_k_sequence_probability(SCORES, [0.0, 1.0], epsilon=1.0), TypeError, "picks"),
    (lambda: private_quantile([1, 2], q=1.5, epsilon=1.0, candidates=[1, 2]), ValueError, "q"),
    (lambda: private_quantile([1, 2], q=0.5, epsilon=1.0, candidates=[2, 1]), ValueError,
     "candidates"),
])
def test_bad_arguments_name_the_parameter(call, error, words):
    with pytest.raises(error, match=words):
        call()
