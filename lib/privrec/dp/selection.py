"""Private selection: the exponential mechanism, report-noisy-max and private top-k.

A recommender *selects*: the best item, the ten most popular movies, a threshold. Adding noise to
every candidate's score and publishing the scores (the Laplace mechanism on a histogram) pays for
all of them; a selection mechanism publishes only *which* candidates won.

* The **exponential mechanism** (McSherry & Talwar 2007) picks candidate :math:`i` with probability

  .. math:: \\Pr[i] = \\frac{\\exp(\\varepsilon u_i / 2\\Delta)}{\\sum_j \\exp(\\varepsilon u_j / 2\\Delta)}

  where :math:`u_i` is the candidate's utility (a count) and :math:`\\Delta` the most one neighbour
  can change any single utility. It is :math:`\\varepsilon`-DP (Dwork & Roth 2014, Theorem 3.10).
  When every utility moves in the *same* direction between neighbours (counts under
  add/remove-one-user: one person can only add 1 to some counts, or remove 1 from some), the
  factor 2 can be dropped, :math:`\\exp(\\varepsilon u_i/\\Delta)` (``monotonic=True``; Dwork & Roth
  2014, Sec. 3.4, remark after Theorem 3.10).
* **Report-noisy-max with Gumbel noise**: add independent :math:`\\mathrm{Gumbel}(2\\Delta/\\varepsilon)`
  noise to every utility and report the argmax. By the Gumbel-max trick its output has *exactly*
  the exponential mechanism's distribution, without computing a normaliser.
* **Private top-k.** *Peeling* runs the exponential mechanism :math:`k` times, removing each pick;
  by composition it is :math:`k\\varepsilon`-DP for :math:`\\varepsilon` per pick. The **one-shot
  Gumbel top-k** adds Gumbel noise once and reports the :math:`k` largest noisy utilities in order;
  Durfee & Rogers (2019, Sec. 4.1) show it has the same output distribution as peeling, hence the
  same guarantee, in one pass.

Only the :math:`\\ell_\\infty` sensitivity enters: a user who changes *many* counts by at most 1
each (a contribution bound :math:`\\tau` of distinct items) still moves every utility by at most 1,
so the selection's guarantee does not grow with :math:`\\tau`, while publishing all noisy counts
(Laplace) pays the :math:`\\ell_1` sensitivity :math:`\\tau` (Durfee & Rogers 2019, Sec. 1 and 4).

Privacy parameters are keyword-only; ``epsilon`` of the top-k functions is the budget **per pick**
(record the release as ``ledger.record_pure(name, epsilon=epsilon, count=k)``). Sampling is in
floating point: a teaching implementation, subject to the caveats of Mironov (2012) and Ilvento
(2020) for real releases.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.arrays import rng_for
from ..core.checks import check_epsilon, choice, flag, in_range, instance, int_in, positive, real_array

__all__ = ["exponential_mechanism_probabilities", "exponential_mechanism", "gumbel_noise",
           "report_noisy_max", "gumbel_top_k", "peeling_top_k", "top_k_sequence_probability",
           "private_quantile"]


def _scores(scores: object) -> np.ndarray:
    """The utilities as a finite, non-empty 1-D float64 array."""
    values = real_array("scores", scores)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array of utilities, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite")
    return values


def _temperature(*, epsilon: float, sensitivity: float, monotonic: bool) -> float:
    """The Gumbel scale :math:`b` with :math:`\\Pr[i]\\propto e^{u_i/b}`: 2Δ/ε, or Δ/ε if monotonic."""
    epsilon = check_epsilon(epsilon)
    sensitivity = positive("sensitivity", sensitivity)
    return (1.0 if flag("monotonic", monotonic) else 2.0) * sensitivity / epsilon


def _numpy_rng(generator: np.random.Generator | None, seed: int | None) -> np.random.Generator:
    if generator is not None:
        instance("generator", generator, np.random.Generator)
    return rng_for(None, generator, seed)


def exponential_mechanism_probabilities(scores: object, *, epsilon: float, sensitivity: float = 1.0,
                                        monotonic: bool = False) -> np.ndarray:
    """The exponential mechanism's output distribution over the candidates.

    :math:`\\Pr[i] \\propto \\exp(\\varepsilon u_i/(2\\Delta))` (McSherry & Talwar 2007; Dwork & Roth
    2014, Definition 3.4), or :math:`\\exp(\\varepsilon u_i/\\Delta)` with ``monotonic=True``; computed
    with the maximum subtracted first (log-sum-exp), so large utilities do not overflow.

    Parameters
    ----------
    scores:
        Utilities :math:`u_i`, one per candidate (higher is better).
    epsilon:
        The pick's privacy budget.
    sensitivity:
        :math:`\\Delta`, the most one neighbour changes any single utility.
    monotonic:
        Whether all utilities move in the same direction between neighbours.

    Examples
    --------
    >>> exponential_mechanism_probabilities([0.0, 0.0, 2.0], epsilon=1.0).round(3)
    array([0.212, 0.212, 0.576])
    """
    logits = _scores(scores) / _temperature(epsilon=epsilon, sensitivity=sensitivity,
                                           monotonic=monotonic)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def exponential_mechanism(scores: object, *, epsilon: float, sensitivity: float = 1.0,
                          monotonic: bool = False, generator: np.random.Generator | None = None,
                          seed: int | None = None) -> int:
    """One :math:`\\varepsilon`-DP pick of the exponential mechanism (McSherry & Talwar 2007).

    Samples the distribution of :func:`exponential_mechanism_probabilities` by inverting its
    cumulative sum with one uniform draw. Arguments as there; ``generator`` (NumPy) or ``seed``.
    """
    probabilities = exponential_mechanism_probabilities(scores, epsilon=epsilon,
                                                        sensitivity=sensitivity, monotonic=monotonic)
    cumulative = np.cumsum(probabilities)
    u = _numpy_rng(generator, seed).random() * cumulative[-1]
    return int(min(np.searchsorted(cumulative, u, side="right"), len(cumulative) - 1))


def gumbel_noise(size: int, *, scale: float, generator: np.random.Generator) -> np.ndarray:
    """``size`` draws of :math:`\\mathrm{Gumbel}(0, \\text{scale})`: :math:`-b\\log(-\\log U)`, U uniform."""
    size = int_in("size", size, 1)
    scale = positive("scale", scale)
    instance("generator", generator, np.random.Generator)
    return generator.gumbel(0.0, scale, size)


def report_noisy_max(scores: object, *, epsilon: float, sensitivity: float = 1.0,
                     monotonic: bool = False, noise: str = "gumbel",
                     generator: np.random.Generator | None = None, seed: int | None = None) -> int:
    """Report-noisy-max: the index of the largest :math:`u_i + Z_i`, an :math:`\\varepsilon`-DP pick.

    ``noise="gumbel"``: :math:`Z_i\\sim\\mathrm{Gumbel}(2\\Delta/\\varepsilon)` (:math:`\\Delta/\\varepsilon`
    if monotonic). For independent Gumbel noise :math:`\\Pr[\\arg\\max_i (u_i + Z_i) = i]
    = e^{u_i/b}/\\sum_j e^{u_j/b}`, so this *is* the exponential mechanism (the Gumbel-max trick;
    Durfee & Rogers 2019, Sec. 4.1). ``noise="laplace"``: :math:`Z_i\\sim\\mathrm{Lap}(2\\Delta/\\varepsilon)`
    (:math:`\\Delta/\\varepsilon` if monotonic), also :math:`\\varepsilon`-DP (Dwork & Roth 2014,
    Claim 3.9) but a different distribution.
    """
    values = _scores(scores)
    scale = _temperature(epsilon=epsilon, sensitivity=sensitivity, monotonic=monotonic)
    gen = _numpy_rng(generator, seed)
    if choice("noise", noise, ("gumbel", "laplace")) == "gumbel":
        noisy = values + gumbel_noise(values.size, scale=scale, generator=gen)
    else:
        noisy = values + gen.laplace(0.0, scale, values.size)
    return int(np.argmax(noisy))  # tie-free: continuous noise; argmax returns the first maximum


def _check_k(k: object, n: int) -> int:
    return int_in("k", k, 1, n)


def gumbel_top_k(scores: object, *, k: int, epsilon: float,
                 sensitivity: float = 1.0, monotonic: bool = False,
                 generator: np.random.Generator | None = None,
                 seed: int | None = None) -> np.ndarray:
    """One-shot private top-k: Gumbel noise once, the ``k`` best in order.

    Same distribution as :func:`peeling_top_k` with ``epsilon`` per pick
    (Durfee & Rogers 2019, Sec. 4.1): the list is k·ε-DP by composition.

    Parameters
    ----------
    scores : array_like
        Utilities, one per candidate (counts); ``sensitivity`` and
        ``monotonic`` as for :func:`exponential_mechanism_probabilities`.
    k : int
        How many candidates to return (best first), 1 to ``len(scores)``.
    epsilon : float
        Budget **per pick**; the list costs ``k * epsilon`` (pure DP).
    generator, seed
        A NumPy generator, or a seed for a new one.
    """
    values = _scores(scores)
    k = _check_k(k, values.size)
    # the Gumbel scale b: 2Δ/ε, or Δ/ε when all scores move together
    b = _temperature(epsilon=epsilon, sensitivity=sensitivity,
                     monotonic=monotonic)
    rng = _numpy_rng(generator, seed)
    noisy = values + gumbel_noise(values.size, scale=b, generator=rng)
    return np.argsort(-noisy, kind="stable")[:k]


def peeling_top_k(scores: object, *, k: int, epsilon: float, sensitivity: float = 1.0,
                  monotonic: bool = False, generator: np.random.Generator | None = None,
                  seed: int | None = None) -> np.ndarray:
    """Private top-k by peeling: k rounds of the exponential mechanism, each without earlier picks.

    Each round is an :math:`\\varepsilon`-DP pick (``epsilon`` per pick) among the candidates not yet
    chosen; the k-fold composition is :math:`k\\varepsilon`-DP (Dwork & Roth 2014, Theorem 3.16).
    Arguments and result as for :func:`gumbel_top_k`.
    """
    values = _scores(scores)
    k = _check_k(k, values.size)
    gen = _numpy_rng(generator, seed)
    remaining = np.arange(values.size)
    picks = []
    for _ in range(k):
        j = exponential_mechanism(values[remaining], epsilon=epsilon, sensitivity=sensitivity,
                                  monotonic=monotonic, generator=gen)
        picks.append(int(remaining[j]))
        remaining = np.delete(remaining, j)
    return np.array(picks, dtype=np.int64)


def top_k_sequence_probability(scores: object, picks: object, *, epsilon: float,
                               sensitivity: float = 1.0, monotonic: bool = False) -> float:
    """Exact probability that peeling (or the one-shot Gumbel top-k) returns ``picks``, in order.

    :math:`\\prod_{r=1}^{k} e^{u_{i_r}/b} / \\sum_{j\\notin\\{i_1..i_{r-1}\\}} e^{u_j/b}` (Durfee & Rogers
    2019, Sec. 4.1), with :math:`b` as in :func:`exponential_mechanism_probabilities`.
    """
    values = _scores(scores)
    order = np.asarray(picks)
    if order.ndim != 1 or order.size == 0 or order.dtype.kind not in "iu":
        raise TypeError("picks must be a non-empty 1-D sequence of integer candidate indices")
    if order.min() < 0 or order.max() >= values.size or np.unique(order).size != order.size:
        raise ValueError(f"picks must be distinct indices in [0, {values.size}), got {order.tolist()}")
    logits = values / _temperature(epsilon=epsilon, sensitivity=sensitivity, monotonic=monotonic)
    remaining = np.ones(values.size, dtype=bool)
    log_p = 0.0
    for i in order:
        top = logits[remaining].max()
        log_p += logits[i] - top - math.log(np.exp(logits[remaining] - top).sum())
        remaining[i] = False
    return float(math.exp(log_p))


def private_quantile(values: object, *, q: float, epsilon: float, candidates: object,
                     generator: np.random.Generator | None = None, seed: int | None = None) -> float:
    """An :math:`\\varepsilon`-DP ``q``-quantile of ``values``, chosen from a public grid.

    The exponential mechanism over ``candidates`` with utility :math:`u(c) = -|\\#\\{x\\le c\\} - qn|`
    (the quantile by exponential mechanism, Smith 2011; McSherry & Talwar 2007). Adding or removing
    one value changes the count by at most 1 and :math:`qn` by :math:`q`, so :math:`\\Delta u\\le 1`.
    The grid must not depend on the data (e.g. 1 to a public maximum).
    """
    data = real_array("values", values).ravel()
    grid = real_array("candidates", candidates).ravel()
    q = in_range("q", q, 0.0, 1.0, closed_high=True)
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError("candidates must be a non-empty, strictly increasing grid of finite values")
    below = np.searchsorted(np.sort(data, kind="stable"), grid, side="right")
    utility = -np.abs(below - q * data.size)
    pick = exponential_mechanism(utility, epsilon=epsilon, sensitivity=1.0,
                                 generator=_numpy_rng(generator, seed))
    return float(grid[pick])
