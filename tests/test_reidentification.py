"""Re-identification: the candidate counts are right, the target always matches, dates only help."""

import numpy as np
import pandas as pd
import pytest

from privrec.attacks.reidentification import (
    SECONDS_PER_DAY,
    adversary_knowledge,
    candidate_counts,
    reidentification_curve,
    reidentification_rate,
    release_tables,
)
from privrec.recsys.data import synthetic_movielens

DAY = SECONDS_PER_DAY


def tiny():
    # users 0 and 1 have identical histories; user 2 alone rated item 3.
    return pd.DataFrame({"user": [0, 0, 1, 1, 2, 2], "item": [0, 1, 0, 1, 0, 3],
                         "rating": np.array([4, 2, 4, 2, 4, 5], dtype=np.float32),
                         "timestamp": np.array([10, 10, 10, 10, 40, 41]) * DAY})


def test_release_tables():
    stars, days = release_tables(tiny(), n_users=3, n_items=4)
    assert stars.shape == days.shape == (3, 4)
    assert stars[2, 3] == 5 and stars[2, 1] == 0 and days[2, 3] == 41


def test_candidate_counts_by_hand():
    stars, days = release_tables(tiny(), n_users=3, n_items=4)
    items = np.array([[0, 1], [0, 3], [0, 0]])
    known = np.array([[4, 2], [4, 5], [4, 4]])
    known_days = np.array([[10, 10], [40, 41], [40, 40]])
    assert candidate_counts(stars, days, items, known, None).tolist() == [2, 1, 3]
    # With dates, knowing "item 0 around day 40" singles out user 2; tolerance 30 does not.
    assert candidate_counts(stars, days, items, known, known_days).tolist() == [2, 1, 1]
    assert candidate_counts(stars, days, items, known, known_days, day_tolerance=30).tolist() == [2, 1, 3]
    # A star off by 2 matches nobody at tolerance 1.
    assert candidate_counts(stars, days, items[:1], known[:1] + [0, 2], None).tolist() == [0]


def brute_force(stars, days, items, known, known_days, tol, dtol):
    out = []
    for t in range(len(items)):
        n = 0
        for v in range(stars.shape[0]):
            ok = all(stars[v, i] > 0 and abs(int(stars[v, i]) - known[t, j]) <= tol
                     and (known_days is None or abs(days[v, i] - known_days[t, j]) <= dtol)
                     for j, i in enumerate(items[t]))
            n += ok
        out.append(n)
    return out


@pytest.mark.parametrize("use_dates", [True, False])
def test_vectorised_matches_brute_force_and_target_always_matches(use_dates):
    data = synthetic_movielens(30, 20, 300, seed=2)
    stars, days = release_tables(data.ratings, n_users=30, n_items=20)
    targets, items, known, known_days = adversary_knowledge(data.ratings, k=3, seed=1)
    kd = known_days if use_dates else None
    fast = candidate_counts(stars, days, items, known, kd, chunk=7)
    assert fast.tolist() == brute_force(stars, days, items, known, kd, 1, 14)
    # The adversary's errors stay within the tolerances, so the target itself is a candidate.
    own = stars[targets[:, None], items].astype(int)
    assert np.all(np.abs(own - known) <= 1) and np.all(own > 0)
    assert np.all(np.abs(days[targets[:, None], items] - known_days) <= 14)
    assert fast.min() >= 1


def test_knowledge_targets_users_with_k_ratings_and_distinct_items():
    data = synthetic_movielens(seed=0)
    counts = data.ratings.groupby("user").size()
    targets, items, _, _ = adversary_knowledge(data.ratings, k=25, seed=0)
    assert targets.tolist() == sorted(counts[counts >= 25].index.tolist())
    assert all(len(set(row)) == 25 for row in items.tolist())


def test_dates_only_help_and_more_knowledge_helps():
    data = synthetic_movielens(100, 150, 3000, seed=1)
    kw = dict(n_users=100, n_items=150, seed=0)
    for k in (1, 3):
        with_dates = reidentification_rate(data.ratings, k=k, use_dates=True, **kw)
        without = reidentification_rate(data.ratings, k=k, use_dates=False, **kw)
        assert with_dates["unique"] >= without["unique"]
    curve = reidentification_curve(data.ratings, n_users=100, n_items=150, ks=[1, 4, 8])
    assert curve["unique (stars only)"].is_monotonic_increasing
    assert curve.loc[8, "unique (stars+dates)"] > curve.loc[1, "unique (stars+dates)"] + 0.3


def test_bad_input():
    with pytest.raises(ValueError, match="k"):
        adversary_knowledge(tiny(), k=0)
    with pytest.raises(TypeError, match="k"):
        adversary_knowledge(tiny(), k=1.5)
    with pytest.raises(ValueError, match="timestamp"):
        release_tables(tiny().drop(columns="timestamp"), n_users=3, n_items=4)
