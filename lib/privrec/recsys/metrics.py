"""Accuracy and ranking metrics: RMSE, MAE, HR@K and NDCG@K with full ranking.

Ranking follows the protocol of most recent recommender papers that avoid sampled metrics
(Krichene & Rendle 2020): every item the user did not rate in training is a candidate.

**Tie rule (the book's pessimistic tie-breaking).** A test item's 0-based rank is the number of
candidates scored strictly higher *plus* the number of other candidates scored exactly the same:
every tie is resolved against the test item, as if tied candidates were listed first. A constant
scorer therefore earns nothing, and the rank does not depend on item ids, on the order of the rows
or on the sort kernel of the machine. Where the book needs an explicit list (a top-K, a median),
:func:`top_k` orders by descending score and breaks ties by the smaller item id.

Every function here first puts its rating tables in the canonical order of :func:`canonical_order`
(by user, then item, then rating), so permuting the input rows gives bit-identical results.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..core.checks import instance, int_in, real, real_array
from .data import validate_ratings

__all__ = ["rmse", "mae", "evaluate_ratings", "ranking_metrics", "evaluate_ranking",
           "heldout_ndcg", "canonical_order", "top_k"]


def canonical_order(ratings: pd.DataFrame) -> pd.DataFrame:
    """``ratings`` sorted by (user, item, rating) with a stable sort: the order every metric uses.

    Floating-point sums depend on the order of their terms; sorting first makes every result
    independent of the order of the input rows (rows equal in all three keys are interchangeable).
    """
    instance("ratings", ratings, pd.DataFrame)
    keys = [ratings[c].to_numpy() for c in ("rating", "item", "user") if c in ratings.columns]
    return ratings.iloc[np.lexsort(keys)] if keys else ratings


def top_k(scores: object, k: int) -> np.ndarray:
    """Ids of the ``k`` highest ``scores`` (1-D), by descending score, ties broken by smaller id.

    Raises
    ------
    ValueError
        If ``scores`` is not 1-D and finite or ``k`` is not an int in ``[1, len(scores)]``.
    """
    values = _as_float_vector(scores, "scores").numpy()
    k = int_in("k", k, 1, len(values))
    # A stable sort keeps equal scores in ascending id order: the explicit secondary key.
    return np.argsort(-values, kind="stable")[:k]


def _as_float_vector(values: object, name: str) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(
        real_array(name, values))
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
    tensor = tensor.double()
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _paired(predictions: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    pred = _as_float_vector(predictions, "predictions")
    target = _as_float_vector(targets, "targets")
    if pred.shape != target.shape:
        raise ValueError(f"predictions and targets must have the same length, got {pred.numel()} "
                         f"and {target.numel()}")
    if pred.numel() == 0:
        raise ValueError("predictions must not be empty")
    return pred, target


def rmse(predictions: object, targets: object) -> float:
    """Root mean squared error."""
    pred, target = _paired(predictions, targets)
    return float(((pred - target) ** 2).mean().sqrt())


def mae(predictions: object, targets: object) -> float:
    """Mean absolute error."""
    pred, target = _paired(predictions, targets)
    return float((pred - target).abs().mean())


@torch.no_grad()
def evaluate_ratings(model: torch.nn.Module, ratings: pd.DataFrame, *,
                     clamp: tuple[float, float] | None = (1.0, 5.0)) -> dict[str, float]:
    """RMSE and MAE of ``model(users, items)`` on a ratings table, predictions clamped to the scale."""
    instance("model", model, torch.nn.Module)
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise TypeError(f"clamp must be None or a (low, high) pair, got {clamp!r}")
        clamp = (real("clamp[0]", clamp[0]), real("clamp[1]", clamp[1]))
    validate_ratings(ratings, n_users=model.n_users, n_items=model.n_items)
    ratings = canonical_order(ratings)
    pred = model(torch.as_tensor(ratings["user"].to_numpy()), torch.as_tensor(ratings["item"].to_numpy()))
    if clamp is not None:
        pred = pred.clamp(*clamp)
    target = ratings["rating"].to_numpy()
    return {"rmse": rmse(pred, target), "mae": mae(pred, target)}


@torch.no_grad()
def ranking_metrics(scores: torch.Tensor, train: pd.DataFrame, test: pd.DataFrame, *,
                    k: int = 10) -> dict[str, float]:
    """HR@K and NDCG@K with every item the user did not rate in ``train`` as a candidate.

    Parameters
    ----------
    scores:
        ``[n_users, n_items]`` scores, higher is better (e.g. ``model.score_all()``).
    train:
        Ratings the user already has; excluded from the candidates.
    test:
        Held-out (user, item) pairs, one or more per user; each is a relevant item.
    k:
        Cut-off.

    Returns
    -------
    ``{"hr": ..., "ndcg": ...}`` averaged over the users in ``test``. HR@K is the share of users
    with at least one test item in their top K; NDCG@K uses binary relevance.

    Notes
    -----
    Ties are resolved against the test item (the module's pessimistic tie rule): its rank is
    ``#{candidates scored higher} + #{other candidates scored equal}``. The result does not depend
    on the order of the rows of ``train`` or ``test``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError("scores must be a 2-D torch tensor [n_users, n_items]")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contains NaN or infinite values")
    k = int_in("k", k, 1)
    n_users, n_items = scores.shape
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    validate_ratings(test, n_users=n_users, n_items=n_items, name="test")
    if len(test) == 0:
        raise ValueError("test must not be empty")

    test = canonical_order(test)
    masked = scores.double().clone()
    masked[torch.as_tensor(train["user"].to_numpy()), torch.as_tensor(train["item"].to_numpy())] = -math.inf
    t_users = torch.as_tensor(test["user"].to_numpy())
    t_items = torch.as_tensor(test["item"].to_numpy())
    target = masked[t_users, t_items]
    if torch.isinf(target).any():
        raise ValueError("test contains (user, item) pairs that are also in train")
    return _hr_ndcg(_pessimistic_ranks(masked, t_users, target), t_users, n_users=n_users, k=k)


def _pessimistic_ranks(masked: torch.Tensor, t_users: torch.Tensor,
                       target: torch.Tensor) -> torch.Tensor:
    """Rank of each test item: strictly higher candidates plus ties other than the item itself."""
    rank = torch.empty(len(t_users), dtype=torch.long)
    for start in range(0, len(t_users), 4096):
        rows = masked[t_users[start:start + 4096]]
        s = target[start:start + 4096, None]
        rank[start:start + 4096] = (rows > s).sum(1) + (rows == s).sum(1) - 1
    return rank


def _hr_ndcg(rank: torch.Tensor, t_users: torch.Tensor, *, n_users: int, k: int) -> dict[str, float]:
    """HR@K and NDCG@K (binary relevance) averaged over the users with a test item."""
    hit = rank < k
    gain = torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), torch.zeros((), dtype=torch.double))
    n_rel = torch.bincount(t_users, minlength=n_users)
    dcg = torch.zeros(n_users, dtype=torch.double).index_add_(0, t_users, gain)
    hits = torch.zeros(n_users, dtype=torch.long).index_add_(0, t_users, hit.long())
    discounts = 1.0 / torch.log2(torch.arange(k, dtype=torch.double) + 2.0)
    ideal = torch.cumsum(discounts, 0)[(n_rel.clamp(max=k) - 1).clamp(min=0)]
    evaluated = n_rel > 0
    return {"hr": float((hits[evaluated] > 0).double().mean()),
            "ndcg": float((dcg[evaluated] / ideal[evaluated]).mean())}


def evaluate_ranking(model: torch.nn.Module, train: pd.DataFrame, test: pd.DataFrame, *,
                     k: int = 10) -> dict[str, float]:
    """:func:`ranking_metrics` on ``model.score_all()``."""
    instance("model", model, torch.nn.Module)
    with torch.no_grad():
        scores = model.score_all()
    return ranking_metrics(scores, train, test, k=k)


@torch.no_grad()
def heldout_ndcg(model: torch.nn.Module, test: pd.DataFrame, *, k: int = 10) -> float:
    """NDCG@K of ordering each user's *held-out rated* items by predicted rating.

    The explicit-feedback ranking metric (graded gain :math:`2^{r}-1`, as in CofiRank, Weimer et al.
    2007): it asks whether the model puts the movies a user rated highly above those the user rated
    low, among the movies the user actually rated in the test set. Unlike :func:`ranking_metrics`
    it does not ask the model to find those movies in the whole catalogue, so it suits models trained
    on stars. Users with a single test rating are skipped (any order is ideal).
    """
    instance("model", model, torch.nn.Module)
    validate_ratings(test, n_users=model.n_users, n_items=model.n_items, name="test")
    k = int_in("k", k, 1)
    test = canonical_order(test)
    pred = model(torch.as_tensor(test["user"].to_numpy()), torch.as_tensor(test["item"].to_numpy()))
    frame = pd.DataFrame({"user": test["user"].to_numpy(), "rating": test["rating"].to_numpy(),
                          "pred": pred.double().numpy()})
    frame = frame[frame.groupby("user")["user"].transform("size") > 1]
    if frame.empty:
        raise ValueError("test needs at least one user with two or more ratings")
    gain = np.exp2(frame["rating"].to_numpy()) - 1.0
    # Position of each item when the user's items are sorted by prediction (ties: lower rating first,
    # pessimistic) and by true rating (the ideal order).
    frame = frame.assign(gain=gain)
    by_pred = frame.sort_values(["user", "pred", "rating"], ascending=[True, False, True], kind="stable")
    by_true = frame.sort_values(["user", "rating"], ascending=[True, False], kind="stable")
    discount = 1.0 / np.log2(np.arange(len(frame)) + 2.0)

    def dcg(ordered: pd.DataFrame) -> pd.Series:
        pos = ordered.groupby("user").cumcount().to_numpy()
        value = np.where(pos < k, ordered["gain"].to_numpy() * discount[np.minimum(pos, len(frame) - 1)], 0.0)
        return pd.Series(value, index=ordered["user"].to_numpy()).groupby(level=0).sum()

    return float((dcg(by_pred) / dcg(by_true)).mean())
