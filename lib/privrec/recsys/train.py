"""Training loops and baselines for the embedding recommender.

* :func:`fit_explicit` fits :class:`~privrec.recsys.models.BiasedMF` to star ratings by mini-batch Adam on
  squared error with per-rating L2 regularisation (the objective of Koren, Bell & Volinsky 2009).
* :func:`fit_implicit` fits the same model to "who rated what" with sampled negatives and logistic
  loss, for top-K recommendation.
* Baselines: :func:`global_mean_model`, :func:`fit_bias_baseline` (regularised user + item biases
  solved in closed form by alternating least squares, Koren 2010, Sec. 2.1) and
  :func:`popularity_scores`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..core.checks import flag, instance, int_in, non_negative, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from .data import validate_ratings
from .metrics import canonical_order, evaluate_ratings
from .models import BiasedMF

__all__ = [
    "explicit_loss",
    "fit_explicit",
    "fit_implicit",
    "fit_bias_baseline",
    "global_mean_model",
    "popularity_scores",
    "ratings_to_tensors",
]


def ratings_to_tensors(ratings: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(users, items, ratings)`` tensors (int64, int64, float32) of a ratings table."""
    instance("ratings", ratings, pd.DataFrame)
    return (torch.as_tensor(ratings["user"].to_numpy(np.int64)),
            torch.as_tensor(ratings["item"].to_numpy(np.int64)),
            torch.as_tensor(ratings["rating"].to_numpy(np.float32)))


def _progress(total: int, enabled: bool | None, desc: str) -> tqdm:
    # None: a bar appears only if the run lasts longer than 5 s, so short runs stay quiet.
    return tqdm(total=total, desc=desc, disable=enabled is False, delay=0 if enabled else 5.0,
                leave=False)


def _setup(model: BiasedMF, train: pd.DataFrame, *, epochs: int, batch_size: int, lr: float,
           seed: int, progress: bool | None) -> tuple[int, int, torch.optim.Adam, torch.Generator]:
    """Shared argument checks of the fitters; returns (epochs, batch_size, Adam, seeded generator)."""
    if not isinstance(model, BiasedMF):
        raise TypeError(f"model must be a BiasedMF, got {type(model).__name__}")
    validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
    epochs = int_in("epochs", epochs, 1)
    batch_size = int_in("batch_size", batch_size, 1)
    if progress is not None:
        flag("progress", progress)
    optimiser = torch.optim.Adam(model.parameters(), lr=positive("lr", lr))
    return epochs, batch_size, optimiser, torch.Generator().manual_seed(check_seed("seed", seed))


def explicit_loss(model: BiasedMF, users: torch.Tensor, items: torch.Tensor,
                  ratings: torch.Tensor, *, reg: float, bias_reg: float) -> torch.Tensor:
    """Mean over a batch of :math:`(r_{ui}-\\hat r_{ui})^2 + \\lambda(\\lVert p_u\\rVert^2 +
    \\lVert v_i\\rVert^2) + \\lambda_b (b_u^2 + b_i^2)`, the loss :func:`fit_explicit` minimises
    (ids unchecked: inner-loop function)."""
    # Gather each touched row once; prediction and penalty share it.
    p_u, v_i = model.user_factors[users], model.item_factors[items]
    b_u, b_i = model.user_bias[users], model.item_bias[items]
    err = model.global_bias + b_u + b_i + (p_u * v_i).sum(1) - ratings
    penalty = (reg * (p_u.square().sum(1) + v_i.square().sum(1))
               + bias_reg * (b_u.square() + b_i.square()))
    return (err.square() + penalty).mean()


def fit_explicit(model: BiasedMF, train: pd.DataFrame, *, epochs: int = 30, lr: float = 0.01,
                 batch_size: int = 1024, reg: float = 0.1, bias_reg: float = 0.01, seed: int = 0,
                 validation: pd.DataFrame | None = None,
                 progress: bool | None = None) -> FitResult:
    """Fit ``model`` to ratings by mini-batch Adam on the regularised squared error.

    The loss of a batch B is

    .. math:: \\frac{1}{|B|}\\sum_{(u,i)\\in B} (r_{ui}-\\hat r_{ui})^2
              + \\lambda(\\lVert p_u\\rVert^2 + \\lVert v_i\\rVert^2) + \\lambda_b (b_u^2 + b_i^2),

    so users and items are regularised in proportion to how often they appear (per-rating L2).

    Parameters
    ----------
    model:
        The model to train in place.
    train:
        Ratings table (``user``, ``item``, ``rating``).
    epochs, lr, batch_size, reg, bias_reg:
        Passes over the data, Adam step size, ratings per step, :math:`\\lambda`, :math:`\\lambda_b`.
    seed:
        Seeds the shuffling (the model's initialisation has its own seed).
    validation:
        Optional ratings table; its RMSE is recorded after every epoch.
    progress:
        ``True`` always shows a progress bar, ``False`` never, ``None`` only for runs over 5 s.

    Returns
    -------
    FitResult
        ``history`` has ``"train_loss"`` and ``"val_rmse"`` (one value per epoch; the latter empty
        without ``validation``); ``ledger`` is ``None`` (not private).
    """
    epochs, batch_size, optimiser, gen = _setup(model, train, epochs=epochs, batch_size=batch_size,
                                                lr=lr, seed=seed, progress=progress)
    if validation is not None:
        validate_ratings(validation, n_users=model.n_users, n_items=model.n_items, name="validation")
    reg, bias_reg = non_negative("reg", reg), non_negative("bias_reg", bias_reg)

    users, items, ratings = ratings_to_tensors(train)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return explicit_loss(model, users[idx], items[idx], ratings[idx], reg=reg,
                             bias_reg=bias_reg)

    def after_epoch(history: dict[str, list[float]]) -> None:
        if validation is not None:
            history["val_rmse"].append(evaluate_ratings(model, validation)["rmse"])

    return _run_epochs(model, len(ratings), batch_loss, optimiser, gen, epochs=epochs,
                       batch_size=batch_size, progress=progress, desc="fit_explicit",
                       after_epoch=after_epoch)


def fit_implicit(model: BiasedMF, train: pd.DataFrame, *, epochs: int = 20, lr: float = 0.01,
                 batch_size: int = 1024, n_negatives: int = 4, reg: float = 1e-4, seed: int = 0,
                 progress: bool | None = None) -> FitResult:
    """Fit ``model`` to implicit feedback (a rating means "interacted") with sampled negatives.

    Each observed pair is a positive; ``n_negatives`` items drawn uniformly per positive are
    negatives (a draw may occasionally hit an observed item: the usual, slightly noisy, estimator).
    The loss is binary cross-entropy on the model's score used as a logit, plus L2 on the touched
    factors.
    """
    epochs, batch_size, optimiser, gen = _setup(model, train, epochs=epochs, batch_size=batch_size,
                                                lr=lr, seed=seed, progress=progress)
    n_negatives = int_in("n_negatives", n_negatives, 1)
    reg = non_negative("reg", reg)

    users, items, _ = ratings_to_tensors(train)
    labels_per_batch = torch.cat([torch.ones(1), torch.zeros(n_negatives)])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        u = users[idx].repeat_interleave(n_negatives + 1)
        negatives = torch.randint(model.n_items, (len(idx), n_negatives), generator=gen)
        i = torch.cat([items[idx, None], negatives], 1).reshape(-1)
        labels = labels_per_batch.repeat(len(idx))
        p_u, v_i = model.user_factors[u], model.item_factors[i]
        logits = model.global_bias + model.user_bias[u] + model.item_bias[i] + (p_u * v_i).sum(1)
        penalty = reg * (p_u.square().sum(1) + v_i.square().sum(1))
        return (torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="none") + penalty).mean()

    return _run_epochs(model, len(users), batch_loss, optimiser, gen, epochs=epochs,
                       batch_size=batch_size, progress=progress, desc="fit_implicit")


def _run_epochs(model: BiasedMF, n: int, batch_loss, optimiser: torch.optim.Optimizer,
                gen: torch.Generator, *, epochs: int, batch_size: int, progress: bool | None,
                desc: str, after_epoch=None) -> FitResult:
    """The shared loop: each epoch a seeded shuffle, Adam on ``batch_loss`` of each mini-batch."""
    history: dict[str, list[float]] = {"train_loss": [], "val_rmse": []}
    start = time.perf_counter()
    with _progress(epochs, progress, desc) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                loss = batch_loss(idx)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(idx)
            history["train_loss"].append(total / n)
            if after_epoch is not None:
                after_epoch(history)
            bar.update()
    return FitResult(model, history, None, time.perf_counter() - start)


def global_mean_model(train: pd.DataFrame, *, n_users: int, n_items: int) -> BiasedMF:
    """The constant predictor :math:`\\hat r_{ui} = \\mu` as a bias-only :class:`BiasedMF`."""
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    if len(train) == 0:
        raise ValueError("train must not be empty")
    return BiasedMF(n_users, n_items, 0, global_mean=float(train["rating"].mean()))


@torch.no_grad()
def fit_bias_baseline(train: pd.DataFrame, *, n_users: int, n_items: int, reg_user: float = 15.0,
                      reg_item: float = 10.0, n_iter: int = 10) -> BiasedMF:
    """Regularised user + item biases, :math:`\\hat r_{ui} = \\mu + b_u + b_i`.

    Minimises :math:`\\sum (r_{ui}-\\mu-b_u-b_i)^2 + \\lambda_u\\sum b_u^2 + \\lambda_i\\sum b_i^2` by
    alternating closed-form updates (Koren 2010, Sec. 2.1),
    :math:`b_i = \\sum_u (r_{ui}-\\mu-b_u)/(\\lambda_i + n_i)` and symmetrically for :math:`b_u`.
    The default strengths are those of Surprise's ``BaselineOnly``. The sums run over ``train`` in
    :func:`~privrec.recsys.metrics.canonical_order`, so the result does not depend on the row order.
    """
    model = global_mean_model(train, n_users=n_users, n_items=n_items)
    train = canonical_order(train)
    reg_user, reg_item = non_negative("reg_user", reg_user), non_negative("reg_item", reg_item)
    n_iter = int_in("n_iter", n_iter, 1)
    users, items, ratings = ratings_to_tensors(train)
    ratings = ratings.double()
    mu = ratings.mean()
    n_u = torch.bincount(users, minlength=n_users).double()
    n_i = torch.bincount(items, minlength=n_items).double()
    b_u = torch.zeros(n_users, dtype=torch.double)
    b_i = torch.zeros(n_items, dtype=torch.double)
    for _ in range(n_iter):
        b_i = torch.zeros(n_items, dtype=torch.double).index_add_(0, items, ratings - mu - b_u[users])
        b_i /= reg_item + n_i
        b_u = torch.zeros(n_users, dtype=torch.double).index_add_(0, users, ratings - mu - b_i[items])
        b_u /= reg_user + n_u
    model.user_bias.copy_(b_u.float())
    model.item_bias.copy_(b_i.float())
    return model


def popularity_scores(train: pd.DataFrame, *, n_users: int, n_items: int) -> torch.Tensor:
    """``[n_users, n_items]`` scores equal to each item's number of training ratings."""
    validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
    counts = torch.bincount(torch.as_tensor(train["item"].to_numpy()), minlength=n_items).float()
    return counts.expand(n_users, n_items).clone()
