"""Re-identification of "anonymised" ratings from a little approximate knowledge.

The attack of Narayanan & Shmatikov (2008) on the Netflix Prize data, in its simplest form: the
ratings are released with user ids removed (each row of the release is one pseudonymous record);
an adversary knows ``k`` of a target's ratings *approximately* -- each star to within
``star_tolerance`` and each date to within ``day_tolerance`` days, e.g. from a conversation or a
public review site -- and lists every record that is consistent with all of it. The target is
**uniquely re-identified** when exactly one record is consistent: then the adversary has that
person's whole history, every other film included.

The adversary's knowledge is simulated by taking ``k`` of the target's ratings uniformly at random
and moving each star by a uniform integer in ``[-star_tolerance, star_tolerance]`` (kept in 1..5)
and each date by a uniform integer number of days in ``[-day_tolerance, day_tolerance]``. The
consistency test uses the same tolerances, so the target's own record always matches and the count
of candidates is at least 1. Narayanan & Shmatikov also weight rare films more (a rare film is
more identifying) and accept a best match that stands out from the second; counting exact
candidates is the simplest, most conservative version of their "Scoreboard" algorithm.

Everything is vectorised: the release is two dense ``[users, items]`` tables (stars with 0 for "not
rated", days) and the test for all targets at once is one gather and one ``all`` over ``k``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.checks import int_in
from ..core.checks import seed as check_seed
from ..recsys.data import validate_ratings

__all__ = ["release_tables", "adversary_knowledge", "candidate_counts", "reidentification_rate",
           "reidentification_curve"]

SECONDS_PER_DAY = 86_400


def release_tables(ratings: pd.DataFrame, *, n_users: int, n_items: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The anonymised release as two dense tables: ``stars[u, i]`` (0 = not rated) and ``days[u, i]``.

    Row ``u`` is a pseudonymous record; the ids themselves carry no identity.

    Parameters
    ----------
    ratings:
        Ratings with ``user``, ``item``, ``rating`` (1..5) and ``timestamp`` (seconds).
    n_users, n_items:
        Table sizes.

    Returns
    -------
    stars, days:
        ``int8`` and ``int32`` arrays of shape ``[n_users, n_items]``.

    Raises
    ------
    ValueError
        If ``ratings`` is malformed or lacks ``timestamp``.
    """
    n_users, n_items = int_in("n_users", n_users, 1), int_in("n_items", n_items, 1)
    validate_ratings(ratings, n_users=n_users, n_items=n_items, name="ratings")
    if "timestamp" not in ratings:
        raise ValueError("ratings must have a 'timestamp' column")
    users, items = ratings["user"].to_numpy(), ratings["item"].to_numpy()
    stars = np.zeros((n_users, n_items), dtype=np.int8)
    days = np.zeros((n_users, n_items), dtype=np.int32)
    stars[users, items] = np.rint(ratings["rating"].to_numpy()).astype(np.int8)
    days[users, items] = (ratings["timestamp"].to_numpy() // SECONDS_PER_DAY).astype(np.int32)
    return stars, days


def adversary_knowledge(ratings: pd.DataFrame, *, k: int, star_tolerance: int = 1,
                        day_tolerance: int = 14, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the adversary knows: ``k`` random ratings of every user with at least ``k``, perturbed.

    Returns
    -------
    targets:
        ``[T]`` user ids (ascending), the users with at least ``k`` ratings.
    items, stars, days:
        ``[T, k]`` arrays: the known items, their approximate stars (within ``star_tolerance``,
        kept in 1..5) and approximate days (within ``day_tolerance``).

    Raises
    ------
    ValueError
        For ``k < 1`` or negative tolerances.
    """
    k = int_in("k", k, 1)
    star_tolerance = int_in("star_tolerance", star_tolerance, 0)
    day_tolerance = int_in("day_tolerance", day_tolerance, 0)
    rng = np.random.default_rng(check_seed("seed", seed))
    key = rng.random(len(ratings))
    users = ratings["user"].to_numpy()
    order = np.argsort(key, kind="stable")                      # a random order of all ratings,
    order = order[np.argsort(users[order], kind="stable")]      # then grouped by user (stable)
    rank = pd.Series(users[order]).groupby(users[order]).cumcount().to_numpy()
    counts = np.bincount(users)
    chosen = order[(rank < k) & (counts[users[order]] >= k)]
    targets = np.unique(users[chosen])
    items = ratings["item"].to_numpy()[chosen].reshape(-1, k)
    stars = np.rint(ratings["rating"].to_numpy()[chosen]).astype(np.int64).reshape(-1, k)
    days = (ratings["timestamp"].to_numpy()[chosen] // SECONDS_PER_DAY).reshape(-1, k)
    stars = np.clip(stars + rng.integers(-star_tolerance, star_tolerance + 1, stars.shape), 1, 5)
    days = days + rng.integers(-day_tolerance, day_tolerance + 1, days.shape)
    return targets, items, stars, days


def candidate_counts(stars: np.ndarray, days: np.ndarray, items: np.ndarray,
                     known_stars: np.ndarray, known_days: np.ndarray | None, *,
                     star_tolerance: int = 1, day_tolerance: int = 14, chunk: int = 128) -> np.ndarray:
    """For each target, the number of released records consistent with everything known.

    A record is consistent when it rated every known item, each star within ``star_tolerance`` and
    (unless ``known_days`` is None) each date within ``day_tolerance`` days. ``stars``, ``days``:
    the release (:func:`release_tables`); ``items``, ``known_stars``, ``known_days``: ``[T, k]``
    knowledge (:func:`adversary_knowledge`); ``chunk`` targets are matched at once. Returns ``[T]``.
    """
    counts = np.empty(len(items), dtype=np.int64)
    for s in range(0, len(items), int_in("chunk", chunk, 1)):
        it = items[s:s + chunk]                                    # [t, k]
        got = stars[:, it].astype(np.int16)                        # [users, t, k]
        ok = (got > 0) & (np.abs(got - known_stars[None, s:s + chunk]) <= star_tolerance)
        if known_days is not None:
            ok &= np.abs(days[:, it] - known_days[None, s:s + chunk]) <= day_tolerance
        counts[s:s + chunk] = ok.all(axis=2).sum(axis=0)
    return counts


def reidentification_rate(ratings: pd.DataFrame, *, n_users: int, n_items: int, k: int,
                          use_dates: bool, star_tolerance: int = 1, day_tolerance: int = 14,
                          seed: int = 0) -> dict[str, float]:
    """Fraction of users uniquely re-identified from ``k`` approximately known ratings.

    Returns
    -------
    dict with ``unique`` (fraction with exactly one consistent record), ``at_most_5`` (fraction
    narrowed to at most five records), ``median_candidates`` and ``targets`` (users with >= k
    ratings, all of whom are attacked).

    References
    ----------
    A. Narayanan and V. Shmatikov, "Robust de-anonymization of large sparse datasets", IEEE S&P 2008.
    """
    stars, days = release_tables(ratings, n_users=n_users, n_items=n_items)
    targets, items, known_stars, known_days = adversary_knowledge(
        ratings, k=k, star_tolerance=star_tolerance, day_tolerance=day_tolerance, seed=seed)
    counts = candidate_counts(stars, days, items, known_stars, known_days if use_dates else None,
                              star_tolerance=star_tolerance, day_tolerance=day_tolerance)
    return {"unique": float(np.mean(counts == 1)), "at_most_5": float(np.mean(counts <= 5)),
            "median_candidates": float(np.median(counts)), "targets": int(len(targets))}


def reidentification_curve(ratings: pd.DataFrame, *, n_users: int, n_items: int, ks, seeds=(0,),
                           star_tolerance: int = 1, day_tolerance: int = 14) -> pd.DataFrame:
    """:func:`reidentification_rate` for each ``k`` in ``ks``, with and without dates, averaged
    over ``seeds`` (each seed draws new known ratings and new perturbations).

    Returns
    -------
    DataFrame indexed by ``k`` with columns ``unique (stars+dates)``, ``unique (stars only)``,
    ``at most 5 (stars+dates)``, ``at most 5 (stars only)``.
    """
    rows = []
    for k in ks:
        row = {"k": int(k)}
        for use_dates, label in ((True, "stars+dates"), (False, "stars only")):
            runs = [reidentification_rate(ratings, n_users=n_users, n_items=n_items, k=k,
                                          use_dates=use_dates, star_tolerance=star_tolerance,
                                          day_tolerance=day_tolerance, seed=s) for s in seeds]
            row[f"unique ({label})"] = float(np.mean([r["unique"] for r in runs]))
            row[f"at most 5 ({label})"] = float(np.mean([r["at_most_5"] for r in runs]))
        rows.append(row)
    return pd.DataFrame(rows).set_index("k")
