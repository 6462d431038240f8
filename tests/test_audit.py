"""The one-run audit: its statistics are valid, and it audits the library's real DP-SGD --
flagging a deliberately broken one and not the correct one."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from privrec.attacks.audit import (
    TouchedRowsNoiseDPSGD,
    UnclippedDPSGD,
    audit_dpsgd,
    canary_ratings,
    guesses_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from privrec.central.dpsgd import DPSGD
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.models import BiasedMF

SMALL = synthetic_movielens(seed=0)
DPSGD_KW = dict(epochs=5, sample_rate=0.1, clip_norm=0.5, lr=0.05)


def test_p_value_is_the_binomial_tail_without_delta_and_grows_with_epsilon_and_delta():
    p = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(m=50, r=30, v=25, epsilon=1.0, delta=0.0) == pytest.approx(
        binom.sf(24, 30, p))
    values = [one_run_p_value(m=50, r=30, v=25, epsilon=e, delta=0.0) for e in (0.5, 1, 2, 4)]
    assert values == sorted(values)
    assert one_run_p_value(m=50, r=30, v=25, epsilon=1.0, delta=1e-3) > values[1]
    assert one_run_p_value(m=50, r=30, v=10, epsilon=0.0, delta=0.0) > 0.5


def test_lower_bound_sits_at_the_confidence_level_and_grows_with_correct_guesses():
    lb = one_run_epsilon_lower_bound(m=1000, r=200, v=180, delta=1e-6)
    assert one_run_p_value(m=1000, r=200, v=180, epsilon=lb, delta=1e-6) == pytest.approx(0.05, rel=1e-4)
    bounds = [one_run_epsilon_lower_bound(m=1000, r=200, v=v, delta=1e-6) for v in (100, 150, 190, 200)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > bounds[-2]
    # All-correct guesses cap the bound: few canaries can never certify a large epsilon.
    assert one_run_epsilon_lower_bound(m=100, r=50, v=50, delta=1e-6) < 3.0


def test_lower_bound_is_valid_for_randomized_response():
    """A mechanism that is exactly eps-DP per canary (randomized response on the inclusion bit)
    must be flagged above its eps in at most ~5% of audits."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 400, 300
    keep = 1 / (1 + math.exp(-eps))
    correct = rng.binomial(m, keep, size=trials)
    flagged = [one_run_epsilon_lower_bound(m=m, r=m, v=int(v), delta=1e-6) > eps for v in correct]
    assert np.mean(flagged) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)


def test_guesses_break_ties_by_canary_id():
    guess = guesses_from_scores([0.0, 1.0, 0.0, 1.0, 0.0, 0.5], k_in=1, k_out=2)
    # order: highest first, ties by id -> [1, 3, 5, 0, 2, 4]; IN = first, OUT = last two
    assert guess.tolist() == [0, 1, -1, 0, -1, 0]
    with pytest.raises(ValueError, match="k_in"):
        guesses_from_scores([0.0, 1.0], k_in=2, k_out=1)


def test_canaries_are_fresh_items_and_fair_coins():
    canaries, inserted = canary_ratings(n_users=10, n_items=20, n_canaries=2000, seed=3)
    assert canaries["item"].tolist() == list(range(20, 2020))
    assert canaries["user"].between(0, 9).all() and (canaries["rating"] == 5).all()
    assert abs(inserted.mean() - 0.5) < 0.05


def make_trainer(cls, noise_multiplier=1.0):
    model = BiasedMF(SMALL.n_users, SMALL.n_items, 3, global_mean=3.0, seed=0)
    return cls(model, SMALL.ratings, clip_norm=0.5, noise_multiplier=noise_multiplier,
               sample_rate=0.1, seed=0)


def test_touched_rows_mutation_zeroes_exactly_the_untouched_rows():
    correct, broken = make_trainer(DPSGD), make_trainer(TouchedRowsNoiseDPSGD)
    index = torch.arange(5)
    summed = correct.clipped_sum(index)
    touched = summed["item_factors"].ne(0).any(1)
    assert 0 < int(touched.sum()) < SMALL.n_items
    noisy_ok, noisy_bad = correct.add_noise(summed), broken.add_noise(summed)
    assert noisy_ok["item_factors"][~touched].abs().min() > 0          # the correct one noises all
    assert noisy_bad["item_factors"][~touched].abs().max() == 0
    assert noisy_bad["item_factors"][touched].abs().min() > 0


def test_unclipped_mutation_sums_raw_gradients():
    correct, broken = make_trainer(DPSGD), make_trainer(UnclippedDPSGD)
    index = torch.arange(200)
    clipped, raw = correct.clipped_sum(index), broken.clipped_sum(index)
    assert broken.clip_norm == 0.5                                      # restored after the call
    assert raw["global_bias"].abs() > clipped["global_bias"].abs() + 1.0


def test_audit_flags_the_broken_dpsgd_and_not_the_correct_one():
    kw = dict(n_users=SMALL.n_users, n_items=SMALL.n_items, n_canaries=200, **DPSGD_KW)
    broken = audit_dpsgd(SMALL.ratings, target_epsilon=1.0, trainer=TouchedRowsNoiseDPSGD, **kw)
    assert broken["flagged"] == 1.0 and broken["empirical_epsilon"] > broken["claimed_epsilon"]
    assert broken["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    for eps in (1.0, 4.0):
        correct = audit_dpsgd(SMALL.ratings, target_epsilon=eps, trainer=DPSGD, **kw)
        assert correct["flagged"] == 0.0
        assert correct["empirical_epsilon"] <= correct["claimed_epsilon"]
