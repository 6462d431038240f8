"""Tests for privrec.federated.engine: engines agree, aggregation weights, information flow, bytes, scale."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.federated.engine import (
    BYTES_PER_FLOAT,
    BYTES_PER_INDEX,
    PUBLIC_GLOBAL_MEAN,
    FederatedMF,
    FederatedSimulator,
    wire_bytes,
)
from privrec.federated.mf import sample_fake_items
from privrec.federated.mf_local import RatingStore, solve_user_ridge
from privrec.federated.partitions import cross_device, dirichlet_genre_partition, iid_partition
from privrec.federated.strategies import FedAvg, FedAvgM
from privrec.federated.updates import ClientUpdates
from privrec.recsys.data import random_split, synthetic_movielens
from privrec.recsys.metrics import evaluate_ratings
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import fit_explicit, global_mean_model

ML = synthetic_movielens(n_users=50, n_items=70, n_ratings=1200, seed=3)
TRAIN, TEST = random_split(ML.ratings, seed=0)
NU, NI = ML.n_users, ML.n_items
SHARED = set(BiasedMF.shared_parameter_names)


def model(train=TRAIN, **kwargs) -> FederatedMF:
    kwargs.setdefault("dim", 4)
    return FederatedMF(train, n_users=NU, n_items=NI, **kwargs)


def make(strategy=None, *, chunk_ratings: int = 1 << 20, **kwargs) -> FederatedSimulator:
    return FederatedSimulator(model(**kwargs), strategy, keep_updates=True,
                              chunk_ratings=chunk_ratings)


def partitions() -> dict:
    return {"device": cross_device(NU), "iid": iid_partition(NU, 6, seed=1),
            "dirichlet": dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=5,
                                                   alpha=0.3)}


# -- the vectorised engine is the loop reference; chunking changes nothing ----------------------

@pytest.mark.parametrize("part", ["device", "iid", "dirichlet"])
@pytest.mark.parametrize("solver", ["closed_form", "gradient"])
@pytest.mark.parametrize("epochs", [1, 3])
def test_vectorised_engine_equals_loop(part, solver, epochs):
    runs = []
    for engine in ("vectorised", "loop"):
        m = 12 if part == "device" else 3
        sim = make(FedAvgM(clients_per_round=m, server_momentum=0.5, server_lr=0.8, seed=4),
                   partition=partitions()[part], user_solver=solver, local_epochs=epochs,
                   local_lr=0.3, engine=engine, fake_items=0.5 if epochs == 3 else 0.0)
        runs.append((sim, [sim.round() for _ in range(4)]))
    (a, ra), (b, rb) = runs
    for name in a.shared:
        torch.testing.assert_close(a.shared[name], b.shared[name], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.model.user_factors, b.model.user_factors, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.model.user_bias, b.model.user_bias, atol=2e-5, rtol=1e-4)
    assert [r.bytes_up for r in ra] == [r.bytes_up for r in rb]
    assert [r.clients.tolist() for r in ra] == [r.clients.tolist() for r in rb]


def test_engines_agree_with_per_client_weighting_and_dense_upload():
    sims = [make(FedAvg(weighting="per_client", clients_per_round=20, seed=2), upload="dense",
                 engine=e) for e in ("vectorised", "loop")]
    for _ in range(3):
        ra, rb = sims[0].round(), sims[1].round()
    assert ra.bytes_up == rb.bytes_up
    torch.testing.assert_close(sims[0].shared["item_factors"], sims[1].shared["item_factors"],
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("part", ["device", "iid"])
def test_chunked_round_equals_one_chunk(part):
    whole = make(FedAvgM(server_momentum=0.5), partition=partitions()[part])
    chunked = make(FedAvgM(server_momentum=0.5), partition=partitions()[part],
                   chunk_ratings=40)
    assert len(chunked.model.chunks(torch.arange(chunked.model.n_clients), 40)) > 5
    for _ in range(2):
        ra, rb = whole.round(), chunked.round()
    assert ra.bytes_up == rb.bytes_up and ra.rows_up == rb.rows_up
    for name in SHARED:
        torch.testing.assert_close(whole.shared[name], chunked.shared[name], atol=1e-6, rtol=1e-5)


# -- aggregation weights (checked against an independent numpy computation of the upload) ----

@pytest.mark.parametrize("weighting", ["per_row", "per_client"])
def test_aggregation_is_the_example_weighted_mean(weighting):
    sim = make(FedAvg(weighting=weighting, clients_per_round=3, seed=1),
               partition=iid_partition(NU, 5, seed=0), local_epochs=2)
    sim.round()
    up = sim.last_updates
    rows = up.rows["item_factors"]
    items = rows.row.numpy()
    examples = up.examples.numpy().astype(np.float64)
    if weighting == "per_row":
        w = rows.examples.numpy().astype(np.float64)
        denom = np.bincount(items, weights=w, minlength=NI)
    else:
        w = examples[rows.client_pos.numpy()]
        denom = np.full(NI, examples.sum())
    expected = np.zeros((NI, 4))
    np.add.at(expected, items, w[:, None] * rows.values.numpy())
    expected = np.divide(expected, denom[:, None], out=np.zeros_like(expected),
                         where=denom[:, None] > 0)
    got = (sim.shared["item_factors"] - sim.last_broadcast["item_factors"]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    mu = (examples * up.dense["global_bias"].numpy()).sum() / examples.sum()
    assert float(sim.shared["global_bias"] - sim.last_broadcast["global_bias"]) == pytest.approx(
        mu, abs=1e-6)
    if weighting == "per_row":   # silo per-row weights are real counts (> 1 somewhere)
        assert rows.examples.max() > 1


def test_item_rated_by_one_client_takes_that_clients_row():
    sim = make(FedAvg(clients_per_round=1, seed=0))
    sim.round()
    part = sim.last_updates.rows["item_factors"]
    torch.testing.assert_close(sim.shared["item_factors"][part.row],
                               sim.last_broadcast["item_factors"][part.row] + part.values)
    untouched = torch.ones(NI, dtype=torch.bool)
    untouched[part.row] = False
    torch.testing.assert_close(sim.shared["item_factors"][untouched],
                               sim.last_broadcast["item_factors"][untouched])


# -- information flow: user rows stay on the clients --------------------------------------------

def _tensors(obj, path="", seen=None):
    """Every tensor reachable from ``obj``'s attributes, dicts, lists and dataclasses."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}[{k}]", seen)
    elif isinstance(obj, (list, tuple)):
        for k, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{k}]", seen)
    elif hasattr(obj, "__dict__") and obj.__class__.__module__.startswith("privrec"):
        for k, v in vars(obj).items():
            yield from _tensors(v, f"{path}.{k}", seen)


@pytest.mark.parametrize("solver", ["closed_form", "gradient"])
def test_user_rows_never_reach_the_server_under_any_key(solver):
    sim = make(user_solver=solver, local_lr=0.2)
    sim.fit(2)
    server_side = {"shared": sim.shared, "broadcast": sim.last_broadcast,
                   "updates": sim.last_updates, "strategy": sim.strategy}
    assert set(sim.shared) == SHARED
    assert set(sim.last_updates.rows) | set(sim.last_updates.dense) <= SHARED
    user_rows = torch.cat([sim.model.user_factors, sim.model.user_bias[:, None]], 1)
    found = list(_tensors(server_side))
    assert found and not any("user" in path for path, _ in found)
    for path, value in found:
        flat = value.reshape(-1, value.shape[-1]) if value.dim() > 1 else value.reshape(-1, 1)
        if flat.shape[1] == 4:   # same width as a user factor: must match no user's row
            close = torch.cdist(flat.float(), user_rows[:, :4]).min(1).values
            assert bool((close > 1e-6).all()), path


def test_initial_state_is_public_and_identical_on_neighbouring_datasets():
    without_user = TRAIN[TRAIN["user"] != 7]
    for part in (cross_device(NU), iid_partition(NU, 5, seed=0)):
        a, b = model(partition=part), model(without_user, partition=part)
        for name in SHARED:
            assert torch.equal(a.shared_state()[name], b.shared_state()[name])
        assert float(a.shared_state()["global_bias"]) == PUBLIC_GLOBAL_MEAN
        sa, sb = FedAvg(clients_per_round=3, seed=2), FedAvg(clients_per_round=3, seed=2)
        assert torch.equal(sa.sample(a.n_clients), sb.sample(b.n_clients))


# -- user solve, bytes, learning ----------------------------------------------------------------

def test_closed_form_user_solve_is_the_ridge_optimum():
    sim = make()
    sim.round()
    users, items = (torch.as_tensor(TRAIN[c].to_numpy()) for c in ("user", "item"))
    ratings = torch.as_tensor(TRAIN["rating"].to_numpy())
    s = sim.shared
    w = solve_user_ridge(users, items, ratings, n_rows=NU, item_factors=s["item_factors"],
                         item_bias=s["item_bias"], global_bias=s["global_bias"], reg=0.1,
                         bias_reg=0.01).double()
    x = torch.cat([s["item_factors"], torch.ones(NI, 1)], 1).double()
    err = ratings.double() - s["global_bias"] - s["item_bias"][items] - (w[users] * x[items]).sum(1)
    n_u = torch.bincount(users, minlength=NU).double()
    lam = torch.tensor([0.1] * 4 + [0.01], dtype=torch.double)
    grad = -torch.zeros(NU, 5, dtype=torch.double).index_add_(
        0, users, err[:, None] * x[items]) + n_u[:, None] * lam * w
    assert float(grad.abs().max()) < 1e-3


def test_byte_counts_sparse_and_dense():
    part = iid_partition(NU, 5, seed=2)
    sparse = make(FedAvg(clients_per_round=2, seed=0), partition=part)
    dense = make(FedAvg(clients_per_round=2, seed=0), partition=part, upload="dense")
    rs, rd = sparse.round(), dense.round()
    owners = part.client_of_user[TRAIN["user"].to_numpy()]
    mine = TRAIN[np.isin(owners, rs.clients.numpy())]
    rows = len(set(zip(part.client_of_user[mine["user"]], mine["item"], strict=True)))
    model_floats = NI * (4 + 1) + 1
    assert rs.rows_up == rows
    assert rs.bytes_up == rows * (5 * BYTES_PER_FLOAT + BYTES_PER_INDEX) + 2 * BYTES_PER_FLOAT
    assert rs.bytes_down == rd.bytes_down == 2 * model_floats * BYTES_PER_FLOAT
    assert rd.bytes_up == 2 * model_floats * BYTES_PER_FLOAT
    result = sparse.fit(3)
    assert len(result.history["bytes_up"]) == 3 and result.ledger is None
    assert result.epsilon == float("inf")


def test_federated_training_approaches_centralised():
    sim = make(dim=3, reg=0.05)
    result = sim.fit(40, test=TEST, eval_every=10)
    baseline = evaluate_ratings(global_mean_model(TRAIN, n_users=NU, n_items=NI), TEST)["rmse"]
    central = BiasedMF(NU, NI, 3, global_mean=float(TRAIN["rating"].mean()))
    fit_explicit(central, TRAIN, epochs=60, lr=0.02, reg=0.05, progress=False)
    central_rmse = evaluate_ratings(central, TEST)["rmse"]
    rmse = result.history["test_rmse"]
    assert rmse[-1] < baseline - 0.05 and rmse[-1] < central_rmse + 0.05
    assert result.history["round"] == [10, 20, 30, 40]
    assert evaluate_ratings(result.model, TEST)["rmse"] == pytest.approx(rmse[-1])


def test_no_users_by_items_structure():
    # 2e5 x 2e5 = 4e10 cells: any dense users x items array would need >= 40 GB and fail here.
    n = 200_000
    rng = np.random.default_rng(0)
    users = rng.integers(0, n, 3000)
    items = rng.integers(0, n, 3000)
    big = FederatedMF.from_arrays(users, items, rng.integers(1, 6, 3000).astype(np.float32),
                                  n_users=n, n_items=n, dim=2, fake_items=1.0)
    sim = FederatedSimulator(big, FedAvg(clients_per_round=2000, seed=0), keep_updates=True)
    record = sim.round()
    assert len(record.clients) == 2000 and record.bytes_up > 0
    assert max(v.numel() for _, v in _tensors(big)) < 10 * n


def test_from_arrays_equals_dataframe_and_sorts_unsorted_input():
    shuffled = TRAIN.sample(frac=1.0, random_state=0)
    a = make()
    b = FederatedSimulator(FederatedMF.from_arrays(
        shuffled["user"].to_numpy(), shuffled["item"].to_numpy(), shuffled["rating"].to_numpy(),
        n_users=NU, n_items=NI, dim=4))
    a.round(), b.round()
    for name in SHARED:
        torch.testing.assert_close(a.shared[name], b.shared[name])


# -- fake items ---------------------------------------------------------------------------------

def test_fake_items_are_distinct_unrated_and_counted():
    users, items = (torch.as_tensor(TRAIN[c].to_numpy()) for c in ("user", "item"))
    gen = torch.Generator().manual_seed(3)
    f_users, f_items = sample_fake_items(users, items, n_items=NI, rate=1.5, generator=gen)
    pairs = set(zip(f_users.tolist(), f_items.tolist(), strict=True))
    assert len(pairs) == len(f_users)                                   # distinct per user
    assert not pairs & set(zip(TRAIN["user"], TRAIN["item"], strict=True))   # never rated
    n_u = np.bincount(TRAIN["user"], minlength=NU)
    expected = np.where(n_u > 0, np.minimum(np.round(1.5 * n_u), NI - n_u), 0)
    np.testing.assert_array_equal(np.bincount(f_users.numpy(), minlength=NU), expected)
    # A user who rated all but 5 items gets exactly those 5 (the fallback path).
    rated = torch.arange(NI - 5)
    fu, fi = sample_fake_items(torch.zeros(NI - 5, dtype=torch.long), rated, n_items=NI, rate=3.0,
                               generator=gen)
    assert sorted(fi.tolist()) == list(range(NI - 5, NI)) and bool((fu == 0).all())


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(local_lr=0.0), "local_lr"), (dict(local_epochs=0), "local_epochs"), (dict(dim=0), "dim"),
    (dict(upload="zip"), "upload"), (dict(engine="gpu"), "engine"),
    (dict(fake_items=-0.1), "fake_items"), (dict(user_solver="closed_form", reg=0.0), "reg"),
    (dict(partition=cross_device(NU + 1)), "partition"), (dict(global_mean=float("nan")),
                                                          "global_mean"),
])
def test_model_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_simulator_rejects_bad_input():
    with pytest.raises(ValueError, match="clients_per_round"):
        make(FedAvg(clients_per_round=NU + 1)).round()
    with pytest.raises(ValueError, match="rounds"):
        make().fit(0)
    with pytest.raises(TypeError, match="strategy"):
        make("fedavg")
    with pytest.raises(TypeError, match="model"):
        FederatedSimulator(TRAIN)
    with pytest.raises(TypeError, match="local_epochs"):
        model(local_epochs=1.5)
    with pytest.raises(ValueError, match="users"):
        FederatedMF.from_arrays([0, NU], [0, 1], [3.0, 4.0], n_users=NU, n_items=NI)
    with pytest.raises(ValueError, match="empty"):
        model(TRAIN.iloc[:0])
    assert ClientUpdates.concat([]) is None
    assert isinstance(pd.DataFrame(), pd.DataFrame)


def _shared():
    return model().shared_state()


@pytest.mark.parametrize("call, error, match", [
    (lambda: model().local_training([1.0], torch.arange(3)), TypeError, "shared"),
    (lambda: model().local_training(_shared(), torch.tensor([0.5])), TypeError, "clients"),
    (lambda: model().local_training(_shared(), torch.tensor([2, 1])), ValueError, "sorted"),
    (lambda: model().chunks(torch.arange(3), "5"), TypeError, "max_ratings"),
    (lambda: model().personalise(_shared(), max_ratings=0), ValueError, "max_ratings"),
    (lambda: model().released_model({"q": 1}), TypeError, "shared"),
    (lambda: model().evaluate(_shared(), [1]), TypeError, "test"),
    (lambda: FederatedMF.from_arrays([0], [0], ["a"], n_users=NU, n_items=NI), TypeError,
     "ratings"),
    (lambda: FederatedMF.from_arrays([0], [0], [np.inf], n_users=NU, n_items=NI), ValueError,
     "ratings"),
    (lambda: wire_bytes([1], {}), TypeError, "updates"),
    (lambda: wire_bytes(model().local_training(_shared(), torch.arange(2)), [1]), TypeError,
     "shapes"),
    (lambda: solve_user_ridge(torch.tensor([0]), torch.tensor([0]), [3.0], n_rows=1,
                              item_factors=torch.zeros(NI, 2), item_bias=torch.zeros(NI),
                              global_bias=torch.tensor(3.0), reg=0.1, bias_reg=0.1), TypeError,
     "ratings"),
    (lambda: solve_user_ridge(torch.tensor([1]), torch.tensor([0]), torch.ones(1), n_rows=1,
                              item_factors=torch.zeros(NI, 2), item_bias=torch.zeros(NI),
                              global_bias=torch.tensor(3.0), reg=0.1, bias_reg=0.1), ValueError,
     "rows"),
    (lambda: solve_user_ridge(torch.tensor([0]), torch.tensor([0]), torch.ones(1), n_rows=1,
                              item_factors=torch.zeros(NI, 2), item_bias=torch.zeros(NI),
                              global_bias=torch.tensor(3.0), reg=-0.1, bias_reg=0.1), ValueError,
     "reg"),
    (lambda: sample_fake_items(torch.tensor([0]), torch.tensor([0]), n_items=NI, rate=-1.0,
                               generator=torch.Generator()), ValueError, "rate"),
    (lambda: sample_fake_items(torch.tensor([0]), torch.tensor([0]), n_items=NI, rate=1.0,
                               generator=0), TypeError, "generator"),
    (lambda: RatingStore(np.zeros(2, np.int64), np.zeros(3, np.int64), np.ones(2, np.float32),
                         np.zeros(NU, np.int64), 1), ValueError, "same length"),
])
def test_calls_name_their_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_parallel_client_groups_give_exactly_the_serial_numbers():
    """With workers = 2 or 3 a chunk's clients train in groups on parallel threads."""
    part = iid_partition(NU, 6, seed=1)
    shared = model().shared_state()
    results = []
    for workers in (1, 2, 3):
        m = model(partition=part, user_solver="gradient", local_lr=0.2, workers=workers)
        results.append((m.local_training(shared, torch.arange(6)), m.user_factors.clone()))
    first, users_first = results[0]
    for up, users in results[1:]:
        assert torch.equal(up.clients, first.clients) and torch.equal(users, users_first)
        for name in first.rows:
            assert torch.equal(up.rows[name].values, first.rows[name].values)
            assert torch.equal(up.rows[name].row, first.rows[name].row)
        assert torch.equal(up.dense["global_bias"], first.dense["global_bias"])
    with pytest.raises(ValueError, match="workers"):
        model(workers=0)
