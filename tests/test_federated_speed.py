"""The federated engine's shortcuts change no number: reused batches and their memoised layouts,
the shared clip weights, NumPy's float64 conversion and squares, the reused evaluation clients."""

from __future__ import annotations

import math

import pytest
import torch

from privrec.course.experiments import user_level as ul
from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedMF, FederatedSimulator
from privrec.federated.mf import KEPT_BATCHES
from privrec.federated.partitions import iid_partition
from privrec.federated.strategies import FedAvg, FedAvgM, add_weighted
from privrec.federated.updates import ClientUpdates, RowUpdates, as_float64
from privrec.recsys.data import random_split, synthetic_movielens

ML = synthetic_movielens(n_users=60, n_items=80, n_ratings=1500, seed=5)
TRAIN, TEST = random_split(ML.ratings, seed=0)


def _run(*, fresh: bool, sample_rate: float, rounds: int = 4, **kwargs):
    model = FederatedMF(TRAIN, n_users=ML.n_users, n_items=ML.n_items, dim=4, **kwargs)
    dp = DPFedAvg(FedAvgM(server_momentum=0.5), n_clients=model.n_clients,
                  sample_rate=sample_rate, clip_norm=0.5, noise_multiplier=0.7,
                  unit=model.privacy_unit, seed=3)
    sim = FederatedSimulator(model, dp, chunk_ratings=300)
    for _ in range(rounds):
        if fresh:
            model._gathered.batches.clear()  # every round gathers and lays out its batches anew
        sim.round()
    released = sim.released_model()
    return sim.shared, dp.last_norms, released.user_factors.detach(), released.user_bias.detach()


@pytest.mark.parametrize("kwargs", [{}, {"partition": iid_partition(60, 4, seed=1)},
                                    {"user_solver": "gradient", "local_lr": 0.2},
                                    {"workers": 2, "local_epochs": 2}])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_reused_batches_give_the_same_bits(kwargs, sample_rate):
    kept = _run(fresh=False, sample_rate=sample_rate, **kwargs)
    fresh = _run(fresh=True, sample_rate=sample_rate, **kwargs)
    for a, b in zip(kept[:2], fresh[:2], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else torch.equal(a, b)
    assert torch.equal(kept[2], fresh[2]) and torch.equal(kept[3], fresh[3])


def test_a_full_cohort_reuses_its_batches_and_keeps_few():
    model = FederatedMF(TRAIN, n_users=ML.n_users, n_items=ML.n_items, dim=4)
    sim = FederatedSimulator(model, FedAvg(), chunk_ratings=200)
    sim.round()
    first = dict(model._gathered.batches)
    sim.round()
    assert len(first) > 1 and all(model._gathered.batches[k] is b for k, b in first.items())
    for clients in torch.arange(ML.n_users).split(3):
        model.local_training(sim.shared, clients)
    assert len(model._gathered.batches) == KEPT_BATCHES


def test_float64_conversion_and_squares_are_torchs():
    torch.manual_seed(0)
    x = torch.randn(500, 7) * torch.logspace(-40, 30, 500)[:, None]
    x[0, :3] = torch.tensor([-0.0, math.inf, 1e-45])
    assert torch.equal(as_float64(x), x.double())
    assert torch.equal(as_float64(x[:, ::2]), x[:, ::2].double())  # not contiguous: torch's
    upload = ClientUpdates(torch.arange(2), torch.ones(2),
                           {"t": RowUpdates(torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]),
                                            x[:3, :4].clone(), torch.ones(3))},
                           {"d": x[3:5, :2].clone()})
    expected = torch.zeros(2, dtype=torch.float64).index_add_(
        0, torch.tensor([0, 1, 1]), x[:3, :4].double().square().sum(1))
    expected += x[3:5, :2].double().square().sum(1)
    assert torch.equal(upload.norms(), expected.sqrt().float())


@pytest.mark.parametrize("per_row", [False, True])
def test_tables_sharing_pairs_share_weights(per_row):
    pos, row = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 3, 3, 0])
    examples = torch.tensor([1.0, 2.0, 1.0, 1.0])
    values = {"a": torch.randn(4, 3), "b": torch.randn(4)}
    shared = ClientUpdates(torch.arange(3), torch.ones(3),
                           {k: RowUpdates(pos, row, v, examples) for k, v in values.items()}, {})
    apart = ClientUpdates(torch.arange(3), torch.ones(3),
                          {k: RowUpdates(pos.clone(), row.clone(), v, examples * (i + 1))
                           for i, (k, v) in enumerate(values.items())}, {})
    weight = torch.tensor([0.5, 1.0, 0.25])
    for upload, scale in ((shared, (1, 1)), (apart, (1, 2))):
        sums = {"a": torch.zeros(4, 3), "b": torch.zeros(4)}
        add_weighted(sums, upload, weight, per_row=per_row)
        for (name, v), s in zip(values.items(), scale, strict=True):
            w = examples * s if per_row else weight[pos]
            want = torch.zeros_like(sums[name]).index_add_(0, row, v * w.reshape(-1, *[1] * (v.dim() - 1)))
            assert torch.equal(sums[name], want)


@pytest.mark.parametrize("bias_only", [False, True])
def test_one_evaluation_model_serves_every_release(bias_only):
    train, test = random_split(ML.ratings, test_fraction=0.2, seed=0)
    setup = ul.Setup(ML.ratings, ML.n_users, ML.n_items, train, test, train, test)
    states = [ul.train_run(train, n_users=ML.n_users, n_items=ML.n_items, epsilon=math.inf,
                           sample_rate=1.0, rounds=r, dim=3, clip_norm=1.0, server_lr=1.0,
                           bias_only=bias_only)[1] for r in (1, 3)]
    for state in states + states[:1]:
        reused = ul._everyone(setup, dim=3, bias_only=bias_only).released_model(state)
        fresh = ul._clients(train, n_users=ML.n_users, n_items=ML.n_items, dim=3,
                            bias_only=bias_only).released_model(state)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in reused.state_dict().items())
    assert ul._test_scores(setup, states[0], dim=3, bias_only=bias_only)["rmse"] < 5
