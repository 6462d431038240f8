"""Tests for privrec.attacks.update_inversion: what the server learns, and what the defences cost it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privrec.attacks.update_inversion import (
    invert_ratings,
    item_set_attack,
    score_item_sets,
    score_ratings,
    true_item_sets,
)
from privrec.dp.primitives import clip_factors
from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedMF, FederatedSimulator
from privrec.federated.partitions import iid_partition
from privrec.federated.strategies import FedAvg
from privrec.recsys.data import synthetic_movielens

ML = synthetic_movielens(n_users=60, n_items=90, n_ratings=1500, seed=1)
TRAIN = ML.ratings
NU, NI = ML.n_users, ML.n_items


def simulate(strategy=None, **kwargs) -> FederatedSimulator:
    model = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=4, **kwargs)
    return FederatedSimulator(model, strategy, keep_updates=True)


def attacked(rounds: int = 3, strategy=None, **kwargs):
    sim = simulate(strategy, **kwargs)
    sim.fit(rounds)
    up = sim.last_updates
    truth = true_item_sets(TRAIN, sim.model.partition.client_of_user, up.clients.numpy())
    return sim, up, score_item_sets(item_set_attack(up), truth)


def invert(sim: FederatedSimulator) -> pd.DataFrame:
    m = sim.model
    return invert_ratings(sim.last_updates, sim.last_broadcast, local_lr=m.local_lr, reg=m.reg,
                          bias_reg=m.bias_reg)


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
    plain = simulate().round()
    padded = simulate(fake_items=1.0).round()
    assert padded.rows_up == pytest.approx(2 * plain.rows_up, rel=0.05)
    assert padded.bytes_up > 1.9 * plain.bytes_up


def test_rating_inversion_recovers_every_rating():
    sim, _, _ = attacked(strategy=FedAvg(clients_per_round=25, seed=0))
    recovered = invert(sim)
    scores = score_ratings(recovered, TRAIN)
    assert scores["n_scored"] == len(TRAIN[TRAIN["user"].isin(sim.last_updates.clients.numpy())])
    assert scores["rmse"] < 1e-3 and scores["exact"] == 1.0


def test_central_dp_does_not_hide_the_uploads_from_the_server():
    dp = DPFedAvg(FedAvg(), n_clients=NU, sample_rate=0.4, clip_norm=0.1, noise_multiplier=2.0)
    sim, up, scores = attacked(strategy=dp)
    assert bool((dp.last_norms > 0.1).any())         # clipping and noise were active
    assert scores["precision"] >= 0.99 and scores["recall"] >= 0.99
    assert score_ratings(invert(sim), TRAIN)["exact"] == 1.0


def test_rating_inversion_sees_through_client_side_clipping():
    sim, up, _ = attacked(strategy=FedAvg(clients_per_round=30, seed=1))
    clipped = up.scaled(clip_factors(up.norms(), clip_norm=0.05))
    assert bool((up.norms() > 0.05).all())                  # every upload was rescaled
    kw = dict(local_lr=0.5, reg=0.1, bias_reg=0.01)
    naive = score_ratings(invert_ratings(clipped, sim.last_broadcast, **kw), TRAIN)
    aware = score_ratings(invert_ratings(clipped, sim.last_broadcast, rescaled=True, **kw), TRAIN)
    assert naive["exact"] < 0.8 and aware["exact"] == 1.0 and aware["rmse"] < 1e-3


def test_rating_inversion_degrades_under_fake_items():
    sim, _, _ = attacked(fake_items=1.0)
    assert score_ratings(invert(sim), TRAIN)["rmse"] > 0.3


def test_rating_inversion_needs_cross_device_updates():
    sim = simulate(partition=iid_partition(NU, 3))
    sim.round()
    with pytest.raises(ValueError, match="cross-device"):
        invert(sim)


def test_bad_input():
    with pytest.raises(TypeError, match="upload"):
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
