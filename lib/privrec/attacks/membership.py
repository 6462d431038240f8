"""Membership inference against a rating model: was the rating (u, i, r) in its training set?

The experiment (Carlini et al. 2022, Sec. IV). A set of ``candidate`` ratings is drawn from the
data; the rest (``base``) is always trained on. The **target** model trains on ``base`` plus a
random half of the candidates, and the attacker scores every candidate; the score's AUC and TPR at
low FPR against the true inclusion bits are the measurement. Adding or removing one candidate is
exactly the add/remove neighbouring relation of rating-level DP, so a rating-level
:math:`(\\varepsilon, \\delta)` guarantee bounds every point of the attack's ROC curve:
:math:`\\text{TPR} \\le e^{\\varepsilon}\\,\\text{FPR} + \\delta`.

Two attacks, both on the signed residual :math:`\\phi = \\hat r_{ui} - r_{ui}` of the released model:

* **loss threshold** (Yeom et al. 2018): members have smaller squared error; score
  :math:`-\\phi^2`;
* **calibrated loss** (difficulty calibration, Watson et al. 2022): the same, minus the candidate's
  mean squared residual in the reference models that did not train on it;
* **LiRA, online, cheap** (Carlini et al. 2022, Algorithm 1 with a global variance): train
  ``n_reference`` reference models on ``base`` plus other random halves of the candidates, built as
  complementary pairs so that every candidate is IN exactly half of them. For each candidate fit
  :math:`\\mathcal N(\\mu_{in}, \\sigma_{in}^2)` and :math:`\\mathcal N(\\mu_{out}, \\sigma_{out}^2)` to its
  residuals in the reference models (per-candidate means, variances pooled over candidates, which
  Carlini et al. recommend when references are few) and score the target's residual by the log
  likelihood ratio. Calibrating per example removes the "this rating is just hard to predict"
  confound that limits the loss threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ..core.checks import int_in
from ..core.checks import seed as check_seed
from .inference import attack_summary

__all__ = ["candidate_split", "inclusion_masks", "with_candidates", "residuals",
           "loss_scores", "calibrated_loss_scores", "lira_scores", "membership_attack"]


def candidate_split(ratings: pd.DataFrame, *, n_candidates: int, seed: int = 0
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(base, candidates)``: ``n_candidates`` random ratings and the rest, both in id order."""
    n_candidates = int_in("n_candidates", n_candidates, 2, len(ratings) - 1)
    pick = np.zeros(len(ratings), dtype=bool)
    pick[np.random.default_rng(check_seed("seed", seed)).permutation(len(ratings))[:n_candidates]] = True
    return ratings[~pick].reset_index(drop=True), ratings[pick].reset_index(drop=True)


def inclusion_masks(n_candidates: int, *, n_models: int, seed: int = 0) -> np.ndarray:
    """``[n_models, n_candidates]`` booleans in complementary pairs (row 2j+1 = not row 2j), so each
    candidate is IN exactly ``n_models / 2`` models. ``n_models`` must be even."""
    n_models = int_in("n_models", n_models, 2)
    if n_models % 2:
        raise ValueError(f"n_models must be even, got {n_models}")
    rng = np.random.default_rng(check_seed("seed", seed))
    half = rng.random((n_models // 2, int_in("n_candidates", n_candidates, 1))) < 0.5
    return np.stack([half, ~half], axis=1).reshape(n_models, -1)


def with_candidates(base: pd.DataFrame, candidates: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The training set ``base`` plus the candidates where ``mask`` is True."""
    return pd.concat([base, candidates[np.asarray(mask, dtype=bool)]], ignore_index=True)


@torch.no_grad()
def residuals(model: torch.nn.Module, ratings: pd.DataFrame) -> np.ndarray:
    """Signed residuals :math:`\\hat r_{ui} - r_{ui}` of ``model`` on ``ratings``."""
    users = torch.as_tensor(ratings["user"].to_numpy())
    items = torch.as_tensor(ratings["item"].to_numpy())
    pred = model(users, items).double().numpy()
    return pred - ratings["rating"].to_numpy(dtype=np.float64)


def loss_scores(target_residuals: np.ndarray) -> np.ndarray:
    """Loss-threshold attack (Yeom et al. 2018): score :math:`-\\phi^2` (higher = member)."""
    return -np.square(np.asarray(target_residuals, dtype=np.float64))


def calibrated_loss_scores(target_residuals: np.ndarray, reference_residuals: np.ndarray,
                           reference_in: np.ndarray) -> np.ndarray:
    """Mean OUT squared residual of each candidate minus its target squared residual.

    References
    ----------
    L. Watson, C. Guo, G. Cormode, A. Sablayrolles, "On the importance of difficulty calibration
    in membership inference attacks", ICLR 2022.
    """
    out = ~np.asarray(reference_in, dtype=bool)
    if out.sum(0).min() < 1:
        raise ValueError("every candidate needs >= 1 OUT reference model")
    sq = np.square(np.asarray(reference_residuals, dtype=np.float64))
    return np.where(out, sq, 0.0).sum(0) / out.sum(0) + loss_scores(target_residuals)


def lira_scores(target_residuals: np.ndarray, reference_residuals: np.ndarray,
                reference_in: np.ndarray) -> np.ndarray:
    """Online LiRA log likelihood ratio :math:`\\log N(\\phi;\\mu_{in},\\sigma_{in}^2) -
    \\log N(\\phi;\\mu_{out},\\sigma_{out}^2)` per candidate, variances pooled over candidates.

    ``target_residuals`` ``[M]``; ``reference_residuals`` and ``reference_in`` ``[R, M]`` (every
    candidate IN at least two and OUT of at least two reference models).

    References
    ----------
    N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramer, "Membership inference attacks
    from first principles", IEEE S&P 2022, Algorithm 1 and Sec. VI-A (fixed variance).
    """
    res = np.asarray(reference_residuals, dtype=np.float64)
    inside = np.asarray(reference_in, dtype=bool)
    n_in, n_out = inside.sum(0), (~inside).sum(0)
    if n_in.min() < 2 or n_out.min() < 2:
        raise ValueError("every candidate needs >= 2 IN and >= 2 OUT reference models")
    log_ratio = 0.0
    for sel, n, sign in ((inside, n_in, 1.0), (~inside, n_out, -1.0)):
        mean = np.where(sel, res, 0.0).sum(0) / n
        pooled = np.where(sel, (res - mean) ** 2, 0.0).sum() / (n - 1).sum()
        z2 = (np.asarray(target_residuals, dtype=np.float64) - mean) ** 2 / pooled
        log_ratio = log_ratio + sign * (-0.5 * z2 - 0.5 * np.log(pooled))
    return log_ratio


def membership_attack(train: Callable[[pd.DataFrame, int], torch.nn.Module], base: pd.DataFrame,
                      candidates: pd.DataFrame, *, n_reference: int = 4, seed: int = 0
                      ) -> dict[str, dict[str, float] | int]:
    """Train a target and ``n_reference`` reference models with ``train(data, seed)`` and attack.

    Returns
    -------
    ``{"loss": ..., "calibrated loss": ..., "lira": ..., "members": n_in, "non-members": n_out}``,
    each summary being
    :func:`privrec.attacks.inference.attack_summary` (AUC, TPR at FPR 0.1% and 1%).
    """
    rng = np.random.default_rng(check_seed("seed", seed))
    target_in = rng.random(len(candidates)) < 0.5
    masks = inclusion_masks(len(candidates), n_models=n_reference, seed=seed + 1)
    target = train(with_candidates(base, candidates, target_in), seed)
    phi = residuals(target, candidates)
    refs = np.stack([residuals(train(with_candidates(base, candidates, m), seed + 1 + j), candidates)
                     for j, m in enumerate(masks)])
    return {"loss": attack_summary(loss_scores(phi), target_in),
            "calibrated loss": attack_summary(calibrated_loss_scores(phi, refs, masks), target_in),
            "lira": attack_summary(lira_scores(phi, refs, masks), target_in),
            "members": int(target_in.sum()), "non-members": int((~target_in).sum())}
