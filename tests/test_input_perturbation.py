"""Tests of privrec.central.input_perturbation: Laplace on rating values, randomized response on cells."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.central.input_perturbation import laplace_perturb_ratings, randomized_response_interactions
from privrec.dp.ledger import PrivacyLedger
from privrec.recsys.data import synthetic_movielens


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens(seed=0)


def test_laplace_perturbation_scale_and_clamp(data):
    big = data.ratings.sample(20000, replace=True, random_state=0).reset_index(drop=True)
    raw = laplace_perturb_ratings(big, epsilon=2.0, clamp=False, seed=0)
    noise = raw["rating"].to_numpy(np.float64) - big["rating"].to_numpy(np.float64)
    # Laplace(b), b = 4 / 2: E|x| = b, Var|x| = b^2
    assert abs(np.abs(noise).mean() - 2.0) < 5 * 2.0 / math.sqrt(noise.size)
    assert abs(np.median(noise)) < 0.1
    clamped = laplace_perturb_ratings(big, epsilon=2.0, seed=0)
    assert clamped["rating"].between(1, 5).all()
    assert (clamped[["user", "item"]].to_numpy() == big[["user", "item"]].to_numpy()).all()
    np.testing.assert_array_equal(clamped["rating"], np.clip(raw["rating"], 1, 5))


def test_laplace_perturbation_ledger_says_values_only(data):
    """Against add/remove of a rating the published who-rated-what table gives it away."""
    ledger = PrivacyLedger(unit="rating", n_units=len(data.ratings))
    laplace_perturb_ratings(data.ratings, epsilon=1.0, seed=0, ledger=ledger)
    values, table = ledger.events
    assert values.mechanism == "laplace" and values.noise_multiplier == pytest.approx(1.0)
    assert table.noise_multiplier == 0.0
    assert math.isinf(ledger.epsilon())
    alone = ledger.table()["epsilon alone"].tolist()
    assert alone[0] == pytest.approx(1.0, rel=1e-3) and math.isinf(alone[1])
    with pytest.raises(ValueError, match="unit"):
        laplace_perturb_ratings(data.ratings, epsilon=1.0,
                                ledger=PrivacyLedger(unit="user", n_units=60))


def test_infinite_epsilon_is_a_copy(data):
    out = laplace_perturb_ratings(data.ratings, epsilon=math.inf)
    np.testing.assert_array_equal(out["rating"], data.ratings["rating"].astype(np.float32))
    assert out is not data.ratings


def test_randomized_response_flip_rate(data):
    eps = 1.0
    noisy = randomized_response_interactions(data.ratings, n_users=data.n_users,
                                             n_items=data.n_items, epsilon=eps, seed=0)
    truth = set(zip(data.ratings["user"], data.ratings["item"], strict=True))
    reported = set(zip(noisy["user"], noisy["item"], strict=True))
    cells = data.n_users * data.n_items
    flip = 1 / (1 + math.exp(eps))
    false_pos = len(reported - truth) / (cells - len(truth))
    false_neg = len(truth - reported) / len(truth)
    assert abs(false_pos - flip) < 5 * math.sqrt(flip * (1 - flip) / (cells - len(truth)))
    assert abs(false_neg - flip) < 5 * math.sqrt(flip * (1 - flip) / len(truth))


def test_bad_parameters(data):
    with pytest.raises(ValueError, match="epsilon"):
        laplace_perturb_ratings(data.ratings, epsilon=-1.0)
    with pytest.raises(ValueError, match="low"):
        laplace_perturb_ratings(data.ratings, epsilon=1.0, low=5.0, high=1.0)
    with pytest.raises(TypeError, match="ledger"):
        laplace_perturb_ratings(data.ratings, epsilon=1.0, ledger="x")
    with pytest.raises(ValueError, match="epsilon"):
        randomized_response_interactions(data.ratings, n_users=data.n_users, n_items=data.n_items,
                                         epsilon=0.0)
