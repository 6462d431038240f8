"""Tests for privrec.federated: engines agree, aggregation weights, privacy of user rows, bytes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.data import random_split, synthetic_movielens
from privrec.federated import (
    BYTES_PER_FLOAT,
    BYTES_PER_INDEX,
    FedAvg,
    FedAvgM,
    FederatedMF,
    Partition,
    cross_device,
    demographic_partition,
    dirichlet_genre_partition,
    iid_partition,
    solve_user_ridge,
)
from privrec.metrics import evaluate_ratings
from privrec.models import BiasedMF
from privrec.train import fit_explicit, global_mean_model

ML = synthetic_movielens(n_users=50, n_items=70, n_ratings=1200, seed=3)
TRAIN, TEST = random_split(ML.ratings, seed=0)
NU, NI = ML.n_users, ML.n_items


def make(**kwargs) -> FederatedMF:
    kwargs.setdefault("dim", 4)
    return FederatedMF(TRAIN, n_users=NU, n_items=NI, **kwargs)


def partitions() -> dict[str, Partition]:
    return {
        "device": cross_device(NU),
        "iid": iid_partition(NU, 6, seed=1),
        "dirichlet": dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=5, alpha=0.3),
    }


# ----------------------------------------------------------------------------------------------
# The vectorised engine is the loop reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part", ["device", "iid", "dirichlet"])
@pytest.mark.parametrize("solver", ["closed_form", "gradient"])
@pytest.mark.parametrize("epochs", [1, 3])
def test_vectorised_engine_equals_loop(part, solver, epochs):
    runs = []
    for engine in ("vectorised", "loop"):
        m = 12 if part == "device" else 3
        strategy = FedAvgM(clients_per_round=m, server_momentum=0.5, server_lr=0.8, seed=4)
        sim = make(partition=partitions()[part], user_solver=solver, local_epochs=epochs,
                   local_lr=0.3, strategy=strategy, engine=engine, fake_items=0.5 if epochs == 3
                   else 0.0)
        records = [sim.round() for _ in range(4)]
        runs.append((sim, records))
    (a, ra), (b, rb) = runs
    for name in a.server:
        torch.testing.assert_close(a.server[name], b.server[name], atol=2e-5, rtol=1e-4)
    for name in a.clients:
        torch.testing.assert_close(a.clients[name], b.clients[name], atol=2e-5, rtol=1e-4)
    assert [r.bytes_up for r in ra] == [r.bytes_up for r in rb]
    assert [r.clients.tolist() for r in ra] == [r.clients.tolist() for r in rb]


def test_engines_agree_with_per_client_weighting_and_dense_upload():
    sims = [make(strategy=FedAvg(weighting="per_client", clients_per_round=20, seed=2),
                 upload="dense", engine=e) for e in ("vectorised", "loop")]
    for _ in range(3):
        ra, rb = sims[0].round(), sims[1].round()
    assert ra.bytes_up == rb.bytes_up
    torch.testing.assert_close(sims[0].server["item_factors"], sims[1].server["item_factors"],
                               atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Aggregation weights (checked against an independent numpy computation of the upload)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["per_row", "per_client"])
def test_aggregation_is_the_example_weighted_mean(weighting):
    sim = make(partition=iid_partition(NU, 5, seed=0),
               strategy=FedAvg(weighting=weighting, clients_per_round=3, seed=1), local_epochs=2)
    sim.round()
    up = {k: v.numpy().astype(np.float64) for k, v in sim.last_upload.items()}
    before = sim.last_broadcast
    items = up["pair_item"].astype(int)
    if weighting == "per_row":
        w = up["pair_examples"]
        denom = np.bincount(items, weights=w, minlength=NI)
    else:
        w = up["examples"][up["pair_client"].astype(int)]
        denom = np.full(NI, up["examples"].sum())
    expected = np.zeros((NI, sim.dim))
    np.add.at(expected, items, w[:, None] * up["item_factors"])
    expected = np.divide(expected, denom[:, None], out=np.zeros_like(expected),
                         where=denom[:, None] > 0)
    got = (sim.server["item_factors"] - before["item_factors"]).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    mu_expected = (up["examples"] * up["global_bias"]).sum() / up["examples"].sum()
    assert float(sim.server["global_bias"] - before["global_bias"]) == pytest.approx(mu_expected,
                                                                                      abs=1e-6)
    # Per-row weights in silos are real counts (>1 for items several of a silo's users rated).
    if weighting == "per_row":
        assert up["pair_examples"].max() > 1


def test_item_rated_by_one_client_takes_that_clients_row():
    # per_row weighting, server_lr=1: a row touched by a single client becomes that client's row.
    sim = make(strategy=FedAvg(clients_per_round=1, seed=0))
    sim.round()
    up = sim.last_upload
    torch.testing.assert_close(sim.server["item_factors"][up["pair_item"]],
                               sim.last_broadcast["item_factors"][up["pair_item"]]
                               + up["item_factors"])
    untouched = torch.ones(NI, dtype=torch.bool)
    untouched[up["pair_item"]] = False
    torch.testing.assert_close(sim.server["item_factors"][untouched],
                               sim.last_broadcast["item_factors"][untouched])


def test_server_momentum_zero_is_fedavg_and_momentum_changes_the_path():
    a = make(strategy=FedAvg(clients_per_round=10, seed=5))
    b = make(strategy=FedAvgM(clients_per_round=10, seed=5, server_momentum=0.0))
    c = make(strategy=FedAvgM(clients_per_round=10, seed=5, server_momentum=0.9))
    for _ in range(3):
        a.round(), b.round(), c.round()
    torch.testing.assert_close(a.server["item_factors"], b.server["item_factors"])
    assert not torch.allclose(a.server["item_factors"], c.server["item_factors"])


# ----------------------------------------------------------------------------------------------
# User parameters stay on the client
# ----------------------------------------------------------------------------------------------

def test_server_holds_no_user_rows_and_uploads_carry_none():
    sim = make()
    sim.fit(2)
    assert set(sim.server) == set(BiasedMF.shared_parameter_names)
    assert set(sim.clients) == set(BiasedMF.user_parameter_names)
    assert all(v.dim() == 0 or v.shape[0] == NI for v in sim.server.values())
    assert not any("user" in k for k in sim.last_upload)
    # Every uploaded tensor is indexed by client or by uploaded row, never by user x factor.
    n_rows = len(sim.last_upload["pair_item"])
    for key, value in sim.last_upload.items():
        assert value.shape[0] in (n_rows, len(sim.last_upload["clients"])), key


def test_closed_form_user_solve_is_the_ridge_optimum():
    sim = make()
    sim.round()
    users = torch.as_tensor(TRAIN["user"].to_numpy())
    items = torch.as_tensor(TRAIN["item"].to_numpy())
    ratings = torch.as_tensor(TRAIN["rating"].to_numpy())
    params = dict(item_factors=sim.server["item_factors"], item_bias=sim.server["item_bias"],
                  global_bias=sim.server["global_bias"], reg=0.1, bias_reg=0.01)
    w = solve_user_ridge(users, items, ratings, n_rows=NU, **params).double()
    # Gradient of the ridge objective is zero at the solution.
    x = torch.cat([params["item_factors"], torch.ones(NI, 1)], 1).double()
    err = ratings.double() - params["global_bias"] - params["item_bias"][items] - (
        w[users] * x[items]).sum(1)
    n_u = torch.bincount(users, minlength=NU).double()
    lam = torch.tensor([0.1] * sim.dim + [0.01], dtype=torch.double)
    grad = -torch.zeros(NU, sim.dim + 1, dtype=torch.double).index_add_(
        0, users, err[:, None] * x[items]) + n_u[:, None] * lam * w
    assert float(grad.abs().max()) < 1e-3


# ----------------------------------------------------------------------------------------------
# Communication accounting
# ----------------------------------------------------------------------------------------------

def test_byte_counts_sparse_and_dense():
    part = iid_partition(NU, 5, seed=2)
    sparse = make(partition=part, strategy=FedAvg(clients_per_round=2, seed=0))
    dense = make(partition=part, strategy=FedAvg(clients_per_round=2, seed=0), upload="dense")
    rs, rd = sparse.round(), dense.round()
    owners = part.client_of_user[TRAIN["user"].to_numpy()]
    mine = TRAIN[np.isin(owners, rs.clients)]
    rows = len(set(zip(part.client_of_user[mine["user"]], mine["item"], strict=True)))
    model_floats = NI * (4 + 1) + 1
    assert rs.rows_up == rows
    assert rs.bytes_up == rows * (5 * BYTES_PER_FLOAT + BYTES_PER_INDEX) + 2 * BYTES_PER_FLOAT
    assert rs.bytes_down == rd.bytes_down == 2 * model_floats * BYTES_PER_FLOAT
    assert rd.bytes_up == 2 * model_floats * BYTES_PER_FLOAT
    history = sparse.fit(3)
    assert history.total_bytes == sum(history.bytes_up) + sum(history.bytes_down)
    assert len(history.bytes_up) == 3


# ----------------------------------------------------------------------------------------------
# Partitions and sampling
# ----------------------------------------------------------------------------------------------

def test_iid_partition_sizes_and_seed():
    a = iid_partition(NU, 7, seed=0)
    assert a.users_per_client().max() - a.users_per_client().min() <= 1
    assert np.array_equal(a.client_of_user, iid_partition(NU, 7, seed=0).client_of_user)
    assert not np.array_equal(a.client_of_user, iid_partition(NU, 7, seed=1).client_of_user)
    assert cross_device(NU).users_per_client().tolist() == [1] * NU


def test_non_iid_partitions():
    age = demographic_partition(ML.users, by="age", n_silos=4)
    sizes = age.users_per_client()
    assert sizes.sum() == NU and sizes.max() - sizes.min() <= 1
    ages = ML.users["age"].to_numpy()
    # Age bands: every user of silo k is at least as old as every user of silo k-1.
    for k in range(1, 4):
        assert ages[age.client_of_user == k].min() >= ages[age.client_of_user == k - 1].max()
    gender = demographic_partition(ML.users, by="gender")
    assert gender.n_clients == ML.users["gender"].nunique()

    def label_entropy(part: Partition) -> float:
        # Mean over silos of the entropy of the silos' genre-label mix: lower = more skewed.
        first = ML.items.set_index("item")["genres"].str.split("|").str[0]
        g = first.loc[TRAIN["item"].to_numpy()].to_numpy()
        owner = part.client_of_user[TRAIN["user"].to_numpy()]
        ent = []
        for k in range(part.n_clients):
            _, counts = np.unique(g[owner == k], return_counts=True)
            if counts.sum():
                p = counts / counts.sum()
                ent.append(-(p * np.log(p)).sum())
        return float(np.mean(ent))

    skewed = [label_entropy(dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=4,
                                                      alpha=0.05, seed=s)) for s in range(5)]
    mixed = [label_entropy(dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=4,
                                                     alpha=100.0, seed=s)) for s in range(5)]
    assert np.mean(skewed) < np.mean(mixed)
    d = dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=4, alpha=0.5, seed=3)
    assert np.array_equal(d.client_of_user, dirichlet_genre_partition(
        TRAIN, ML.items, n_users=NU, n_silos=4, alpha=0.5, seed=3).client_of_user)


def test_client_sampling_is_seeded_without_replacement():
    strategy = FedAvg(clients_per_round=7, seed=9)
    draws = [strategy.sample_clients(NU) for _ in range(5)]
    assert all(len(np.unique(d)) == 7 and list(d) == sorted(d) for d in draws)
    again = FedAvg(clients_per_round=7, seed=9)
    assert all(np.array_equal(d, again.sample_clients(NU)) for d in draws)
    assert FedAvg().sample_clients(NU).tolist() == list(range(NU))


# ----------------------------------------------------------------------------------------------
# It learns
# ----------------------------------------------------------------------------------------------

def test_federated_training_approaches_centralised():
    sim = make(dim=3, reg=0.05)
    history = sim.fit(40, test=TEST, eval_every=10)
    baseline = evaluate_ratings(global_mean_model(TRAIN, n_users=NU, n_items=NI), TEST)["rmse"]
    central = BiasedMF(NU, NI, 3, global_mean=float(TRAIN["rating"].mean()))
    fit_explicit(central, TRAIN, epochs=60, lr=0.02, reg=0.05, progress=False)
    central_rmse = evaluate_ratings(central, TEST)["rmse"]
    assert history.test_rmse[-1] < baseline - 0.05
    assert history.test_rmse[-1] < central_rmse + 0.05
    assert history.rounds == [10, 20, 30, 40]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy=FedAvg(clients_per_round=NU + 1)), "clients_per_round"),
    (dict(partition=iid_partition(NU, 4), strategy=FedAvg(clients_per_round=5)),
     "clients_per_round"),
    (dict(local_lr=0.0), "local_lr"),
    (dict(local_lr=-1.0), "local_lr"),
    (dict(local_epochs=0), "local_epochs"),
    (dict(dim=0), "dim"),
    (dict(upload="zip"), "upload"),
    (dict(engine="gpu"), "engine"),
    (dict(fake_items=-0.1), "fake_items"),
    (dict(user_solver="closed_form", reg=0.0), "reg"),
    (dict(partition=cross_device(NU + 1)), "partition"),
])
def test_simulator_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda: FedAvg(clients_per_round=0), "clients_per_round"),
    (lambda: FedAvg(server_lr=0.0), "server_lr"),
    (lambda: FedAvg(weighting="median"), "weighting"),
    (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
    (lambda: FedAvgM(server_momentum=-0.1), "server_momentum"),
    (lambda: iid_partition(NU, 0), "n_silos"),
    (lambda: iid_partition(NU, NU + 1), "n_silos"),
    (lambda: dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=0), "n_silos"),
    (lambda: dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=3, alpha=0.0), "alpha"),
    (lambda: demographic_partition(ML.users, by="zip"), "by"),
    (lambda: Partition(np.array([0, 1, 5]), 3), "client_of_user"),
    (lambda: make().fit(0), "rounds"),
])
def test_other_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_type_errors():
    with pytest.raises(TypeError, match="strategy"):
        make(strategy="fedavg")
    with pytest.raises(TypeError, match="local_epochs"):
        make(local_epochs=1.5)


def test_fake_items_are_distinct_unrated_and_counted():
    sim = make(fake_items=1.5, seed=3)
    users = torch.as_tensor(TRAIN["user"].to_numpy())
    f_users, f_items = sim._sample_fake_items(users)
    pairs = set(zip(f_users.tolist(), f_items.tolist(), strict=True))
    assert len(pairs) == len(f_users)                                   # distinct per user
    rated = set(zip(TRAIN["user"], TRAIN["item"], strict=True))
    assert not pairs & rated                                            # never a rated item
    n_u = np.bincount(TRAIN["user"], minlength=NU)
    expected = np.minimum(np.round(1.5 * n_u), NI - n_u)
    np.testing.assert_array_equal(np.bincount(f_users.numpy(), minlength=NU), expected)
    # A user who rated most of the catalogue still gets exactly its unrated items.
    dense = TRAIN[TRAIN["user"] != 0]
    extra = np.setdiff1d(np.arange(NI), TRAIN.loc[TRAIN["user"] == 0, "item"])[:-3]
    heavy = pd.concat([dense, pd.DataFrame({"user": 0, "item": np.arange(NI)[~np.isin(
        np.arange(NI), extra)], "rating": 3.0, "timestamp": 0})], ignore_index=True)
    heavy = heavy.astype({"user": "int64", "item": "int64", "rating": "float32"})
    sim = FederatedMF(heavy, n_users=NU, n_items=NI, dim=4, fake_items=3.0)
    fu, fi = sim._sample_fake_items(torch.tensor([0]))
    assert sorted(fi.tolist()) == sorted(extra.tolist()) and (fu == 0).all()
