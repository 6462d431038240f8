"""Chapter 2's private-selection experiment: a "most popular" top-10 of MovieLens-100K at user level.

The list to publish is the 10 movies rated by the most users (ties: the smaller id). The privacy
unit is the **user**: a neighbouring data set adds or removes one person's whole history. A user
rates a movie at most once, so one user changes every count by at most 1 (:math:`\\ell_\\infty`
sensitivity 1), in the same direction, while changing as many counts as movies rated.

* Selection mechanisms publish only the 10 ids. Each pick is an exponential mechanism on the
  counts with sensitivity 1 (monotone: all counts move together), so the list costs
  :math:`k\\varepsilon_0` whatever the number of movies a user rated: no contribution bound is
  needed (Durfee & Rogers 2019). Two samplers with the same distribution are compared: the
  one-shot Gumbel top-k and peeling (k exponential mechanisms in sequence).
* The baselines publish (and then sort) all 1,682 noisy counts. That needs a contribution bound
  :math:`\\tau` (each user keeps at most :math:`\\tau` random ratings), after which the count vector
  has :math:`\\ell_1` sensitivity :math:`\\tau` (Laplace) and :math:`\\ell_2` sensitivity
  :math:`\\sqrt\\tau` (Gaussian). They are run at every :math:`\\tau` of a grid and reported at the
  best :math:`\\tau` *in hindsight*, which favours them (choosing :math:`\\tau` that way would itself
  leak).

Every method's ε is read off a :class:`~privrec.dp.ledger.PrivacyLedger` (unit user, 943 users,
δ = ``default_delta(943)``), never computed on the side.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from ...core.checks import int_in, positive
from ...core.checks import seed as check_seed
from ...dp import selection as selection_module
from ...dp.ledger import PrivacyEvent, PrivacyLedger
from ...dp.mechanisms import add_gaussian_noise, laplace_mechanism
from ...dp.selection import exponential_mechanism_probabilities, gumbel_top_k, peeling_top_k, report_noisy_max
from ...recsys.metrics import top_k
from ..book import cached_json
from . import dp_basics
from .dp_basics import bounded_item_counts, item_counts

__all__ = ["METHODS", "TAUS", "precision_at_k",
           "selection_ledger", "release_top_k", "precision_grid", "precision_table",
           "ledger_table", "weekly_active_users", "weekly_summary", "gumbel_max_check",
           "grid_footnote"]

METHODS = ("one-shot Gumbel", "peeling EM", "Laplace, sort", "Gaussian, sort")
"""The four releases compared (the first two are selection mechanisms, the last two noisy counts)."""
TAUS = (5, 10, 25, 50, 100, 200)
"""Contribution bounds tried for the noisy-count baselines."""


def precision_at_k(picked: object, truth: object) -> float:
    """Share of the true top-k found in ``picked`` (both of length k)."""
    picked, truth = np.asarray(picked), np.asarray(truth)
    return len(set(picked.tolist()) & set(truth.tolist())) / len(truth)


def selection_ledger(method: str, *, epsilon: float, k: int, n_users: int) -> PrivacyLedger:
    """The ledger of one release at total budget ``epsilon`` (user level, δ = default_delta).

    Selection: ``k`` pure exponential-mechanism picks of ``epsilon / k`` each. Laplace: one pure
    release of all counts at ``epsilon``. Gaussian: one release whose noise multiplier the ledger
    calibrates to ``epsilon`` at its δ (noise standard deviation = multiplier · √τ).
    """
    epsilon, k = positive("epsilon", epsilon), int_in("k", k, 1)
    ledger = PrivacyLedger(unit="user", n_units=n_users)
    if method in METHODS[:2]:
        ledger.record_pure(f"top-{k} pick ({method})", epsilon=epsilon / k, count=k,
                           mechanism="exponential")
    elif method == METHODS[2]:
        ledger.record_laplace("all item counts (τ-bounded)", epsilon=epsilon)
    elif method == METHODS[3]:
        z = ledger.calibrate(lambda m: [PrivacyEvent.gaussian("all item counts (τ-bounded)",
                                                              noise_multiplier=m, unit="user")],
                             target_epsilon=epsilon)
        ledger.record_gaussian("all item counts (τ-bounded)", noise_multiplier=z)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return ledger


def release_top_k(method: str, counts: np.ndarray, *, ledger: PrivacyLedger, k: int,
                  tau: int | None, rng: np.random.Generator) -> np.ndarray:
    """The ``k`` ids ``method`` publishes, with the noise its ``ledger`` paid for.

    ``counts`` are the full counts for the selection methods and the ``tau``-bounded counts for
    the noisy-count baselines (Laplace scale τ/ε; Gaussian standard deviation multiplier · √τ).
    """
    event = ledger.events[0]
    if method == METHODS[0]:
        return gumbel_top_k(counts, k=k, epsilon=event.epsilon, monotonic=True, generator=rng)
    if method == METHODS[1]:
        return peeling_top_k(counts, k=k, epsilon=event.epsilon, monotonic=True, generator=rng)
    tau = int_in("tau", tau, 1)
    if method == METHODS[2]:
        noisy = laplace_mechanism(counts, sensitivity=tau, epsilon=event.epsilon, generator=rng)
    else:
        noisy = add_gaussian_noise(counts, std=event.noise_multiplier * math.sqrt(tau), generator=rng)
    return top_k(noisy, k)


def _grid(ratings: pd.DataFrame, n_users: int, n_items: int, epsilons: tuple[float, ...], k: int,
          repeats: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    full = item_counts(ratings, n_items=n_items)
    truth = top_k(full, k)
    ledgers = {(m, e): selection_ledger(m, epsilon=e, k=k, n_users=n_users)
               for m in METHODS for e in epsilons}
    hits: dict[tuple, list[float]] = {}
    for _ in range(repeats):
        bounded = bounded_item_counts(ratings, n_items=n_items, taus=TAUS, rng=rng)
        for (method, eps), ledger in ledgers.items():
            for tau in (None,) if method in METHODS[:2] else TAUS:
                counts = full if tau is None else bounded[tau]
                picked = release_top_k(method, counts, ledger=ledger, k=k, tau=tau, rng=rng)
                hits.setdefault((method, eps, tau), []).append(precision_at_k(picked, truth))
    return [{"method": m, "epsilon": e, "tau": t, "ledger epsilon": ledgers[m, e].epsilon(),
             "precision": float(np.mean(v)), "se": float(np.std(v, ddof=1) / math.sqrt(len(v)))}
            for (m, e, t), v in hits.items()]


def precision_grid(ratings: pd.DataFrame, *, n_users: int, n_items: int,
                   epsilons: tuple[float, ...], k: int = 10, repeats: int = 200,
                   seed: int = 0) -> pd.DataFrame:
    """Precision@k of each method's private top-k against the true top-k, for every ε (and τ).

    ``repeats`` independent releases per cell (a fresh contribution bounding each time), from
    one seeded generator. Columns: method, epsilon (the target), tau (None for the selection
    methods), ledger epsilon (what the ledger reports), precision (mean) and se. Cached.
    """
    config = {"n": len(ratings), "epsilons": list(epsilons), "k": k, "repeats": repeats,
              "seed": check_seed("seed", seed), "taus": TAUS}
    rows = cached_json("ch2-selection", config,
                       lambda: _grid(ratings, n_users, n_items, tuple(epsilons), k, repeats, seed),
                       modules=(selection_module, dp_basics, sys.modules[__name__]))
    return pd.DataFrame(rows)


def precision_table(grid: pd.DataFrame) -> pd.DataFrame:
    """One row per ε: each method's precision, the baselines at their best τ in hindsight (the
    τ columns), with short column names that fit the page."""
    best = (grid.sort_values(["method", "epsilon", "precision", "tau"],
                             ascending=[True, True, False, True], kind="stable")
            .groupby(["method", "epsilon"], sort=False).head(1))
    wide = best.pivot(index="epsilon", columns="method", values="precision")[list(METHODS)]
    taus = best.pivot(index="epsilon", columns="method", values="tau")
    wide.columns = ["one-shot", "peeling", "Laplace", "Gaussian"]
    wide["τ Lap"] = taus[METHODS[2]].astype(int)
    wide["τ Gau"] = taus[METHODS[3]].astype(int)
    wide.index.name = "ε"
    return wide


def ledger_table(*, epsilon: float, k: int, n_users: int) -> pd.DataFrame:
    """The four ledgers at one total ε, one row each: event, mechanism, count, noise, ledger ε."""
    rows = []
    for method in METHODS:
        ledger = selection_ledger(method, epsilon=epsilon, k=k, n_users=n_users)
        event = ledger.events[0]
        rows.append({"method": method, "mechanism": str(event.mechanism), "count": event.count,
                     "ε per event": event.epsilon if event.epsilon is not None else math.nan,
                     "noise mult.": event.noise_multiplier if event.noise_multiplier else math.nan,
                     "ledger ε": ledger.epsilon()})
    return pd.DataFrame(rows).set_index("method")


def weekly_active_users(ratings: pd.DataFrame) -> pd.Series:
    """Distinct users who rated something in each calendar week (by the ratings' timestamps)."""
    weeks = pd.to_datetime(ratings["timestamp"], unit="s").dt.to_period("W")
    return ratings.groupby(weeks)["user"].nunique()


def weekly_summary(ratings: pd.DataFrame) -> str:
    """How many calendar weeks the ratings span and how many users are active in one."""
    weekly = weekly_active_users(ratings)
    return (f"{len(weekly)} calendar weeks; active users per week: min {weekly.min()}, "
            f"median {weekly.median():.0f}, max {weekly.max()}")


def gumbel_max_check(counts: np.ndarray, titles: pd.Series, *, k: int = 5, epsilon: float = 0.05,
                     draws: int = 20_000, seed: int = 12) -> pd.DataFrame:
    """The Gumbel-max trick on the ``k`` most-rated movies: the exponential mechanism's
    probabilities next to the share of ``draws`` report-noisy-max (Gumbel) picks of each."""
    five = top_k(counts, k)
    rng = np.random.default_rng(check_seed("seed", seed))
    picks = [report_noisy_max(counts[five], epsilon=epsilon, generator=rng) for _ in range(draws)]
    return pd.DataFrame({"movie": titles.to_numpy()[five], "count": counts[five].astype(int),
                         "EM probability": exponential_mechanism_probabilities(counts[five],
                                                                               epsilon=epsilon),
                         "Gumbel max share": np.bincount(picks, minlength=k) / draws})


def grid_footnote(grid: pd.DataFrame) -> str:
    """The largest standard error in :func:`precision_grid` and whether every ledger reports at
    most its target ε."""
    within = bool((grid["ledger epsilon"] <= grid["epsilon"] * (1 + 1e-9)).all())
    return (f"largest standard error of a mean: {grid['se'].max():.3f}; every ledger's ε <= its "
            f"target: {within}")
