"""Chapter 1's experiments: honest tuning, the multi-seed test table, top-K and the NDCG protocols.

Every split tunes **inside its own training data**: :func:`tune_explicit` carves a validation set
out of the training ratings it is given and chooses the embedding dimension :math:`d`, the
regularisation :math:`\\lambda` and the number of epochs by validation RMSE. :func:`seed_run`
repeats split -> tune -> retrain -> test for one seed, so no seed's test ratings ever influence
the settings it is evaluated with. Results are JSON and cached with
:func:`privrec.course.book.cached_json`, keyed on the code they depend on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ...core.checks import int_in
from ...core.checks import seed as check_seed
from ...recsys import data as data_module
from ...recsys import metrics as metrics_module
from ...recsys import models as models_module
from ...recsys import train as train_module
from ...recsys.data import leave_last_out_split, random_split
from ...recsys.metrics import evaluate_ranking, evaluate_ratings, heldout_ndcg, ranking_metrics
from ...recsys.models import BiasedMF
from ...recsys.train import (
    fit_bias_baseline,
    fit_explicit,
    fit_implicit,
    global_mean_model,
    popularity_scores,
)
from ..book import cached_json

__all__ = ["DIMS", "REGS", "MAX_EPOCHS", "validation_curves", "tune_explicit", "fit_chosen",
           "seed_run", "seed_table", "ranking_run", "protocol_table", "popularity_mix",
           "bias_regularisation_effect"]

DIMS = (16, 64)
"""Embedding dimensions of the tuning grid."""
REGS = (0.03, 0.1, 0.3)
"""Regularisation strengths :math:`\\lambda` of the tuning grid."""
MAX_EPOCHS = 15
"""Epochs of each tuning run; the chosen epoch count is at most this."""
IMPLICIT = {"dim": 32, "epochs": 20, "reg": 1e-4}
"""The implicit-feedback model of the top-K section (fixed, as in chapters 3 and 6)."""


def _modules() -> tuple:
    import sys

    return (data_module, metrics_module, models_module, train_module, sys.modules[__name__])


def _key(dim: int, reg: float) -> str:
    return f"{dim},{reg}"


def validation_curves(train: pd.DataFrame, *, n_users: int, n_items: int, seed: int = 0,
                      dims: tuple[int, ...] = DIMS, regs: tuple[float, ...] = REGS,
                      epochs: int = MAX_EPOCHS, val_fraction: float = 0.1) -> dict[str, list[float]]:
    """Validation RMSE after each epoch for every grid point, all inside ``train``.

    A seeded ``val_fraction`` of ``train`` is held out; each ``(dim, reg)`` trains on the rest
    (Adam, :func:`~privrec.recsys.train.fit_explicit`'s defaults). Keys are ``"dim,reg"``.
    """
    seed = check_seed("seed", seed)
    epochs = int_in("epochs", epochs, 1)
    fit_train, fit_val = random_split(train, test_fraction=val_fraction, seed=seed)
    mu = float(fit_train["rating"].mean())
    curves = {}
    for dim in dims:
        for reg in regs:
            model = BiasedMF(n_users, n_items, dim, global_mean=mu, seed=seed)
            curves[_key(dim, reg)] = fit_explicit(model, fit_train, epochs=epochs, reg=reg,
                                                  seed=seed, validation=fit_val,
                                                  progress=False).history["val_rmse"]
    return curves


def tune_explicit(train: pd.DataFrame, *, n_users: int, n_items: int,
                  seed: int = 0) -> dict:
    """Choose :math:`d`, :math:`\\lambda` and the epochs using ``train`` only.

    The (configuration, epoch) with the lowest validation RMSE of
    :func:`validation_curves` wins (early stopping by validation); ties go
    to the first configuration in grid order, then to the earlier epoch.
    Returns the ``grid`` (one row per configuration), the ``curves`` and
    the chosen ``dim``, ``reg`` and ``epochs``.
    """
    curves = validation_curves(train, n_users=n_users, n_items=n_items,
                               seed=seed, dims=DIMS, regs=REGS,
                               epochs=MAX_EPOCHS)
    grid = []
    for key, curve in curves.items():
        dim, reg = key.split(",")
        best = int(np.flatnonzero(np.array(curve) == min(curve))[0])  # first
        grid.append({"dim": int(dim), "reg": float(reg),
                     "best val RMSE": min(curve), "best epoch": best + 1,
                     "final val RMSE": curve[-1]})
    chosen = min(grid, key=lambda row: row["best val RMSE"])  # ties: first
    return {"grid": grid, "curves": curves, "dim": chosen["dim"],
            "reg": chosen["reg"], "epochs": chosen["best epoch"]}


def fit_chosen(train: pd.DataFrame, tuning: dict, *, n_users: int, n_items: int,
               seed: int = 0) -> BiasedMF:
    """Retrain the configuration :func:`tune_explicit` chose on the whole of ``train``."""
    model = BiasedMF(n_users, n_items, tuning["dim"], global_mean=float(train["rating"].mean()),
                     seed=seed)
    fit_explicit(model, train, epochs=tuning["epochs"], reg=tuning["reg"], seed=seed, progress=False)
    return model


def _seed_run(ratings: pd.DataFrame, n_users: int, n_items: int, seed: int) -> dict:
    train, test = random_split(ratings, seed=seed)
    tuning = tune_explicit(train, n_users=n_users, n_items=n_items, seed=seed)
    model = fit_chosen(train, tuning, n_users=n_users, n_items=n_items, seed=seed)
    kw = {"n_users": n_users, "n_items": n_items}
    mf = evaluate_ratings(model, test)
    return {"seed": seed, "tuning": tuning,
            "global mean": evaluate_ratings(global_mean_model(train, **kw), test)["rmse"],
            "biases": evaluate_ratings(fit_bias_baseline(train, **kw), test)["rmse"],
            "MF": mf["rmse"], "MF MAE": mf["mae"],
            "80/20 full ranking": evaluate_ranking(model, train, test)["ndcg"],
            "held-out rating": heldout_ndcg(model, test)}


def seed_run(ratings: pd.DataFrame, *, n_users: int, n_items: int, seed: int) -> dict:
    """Split (80/20, ``seed``), tune inside the training split, retrain, test: one seed's results.

    Returns the tuning (:func:`tune_explicit`), the test RMSE of the global mean, the biases and the
    tuned MF, MF's MAE, and MF's NDCG@10 under the two 80/20 protocols. Cached.
    """
    seed = check_seed("seed", seed)
    config = {"seed": seed, "n": len(ratings), "dims": DIMS, "regs": REGS, "epochs": MAX_EPOCHS}
    return cached_json("ch1-seed-run", config,
                       lambda: _seed_run(ratings, n_users, n_items, seed), modules=_modules())


def seed_table(runs: list[dict]) -> pd.DataFrame:
    """One row per seed: the chosen settings and the test RMSE of each model."""
    rows = [{"seed": r["seed"], "d": r["tuning"]["dim"], "λ": r["tuning"]["reg"],
             "epochs": r["tuning"]["epochs"], "global mean": r["global mean"],
             "biases": r["biases"], "MF": r["MF"], "MF MAE": r["MF MAE"]} for r in runs]
    return pd.DataFrame(rows).set_index("seed")


def _ranking_run(ratings: pd.DataFrame, n_users: int, n_items: int) -> dict:
    ll_train, ll_test = leave_last_out_split(ratings)
    kw = {"n_users": n_users, "n_items": n_items}
    tuning = tune_explicit(ll_train, **kw, seed=0)
    stars = fit_chosen(ll_train, tuning, **kw, seed=0)
    implicit = BiasedMF(n_users, n_items, IMPLICIT["dim"], seed=0)
    fit_implicit(implicit, ll_train, epochs=IMPLICIT["epochs"], reg=IMPLICIT["reg"], progress=False)
    pop = popularity_scores(ll_train, **kw)
    scores = {"popularity": ranking_metrics(pop, ll_train, ll_test),
              "user + item biases": evaluate_ranking(fit_bias_baseline(ll_train, **kw), ll_train,
                                                     ll_test),
              "MF (trained on stars)": evaluate_ranking(stars, ll_train, ll_test),
              "MF (implicit, sampled negatives)": evaluate_ranking(implicit, ll_train, ll_test)}
    return {"tuning": {k: tuning[k] for k in ("dim", "reg", "epochs")}, "scores": scores,
            "ties": _tie_effect(pop, ll_train, ll_test),
            "mix": popularity_mix(ratings, tuning, stars, n_users=n_users, n_items=n_items)}


def ranking_run(ratings: pd.DataFrame, *, n_users: int, n_items: int) -> dict:
    """The top-K comparison on the leave-last-out split (cached).

    Four scorers: popularity, the bias model, MF trained on stars (tuned by validation RMSE inside
    the leave-last-out *training* ratings) and MF trained on implicit feedback. Also returns the
    tie statistics of popularity and the popularity-mix answer of exercise 3.
    """
    config = {"n": len(ratings), "dims": DIMS, "regs": REGS, "epochs": MAX_EPOCHS, **IMPLICIT}
    return cached_json("ch1-ranking", config, lambda: _ranking_run(ratings, n_users, n_items),
                       modules=_modules())


def _tie_effect(pop: torch.Tensor, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """How often popularity ties the held-out movie, and HR@10 with ties against / for it."""
    pop = pop.clone()
    pop[torch.as_tensor(train["user"].to_numpy()), torch.as_tensor(train["item"].to_numpy())] = -np.inf
    held = pop[torch.as_tensor(test["user"].to_numpy()), torch.as_tensor(test["item"].to_numpy())]
    higher = (pop > held[:, None]).sum(1)
    tied = (pop == held[:, None]).sum(1) - 1
    return {"tied share": float((tied > 0).float().mean()),
            "hr ties against": float(((higher + tied) < 10).float().mean()),
            "hr ties for": float((higher < 10).float().mean())}


def popularity_mix(ratings: pd.DataFrame, tuning: dict, stars: BiasedMF, *,
                   n_users: int, n_items: int,
                   weights: tuple = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)) -> dict:
    """Exercise 3: stars + w·log(1 + popularity), with w chosen on
    validation: each user's latest *training* rating (leave-last-out
    inside the training split). The chosen :math:`w` is applied once to
    ``stars`` and measured on the test users. Ties: the smaller ``w``."""
    kw = {"n_users": n_users, "n_items": n_items}
    ll_train, ll_test = leave_last_out_split(ratings)
    val_train, val_test = leave_last_out_split(ll_train)
    val_mf = fit_chosen(val_train, tuning, **kw, seed=0)
    with torch.no_grad():
        val_scores, test_scores = val_mf.score_all(), stars.score_all()
    val_pop = torch.log1p(popularity_scores(val_train, **kw))
    val_hr = [ranking_metrics(val_scores + w * val_pop, val_train,
                              val_test)["hr"] for w in weights]
    best = weights[int(np.flatnonzero(np.array(val_hr) == max(val_hr))[0])]
    mixed = test_scores + best * torch.log1p(popularity_scores(ll_train, **kw))
    return {"weights": list(weights), "val hr": val_hr, "w": best,
            "test hr": ranking_metrics(mixed, ll_train, ll_test)["hr"]}


def _implicit_8020(ratings: pd.DataFrame, n_users: int, n_items: int) -> dict:
    train, test = random_split(ratings, seed=0)
    model = BiasedMF(n_users, n_items, IMPLICIT["dim"], seed=0)
    fit_implicit(model, train, epochs=IMPLICIT["epochs"], reg=IMPLICIT["reg"], progress=False)
    return {"80/20 full ranking": evaluate_ranking(model, train, test)["ndcg"],
            "held-out rating": heldout_ndcg(model, test)}


def protocol_table(ratings: pd.DataFrame, ranking: dict, seed0: dict, *, n_users: int,
                   n_items: int) -> pd.DataFrame:
    """NDCG@10 of the stars-trained and the implicit MF under the book's three protocols.

    Leave-last-out numbers come from :func:`ranking_run`; the 80/20 numbers from seed 0's tuned MF
    (:func:`seed_run`) and an implicit MF trained on the same 80/20 training split (cached).
    """
    config = {"n": len(ratings), **IMPLICIT}
    implicit = cached_json("ch1-implicit-8020", config,
                           lambda: _implicit_8020(ratings, n_users, n_items), modules=_modules())
    scores = ranking["scores"]
    return pd.DataFrame({
        "leave-last-out": [scores["MF (trained on stars)"]["ndcg"],
                           scores["MF (implicit, sampled negatives)"]["ndcg"]],
        "80/20 full ranking": [seed0["80/20 full ranking"], implicit["80/20 full ranking"]],
        "held-out rating": [seed0["held-out rating"], implicit["held-out rating"]],
    }, index=["MF trained on stars", "MF implicit"])


def bias_regularisation_effect(train: pd.DataFrame, test: pd.DataFrame, *, n_users: int,
                               n_items: int) -> pd.DataFrame:
    """Exercise 2: test RMSE of the bias model with its penalties and with almost none (1e-6),
    overall and on the test ratings of movies with at most two training ratings."""
    n_train = train.groupby("item").size().reindex(range(n_items), fill_value=0).to_numpy()
    rare = test[n_train[test["item"].to_numpy()] <= 2]
    rows = []
    for name, regs in (("regularised (15, 10)", {}),
                       ("almost none (1e-6)", {"reg_user": 1e-6, "reg_item": 1e-6})):
        model = fit_bias_baseline(train, n_users=n_users, n_items=n_items, **regs)
        rows.append({"penalties": name, "test RMSE": evaluate_ratings(model, test)["rmse"],
                     f"RMSE, {len(rare)} rare-movie ratings":
                         evaluate_ratings(model, rare)["rmse"] if len(rare) else float("nan")})
    return pd.DataFrame(rows).set_index("penalties")
