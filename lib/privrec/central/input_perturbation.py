"""Input perturbation (the source article's approach): noise on the data, then ordinary training.

Both releases here are *local*: each value is perturbed on its own, before any training, so the
training that follows is post-processing and needs no trusted curator. What each protects differs,
and it is not what DP-SGD protects:

* :func:`laplace_perturb_ratings` adds Laplace noise to each rating *value*. Against changing one
  rating's value (a replace-value relation, sensitivity ``high - low``) it is pure
  :math:`\\varepsilon`-DP. But the table of *who rated what* is published unchanged, so against
  adding or removing a rating -- the rating-level relation of DP-SGD -- it gives no protection at
  all (:math:`\\varepsilon = \\infty`). Given a ledger, it records both facts: a Laplace event
  (the values) and a noiseless event (the who-rated-what table), whose composition is ∞.
* :func:`randomized_response_interactions` applies randomized response (Warner 1965) to every cell
  of the user x item "interacted" matrix. Adding or removing one interaction flips one cell, whose
  report is :math:`\\varepsilon`-DP: the release is pure :math:`\\varepsilon`-DP at interaction
  level. (At user level a whole row of :math:`I` cells can differ: :math:`I\\varepsilon`.) It records
  nothing on a ledger: the ledger composes Gaussian and Laplace curves, and randomized response is
  not a Laplace mechanism -- it dominates every pure :math:`\\varepsilon`-DP mechanism (Kairouz,
  Oh & Viswanath 2015), so booking it as Laplace would under-state its cost. Its guarantee is the
  exact pure :math:`\\varepsilon` stated here.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..core.checks import epsilon_or_inf, flag, real
from ..dp.ledger import PrivacyLedger
from ..dp.mechanisms import laplace_mechanism, randomized_response
from ..recsys.data import validate_ratings

__all__ = ["laplace_perturb_ratings", "randomized_response_interactions"]


def _record_laplace_release(ledger: PrivacyLedger, epsilon: float) -> None:
    if not isinstance(ledger, PrivacyLedger):
        raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
    if ledger.unit != "rating":
        raise ValueError(f"ledger unit must be 'rating', got {ledger.unit!r}")
    if math.isinf(epsilon):
        ledger.record_gaussian("rating values (published as is)", noise_multiplier=0.0)
    else:
        ledger.record_laplace("rating values (Laplace, change of one value)", epsilon=epsilon)
    ledger.record_gaussian("who-rated-what table (published as is)", noise_multiplier=0.0)


def laplace_perturb_ratings(ratings: pd.DataFrame, *, epsilon: float, low: float = 1.0,
                            high: float = 5.0, clamp: bool = True, seed: int = 0,
                            ledger: PrivacyLedger | None = None) -> pd.DataFrame:
    """Each rating value plus Laplace noise of scale :math:`b=\\Delta/\\varepsilon`, :math:`\\Delta=`
    ``high - low`` (4 for stars 1..5), then clamped to ``[low, high]`` (post-processing).

    Each value is :math:`\\varepsilon`-DP against *changing that one rating's value* (a local
    guarantee; Dwork et al. 2006). It does not hide *which* (user, item) pairs exist: the table of
    who rated what is published unchanged, so under add/remove-one-rating ε is infinite. Both
    facts are recorded on ``ledger`` if one is given (unit ``"rating"``). ``epsilon=math.inf``
    returns a copy.

    Raises
    ------
    ValueError
        For ``epsilon <= 0``, ``low >= high`` or a ledger about another unit.
    """
    validate_ratings(ratings)
    epsilon = epsilon_or_inf("epsilon", epsilon)
    low, high = real("low", low), real("high", high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"need finite low < high, got low={low!r}, high={high!r}")
    clamp = flag("clamp", clamp)
    if ledger is not None:
        _record_laplace_release(ledger, epsilon)
    out = ratings.copy()
    values = out["rating"].to_numpy(np.float64)
    if not math.isinf(epsilon):
        values = laplace_mechanism(values, sensitivity=high - low, epsilon=epsilon, seed=seed)
    if clamp:
        values = np.clip(values, low, high)
    out["rating"] = values.astype(np.float32)
    return out


def randomized_response_interactions(ratings: pd.DataFrame, *, n_users: int, n_items: int,
                                     epsilon: float, seed: int = 0) -> pd.DataFrame:
    """Randomized response (Warner 1965) on every cell of the user x item "interacted" matrix.

    Each of the :math:`U\\times I` bits is kept with probability :math:`e^\\varepsilon/(1+e^\\varepsilon)`
    and flipped otherwise: pure :math:`\\varepsilon`-DP per interaction (see the module docstring
    for why no ledger event). Returns the noisy positives as a ratings table (``rating`` 1.0,
    ``timestamp`` 0), ready for :func:`privrec.recsys.train.fit_implicit`. At small :math:`\\varepsilon`
    most of the roughly :math:`UI/(1+e^\\varepsilon)` positives are fake.
    """
    validate_ratings(ratings, n_users=n_users, n_items=n_items)
    epsilon = epsilon_or_inf("epsilon", epsilon)
    truth = torch.zeros(n_users, n_items, dtype=torch.bool)
    truth[torch.as_tensor(ratings["user"].to_numpy()), torch.as_tensor(ratings["item"].to_numpy())] = True
    if not math.isinf(epsilon):
        truth = randomized_response(truth.to(torch.uint8), epsilon=epsilon, seed=seed).bool()
    u, i = truth.nonzero(as_tuple=True)
    return pd.DataFrame({"user": u.numpy().astype(np.int64), "item": i.numpy().astype(np.int64),
                         "rating": np.ones(len(u), np.float32),
                         "timestamp": np.zeros(len(u), np.int64)})
