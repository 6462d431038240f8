"""Chapter 1's harness (privrec.course.experiments.embedding) on a small synthetic MovieLens."""

from __future__ import annotations

import numpy as np
import pytest

from privrec.course.experiments import embedding as ch1
from privrec.recsys.data import random_split, synthetic_movielens


@pytest.fixture(scope="module")
def ml():
    return synthetic_movielens(n_users=50, n_items=60, n_ratings=1200, seed=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))


@pytest.fixture(autouse=True)
def _small_grid(monkeypatch):
    monkeypatch.setattr(ch1, "DIMS", (2, 4))
    monkeypatch.setattr(ch1, "REGS", (0.01, 0.3))
    monkeypatch.setattr(ch1, "MAX_EPOCHS", 4)


def test_tuning_picks_the_lowest_validation_rmse_with_its_epoch(ml):
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    train, _ = random_split(ml.ratings, seed=0)
    tuning = ch1.tune_explicit(train, **kw, seed=0)
    assert len(tuning["grid"]) == 4 and set(tuning["curves"]) == {"2,0.01", "2,0.3", "4,0.01", "4,0.3"}
    best = min(min(c) for c in tuning["curves"].values())
    curve = tuning["curves"][f"{tuning['dim']},{tuning['reg']}"]
    assert min(curve) == best and curve[tuning["epochs"] - 1] == best
    assert all(len(c) == 4 for c in tuning["curves"].values())


def test_tuning_never_sees_the_test_ratings(ml):
    """Each seed tunes inside its own training split: the test ratings cannot change the choice."""
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    train, test = random_split(ml.ratings, seed=1)
    tuned = ch1.tune_explicit(train, **kw, seed=1)
    assert ch1.seed_run(ml.ratings, **kw, seed=1)["tuning"] == tuned
    held = ml.ratings.merge(test[["user", "item"]], how="left", indicator=True)["_merge"] == "both"
    scrambled = ml.ratings.assign(rating=np.where(held, 6.0 - ml.ratings["rating"],
                                                  ml.ratings["rating"]).astype(np.float32))
    assert not scrambled.equals(ml.ratings)
    assert ch1.seed_run(scrambled, **kw, seed=1)["tuning"] == tuned  # same split, other test stars


def test_seed_runs_differ_and_the_table_has_one_row_each(ml):
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    runs = [ch1.seed_run(ml.ratings, **kw, seed=s) for s in (0, 1)]
    assert runs[0]["MF"] != runs[1]["MF"]
    table = ch1.seed_table(runs)
    assert list(table.index) == [0, 1]
    assert {"d", "λ", "epochs", "biases", "MF"} <= set(table.columns)
    assert (table["MF"] > 0).all() and (table["global mean"] > table["biases"] - 0.5).all()
    assert ch1.seed_run(ml.ratings, **kw, seed=0) == runs[0]  # cached and reproducible


def test_ranking_run_and_protocols(ml):
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    ranking = ch1.ranking_run(ml.ratings, **kw)
    assert set(ranking["scores"]) == {"popularity", "user + item biases", "MF (trained on stars)",
                                      "MF (implicit, sampled negatives)"}
    for scores in ranking["scores"].values():
        assert 0 <= scores["ndcg"] <= scores["hr"] <= 1
    ties = ranking["ties"]
    assert ties["hr ties against"] <= ties["hr ties for"]
    assert ranking["mix"]["w"] in ranking["mix"]["weights"]
    protocols = ch1.protocol_table(ml.ratings, ranking, ch1.seed_run(ml.ratings, **kw, seed=0), **kw)
    assert protocols.shape == (2, 3) and protocols.notna().all().all()


def test_bias_regularisation_matters_most_for_rare_movies():
    sparse = synthetic_movielens(n_users=60, n_items=200, n_ratings=1500, seed=2)
    train, test = random_split(sparse.ratings, seed=0)
    table = ch1.bias_regularisation_effect(train, test, n_users=sparse.n_users,
                                           n_items=sparse.n_items)
    assert len(table) == 2 and np.isfinite(table.to_numpy()).all()
    rare = table.columns[1]
    assert table[rare].iloc[1] > table[rare].iloc[0]  # without penalties rare movies suffer


def test_bad_seed_is_named(ml):
    with pytest.raises(ValueError, match="seed"):
        ch1.seed_run(ml.ratings, n_users=ml.n_users, n_items=ml.n_items, seed=-1)
