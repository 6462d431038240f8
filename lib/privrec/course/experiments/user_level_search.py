"""Chapter 5's staged validation search for DP-FedAvg, and what the search cost in privacy.

The search tunes on a validation split carved from the training ratings (``Setup.fit`` and
``Setup.val`` of :mod:`~privrec.course.experiments.user_level`), never on the test split:
(A) clip norm × server learning rate and (B) embedding dimension at user-level ε = 8 with every
user in every round and T = 100, then (C) the number of rounds T for each ε, tried in increasing
order until the validation RMSE rises. Without noise every T is a prefix of the longest run, so
the ε = ∞ row is read off one run's checkpoints. The rule for a winner is fixed in advance: the
smallest validation RMSE (4 decimals), ties to the earlier candidate.

Each candidate is a cached run that returns its own ledger (JSON); :func:`search_ledger` composes
the search and the released model on one ledger with
:meth:`~privrec.dp.ledger.PrivacyLedger.extend`. Every candidate was trained on the users' own
data, so this composed ε is the honest size of the search (strictly, exact validation scores carry
no finite guarantee; Papernot & Steinke 2022 show how a private search is priced).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from ...core.checks import instance
from ...dp.ledger import PrivacyLedger
from ...recsys.metrics import evaluate_ratings
from ..book import cached_json
from . import user_level
from .dp_basics import compact_summary
from .user_level import EPSILONS, Setup, grid_run, train_run

__all__ = ["ROUNDS", "STAGE_A", "DIMS", "validation_run", "Search", "search_rounds",
           "staged_search", "search_tables", "search_ledger", "search_cost", "search_text",
           "headline_text", "search_cost_text"]

ROUNDS = (10, 25, 50, 100, 200)
"""Stage C's candidates for the number of rounds T, tried in this order."""
STAGE_A = {"clip_norm": (0.5, 2.0), "server_lr": (1.0, 2.0, 4.0, 8.0)}
"""Stage A's grid (at dimension 8, T = 100): two clip norms, so that pairs with the same product
C·lr_s show whether only the product matters (it does when every update is clipped)."""
DIMS = (2, 4, 8, 16)
"""Stage B's embedding dimensions."""


@functools.cache
def _code_version() -> str:
    text = user_level.code_version() + inspect.getsource(_validation_rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _validation_rows(setup: Setup, *, epsilon: float, rounds: Sequence[int], dim: int,
                     clip_norm: float, server_lr: float) -> list[dict]:
    """One run on ``fit`` for ``max(rounds)`` rounds, scored on ``val`` at each of ``rounds``
    (every user personalises the item model on their own ``fit`` ratings)."""
    clients, _, dp, snaps = train_run(setup.fit, n_users=setup.n_users, n_items=setup.n_items,
                                      epsilon=epsilon, sample_rate=1.0, rounds=max(rounds),
                                      dim=dim, clip_norm=clip_norm, server_lr=server_lr,
                                      checkpoints=rounds)
    rows = []
    for t in rounds:
        state, norms, book = snaps.get(t, (None, dp.last_norms, dp.ledger.to_json()))
        rmse = (math.inf if state is None else
                round(evaluate_ratings(clients.released_model(state), setup.val)["rmse"], 4))
        rows.append({"epsilon": epsilon, "dim": dim, "clip_norm": clip_norm,
                     "server_lr": server_lr, "rounds": t, "sigma": round(dp.noise_multiplier, 4),
                     "median_norm": round(float(norms.median()), 3),
                     "clipped": round(float((norms > clip_norm).double().mean()), 3),
                     "val_rmse": rmse, "ledger": book})
    return rows


def validation_run(setup: Setup, *, dim: int, clip_norm: float, server_lr: float,
                   rounds: int | Sequence[int], epsilon: float = 8.0) -> list[dict]:
    """Cached :func:`_validation_rows`: one row per number of rounds in ``rounds`` (several only
    without noise, where every shorter run is a prefix of the longest)."""
    rounds = (rounds,) if isinstance(rounds, int) else tuple(rounds)
    if len(rounds) > 1 and not math.isinf(epsilon):
        raise ValueError("several rounds from one run need epsilon = inf (sigma depends on T)")
    config = {"data": user_level.digest(setup.fit, setup.val), "epsilon": epsilon, "dim": dim,
              "clip_norm": clip_norm, "server_lr": server_lr, "rounds": list(rounds),
              "code": _code_version()}
    return cached_json("ch5-validation", config, lambda: _validation_rows(
        setup, epsilon=epsilon, rounds=rounds, dim=dim, clip_norm=clip_norm, server_lr=server_lr))


def _best(rows: Sequence[dict]) -> dict:
    """Smallest validation RMSE; a tie goes to the earlier candidate in the printed order."""
    return min(enumerate(rows), key=lambda pair: (pair[1]["val_rmse"], pair[0]))[1]


@dataclass(frozen=True)
class Search:
    """The staged search's candidates (every row printed) and its choices."""

    stage_a: list[dict]
    stage_b: list[dict]
    stage_c: dict[float, list[dict]]
    tuned: dict
    rounds_for: dict[float, int]


def search_rounds(setup: Setup, tuned: dict, epsilon: float) -> list[dict]:
    """Rounds T in increasing order until the validation RMSE is worse than at the previous T."""
    if math.isinf(epsilon):
        return validation_run(setup, **tuned, rounds=ROUNDS, epsilon=epsilon)
    rows: list[dict] = []
    for t in ROUNDS:
        rows += validation_run(setup, **tuned, rounds=t, epsilon=epsilon)
        if len(rows) > 1 and rows[-1]["val_rmse"] > rows[-2]["val_rmse"]:
            break
    return rows


def staged_search(setup: Setup) -> Search:
    """Stages A (C × lr_s at d = 8), B (d) at user-level ε = 8, q = 1, T = 100; C (T per ε)."""
    instance("setup", setup, Setup)
    stage_a = [r for c in STAGE_A["clip_norm"] for lr in STAGE_A["server_lr"]
               for r in validation_run(setup, dim=8, clip_norm=c, server_lr=lr, rounds=100)]
    a = _best(stage_a)
    stage_b = [r for d in DIMS for r in validation_run(
        setup, dim=d, clip_norm=a["clip_norm"], server_lr=a["server_lr"], rounds=100)]
    tuned = {k: _best(stage_b)[k] for k in ("dim", "clip_norm", "server_lr")}
    stage_c = {e: search_rounds(setup, tuned, e) for e in EPSILONS}
    return Search(stage_a, stage_b, stage_c, tuned,
                  {e: _best(_winnable(rows))["rounds"] for e, rows in stage_c.items()})


def _winnable(rows: list[dict]) -> list[dict]:
    """Stage C's rows up to the first T whose validation RMSE is worse than the one before."""
    for k in range(1, len(rows)):
        if rows[k]["val_rmse"] > rows[k - 1]["val_rmse"]:
            return rows[:k + 1]
    return rows


def search_tables(search: Search) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stages A and B (one row per distinct candidate) and stage C's validation RMSE by T (rows)
    and ε (columns; blank where the search had stopped)."""
    ab = pd.DataFrame(search.stage_a + search.stage_b).drop_duplicates(
        ["dim", "clip_norm", "server_lr"])
    ab = ab[["dim", "clip_norm", "server_lr", "median_norm", "clipped", "val_rmse"]].rename(
        columns={"clip_norm": "C", "server_lr": "lr_s", "median_norm": "median norm",
                 "val_rmse": "val RMSE"})
    c = pd.DataFrame([r for rows in search.stage_c.values() for r in rows]).pivot(
        index="rounds", columns="epsilon", values="val_rmse")
    return ab, c


# -- what the search cost ------------------------------------------------------------------------

def search_ledger(setup: Setup, search: Search, epsilon: float) -> tuple[PrivacyLedger, int]:
    """One user-level ledger: every distinct search run behind the model at ``epsilon`` (stages
    A and B at ε = 8, stage C at ``epsilon``), then the released model itself; and the number
    of search runs. Composed from the runs' own ledgers (JSON) with ``extend``."""
    runs = {tuple(r[k] for k in ("epsilon", "dim", "clip_norm", "server_lr", "rounds")): r
            for r in search.stage_a + search.stage_b + search.stage_c[epsilon]}
    book = PrivacyLedger(unit="user", n_units=setup.n_users)  # δ: default_delta(N)
    for r in runs.values():
        book.extend(PrivacyLedger.from_json(r["ledger"]), prefix=f"search, ε={r['epsilon']:g}: ")
    release = grid_run(setup, search, epsilon=epsilon, sample_rate=1.0)
    book.extend(PrivacyLedger.from_json(release["ledger"]), prefix="release: ")
    return book, len(runs)


def search_cost(setup: Setup, search: Search) -> pd.DataFrame:
    """Per finite target ε: its T, the number of search runs behind it and the user-level ε of
    the search and the release composed on one ledger."""
    rows = {}
    for e in EPSILONS[:-1]:
        book, n_runs = search_ledger(setup, search, e)
        rows[e] = {"T": search.rounds_for[e], "search runs": n_runs,
                   "ε of search + release": round(book.epsilon(), 2)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("target ε")


# -- what the chapter prints --------------------------------------------------------------------

def search_text(search: Search) -> str:
    """Every candidate of stages A and B and stage C's table (:func:`search_tables`) with the
    choices."""
    ab, c = search_tables(search)
    tuned = search.tuned
    return "\n".join([
        "stages A (C x lr_s at d = 8) and B (d): user-level epsilon = 8, q = 1, T = 100,",
        f"sigma = {search.stage_a[0]['sigma']:.4f} for every candidate", ab.to_string(index=False),
        f"\nchosen: d = {tuned['dim']}, C = {tuned['clip_norm']:g}, lr_s = {tuned['server_lr']:g}",
        "\nstage C: validation RMSE by rounds T (rows) and user-level epsilon (columns),",
        "q = 1; blank: not run (the RMSE had risen at the T before)",
        c.to_string(float_format="{:.4f}".format, na_rep=""),
        "chosen T: " + ", ".join(f"{e:g}: {t}" for e, t in search.rounds_for.items())])


def headline_text(setup: Setup, search: Search, refs: dict[str, dict], *,
                  epsilon: float = 8.0) -> str:
    """The tuned model and the private bias-only model at user-level ``epsilon``, q = 1, next to
    the non-private references ``refs`` (test RMSE, NDCG@10); then the private models' ledgers."""
    runs = {f"DP-FedAvg MF (user-level eps = {epsilon:g})":
            grid_run(setup, search, epsilon=epsilon, sample_rate=1.0),
            f"DP-FedAvg bias-only (eps = {epsilon:g})":
            grid_run(setup, search, epsilon=epsilon, sample_rate=1.0, bias_only=True)}
    rows = runs | {f"{name} (non-private)": r for name, r in refs.items()}
    return "\n".join([f"{name:<35} test RMSE {r['rmse']:.4f}  NDCG@10 {r['ndcg']:.4f}"
                      for name, r in rows.items()]
                     + ["\n" + user_level.ledger_text(r) for r in runs.values()])


def search_cost_text(setup: Setup, search: Search, *, epsilon: float = 8.0) -> str:
    """:func:`search_ledger` at ``epsilon`` and :func:`search_cost` at every finite target."""
    spent, n_runs = search_ledger(setup, search, epsilon)
    return "\n".join([
        f"the model at user-level epsilon = {epsilon:g} and the {n_runs} distinct search runs "
        "behind it:", compact_summary(spent),
        "\nevery finite target: the search and the released model composed on one ledger",
        search_cost(setup, search).to_string()])
