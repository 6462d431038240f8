"""The benchmark plumbing (issue 16): the synthetic data generator and the committed results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import synthetic  # noqa: E402


@pytest.mark.parametrize("n_users, n_items, n_ratings", [(300, 1_000, 6_000), (1_000, 1_000, 50_000)])
def test_long_tailed_data_has_the_requested_shape(n_users, n_items, n_ratings):
    users, items, ratings = synthetic.long_tailed(n_users, n_items, n_ratings, seed=1)
    assert users.dtype == np.int32 and items.dtype == np.int32 and ratings.dtype == np.float32
    assert abs(len(users) - n_ratings) <= 0.01 * n_ratings
    keys = users.astype(np.int64) * n_items + items
    assert (np.diff(keys) > 0).all(), "sorted by (user, item), no user rates an item twice"
    assert users.min() >= 0 and users.max() < n_users and items.min() >= 0 and items.max() < n_items
    assert set(np.unique(ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    counts = np.bincount(users, minlength=n_users)
    assert counts.min() >= 1
    assert counts.max() > 3 * np.median(counts), "a heavy tail of per-user counts"
    popularity = np.bincount(items, minlength=n_items)
    assert popularity[:10].sum() > popularity[-10:].sum() * 3, "Zipf-like item popularity"


def test_long_tailed_data_is_seeded():
    a = synthetic.long_tailed(300, 200, 6_000, seed=3)
    b = synthetic.long_tailed(300, 200, 6_000, seed=3)
    c = synthetic.long_tailed(300, 200, 6_000, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_user_counts_follow_the_ml100k_shape():
    counts = synthetic.user_counts(100_000, 10_000, 5_000_000, np.random.default_rng(0))
    assert abs(counts.sum() - 5_000_000) <= 100
    assert counts.min() >= round(synthetic.FLOOR * 50) - 1
    assert 0.6 < np.median(counts) / counts.mean() < 0.85  # ML-100K: 65 / 106 = 0.61


def test_committed_results_have_what_the_performance_page_reads():
    path = BENCH / "results.json"
    if not path.exists():
        pytest.skip("no committed results yet: run `make bench`")
    results = json.loads(path.read_text())
    for section in ("dpsgd", "accountant", "fedavg", "scaling"):
        assert section in results, section
        machine = results[section]["machine"]
        assert {"cpu", "cores", "memory_gib", "libraries", "utc"} <= set(machine)
    assert results["dpsgd"]["fastest_opacus"] in results["dpsgd"]["ratio_vs_privrec"]
    assert {"fedavg", "dpfedavg", "dpsgd"} <= set(results["scaling"]["exponents"])
