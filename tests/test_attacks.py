"""Tests for privrec.attacks: what the server learns, and what the defences cost it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privrec.attacks import (
    invert_ratings,
    item_set_attack,
    score_item_sets,
    score_ratings,
    true_item_sets,
)
from privrec.data import synthetic_movielens
from privrec.federated import FedAvg, FederatedMF, iid_partition

ML = synthetic_movielens(n_users=60, n_items=90, n_ratings=1500, seed=1)
TRAIN = ML.ratings
NU, NI = ML.n_users, ML.n_items


def attacked(rounds: int = 3, **kwargs) -> tuple[FederatedMF, dict, dict]:
    sim = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=4, **kwargs)
    sim.fit(rounds)
    up = sim.last_upload
    truth = true_item_sets(TRAIN, sim.partition.client_of_user, up["clients"].numpy())
    return sim, up, score_item_sets(item_set_attack(up), truth)


def invert(sim: FederatedMF) -> pd.DataFrame:
    return invert_ratings(sim.last_upload, sim.last_broadcast, local_lr=sim.local_lr,
                          reg=sim.reg, bias_reg=sim.bias_reg)


def test_item_set_attack_is_exact_without_defence():
    _, _, scores = attacked()
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.99
    assert scores["precision_per_client"] >= 0.99


def test_dense_upload_does_not_hide_the_item_set():
    sim, _, scores = attacked(upload="dense")
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.99


@pytest.mark.parametrize("rho", [0.25, 1.0, 3.0])
def test_fake_items_drive_precision_to_the_fake_rate(rho):
    _, up, scores = attacked(fake_items=rho)
    expected = 1.0 / (1.0 + rho)
    assert scores["recall"] >= 0.99          # real items are still all uploaded
    assert abs(scores["precision"] - expected) < 0.05
    assert scores["precision"] < 0.9


def test_fake_items_cost_bandwidth():
    plain = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=4).round()
    padded = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=4, fake_items=1.0).round()
    assert padded.rows_up == pytest.approx(2 * plain.rows_up, rel=0.05)
    assert padded.bytes_up > 1.9 * plain.bytes_up


def test_rating_inversion_recovers_every_rating():
    sim, _, _ = attacked(strategy=FedAvg(clients_per_round=25, seed=0))
    recovered = invert(sim)
    scores = score_ratings(recovered, TRAIN)
    assert scores["n_scored"] == len(TRAIN[TRAIN["user"].isin(sim.last_upload["clients"].numpy())])
    assert scores["rmse"] < 1e-3 and scores["exact"] == 1.0


def test_rating_inversion_degrades_under_fake_items():
    sim, _, _ = attacked(fake_items=1.0)
    assert score_ratings(invert(sim), TRAIN)["rmse"] > 0.3


def test_rating_inversion_needs_cross_device_updates():
    sim = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=4, partition=iid_partition(NU, 3))
    sim.round()
    with pytest.raises(ValueError, match="cross-device"):
        invert(sim)


def test_bad_input():
    with pytest.raises(ValueError, match="upload"):
        item_set_attack({"clients": 1})
    sim, up, _ = attacked(rounds=1)
    with pytest.raises(ValueError, match="tol"):
        item_set_attack(up, tol=-1.0)
    with pytest.raises(ValueError, match="local_epochs"):
        invert_ratings(up, sim.last_broadcast, local_lr=0.5, reg=0.1, bias_reg=0.01, local_epochs=3)
    with pytest.raises(ValueError, match="local_lr"):
        invert_ratings(up, sim.last_broadcast, local_lr=0.0, reg=0.1, bias_reg=0.01)
    with pytest.raises(ValueError, match="empty"):
        score_item_sets(pd.DataFrame({"client": [], "item": []}), pd.DataFrame(
            {"client": [0], "item": [0]}))
    with pytest.raises(ValueError, match="recovered"):
        score_ratings(pd.DataFrame({"x": np.zeros(2)}), TRAIN)
