"""Attack scores as measurements: AUC and TPR at low FPR, and attribute inference.

**Scoring an attack.** An attack outputs a score per target (higher = "more likely positive":
a member, a woman, ...). :func:`roc_auc` is the probability that a random positive outranks a
random negative, **ties counted as one half** (the Mann-Whitney statistic with mid-ranks), so a
constant score gets exactly 0.5 whatever the order of the rows. :func:`tpr_at_fpr` follows
Carlini et al. (2022): the fraction of positives caught by the best threshold whose false-positive
rate is at most ``fpr``; a threshold classifies a whole group of tied scores together, so ties
never give a rate between two achievable points.

**Attribute inference** (Weinsberg et al. 2012): predict a private attribute (gender, an age band)
of a user from what a recommender sees of them -- the set of items they rated, or the user
embedding a centrally trained model learned. The attacker knows the attribute of some users (a
public profile, a survey) and trains an L2-regularised logistic regression on them;
:func:`attribute_inference_auc` reports the AUC on users held out of that training, pooled over
``folds`` cross-validation folds so that every user is scored once by a model that never saw them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import beta, rankdata

from ..core.checks import epsilon_or_inf, in_range, int_in, non_negative
from ..core.checks import seed as check_seed

__all__ = ["roc_auc", "tpr_at_fpr", "attack_summary", "clopper_pearson", "dp_tpr_bound",
           "item_set_features", "fit_logistic", "attribute_inference_auc"]


def _scores_labels(scores: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("labels must contain both classes")
    return s, y


def roc_auc(scores: object, labels: object) -> float:
    """Area under the ROC curve, ties counted as 1/2 (Mann-Whitney U with mid-ranks).

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([1.0, 1.0, 1.0], [0, 1, 1])
    0.5

    Raises
    ------
    ValueError
        If lengths differ, a score is not finite, a label is not 0/1, or one class is missing.
    """
    s, y = _scores_labels(scores, labels)
    ranks = rankdata(s, method="average")          # tied scores share their mean rank
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _roc_points(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "positive iff score >= t" for every distinct score t, plus the (0, 0) point."""
    values, inverse = np.unique(s, return_inverse=True)            # ascending distinct scores
    pos = np.bincount(inverse, weights=y, minlength=len(values))[::-1]
    neg = np.bincount(inverse, weights=~y, minlength=len(values))[::-1]
    tpr = np.concatenate([[0.0], np.cumsum(pos) / y.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / (~y).sum()])
    return fpr, tpr


def tpr_at_fpr(scores: object, labels: object, *, fpr: float) -> float:
    """Largest true-positive rate of a threshold rule whose false-positive rate is <= ``fpr``.

    >>> tpr_at_fpr([0.9, 0.8, 0.8, 0.1], [1, 1, 0, 0], fpr=0.0)
    0.5

    References
    ----------
    N. Carlini et al., "Membership inference attacks from first principles", IEEE S&P 2022, Sec. III.
    """
    fpr = in_range("fpr", fpr, 0.0, 1.0, closed_high=True)
    f, t = _roc_points(*_scores_labels(scores, labels))
    return float(t[f <= fpr + 1e-12].max())


def attack_summary(scores: object, labels: object, *, fprs=(0.001, 0.01)) -> dict[str, float]:
    """``{"auc": ..., "tpr@0.1%": ..., "tpr@1%": ...}`` for one attack."""
    out = {"auc": roc_auc(scores, labels)}
    for f in fprs:
        out[f"tpr@{100 * f:g}%"] = tpr_at_fpr(scores, labels, fpr=f)
    return out


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided confidence interval for a binomial proportion (Clopper & Pearson 1934).

    >>> tuple(round(x, 4) for x in clopper_pearson(0, 100))
    (0.0, 0.0362)
    """
    n = int_in("trials", trials, 1)
    k = int_in("successes", successes, 0, n)
    alpha = 1.0 - in_range("confidence", confidence, 0.0, 1.0, closed_high=False)
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def dp_tpr_bound(*, epsilon: float, delta: float, fpr: float) -> float:
    """The largest true-positive rate any test can reach at false-positive rate ``fpr`` against an
    :math:`(\\varepsilon,\\delta)`-DP mechanism: the privacy region of Kairouz, Oh & Viswanath
    (2015, Thm. 2.1),

    .. math:: \\mathrm{TPR} \\le \\min\\{1,\\; e^{\\varepsilon}\\,\\mathrm{FPR} + \\delta,\\;
              1 - e^{-\\varepsilon}(1 - \\delta - \\mathrm{FPR})\\}.

    The second term binds at small FPR, the third near FPR = 1; ``epsilon = inf`` gives 1.

    >>> round(dp_tpr_bound(epsilon=1.0, delta=1e-5, fpr=0.01), 5)
    0.02719
    >>> round(dp_tpr_bound(epsilon=1.0, delta=0.0, fpr=0.9), 4)
    0.9632
    """
    epsilon = epsilon_or_inf("epsilon", epsilon)
    delta = in_range("delta", delta, 0.0, 1.0, closed_high=True)
    fpr = in_range("fpr", fpr, 0.0, 1.0, closed_high=True)
    if math.isinf(epsilon):
        return 1.0
    return float(min(1.0, math.exp(epsilon) * fpr + delta,
                     1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)))


def item_set_features(ratings: pd.DataFrame, *, n_users: int, n_items: int) -> np.ndarray:
    """The 0/1 matrix ``[users, items]`` of who rated what (what a server learns from uploads)."""
    x = np.zeros((int_in("n_users", n_users, 1), int_in("n_items", n_items, 1)), dtype=np.float32)
    x[ratings["user"].to_numpy(), ratings["item"].to_numpy()] = 1.0
    return x


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1.0, steps: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by full-batch L-BFGS (deterministic): ``(w, b)``.

    Minimises :math:`\\sum_j \\log(1+e^{-s_j(w^\\top x_j+b)}) + \\tfrac{l_2}{2}\\lVert w\\rVert^2`.
    """
    l2 = non_negative("l2", l2)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y.double()
    opt = torch.optim.LBFGS([w, b], max_iter=int_in("steps", steps, 1),
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
        loss = loss + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def attribute_inference_auc(features: object, labels: object, *, folds: int = 5, l2: float = 1.0,
                            standardize: bool = False, seed: int = 0) -> float:
    """Held-out AUC of a logistic-regression attack that predicts ``labels`` from ``features``.

    Users are split into ``folds`` random folds; each fold is scored by a model trained on the
    others, and the AUC is computed over all out-of-fold scores.

    Parameters
    ----------
    features:
        ``[users, d]`` array (item set, embedding, noisy report...).
    labels:
        ``[users]`` 0/1 attribute.
    folds:
        Number of cross-validation folds (>= 2).
    l2:
        Ridge strength of the attack (fixed in advance, not tuned on the targets).
    standardize:
        Scale each feature to mean 0 and std 1 using the training folds only (for embeddings).
    seed:
        Seeds the fold assignment.

    References
    ----------
    U. Weinsberg, S. Bhagat, S. Ioannidis, N. Taft, "BlurMe: inferring and obfuscating user gender
    based on ratings", RecSys 2012.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    y = np.asarray(labels).astype(np.int64)
    _scores_labels(np.zeros(len(y)), y)
    folds = int_in("folds", folds, 2, len(y))
    fold = np.random.default_rng(check_seed("seed", seed)).permutation(len(y)) % folds
    scores = np.zeros(len(y))
    for f in range(folds):
        train, test = fold != f, fold == f
        xt, xs = x[train], x[test]
        if standardize:
            mean, std = xt.mean(0), xt.std(0).clamp(min=1e-8)
            xt, xs = (xt - mean) / std, (xs - mean) / std
        w, b = fit_logistic(xt, torch.as_tensor(y[train]), l2=l2)
        scores[test] = (xs @ w + b).numpy()
    return roc_auc(scores, y)
