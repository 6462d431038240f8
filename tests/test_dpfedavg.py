"""privrec.federated.dpfedavg: the DP wrapper's clipping, noise, sampling, ledger and released model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privrec.dp.accounting import get_epsilon
from privrec.dp.ledger import PrivacyLedger
from privrec.federated.dpfedavg import DPFedAvg, fit_dp_fedavg_mf, round_events
from privrec.federated.engine import FederatedMF, FederatedSimulator
from privrec.federated.partitions import cross_device, iid_partition
from privrec.federated.strategies import FedAdam, FedAvg, FedAvgM
from privrec.federated.updates import ClientUpdates, RowUpdates
from privrec.recsys.data import random_split, synthetic_movielens
from privrec.recsys.metrics import evaluate_ratings
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import global_mean_model

ML = synthetic_movielens(n_users=60, n_items=40, n_ratings=900, seed=3)
TRAIN, TEST = random_split(ML.ratings, seed=0)
NU, NI = ML.n_users, ML.n_items


def wrapper(inner=None, **kwargs) -> DPFedAvg:
    kw = {"n_clients": NU, "sample_rate": 1.0, "clip_norm": 0.3, "noise_multiplier": 0.0} | kwargs
    return DPFedAvg(FedAvg() if inner is None else inner, **kw)


def sim(strategy, train=TRAIN, **kwargs) -> FederatedSimulator:
    model = FederatedMF(train, n_users=NU, n_items=NI, dim=3, **kwargs)
    return FederatedSimulator(model, strategy, keep_updates=True)


def crafted(scale: float) -> ClientUpdates:
    gen = torch.Generator().manual_seed(0)
    return ClientUpdates(torch.arange(5), torch.ones(5),
                         {"t": RowUpdates(torch.arange(5), torch.arange(5),
                                          torch.randn(5, 4, generator=gen) * scale, torch.ones(5))},
                         {"s": torch.randn(5, generator=gen) * scale})


# -- clipping, sensitivity and noise ------------------------------------------------------------

def test_each_clients_whole_update_is_clipped_and_small_ones_kept():
    dp = wrapper(n_clients=5, clip_norm=1.0)
    for scale, clipped in ((10.0, True), (0.01, False)):
        up = crafted(scale)
        total = dp.start({"t": torch.zeros(5, 4), "s": torch.zeros(())})
        dp.accumulate(total, up)
        # Client k touched only row k, so row k plus its share of "s" is its clipped update.
        norms = up.norms()
        factor = torch.clamp(1.0 / norms, max=1.0)
        torch.testing.assert_close(total.sums["t"], up.rows["t"].values * factor[:, None])
        torch.testing.assert_close(total.sums["s"], (up.dense["s"] * factor).sum())
        whole = torch.cat([total.sums["t"], (up.dense["s"] * factor)[:, None]], 1).norm(dim=1)
        assert bool((whole <= 1.0 + 1e-5).all())
        assert bool(torch.isclose(whole, torch.ones(5)).all()) == clipped
        torch.testing.assert_close(dp.finish(total)["t"], total.sums["t"] / 5)


def test_removing_one_client_moves_the_sum_by_at_most_the_clip_norm():
    a = sim(wrapper(clip_norm=0.05))
    a.round()
    up = a.last_updates
    assert bool((a.strategy.last_norms > 0.05).any())     # clipping was active
    drop = up.clients[0]
    keep = up.rows["item_factors"].client_pos != 0
    pos = up.rows["item_factors"].client_pos[keep] - 1
    rows = {k: RowUpdates(pos, p.row[keep], p.values[keep], p.examples[keep])
            for k, p in up.rows.items()}
    smaller = ClientUpdates(up.clients[1:], up.examples[1:], rows,
                            {"global_bias": up.dense["global_bias"][1:]})
    assert drop not in smaller.clients
    sums = []
    for u in (up, smaller):
        total = a.strategy.start(a.shared)
        a.strategy.accumulate(total, u)
        sums.append(torch.cat([v.reshape(-1) for v in total.sums.values()]))
    assert float((sums[0] - sums[1]).norm()) <= 0.05 + 1e-6


def test_noise_std_on_untouched_coordinates_is_sigma_c_over_qn():
    dp = wrapper(n_clients=1000, sample_rate=0.02, clip_norm=2.0, noise_multiplier=1.5)
    total = dp.start({"t": torch.zeros(50_000, 4), "s": torch.zeros(())})
    dp.accumulate(total, crafted(1.0))                      # touches rows 0-4 only
    change = dp.finish(total)["t"][5:]
    assert bool((change != 0).all())                         # noise on every untouched row
    expected = 1.5 * 2.0 / 20
    assert abs(float(change.std()) / expected - 1) < 0.01   # 200k draws: sd of ratio ~ 0.0016
    assert abs(float(change.mean())) < 4 * expected / math.sqrt(change.numel())


def test_poisson_sampling_rate():
    dp = wrapper(n_clients=1000, sample_rate=0.05, seed=2)
    sizes = [len(dp.sample(1000)) for _ in range(200)]
    assert abs(np.mean(sizes) - 50) < 2       # sd of the mean ~ 0.49
    assert np.std(sizes) == pytest.approx(math.sqrt(47.5), rel=0.25)
    with pytest.raises(ValueError, match="n_clients"):
        dp.sample(999)


# -- the ledger --------------------------------------------------------------------------------

def test_reported_epsilon_is_the_ledger_composition_and_hits_the_target():
    result = fit_dp_fedavg_mf(TRAIN, n_users=NU, n_items=NI, target_epsilon=4.0, rounds=10,
                              sample_rate=0.3, clip_norm=0.5, dim=3, test=TEST)
    sigma = result.ledger.events[0].noise_multiplier
    assert result.ledger.unit == "user" and result.ledger.delta == 1e-4    # 60 users
    assert result.ledger.events[0].count == 10 and result.ledger.events[0].sample_rate == 0.3
    assert 3.95 < result.epsilon <= 4.0
    fresh = PrivacyLedger(unit="user", n_units=NU)
    fresh.record_gaussian("x", noise_multiplier=sigma, sample_rate=0.3, count=10)
    assert result.epsilon == fresh.epsilon()
    assert result.epsilon == pytest.approx(get_epsilon(noise_multiplier=sigma, sample_rate=0.3,
                                                       steps=10, delta=1e-4), rel=1e-9)


def test_every_round_is_recorded_even_empty_ones_and_sigma_zero_is_infinite():
    s = sim(wrapper(sample_rate=1 / 60, noise_multiplier=1.0))
    before = s.shared["item_bias"].clone()
    records = [s.round() for _ in range(8)]
    empty = [r for r in records if len(r.clients) == 0]
    assert empty, "with q = 1/60 some of 8 rounds sample nobody (seeded)"
    assert empty[0].bytes_up == 0 and not torch.equal(s.shared["item_bias"], before)
    assert s.ledger.events[0].count == 8
    free = sim(wrapper())
    free.round()
    assert free.ledger.epsilon() == math.inf and free.ledger.events[0].count == 1


def test_silo_partition_records_silo_level_and_units_must_match():
    part = iid_partition(NU, 6, seed=0)
    dp = wrapper(n_clients=6, unit="silo", sample_rate=0.5, noise_multiplier=1.0)
    s = sim(dp, partition=part)
    s.round()
    assert s.ledger.unit == "silo" and s.ledger.n_units == 6
    with pytest.raises(ValueError, match="silo"):
        sim(wrapper(n_clients=6, sample_rate=0.5), partition=part)     # unit "user" on silos


# -- neighbouring datasets and the released model -----------------------------------------------

@pytest.mark.parametrize("partition", [None, iid_partition(NU, 6, seed=0)])
def test_server_view_before_the_first_release_is_identical_on_neighbours(partition):
    n_clients = NU if partition is None else 6
    unit = "user" if partition is None else "silo"
    views = []
    for train in (TRAIN, TRAIN[TRAIN["user"] != 11]):
        dp = wrapper(n_clients=n_clients, unit=unit, sample_rate=0.5, noise_multiplier=1.0)
        s = sim(dp, train=train, partition=partition)
        views.append(({k: v.clone() for k, v in s.shared.items()}, dp.sample(n_clients),
                      dp.expected_clients))
    (shared_a, cohort_a, m_a), (shared_b, cohort_b, m_b) = views
    assert all(torch.equal(shared_a[k], shared_b[k]) for k in shared_a)
    assert torch.equal(cohort_a, cohort_b) and m_a == m_b
    assert float(shared_a["global_bias"]) == 3.0          # public constant, not the data mean


def test_released_model_path_end_to_end():
    plain = fit_dp_fedavg_mf(TRAIN, n_users=NU, n_items=NI, target_epsilon=math.inf, rounds=15,
                             sample_rate=0.5, clip_norm=1.0, dim=3, test=TEST,
                             strategy=FedAvg(server_lr=2.0))
    noisy = fit_dp_fedavg_mf(TRAIN, n_users=NU, n_items=NI, target_epsilon=0.05, rounds=15,
                             sample_rate=0.5, clip_norm=1.0, dim=3, test=TEST,
                             strategy=FedAvg(server_lr=2.0))
    assert isinstance(plain.model, BiasedMF) and plain.epsilon == math.inf
    for result in (plain, noisy):   # the reported RMSE is the released model's
        assert evaluate_ratings(result.model, TEST)["rmse"] == pytest.approx(
            result.history["test_rmse"][-1])
    baseline = evaluate_ratings(global_mean_model(TRAIN, n_users=NU, n_items=NI), TEST)["rmse"]
    assert plain.history["test_rmse"][-1] < baseline
    assert noisy.history["test_rmse"][-1] > plain.history["test_rmse"][-1] + 0.05
    assert noisy.epsilon <= 0.05


@pytest.mark.parametrize("inner", ["FedAvgM", "FedAdam"])
def test_wrapper_hands_the_noisy_mean_to_the_inner_optimiser(inner):
    make = {"FedAvgM": lambda: FedAvgM(server_momentum=0.6, server_lr=1.5),
            "FedAdam": lambda: FedAdam(server_lr=0.05)}[inner]
    s = sim(wrapper(make(), clip_norm=1e9, sample_rate=1.0))
    reference, shared = make(), {k: v.clone() for k, v in s.shared.items()}
    for _ in range(3):
        s.round()
        up = s.last_updates
        mean = {"item_factors": torch.zeros(NI, 3).index_add_(
                    0, up.rows["item_factors"].row, up.rows["item_factors"].values) / NU,
                "item_bias": torch.zeros(NI).index_add_(
                    0, up.rows["item_bias"].row, up.rows["item_bias"].values) / NU,
                "global_bias": up.dense["global_bias"].sum() / NU}
        reference.step(shared, mean)      # uniform mean over N clients (no clipping, no noise)
    for k in shared:
        torch.testing.assert_close(s.shared[k], shared[k], atol=1e-6, rtol=1e-5)


def test_noise_seed_and_chunking():
    def run(chunk):
        model = FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=3)
        s = FederatedSimulator(model, wrapper(sample_rate=0.5, noise_multiplier=0.7, seed=3),
                               chunk_ratings=chunk)
        s.fit(3)
        return s.shared
    a, b = run(1 << 20), run(30)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_calibrated_and_round_events():
    dp = DPFedAvg.calibrated(FedAvg(), target_epsilon=2.0, rounds=30, n_clients=NU,
                             sample_rate=0.2, clip_norm=1.0)
    ledger = PrivacyLedger(unit="user", n_units=NU)
    for event in round_events(dp.noise_multiplier, sample_rate=0.2, rounds=30):
        ledger.record(event)
    assert 1.98 < ledger.epsilon() <= 2.0
    assert DPFedAvg.calibrated(FedAvg(), target_epsilon=math.inf, rounds=3, n_clients=NU,
                               sample_rate=0.2, clip_norm=1.0).noise_multiplier == 0.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(clip_norm=0.0), ValueError, "clip_norm"),
    (dict(noise_multiplier=-0.5), ValueError, "noise_multiplier"),
    (dict(sample_rate=0.0), ValueError, "sample_rate"),
    (dict(sample_rate=1.5), ValueError, "sample_rate"),
    (dict(n_clients=0), ValueError, "n_clients"),
    (dict(unit="rating"), ValueError, "unit"),
    (dict(delta=0.5), ValueError, "delta"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        wrapper(**kwargs)


def test_bad_strategies():
    with pytest.raises(TypeError, match="strategy"):
        DPFedAvg("fedavg", n_clients=NU, sample_rate=0.1, clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="clients_per_round"):
        wrapper(FedAvg(clients_per_round=5))
    assert cross_device(NU).privacy_unit == "user"


@pytest.mark.parametrize("call, error, match", [
    (lambda: wrapper().sample("60"), TypeError, "n_clients"),
    (lambda: wrapper().start([1.0]), TypeError, "shared"),
    (lambda: wrapper().accumulate(None, crafted(1.0)), TypeError, "total"),
    (lambda: wrapper().finish(None), TypeError, "total"),
    (lambda: round_events(1.0, sample_rate=0.1, rounds=3, unit="rating"), ValueError, "unit"),
])
def test_calls_name_their_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
