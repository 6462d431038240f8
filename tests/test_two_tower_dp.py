"""The two-tower model trained through the federated engine (privrec.federated.engine) and its DP-FedAvg
wrapper (privrec.federated.dpfedavg): the same engine and ledger as matrix factorisation.

Checked: what the server sees before the first noisy release is identical on neighbouring data
sets; the reported epsilon is the ledger's and matches Opacus's accountant; the noise on the
released update has the calibrated standard deviation; user rows never reach the server."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant as OpacusRDP
from test_two_tower import _neighbours, new_model, synthetic_with_text

from privrec.dp.accounting import OPACUS_ORDERS
from privrec.dp.ledger import PrivacyLedger
from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedSimulator
from privrec.federated.protocols import FederatedModel
from privrec.federated.strategies import FedAvg, FedAvgM
from privrec.federated.two_tower import FederatedImplicit
from privrec.recsys.data import random_split
from privrec.recsys.metrics import evaluate_ranking
from privrec.recsys.two_tower import TwoTowerRecommender


def _private_sim(model, ratings, *, target_epsilon=4.0, rounds=5, sample_rate=0.3, clip_norm=0.5,
                 client_lr=5.0, seed=0, **kwargs):
    fed = FederatedImplicit(model, ratings, client_lr=client_lr, seed=seed)
    dp = DPFedAvg.calibrated(FedAvgM(server_momentum=0.9), target_epsilon=target_epsilon,
                             rounds=rounds, n_clients=fed.n_clients, sample_rate=sample_rate,
                             clip_norm=clip_norm, unit=fed.privacy_unit, seed=seed)
    return FederatedSimulator(fed, dp, **kwargs)


def test_neighbouring_datasets_look_the_same_to_the_server_until_the_first_noisy_release():
    """D and D' differ by one user (61 vs 60 clients, N public as in Opacus): the broadcast state,
    the calibrated noise and the (empty) ledger agree before round 1, and round 1's broadcast is
    that same state."""
    emb, data, neighbour = _neighbours()
    sims = [_private_sim(TwoTowerRecommender(n, emb, dim=4, rank=2, item_bias=True, seed=3), ratings,
                         rounds=10)
            for n, ratings in ((60, data), (61, neighbour))]
    for name in sims[0].shared:
        assert torch.equal(sims[0].shared[name], sims[1].shared[name]), name
    assert sims[0].strategy.noise_multiplier == sims[1].strategy.noise_multiplier > 0
    assert sims[0].ledger.delta == sims[1].ledger.delta == 1e-4
    assert not sims[0].ledger.events and not sims[1].ledger.events
    start = {k: v.clone() for k, v in sims[0].shared.items()}
    sims[0].round()
    assert all(torch.equal(sims[0].last_broadcast[k], start[k]) for k in start)
    assert len(sims[0].ledger.events) == 1  # the first release is charged


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_reported_epsilon_is_the_ledger_and_matches_opacus(kind):
    ml, emb = synthetic_with_text()
    rounds, q = 6, 0.3
    sim = _private_sim(new_model(kind, emb=emb), ml.ratings, target_epsilon=3.0, rounds=rounds,
                       sample_rate=q)
    result = sim.fit(rounds)
    sigma = sim.strategy.noise_multiplier
    assert result.ledger is sim.ledger and result.ledger.unit == "user"
    assert result.epsilon == sim.ledger.epsilon() <= 3.0 + 1e-6
    assert result.epsilon == pytest.approx(3.0, rel=0.02)  # calibrated to the target
    # An independent composition: one Poisson-subsampled Gaussian per round, at Opacus's orders.
    twin = PrivacyLedger(unit="user", n_units=ml.n_users, orders=OPACUS_ORDERS)
    twin.record_gaussian("round", noise_multiplier=sigma, sample_rate=q, count=rounds)
    opacus = OpacusRDP()
    opacus.history = [(sigma, q, rounds)]
    ours = PrivacyLedger(unit="user", n_units=ml.n_users, orders=OPACUS_ORDERS)
    ours.events = list(sim.ledger.events)
    assert ours.epsilon() == pytest.approx(twin.epsilon(), rel=1e-12)
    assert ours.epsilon() == pytest.approx(opacus.get_epsilon(delta=sim.ledger.delta), rel=1e-6)
    assert result.model is sim.model.model  # the released, personalised model


def test_at_sigma_zero_the_run_reports_infinite_epsilon():
    ml, emb = synthetic_with_text()
    result = _private_sim(new_model("two_tower", emb=emb), ml.ratings, target_epsilon=math.inf,
                          rounds=2).fit(2)
    assert result.ledger.events[0].count == 2 and result.epsilon == math.inf


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_released_update_is_pure_noise_of_std_sigma_c_over_qn_when_clients_do_not_move(kind):
    """client_lr = 0: every upload is zero, so one FedAvg step (server_lr 1) moves the shared
    model by the noise alone, N(0, (sigma C / qN)^2) on every coordinate."""
    ml, emb = synthetic_with_text()
    fed = FederatedImplicit(new_model(kind, emb=emb), ml.ratings, client_lr=0.0, seed=0)
    sigma, clip, q = 2.0, 0.5, 0.5
    dp = DPFedAvg(FedAvg(), n_clients=fed.n_clients, sample_rate=q, clip_norm=clip,
                  noise_multiplier=sigma, seed=0)
    sim = FederatedSimulator(fed, dp)
    before = torch.cat([v.reshape(-1) for v in sim.shared.values()])
    sim.round()
    change = torch.cat([v.reshape(-1) for v in sim.shared.values()]) - before
    assert float(dp.last_norms.abs().max()) == 0.0
    target, d = sigma * clip / (q * ml.n_users), change.numel()
    assert d > 200
    # The sample std of d Gaussians is within 5 standard errors (~5/sqrt(2d)) of the truth.
    assert abs(float(change.std()) / target - 1) < 5 / np.sqrt(2 * d)
    assert abs(float(change.mean())) < 5 * target / np.sqrt(d)


def test_user_rows_never_reach_the_server():
    ml, emb = synthetic_with_text()
    model = new_model("two_tower", emb=emb)
    before = model.user_factors.detach().clone()
    sim = _private_sim(model, ml.ratings, rounds=1, keep_updates=True)
    sim.round()
    updates, cohort = sim.last_updates, sim.last_updates.clients
    names = set(updates.rows) | set(updates.dense) | set(sim.shared)
    assert not any(n.startswith("user_") for n in names)
    moved = (model.user_factors.detach() != before).any(1).nonzero().squeeze(1)
    assert set(moved.tolist()) <= set(cohort.tolist())  # only sampled devices changed their rows


@pytest.mark.parametrize("kind", ["two_tower", "mf"])
def test_non_private_fedavg_through_the_engine_learns(kind):
    ml, emb = synthetic_with_text()
    train, test = ml.ratings.iloc[:1100], ml.ratings.iloc[1100:]
    model = new_model(kind, emb=emb)
    before = evaluate_ranking(model, train, test)["ndcg"]
    fed = FederatedImplicit(model, train, client_lr=2.0, seed=0)
    result = FederatedSimulator(fed, FedAvgM(weighting="per_client", seed=0)).fit(30)
    assert result.ledger is None and result.epsilon == math.inf and result.model is model
    assert evaluate_ranking(model, train, test)["ndcg"] > before + 0.05


def test_implicit_clients_follow_the_protocol_chunk_as_one_group_and_evaluate():
    train, test = random_split(synthetic_with_text()[0].ratings, seed=0)
    fed = FederatedImplicit(new_model("two_tower"), train, seed=0)
    assert isinstance(fed, FederatedModel)
    clients = torch.arange(fed.n_clients)
    assert [c.tolist() for c in fed.chunks(clients, 1)] == [clients.tolist()]
    metrics = fed.evaluate(fed.shared_state(), test)
    assert set(metrics) == {"hr", "ndcg"} and 0 <= metrics["ndcg"] <= metrics["hr"] <= 1
    with pytest.raises(TypeError, match="shared"):
        fed.local_training([1.0], clients)
    with pytest.raises(ValueError, match="shared"):
        fed.released_model({"nothing": torch.zeros(1)})
