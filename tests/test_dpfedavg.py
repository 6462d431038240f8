"""privrec.dpfedavg: clipping, the noisy fixed-denominator average, sampling, accounting."""

import math

import numpy as np
import pytest
import torch

from privrec.accounting import get_epsilon
from privrec.data import random_split, synthetic_movielens
from privrec.dpfedavg import (
    DPFedAvg,
    DPFederatedMF,
    clip_updates,
    dp_aggregate,
    noise_multiplier_for_target,
    poisson_sample_clients,
    user_level_epsilon,
)
from privrec.federated import FederatedMF


def test_clipping_bounds_every_row_and_keeps_small_ones():
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped, norms = clip_updates(updates, clip_norm=1.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5, 0.0]))
    assert torch.allclose(clipped, torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]))


def test_sensitivity_of_the_clipped_sum_is_the_clip_norm():
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(50, 20, generator=gen) * 10
    with_all = dp_aggregate(updates, clip_norm=0.5, noise_multiplier=0.0, expected_clients=10)
    without_one = dp_aggregate(updates[1:], clip_norm=0.5, noise_multiplier=0.0, expected_clients=10)
    # One client moves the (un-noised) average by at most C / m.
    assert (with_all - without_one).norm() <= 0.5 / 10 + 1e-6


def test_noise_std_is_sigma_c_over_m():
    gen = torch.Generator().manual_seed(1)
    zeros = torch.zeros(3, 200_000)
    out = dp_aggregate(zeros, clip_norm=2.0, noise_multiplier=1.5, expected_clients=30, generator=gen)
    assert abs(out.std().item() / (1.5 * 2.0 / 30) - 1) < 0.01


def test_poisson_sampling_rate():
    gen = torch.Generator().manual_seed(2)
    sizes = [len(poisson_sample_clients(1000, sample_rate=0.05, generator=gen)) for _ in range(200)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 3  # std of the mean ~ sqrt(47.5 / 200) ~ 0.5
    assert len(poisson_sample_clients(7, sample_rate=1.0)) == 7


def test_accounting_round_trip():
    sigma = noise_multiplier_for_target(target_epsilon=4.0, delta=1e-3, n_clients=1000,
                                        clients_per_round=50, rounds=100)
    eps = user_level_epsilon(noise_multiplier=sigma, sample_rate=0.05, rounds=100, delta=1e-3)
    assert eps <= 4.0 and eps > 3.9
    assert eps == get_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=100, delta=1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda: clip_updates(torch.zeros(2, 2), clip_norm=0), "clip_norm"),
    (lambda: clip_updates(torch.zeros(2), clip_norm=1), "2-D"),
    (lambda: clip_updates(torch.full((1, 2), math.nan), clip_norm=1), "NaN"),
    (lambda: dp_aggregate(torch.zeros(1, 2), clip_norm=1, noise_multiplier=-1, expected_clients=1),
     "noise_multiplier"),
    (lambda: dp_aggregate(torch.zeros(1, 2), clip_norm=1, noise_multiplier=1, expected_clients=0),
     "expected_clients"),
    (lambda: poisson_sample_clients(10, sample_rate=0), "sample_rate"),
    (lambda: noise_multiplier_for_target(target_epsilon=1, delta=1e-5, n_clients=10,
                                         clients_per_round=20, rounds=5), "clients_per_round"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- DP-FedAvg on the federated MF simulator ------------------------------------------------------



@pytest.fixture(scope="module")
def syn():
    ml = synthetic_movielens(n_users=60, n_items=40, n_ratings=900, seed=3)
    train, test = random_split(ml.ratings, seed=0)
    return ml, train, test


def _sim(syn, **strategy):
    ml, train, _ = syn
    kw = {"clients_per_round": ml.n_users, "clip_norm": 0.3, "noise_multiplier": 0.0} | strategy
    return DPFederatedMF(train, n_users=ml.n_users, n_items=ml.n_items, dim=3,
                         strategy=DPFedAvg(**kw))


def test_sparse_aggregation_equals_dense_clipped_average(syn):
    sim = _sim(syn)
    sim.round()
    up = sim.last_upload
    n = len(up["clients"])
    dense = torch.zeros(n, sim.n_items * (sim.dim + 1) + 1)
    rows = dense[:, :-1].reshape(n, sim.n_items, sim.dim + 1)
    rows[up["pair_client"], up["pair_item"], :-1] = up["item_factors"]
    rows[up["pair_client"], up["pair_item"], -1] = up["item_bias"]
    dense[:, :-1] = rows.reshape(n, -1)
    dense[:, -1] = up["global_bias"]
    expected = dp_aggregate(dense, clip_norm=0.3, noise_multiplier=0.0, expected_clients=60)
    change = sim.strategy.aggregate(up, n_items=sim.n_items, dim=sim.dim)
    got = torch.cat([torch.cat([change["item_factors"], change["item_bias"][:, None]], 1).reshape(-1),
                     change["global_bias"].reshape(1)])
    assert torch.allclose(got, expected, atol=1e-6)
    assert (sim.strategy.last_norms > 0.3).any()  # clipping was active in this check


def test_noise_lands_on_every_row(syn):
    sim = _sim(syn, noise_multiplier=1.0, clients_per_round=30)
    sim.round()
    change = sim.strategy.aggregate(sim.last_upload, n_items=sim.n_items, dim=sim.dim)
    rated = torch.zeros(sim.n_items, dtype=torch.bool)
    rated[sim.last_upload["pair_item"]] = True
    assert (change["item_factors"][~rated] != 0).all() or rated.all()
    assert (change["item_bias"] != 0).all()


def test_dp_training_spends_the_planned_epsilon(syn):
    ml, _, test = syn
    sigma = noise_multiplier_for_target(target_epsilon=4.0, delta=1e-3, n_clients=60,
                                        clients_per_round=20, rounds=10)
    sim = _sim(syn, clients_per_round=20, noise_multiplier=sigma)
    history = sim.fit(10, test=test, eval_every=5)
    assert 3.9 < sim.strategy.epsilon(1e-3) <= 4.0
    assert len(history.test_rmse) == 2 and all(np.isfinite(history.test_rmse))
    # User rows never reach the server object.
    assert set(sim.server) == {"item_factors", "item_bias", "global_bias"}


def test_without_clipping_or_noise_it_is_uniform_fedavg(syn):
    ml, train, _ = syn
    sim = _sim(syn, clip_norm=1e9)
    ref = FederatedMF(train, n_users=ml.n_users, n_items=ml.n_items, dim=3)
    sim.round()
    ref.round()
    up = sim.last_upload
    # Same local training; the DP server divides the summed rows by m (untouched rows count 0).
    assert torch.allclose(up["item_factors"], ref.last_upload["item_factors"])
    expected = torch.zeros(ml.n_items, 3).index_add_(0, up["pair_item"], up["item_factors"]) / 60
    change = sim.strategy.aggregate(up, n_items=ml.n_items, dim=3)
    assert torch.allclose(change["item_factors"], expected, atol=1e-7)


def test_dp_strategy_rejects_bad_parameters(syn):
    with pytest.raises(ValueError, match="clip_norm"):
        DPFedAvg(clients_per_round=5, clip_norm=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPFedAvg(clients_per_round=5, clip_norm=1.0, noise_multiplier=-0.5)
    with pytest.raises(ValueError, match="server_momentum"):
        DPFedAvg(clients_per_round=5, clip_norm=1.0, noise_multiplier=1.0, server_momentum=1.0)
    with pytest.raises(ValueError, match="clients_per_round"):
        _sim(syn, clients_per_round=61)
    ml, train, _ = syn
    with pytest.raises(TypeError, match="DPFedAvg"):
        DPFederatedMF(train, n_users=ml.n_users, n_items=ml.n_items, strategy=None)


def test_rounds_with_nobody_sampled_release_noise_only(syn):
    sim = _sim(syn, clients_per_round=1, noise_multiplier=1.0)
    before = sim.server["item_bias"].clone()
    records = [sim.round() for _ in range(8)]
    empty = [r for r in records if len(r.clients) == 0]
    assert empty, "with q = 1/60 some of 8 rounds sample nobody (seeded)"
    assert empty[0].bytes_up == 0 and not torch.equal(sim.server["item_bias"], before)
    assert sim.strategy.accountant.steps == 8
