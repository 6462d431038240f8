"""Chapter 6's cold-start experiment: items nobody has rated, ranked by text, ID embeddings and baselines.

Central, non-private training (no ε is claimed here): the number of epochs is chosen on a second,
validation cold-start split carved out of the training data (:func:`cold_epoch_search`), never on
the cold test movies; :func:`cold_start_table` then trains the two-tower model and ID-embedding MF
on the warm movies (negatives drawn from warm movies only) and ranks the cold movies for every user
who rated one, next to popularity, genre popularity, a random order and -- as an upper reference no
deployed system has -- popularity counted on the held-out ratings themselves.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import torch

from ...recsys import data, metrics, models, text_encoder, two_tower
from ...recsys.data import ColdStartSplit, cold_start_split, random_split, restrict_ids
from ...recsys.metrics import ranking_metrics
from ...recsys.models import BiasedMF
from ...recsys.train import popularity_scores
from ...recsys.two_tower import TwoTowerRecommender, fit_two_tower
from ..book import cached_json

__all__ = ["CENTRAL", "EPOCH_GRID", "cold_metrics", "central_model", "cold_epoch_search",
           "cold_start_table", "warm_ndcg", "nearest_titles", "neighbour_lines"]

#: Central training settings (chapter 1's Adam step) and the epoch grid of the search.
CENTRAL = dict(lr=0.01, batch_size=1024, n_negatives=4)
EPOCH_GRID = (2, 5, 10)
_CODE = (data, metrics, models, text_encoder, two_tower)


def cold_metrics(scores: torch.Tensor, test: pd.DataFrame, candidates: np.ndarray) -> dict:
    """HR@10 and NDCG@10 ranking only the ``candidates`` (cold) movies; nothing is excluded."""
    return ranking_metrics(scores[:, torch.as_tensor(candidates)].contiguous(), test.iloc[:0], test)


def central_model(kind: str, embeddings: torch.Tensor, n_users: int, seed: int = 0):
    """Chapter 6's two-tower model (d = 16, 64 principal coordinates, rank 4, item biases) or MF."""
    if kind == "two-tower":
        return TwoTowerRecommender(n_users, embeddings, 16, text_dim=64, rank=4, item_bias=True,
                                   seed=seed)
    return BiasedMF(n_users, len(embeddings), 16, seed=seed)


def cold_epoch_search(split: ColdStartSplit, embeddings: torch.Tensor, *, n_users: int,
                      key: str) -> tuple[pd.DataFrame, dict]:
    """Validation NDCG@10 for each model and number of epochs; the best (ties: fewer epochs).

    Each model trains once, to the largest number of epochs, and is scored after each epoch of
    :data:`EPOCH_GRID`: with one seed, a shorter run is exactly the start of a longer one."""
    warm = split.warm_items

    def search():
        inner = restrict_ids(split.train, column="item", ids=warm)  # warm movies, renumbered
        val = cold_start_split(inner, n_items=len(warm), fraction=0.1, seed=1)
        rows = []
        for kind in ("two-tower", "MF"):
            def score(epoch, model, kind=kind):
                if epoch in EPOCH_GRID:
                    with torch.no_grad():
                        m = cold_metrics(model.score_all(), val.test, val.cold_items)
                    rows.append({"model": kind, "epochs": epoch,
                                 "validation NDCG@10": round(m["ndcg"], 4)})

            fit_two_tower(central_model(kind, embeddings[warm], n_users), val.train,
                          epochs=max(EPOCH_GRID), negative_items=val.warm_items, seed=0,
                          on_epoch=score, **CENTRAL)
        return rows

    table = pd.DataFrame(cached_json("ch6-cold-epochs", {"embeddings": key, **CENTRAL,
                                                         "epochs": EPOCH_GRID}, search,
                                     modules=_CODE + (central_model, cold_metrics, cold_epoch_search)))
    ranked = table.sort_values(["model", "validation NDCG@10", "epochs"],
                               ascending=[True, False, True], kind="stable")
    return table, ranked.groupby("model", sort=False).head(1).set_index("model")["epochs"].to_dict()


def _genre_popularity(items: pd.DataFrame, train: pd.DataFrame, warm: np.ndarray) -> np.ndarray:
    counts = np.bincount(train["item"], minlength=len(items)).astype(float)
    genres = items["genres"].str.split("|")
    mean = (pd.DataFrame({"genre": genres[warm].explode(),
                          "count": np.repeat(counts[warm], genres[warm].str.len())})
            .groupby("genre")["count"].mean())
    return np.array([mean.reindex(g).fillna(0).mean() for g in genres])


@torch.no_grad()
def cold_start_table(split: ColdStartSplit, items: pd.DataFrame, embeddings: torch.Tensor, *,
                     n_users: int, epochs: dict) -> tuple[dict, dict]:
    """``(results, checks)``: HR@10/NDCG@10 among cold movies per method, and how many cold rows
    of MF's tables training changed (none can: no rating, no sampled negative touches them)."""
    n_items, cold = len(items), split.cold_items
    trained = {}
    for kind in ("two-tower", "MF"):
        trained[kind] = central_model(kind, embeddings, n_users)
        with torch.enable_grad():
            fit_two_tower(trained[kind], split.train, epochs=epochs[kind],
                          negative_items=split.warm_items, seed=0, **CENTRAL)
    oracle = np.zeros(n_items)
    oracle[cold] = np.bincount(split.test["item"], minlength=len(cold))

    def same_for_everyone(per_item):
        return torch.as_tensor(per_item, dtype=torch.float32).expand(n_users, n_items).clone()

    scores = {"popularity (training counts)": popularity_scores(split.train, n_users=n_users,
                                                                n_items=n_items),
              "genre popularity": same_for_everyone(_genre_popularity(items, split.train,
                                                                      split.warm_items)),
              "random order": torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0)),
              "ID-embedding MF": trained["MF"].score_all(),
              "two-tower, text + adapter": trained["two-tower"].score_all(),
              "oracle popularity (not deployable)": same_for_everyone(oracle)}
    results = {name: cold_metrics(s, split.test, cold) for name, s in scores.items()}
    ids = torch.as_tensor(cold)
    mf_init = central_model("MF", embeddings, n_users)
    checks = {"training ratings on cold movies": int(np.isin(split.train["item"], cold).sum()),
              "MF item_factors: cold rows changed": int(
                  (trained["MF"].item_factors[ids] != mf_init.item_factors[ids]).any(1).sum()),
              "MF item_bias: cold rows changed": int((trained["MF"].item_bias[ids] != 0).sum()),
              "two-tower max |b_i| on cold movies": float(trained["two-tower"].item_bias[ids]
                                                          .abs().max())}
    return results, checks


def warm_ndcg(split: ColdStartSplit, embeddings: torch.Tensor, *, n_users: int, epochs: int,
              seed: int = 0) -> float:
    """NDCG@10 of the two-tower model on the *warm* movies: trained on 80% of the warm training
    ratings, evaluated on the other 20% with every warm movie the user did not rate a candidate."""
    fit, test = random_split(split.train, test_fraction=0.2, seed=seed)
    warm = split.warm_items
    model = central_model("two-tower", embeddings, n_users)
    fit_two_tower(model, fit, epochs=epochs, negative_items=warm, seed=0, **CENTRAL)
    with torch.no_grad():
        scores = model.score_all()[:, torch.as_tensor(warm)].contiguous()
    return ranking_metrics(scores, restrict_ids(fit, column="item", ids=warm),
                           restrict_ids(test, column="item", ids=warm))["ndcg"]


def nearest_titles(items: pd.DataFrame, embeddings: torch.Tensor, title: str, k: int = 4) -> str:
    """The ``k`` titles nearest to ``title`` by cosine similarity, ties to the smaller id."""
    i = int(items.index[items["title"] == title][0])
    cos = embeddings @ embeddings[i]
    cos[i] = -float("inf")
    top = torch.argsort(-cos, stable=True)[:k]  # ties: smaller id first
    return ", ".join(f"{items.loc[int(j), 'title']} ({cos[j]:.2f})" for j in top)


def neighbour_lines(items: pd.DataFrame, embeddings: torch.Tensor, *,
                    titles: tuple[str, ...] = ("Toy Story", "Schindler's List", "Star Wars"),
                    query: str = "Toy Story",
                    others: tuple[str, ...] = ("Aladdin", "Schindler's List")) -> list[str]:
    """Lines of at most 80 characters: each of ``titles`` with its :func:`nearest_titles`, then
    the cosine similarity of ``query`` with each of ``others`` (embeddings of unit norm)."""
    lines = []
    for t in titles:  # wrap between neighbours, never inside a title
        names = nearest_titles(items, embeddings, t).replace("), ", ")\0").split("\0")
        lines += textwrap.wrap(f"{t} -> " + ", ".join(n.replace(" ", "\xa0") for n in names), 80,
                               subsequent_indent="    ", break_on_hyphens=False)
    lines = [line.replace("\xa0", " ") for line in lines]
    row = {t: int(items.index[items["title"] == t][0]) for t in (query, *others)}
    return lines + [f"cos({query}, {o}) = {float(embeddings[row[query]] @ embeddings[row[o]]):.2f}"
                    for o in others]
