"""Auditing DP-SGD: an empirical lower bound on epsilon from one training run with canaries.

The accountant gives an *upper* bound: if the code does what the analysis assumes, no attack can
do better than :math:`(\\varepsilon, \\delta)`. An audit gives a *lower* bound: an attack that
succeeds too often proves the code is **not** :math:`(\\varepsilon, \\delta)`-DP, whatever the
analysis says. A correct implementation must give lower bound <= upper bound; a lower bound above
the claim is a bug (in the code or in the analysis).

The one-run audit of Steinke, Nasr & Jagielski (2023). Insert ``m`` **canaries** -- here ratings of
fresh items that nobody else rated -- each included in the training set independently with
probability 1/2 (:func:`canary_ratings`). Train once. Score every canary (:func:`canary_scores`:
how far its item's parameters moved from their initialisation, and the signed shift of its item's
bias), guess IN for the ``k_in`` highest scores and OUT for
the ``k_out`` lowest, abstain on the rest (ties broken by canary id). If training is
:math:`(\\varepsilon, \\delta)`-DP, the number of correct guesses among :math:`r` is stochastically
dominated by :math:`\\text{Binomial}(r, e^{\\varepsilon}/(1+e^{\\varepsilon}))` up to a
:math:`\\delta` term (their Theorem 3.1); :func:`one_run_p_value` is that tail bound, and
:func:`one_run_epsilon_lower_bound` the largest :math:`\\varepsilon` it rejects at the given
confidence. With ``r`` guesses the bound can never exceed about
:math:`\\log(r/\\log(1/\\beta))`: few canaries give a loose audit.

Broken DP-SGDs, each one overridden method of the library's :class:`~privrec.central.dpsgd.DPSGD` (so the
audit runs the real training loop):

* :class:`TouchedRowsNoiseDPSGD` adds noise only to the rows the batch touched;
* :class:`UnclippedDPSGD` skips clipping (the noise still assumes sensitivity :math:`C`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import binom

from ..central.dpsgd import DPSGD, fit_dpsgd
from ..core.checks import check_delta, in_range, int_in, positive
from ..core.checks import seed as check_seed
from ..recsys.models import BiasedMF

__all__ = ["one_run_p_value", "one_run_epsilon_lower_bound", "guesses_from_scores",
           "canary_ratings", "TouchedRowsNoiseDPSGD", "UnclippedDPSGD", "canary_scores",
           "audit_dpsgd", "judge_guesses", "canaries_to_certify"]


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (``m`` canaries) if training is
    :math:`(\\varepsilon, \\delta)`-DP -- small means "not DP at this epsilon".

    :math:`P[\\text{Bin}(r, p) \\ge v] + 2m\\delta\\,\\max_{i\\ge1} P[v > \\text{Bin}(r,p) \\ge v-i]/i`
    with :math:`p = e^{\\varepsilon}/(1+e^{\\varepsilon})`.

    >>> round(one_run_p_value(m=100, r=10, v=10, epsilon=1.0, delta=0.0), 4)
    0.0436

    References
    ----------
    T. Steinke, M. Nasr, M. Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023,
    Theorem 3.1 and Algorithm 2.
    """
    m = int_in("m", m, 1)
    r = int_in("r", r, 0, m)
    v = int_in("v", v, 0, r)
    epsilon = in_range("epsilon", epsilon, 0.0, math.inf, closed_high=False)
    delta = in_range("delta", delta, 0.0, 1.0, closed_high=True)
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    window = np.cumsum(binom.pmf(v - i, r, p))           # P[v > Bin >= v - i]
    return min(1.0, tail + 2 * m * delta * float((window / i).max()))


def one_run_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float,
                                confidence: float = 0.95) -> float:
    """Largest :math:`\\varepsilon` rejected at ``confidence`` by :func:`one_run_p_value` (0 if none).

    >>> round(one_run_epsilon_lower_bound(m=1000, r=500, v=500, delta=1e-7), 2)
    5.11
    """
    beta = 1.0 - in_range("confidence", confidence, 0.5, 1.0, closed_high=False)
    delta = check_delta(delta)
    if one_run_p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m=m, r=r, v=v, epsilon=high, delta=delta) <= beta:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        if one_run_p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) <= beta:
            low = mid
        else:
            high = mid
    return low


def guesses_from_scores(scores: object, *, k_in: int, k_out: int) -> np.ndarray:
    """+1 (IN) for the ``k_in`` highest scores, -1 (OUT) for the ``k_out`` lowest, 0 otherwise.

    Ties are broken by position (canary id): a stable sort, never a bare ``argsort``.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    k_in, k_out = int_in("k_in", k_in, 0), int_in("k_out", k_out, 0)
    if k_in + k_out > len(s):
        raise ValueError(f"k_in + k_out must be <= the number of scores {len(s)}, got {k_in + k_out}")
    order = np.argsort(-s, kind="stable")             # highest first, ties by id
    guess = np.zeros(len(s), dtype=np.int64)
    guess[order[:k_in]] = 1
    guess[order[len(s) - k_out:]] = -1
    return guess


def canary_ratings(*, n_users: int, n_items: int, n_canaries: int, rating: float = 5.0,
                   timestamp: int = 0, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """``n_canaries`` ratings of fresh items ``n_items, n_items+1, ...`` by random users, and
    independent fair coins saying which are inserted. The model needs ``n_items + n_canaries``
    items."""
    n_canaries = int_in("n_canaries", n_canaries, 1)
    rng = np.random.default_rng(check_seed("seed", seed))
    canaries = pd.DataFrame({
        "user": rng.integers(0, int_in("n_users", n_users, 1), n_canaries).astype(np.int64),
        "item": np.arange(int_in("n_items", n_items, 1), n_items + n_canaries, dtype=np.int64),
        "rating": np.full(n_canaries, in_range("rating", rating, 1.0, 5.0, closed_high=True),
                          dtype=np.float32),
        "timestamp": np.full(n_canaries, int(timestamp), dtype=np.int64)})
    return canaries, rng.random(n_canaries) < 0.5


class TouchedRowsNoiseDPSGD(DPSGD):
    """BROKEN on purpose: noise only on rows with a non-zero clipped gradient (the batch's rows).

    An item nobody in the batch rated gets an exactly-zero update, which reveals that nobody did.
    """

    def add_noise(self, summed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        noisy = super().add_noise(summed)
        for name, g in summed.items():
            if g.dim() > 0:
                untouched = g.reshape(g.shape[0], -1).eq(0).all(1)
                noisy[name][untouched] = 0.0
        return noisy


class UnclippedDPSGD(DPSGD):
    """BROKEN on purpose: per-example gradients are not clipped, while the noise still assumes
    sensitivity :math:`C`."""

    def clipped_sum(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        clip_norm, self.clip_norm = self.clip_norm, 1e12
        try:
            return super().clipped_sum(index)
        finally:
            self.clip_norm = clip_norm


@torch.no_grad()
def canary_scores(model: BiasedMF, start: dict[str, torch.Tensor], items: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """The two pre-registered scores of each canary item, from the initial and final model.

    ``"movement"``: L2 distance its factor row and bias moved (an item nobody rated moves only by
    noise); ``"bias"``: signed change of its bias (a 5-star canary pushes its item's bias up).
    """
    idx = torch.as_tensor(items)
    d_bias = (model.item_bias[idx] - start["item_bias"][idx]).double()
    d_row = (model.item_factors[idx] - start["item_factors"][idx]).double().square().sum(1)
    return {"movement": (d_row + d_bias.square()).sqrt().numpy(), "bias": d_bias.numpy()}


def audit_dpsgd(train: pd.DataFrame, *, n_users: int, n_items: int, target_epsilon: float,
                trainer: type[DPSGD] = DPSGD, n_canaries: int = 1000, guess_fraction: float = 0.5,
                dim: int = 4, global_mean: float = 3.0, confidence: float = 0.95, seed: int = 0,
                **dpsgd) -> dict[str, float | str]:
    """One-run audit of ``trainer`` (the library's DP-SGD or a subclass) at ``target_epsilon``.

    Each of the :func:`canary_scores` is one test at confidence ``1 - (1 - confidence)/2``
    (Bonferroni), so the larger of the two lower bounds holds at ``confidence``.

    Parameters
    ----------
    train:
        Training ratings (ids below ``n_users`` / ``n_items``).
    target_epsilon:
        The claim: σ is calibrated by :func:`privrec.central.dpsgd.fit_dpsgd` so that the ledger reports it.
    trainer:
        The DP-SGD class to audit.
    n_canaries:
        :math:`m`; each is inserted with probability 1/2.
    guess_fraction:
        Fraction of canaries guessed (half IN from the top, half OUT from the bottom), fixed in
        advance: choosing it after seeing the scores would void the confidence level.
    dim, global_mean:
        The model (a public constant initialises :math:`\\mu`).
    confidence:
        Confidence of the lower bound.
    **dpsgd:
        ``epochs``, ``sample_rate``, ``clip_norm``, ``lr``, ... for :func:`fit_dpsgd`.

    Returns
    -------
    dict with ``claimed_epsilon``, ``delta`` and ``ledger`` (the run's ledger and its printable
    summary), per score ``guesses_<s>``,
    ``correct_<s>`` and ``epsilon_lb_<s>``, then ``empirical_epsilon`` (the larger lower bound),
    ``p_value`` of the claim (Bonferroni-adjusted) and ``flagged`` (1.0 if the claim is rejected).
    """
    canaries, inserted = canary_ratings(n_users=n_users, n_items=n_items, n_canaries=n_canaries,
                                        seed=seed)
    model = BiasedMF(n_users, n_items + n_canaries, dim, global_mean=global_mean, seed=seed)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = fit_dpsgd(model, pd.concat([train, canaries[inserted]], ignore_index=True),
                    target_epsilon=target_epsilon, seed=seed, trainer=trainer, **dpsgd)
    claimed, delta = run.ledger.epsilon(), run.ledger.delta
    k = int(round(in_range("guess_fraction", guess_fraction, 0.0, 1.0, closed_high=True)
                  * n_canaries / 2))
    scores = canary_scores(model, start, canaries["item"].to_numpy())
    confidence = in_range("confidence", confidence, 0.5, 1.0, closed_high=False)
    out = {"claimed_epsilon": float(claimed), "delta": float(delta), "ledger": run.ledger.summary()}
    return out | judge_guesses(scores, inserted, k=k, epsilon=claimed, delta=delta,
                               confidence=confidence)


def canaries_to_certify(*, epsilon: float, delta: float, confidence: float = 0.95) -> int:
    """The fewest guesses ``r`` (with ``m = 2r`` canaries), all correct, that certify more than
    ``epsilon`` at ``confidence``: the design's ceiling grows only like :math:`\\log r`.

    >>> canaries_to_certify(epsilon=1.0, delta=1e-5)
    10
    """
    epsilon = positive("epsilon", epsilon)

    def certifies(r: int) -> bool:
        return one_run_epsilon_lower_bound(m=2 * r, r=r, v=r, delta=delta, confidence=confidence) > epsilon

    high = 1
    while not certifies(high):  # doubling, then bisection: certifies() is monotone in r
        high *= 2
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if certifies(mid) else (mid, high)
    return high


def judge_guesses(scores: dict[str, np.ndarray], inserted: np.ndarray, *, k: int, epsilon: float,
                  delta: float, confidence: float) -> dict[str, float]:
    """Guess the top/bottom ``k`` canaries of each score and test the claim (Bonferroni over scores).

    Returns, per score ``s``, ``guesses_<s>``, ``correct_<s>`` and ``epsilon_lb_<s>`` (the lower
    bound at confidence ``1 - (1 - confidence)/len(scores)``), then ``empirical_epsilon`` (the larger
    lower bound), ``p_value`` of the claim and ``flagged`` (1.0 if the claim is rejected).
    """
    level = 1.0 - (1.0 - confidence) / len(scores)
    out, p_values = {}, []
    for name, score in scores.items():
        guess = guesses_from_scores(score, k_in=k, k_out=k)
        r, v = int((guess != 0).sum()), int((guess == np.where(inserted, 1, -1)).sum())
        out |= {f"guesses_{name}": r, f"correct_{name}": v,
                f"epsilon_lb_{name}": one_run_epsilon_lower_bound(
                    m=len(inserted), r=r, v=v, delta=delta, confidence=level)}
        p_values.append(one_run_p_value(m=len(inserted), r=r, v=v, epsilon=epsilon, delta=delta))
    out["empirical_epsilon"] = max(out[f"epsilon_lb_{name}"] for name in scores)
    out["p_value"] = min(1.0, len(scores) * min(p_values))
    out["flagged"] = float(out["p_value"] <= 1.0 - confidence)
    return out
