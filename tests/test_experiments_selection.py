"""The private top-k experiment of chapter 2 (privrec.course.experiments.selection), on small data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privrec.course.experiments import selection as sel
from privrec.course.experiments.dp_basics import bounded_item_counts, item_counts
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.metrics import top_k


@pytest.fixture(scope="module")
def ml():
    return synthetic_movielens(n_users=60, n_items=40, n_ratings=900, seed=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))


def test_bounding_keeps_at_most_tau_random_ratings_per_user(ml):
    per_user = ml.ratings.groupby("user").size().to_numpy()
    rng = np.random.default_rng(0)
    bounded = bounded_item_counts(ml.ratings, n_items=ml.n_items, taus=(1, 5, 10_000), rng=rng)
    for tau, counts in bounded.items():
        assert counts.sum() == np.minimum(per_user, tau).sum()
    assert np.all(bounded[1] <= bounded[5]) and np.all(bounded[5] <= bounded[10_000])
    assert np.array_equal(bounded[10_000], item_counts(ml.ratings, n_items=ml.n_items))
    again = bounded_item_counts(ml.ratings, n_items=ml.n_items, taus=(5,),
                                    rng=np.random.default_rng(1))
    assert not np.array_equal(again[5], bounded[5])  # the kept ratings are random


def test_one_user_moves_every_count_by_at_most_one(ml):
    """The fact the selection's guarantee rests on: l_inf sensitivity 1, l_1 = ratings of the user."""
    counts = item_counts(ml.ratings, n_items=ml.n_items)
    for user in (0, 7, 31):
        without = item_counts(ml.ratings[ml.ratings["user"] != user], n_items=ml.n_items)
        diff = counts - without
        assert diff.max() == 1 and diff.min() == 0  # monotone, at most 1 per count
        assert diff.sum() == (ml.ratings["user"] == user).sum()


def test_ledgers_report_at_most_the_target_and_name_the_unit(ml):
    for method in sel.METHODS:
        for eps in (0.1, 1.0, 8.0):
            ledger = sel.selection_ledger(method, epsilon=eps, k=5, n_users=ml.n_users)
            assert ledger.unit == "user" and ledger.delta * ml.n_users <= 0.01
            assert ledger.epsilon() <= eps * (1 + 1e-9)
            assert ledger.epsilon() >= 0.85 * eps
    picks = sel.selection_ledger("peeling EM", epsilon=2.0, k=5, n_users=ml.n_users).events[0]
    assert picks.count == 5 and picks.epsilon == pytest.approx(0.4)
    with pytest.raises(ValueError, match="method"):
        sel.selection_ledger("oracle", epsilon=1.0, k=5, n_users=ml.n_users)


def test_every_method_finds_the_true_top_k_at_huge_epsilon(ml):
    counts = item_counts(ml.ratings, n_items=ml.n_items)
    truth = top_k(counts, 5)
    rng = np.random.default_rng(2)
    for method in sel.METHODS:
        ledger = sel.selection_ledger(method, epsilon=5e4, k=5, n_users=ml.n_users)
        picked = sel.release_top_k(method, counts, ledger=ledger, k=5, tau=1000, rng=rng)
        assert sel.precision_at_k(picked, truth) == 1.0
    with pytest.raises(TypeError, match="tau"):
        sel.release_top_k("Laplace, sort", counts, ledger=ledger, k=5, tau=None, rng=rng)


def test_precision_grid_improves_with_epsilon_and_tables_the_best_tau(ml):
    grid = sel.precision_grid(ml.ratings, n_users=ml.n_users, n_items=ml.n_items,
                              epsilons=(0.05, 50.0), k=5, repeats=30, seed=0)
    assert set(grid["method"]) == set(sel.METHODS)
    assert grid["precision"].between(0, 1).all() and (grid["se"] >= 0).all()
    assert len(grid) == 2 * (2 + 2 * len(sel.TAUS))
    for method in sel.METHODS:
        rows = grid[grid["method"] == method]
        assert rows[rows["epsilon"] == 50.0]["precision"].max() > \
            rows[rows["epsilon"] == 0.05]["precision"].max()
    table = sel.precision_table(grid)
    assert list(table.index) == [0.05, 50.0]
    lap = grid[(grid["method"] == "Laplace, sort") & (grid["epsilon"] == 50.0)]
    assert table.loc[50.0, "Laplace"] == lap["precision"].max()
    assert table.loc[50.0, "τ Lap"] == lap.sort_values(["precision", "tau"], ascending=[False, True],
                                                       kind="stable")["tau"].iloc[0]
    cached = sel.precision_grid(ml.ratings, n_users=ml.n_users, n_items=ml.n_items,
                                epsilons=(0.05, 50.0), k=5, repeats=30, seed=0)
    pd.testing.assert_frame_equal(grid, cached)


def test_ledger_table_and_weekly_users(ml):
    table = sel.ledger_table(epsilon=1.0, k=10, n_users=ml.n_users)
    assert list(table.index) == list(sel.METHODS)
    assert (table["ledger ε"] <= 1.0 + 1e-9).all()
    weekly = sel.weekly_active_users(ml.ratings)
    assert weekly.max() <= ml.n_users and weekly.sum() >= ml.n_users


def test_precision_at_k():
    assert sel.precision_at_k([1, 2, 3], [3, 4, 1]) == pytest.approx(2 / 3)
