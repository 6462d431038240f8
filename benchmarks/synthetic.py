"""Large synthetic ratings with MovieLens-100K's long tails, generated vectorised and cached.

Per-user counts are log-normal with ML-100K's spread (standard deviation of log count 0.88; its
counts run from 20 to 737 around a mean of 106), floored at 19% of the mean (ML-100K's 20 / 106),
capped at half the catalogue, and scaled so the total is the requested number. Items follow a
Zipf-like popularity ``rank ** -0.8`` (ML-100K's top 1000 items fit ``rank ** -0.77``). A user
never rates an item twice: duplicates are dropped and redrawn. Ratings are 1..5 stars from
user and item biases plus noise (an engine's cost does not depend on their values). Everything
is seeded; arrays are sorted by (user, item) and cached as ``.npy`` files (``--cache``; default
``$PRIVREC_BENCH_CACHE`` or ``/tmp/privrec-bench``) so every measured process only loads them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LOG_SD, FLOOR, ZIPF = 0.88, 0.19, 0.8
CACHE = Path(os.environ.get("PRIVREC_BENCH_CACHE", "/tmp/privrec-bench"))


def user_counts(n_users: int, n_items: int, n_ratings: int, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: log-normal, floored, capped, summing to ``n_ratings`` (up to rounding)."""
    mean = n_ratings / n_users
    raw = rng.lognormal(0.0, LOG_SD, n_users)
    floor = max(1.0, FLOOR * mean)
    counts = floor + raw * (mean - floor) / raw.mean()
    counts = np.minimum(np.rint(counts), max(1, n_items // 2)).astype(np.int64)
    short = n_ratings - counts.sum()  # what rounding and the cap took, spread over uncapped users
    if short > 0:
        room = np.flatnonzero(counts < n_items // 2)
        np.add.at(counts, rng.choice(room, int(short)), 1)
    return np.minimum(counts, n_items)


def _draw(users: np.ndarray, n_items: int, cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keys = users.astype(np.int64) * n_items
    keys += np.minimum(np.searchsorted(cdf, rng.random(len(users))), n_items - 1)
    return keys


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """``np.unique`` for int64 keys by one sort (numpy's own is many times slower here); the stable
    sort is a merge, linear on the concatenation of two sorted runs."""
    keys = np.sort(keys, kind="stable")
    keep = np.empty(len(keys), dtype=bool)
    keep[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def long_tailed(n_users: int, n_items: int, n_ratings: int, *, seed: int = 0):
    """``(users, items, ratings)``: int32, int32, float32 arrays sorted by (user, item)."""
    rng = np.random.default_rng(seed)
    counts = user_counts(n_users, n_items, n_ratings, rng)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -ZIPF)
    cdf /= cdf[-1]
    keys = _sorted_unique(_draw(np.repeat(np.arange(n_users), counts), n_items, cdf, rng))
    for _ in range(30):  # redraw what duplicates removed, per user
        have = np.bincount(keys // n_items, minlength=n_users)
        missing = counts - have
        if missing.sum() <= 0:
            break
        extra = _draw(np.repeat(np.arange(n_users), np.maximum(missing, 0)), n_items, cdf, rng)
        keys = _sorted_unique(np.concatenate([keys, np.sort(extra, kind="stable")]))
    users = (keys // n_items).astype(np.int32)
    items = (keys % n_items).astype(np.int32)
    del keys
    b_u = rng.normal(0.0, 0.4, n_users).astype(np.float32)
    b_i = rng.normal(0.0, 0.4, n_items).astype(np.float32)
    ratings = 3.5 + b_u[users] + b_i[items] + rng.normal(0.0, 0.8, len(users)).astype(np.float32)
    return users, items, np.clip(np.rint(ratings), 1, 5).astype(np.float32)


def cached(n_users: int, n_items: int, n_ratings: int, *, seed: int = 0, cache: Path = CACHE):
    """Load the arrays of one configuration, generating them once."""
    folder = cache / f"u{n_users}_i{n_items}_r{n_ratings}_s{seed}"
    names = ("users", "items", "ratings")
    if not all((folder / f"{n}.npy").exists() for n in names):
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in zip(names, long_tailed(n_users, n_items, n_ratings, seed=seed),
                               strict=True):
            np.save(folder / f"{name}.npy", array)
    return tuple(np.load(folder / f"{n}.npy") for n in names)


def describe(users: np.ndarray, n_users: int) -> dict:
    """Per-user count summary (to check the tail looks like ML-100K's)."""
    c = np.bincount(users, minlength=n_users)
    return {"ratings": int(len(users)), "min": int(c.min()), "median": float(np.median(c)),
            "mean": round(float(c.mean()), 1), "p99": float(np.percentile(c, 99)), "max": int(c.max())}
