"""privrec.federated.protocols and the one round function: contracts, the round driven from
outside (as the Flower ServerApp drives it), and the data-free initial state."""

from __future__ import annotations

import math

import pytest
import torch

from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedMF, FederatedSimulator, RoundRecord, federated_round
from privrec.federated.mf import PUBLIC_GLOBAL_MEAN, initial_shared_state
from privrec.federated.partitions import iid_partition
from privrec.federated.protocols import FederatedModel, PrivateStrategy, Strategy
from privrec.federated.strategies import FedAdam, FedAvg, FedAvgM, RunningSum
from privrec.federated.two_tower import FederatedImplicit
from privrec.federated.updates import ClientUpdates
from privrec.recsys.data import random_split, synthetic_movielens
from privrec.recsys.models import BiasedMF

ML = synthetic_movielens(n_users=40, n_items=30, n_ratings=700, seed=5)
TRAIN, TEST = random_split(ML.ratings, seed=0)
NU, NI = ML.n_users, ML.n_items


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (``torch.testing`` would import torch.distributed: 5 s)."""
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


def mf(**kwargs) -> FederatedMF:
    return FederatedMF(TRAIN, n_users=NU, n_items=NI, dim=3, **kwargs)


class HalfStep:
    """A server strategy written from scratch (not a FedAvg subclass): unweighted mean, half step."""

    def __init__(self) -> None:
        self.changes: list[dict[str, torch.Tensor]] = []

    def sample(self, n_clients: int) -> torch.Tensor:
        return torch.arange(n_clients)

    def start(self, shared):
        return RunningSum({k: torch.zeros_like(v) for k, v in shared.items()})

    def accumulate(self, total, updates) -> None:
        for name, value in updates.summed({k: v.shape for k, v in total.sums.items()}).items():
            total.sums[name] += value
        total.clients += len(updates)

    def finish(self, total):
        return {k: v / max(total.clients, 1) for k, v in total.sums.items()}

    def step(self, shared, change) -> None:
        self.changes.append(change)
        for k, v in change.items():
            shared[k].add_(v, alpha=0.5)


# -- every shipped object satisfies its protocol; wrong objects are named ------------------------

def test_shipped_models_and_strategies_satisfy_the_protocols():
    implicit = FederatedImplicit(BiasedMF(NU, NI, 3), TRAIN[TRAIN["rating"] >= 4], seed=0)
    for model in (mf(), mf(partition=iid_partition(NU, 4, seed=0)), implicit):
        assert isinstance(model, FederatedModel)
    dp = DPFedAvg(FedAvg(), n_clients=NU, sample_rate=0.5, clip_norm=1.0, noise_multiplier=1.0)
    for strategy in (FedAvg(), FedAvgM(), FedAdam(), dp, HalfStep()):
        assert isinstance(strategy, Strategy)
    assert isinstance(dp, PrivateStrategy) and not isinstance(FedAvg(), PrivateStrategy)
    assert not isinstance(object(), Strategy) and not isinstance(TRAIN, FederatedModel)


class NoStep(HalfStep):
    step = None  # an attribute that is not a method still fails: nothing to call


def test_objects_missing_members_are_refused_with_the_member_named():
    class Lacking:
        def sample(self, n_clients):
            return torch.arange(n_clients)

    with pytest.raises(TypeError, match="strategy must be a Strategy .*accumulate.*step"):
        FederatedSimulator(mf(), Lacking())
    with pytest.raises(TypeError, match="strategy must be a Strategy"):
        DPFedAvg(Lacking(), n_clients=NU, sample_rate=0.5, clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="model must be a FederatedModel .*chunks"):
        FederatedSimulator(TRAIN)
    with pytest.raises(TypeError, match="strategy"):
        federated_round(mf().shared_state(), Lacking(), n_clients=NU, train_cohort=lambda b, c: [])


# -- DPFedAvg wraps any Strategy ------------------------------------------------------------------

def test_dpfedavg_wraps_a_strategy_that_is_not_a_fedavg():
    runs = {}
    for name, inner in (("custom", HalfStep()), ("fedavg", FedAvg(server_lr=1.0))):
        dp = DPFedAvg(inner, n_clients=NU, sample_rate=0.6, clip_norm=0.2, noise_multiplier=0.8,
                      seed=4)
        sim = FederatedSimulator(mf(), dp)
        before = {k: v.clone() for k, v in sim.shared.items()}
        sim.round()
        runs[name] = (inner, before, sim.shared, dp.ledger.events)
    custom, before, after, events = runs["custom"]
    _, _, fedavg_after, fedavg_events = runs["fedavg"]
    assert len(custom.changes) == 1 and events == fedavg_events and len(events) == 1
    for k in before:  # same sampling, clipping and noise; the custom step takes half of it
        assert close(custom.changes[0][k], fedavg_after[k] - before[k])
        assert close(after[k], before[k] + 0.5 * custom.changes[0][k])


# -- one round function: the simulator's round, and a round driven from outside ------------------

def test_simulator_round_is_the_round_function():
    sim = FederatedSimulator(mf(), FedAvgM(clients_per_round=25, seed=2))
    model, strategy = mf(), FedAvgM(clients_per_round=25, seed=2)
    shared = model.shared_state()
    for r in range(1, 4):
        expected = sim.round()
        got = federated_round(shared, strategy, n_clients=model.n_clients, round_number=r,
                              train_cohort=lambda b, c: [model.local_training(b, c)])
        assert torch.equal(got.clients, expected.clients) and torch.equal(got.realised, got.clients)
        assert (got.bytes_down, got.bytes_up, got.rows_up) == (
            expected.bytes_down, expected.bytes_up, expected.rows_up)
        for k in shared:
            assert torch.equal(shared[k], sim.shared[k])


def test_deployed_clients_each_on_its_own_device_give_the_simulated_model():
    """Each silo trains in its own FederatedMF holding only its ratings (as a ClientApp does);
    the server gets their uploads in silo order, a silo that does not answer is left out."""
    part = iid_partition(NU, 4, seed=1)
    silo_of_user = part.client_of_user

    def device(silo: int) -> FederatedMF:
        own = TRAIN[silo_of_user[TRAIN["user"].to_numpy()] == silo]
        return FederatedMF(own, n_users=NU, n_items=NI, dim=3, partition=part)

    devices = {s: device(s) for s in range(4)}
    strategy = DPFedAvg(FedAvg(), n_clients=4, sample_rate=1.0, clip_norm=0.5,
                        noise_multiplier=0.5, unit="silo", seed=1)
    shared = initial_shared_state(n_users=NU, n_items=NI, dim=3)
    silent = {2: 3}   # round 2: silo 3 does not answer

    def cohort(broadcast, clients):
        answered = [c for c in clients.tolist() if silent.get(round_number) != c]
        ups = [devices[c].local_training(broadcast, torch.tensor([c])) for c in answered]
        return [ClientUpdates.concat(ups)] if ups else []

    reference = mf(partition=part)
    sim_strategy = DPFedAvg(FedAvg(), n_clients=4, sample_rate=1.0, clip_norm=0.5,
                            noise_multiplier=0.5, unit="silo", seed=1)
    sim_shared = reference.shared_state()
    for round_number in (1, 2, 3):
        record = federated_round(shared, strategy, n_clients=4, train_cohort=cohort,
                                 round_number=round_number)
        keep = record.realised
        federated_round(sim_shared, sim_strategy, n_clients=4, round_number=round_number,
                        train_cohort=lambda b, c, keep=keep: [reference.local_training(
                            b, c[torch.isin(c, keep)])])
        assert record.realised.tolist() == ([0, 1, 2] if round_number == 2 else [0, 1, 2, 3])
    for k in shared:
        assert close(shared[k], sim_shared[k])
    assert strategy.ledger.events == sim_strategy.ledger.events


def test_an_empty_cohort_still_steps_noises_and_records():
    dp = DPFedAvg(FedAvg(), n_clients=NU, sample_rate=0.5, clip_norm=1.0, noise_multiplier=1.0)
    shared = mf().shared_state()
    before = {k: v.clone() for k, v in shared.items()}
    record = federated_round(shared, dp, n_clients=NU, train_cohort=lambda b, c: [])
    assert isinstance(record, RoundRecord) and len(record.realised) == 0 and record.bytes_up == 0
    assert [e.count for e in dp.ledger.events] == [1]
    assert not torch.equal(shared["item_factors"], before["item_factors"])  # the noise moved it


def test_divergence_names_the_round():
    model = mf()
    shared = model.shared_state()

    def exploding(broadcast, clients):
        up = model.local_training(broadcast, clients)
        up.dense["global_bias"] = up.dense["global_bias"] * math.inf
        return [up]

    with pytest.raises(RuntimeError, match="diverged in round 7"):
        federated_round(shared, FedAvg(), n_clients=NU, train_cohort=exploding, round_number=7)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shared=[1.0]), TypeError, "shared"),
    (dict(shared={}), ValueError, "shared"),
    (dict(shared={"q": torch.zeros(2, dtype=torch.long)}), TypeError, "shared"),
    (dict(n_clients=0), ValueError, "n_clients"),
    (dict(n_clients="3"), TypeError, "n_clients"),
    (dict(train_cohort="clients"), TypeError, "train_cohort"),
    (dict(upload="zip"), ValueError, "upload"),
])
def test_round_function_rejects_bad_arguments(kwargs, error, match):
    args = dict(shared=mf().shared_state(), strategy=FedAvg(), n_clients=NU,
                train_cohort=lambda b, c: []) | kwargs
    shared, strategy = args.pop("shared"), args.pop("strategy")
    with pytest.raises(error, match=match):
        federated_round(shared, strategy, **args)


# -- the data-free initial state -----------------------------------------------------------------

def test_initial_state_is_one_data_free_function():
    other = TRAIN.assign(rating=6 - TRAIN["rating"])
    for data in (TRAIN, other, TRAIN.iloc[:10]):
        model = FederatedMF(data, n_users=NU, n_items=NI, dim=5, seed=3)
        state = initial_shared_state(n_users=NU, n_items=NI, dim=5, seed=3)
        assert state.keys() == model.shared_state().keys()
        assert all(torch.equal(state[k], model.shared_state()[k]) for k in state)
    assert float(state["global_bias"]) == PUBLIC_GLOBAL_MEAN
    assert not torch.equal(state["item_factors"],
                           initial_shared_state(n_users=NU, n_items=NI, dim=5, seed=4)["item_factors"])
    with pytest.raises(ValueError, match="dim"):
        initial_shared_state(n_users=NU, n_items=NI, dim=-1)
    with pytest.raises(TypeError, match="seed"):
        initial_shared_state(n_users=NU, n_items=NI, dim=2, seed="0")
    with pytest.raises(ValueError, match="init_std"):
        initial_shared_state(n_users=NU, n_items=NI, dim=2, init_std=-1.0)
