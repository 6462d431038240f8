"""Tests of privrec.attacks.memorisation: canaries, exposure, extraction, the DP bounds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.attacks.memorisation import (
    CHANCE_EXPOSURE,
    continuation_log_likelihood,
    exposure,
    exposure_bound,
    exposure_from_rank,
    extract,
    group_guarantee,
    memorisation_table,
    plant_canaries,
)
from privrec.recsys.sequential import SASRec, fit_sasrec, user_sequences


def _random_histories(n_users=40, n_items=30, length=10, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = [(u, int(i), 1.0, 100 + t) for u in range(n_users)
            for t, i in enumerate(rng.integers(n_items, size=length))]
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).astype(
        {"user": np.int64, "item": np.int64, "rating": np.float32, "timestamp": np.int64})


@pytest.fixture(scope="module")
def memorised():
    """A small model trained long on data holding one secret 8 times (and two controls)."""
    train = _random_histories()
    planted, canaries = plant_canaries(train, n_users=40, n_items=30, repeats=(0, 8),
                                       per_repeat=2, prefix_len=3, secret_len=3, seed=2)
    model = SASRec(30, dim=32, max_len=16, dropout=0.0, seed=0)
    fit_sasrec(model, planted, epochs=120, lr=0.01, batch_size=8, n_negatives=None)
    return model, canaries


def test_canaries_are_planted_at_the_end_of_distinct_users_histories():
    train = _random_histories()
    planted, c = plant_canaries(train, n_users=40, n_items=30, repeats=(0, 1, 2), per_repeat=3,
                                prefix_len=2, secret_len=3, seed=0)
    assert c.repeats.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    users = np.concatenate(c.users)
    assert len(users) == 9 and len(set(users.tolist())) == 9
    assert len(planted) == len(train) + 9 * 5
    seqs = user_sequences(planted, n_users=40, n_items=30)
    for j, group in enumerate(c.users):
        for u in group:
            assert seqs.of(int(u))[-5:].tolist() == np.r_[c.prefixes[j], c.secrets[j]].tolist()
    assert c.max_exposure == pytest.approx(3 * math.log2(30))
    with pytest.raises(ValueError, match="distinct users"):
        plant_canaries(train, n_users=40, n_items=30, repeats=(8,), per_repeat=6)


def test_exposure_from_rank_and_chance():
    assert exposure_from_rank(1, 1024) == 10.0
    assert exposure_from_rank(1024, 1024) == 0.0
    assert CHANCE_EXPOSURE == pytest.approx(1.4427, abs=1e-4)
    with pytest.raises(ValueError, match="rank"):
        exposure_from_rank(0, 10)


def test_log_likelihood_is_the_chain_rule_of_the_model(memorised):
    model, c = memorised
    prefix, cont = c.prefixes[0], np.array([[4, 9, 1], [0, 0, 29]])
    got = continuation_log_likelihood(model, prefix, cont)
    for row, value in zip(cont, got, strict=True):
        total = 0.0
        for t, item in enumerate(row):  # step t: prefix, row[:t], padding for the rest
            window = torch.tensor([list(prefix) + list(row[:t]) + [-1] * (2 - t)]) + 1
            with torch.no_grad():
                logits = model.logits(model(window)[:, len(prefix) - 1 + t])
            total += float(torch.log_softmax(logits.double(), -1)[0, item])
        assert value == pytest.approx(total, rel=1e-6)


def test_a_memorised_secret_is_exposed_and_extracted_a_fresh_one_is_not(memorised):
    model, c = memorised
    table = memorisation_table(model, c, n_samples=400)
    planted = table[table["repeats"] == 8]
    controls = table[table["repeats"] == 0]
    assert (planted["exposure"] > 8).all()       # of 14.7 bits at most
    assert planted["extracted"].all()
    assert controls["exposure"].mean() < 4.0     # chance: 1.44 bits on average
    assert not controls["extracted"].any()


def test_exposure_of_random_secrets_averages_to_chance(memorised):
    model, c = memorised
    rng = np.random.default_rng(5)
    values = [exposure(model, c.prefixes[0], rng.integers(30, size=3), n_samples=300,
                       seed=k)["sampled"] for k in range(40)]
    assert abs(np.mean(values) - CHANCE_EXPOSURE) < 0.6


def test_beam_search_finds_at_least_as_likely_a_sequence_as_greedy(memorised):
    model, c = memorised
    prefix = c.prefixes[0]
    greedy, beam = extract(model, prefix, length=3), extract(model, prefix, length=3, beam_width=4)
    ll = continuation_log_likelihood(model, prefix, np.vstack([greedy, beam]))
    assert ll[1] >= ll[0] - 1e-6  # float32 scores: equal sequences may differ in the 8th digit
    assert np.array_equal(greedy, extract(model, prefix, length=3))  # deterministic


def test_group_guarantee_and_exposure_bound():
    assert group_guarantee(1.0, 1e-5, group_size=1) == (1.0, pytest.approx(1e-5))
    eps, delta = group_guarantee(1.0, 1e-5, group_size=8)
    assert eps == 8.0 and delta == pytest.approx(8 * math.exp(7) * 1e-5)
    assert group_guarantee(8.0, 1e-5, group_size=8)[1] == 1.0  # nothing promised
    assert exposure_bound(1e-9, 0.0, max_exposure=40) == pytest.approx(CHANCE_EXPOSURE)
    assert exposure_bound(1.0, 1e-5, max_exposure=40) == pytest.approx(2 / math.log(2) + 4e-4)
    assert exposure_bound(math.inf, 1e-5, max_exposure=40) == 40
    with pytest.raises(ValueError, match="group_size"):
        group_guarantee(1.0, 1e-5, group_size=0)
