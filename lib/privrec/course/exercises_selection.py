"""Auto-checked exercises on private selection (chapter 2): the exponential mechanism, the Gumbel trick.

Usage in a chapter:

>>> from privrec.course import exercises_selection as check
>>> check.gumbel_top_k(lambda scores, k, epsilon, sensitivity, gumbel: list(range(k)))
... # doctest: +ELLIPSIS
TRY AGAIN gumbel_top_k: ...

Like :mod:`privrec.course.exercises`, every checker returns a
:class:`~privrec.course.exercise_grading.Feedback` and names the mistake it recognises; the
randomness is handed to the reader's function (standard Gumbel draws), so the check is exact.
``SOLUTIONS`` maps each checker to its reference solution.
"""

from __future__ import annotations

import numpy as np

from .exercise_grading import Feedback, grade

__all__ = ["SOLUTIONS", "exponential_probabilities", "gumbel_top_k"]


def exponential_probabilities_solution(scores, epsilon, sensitivity):
    """The exponential mechanism's distribution, ∝ exp(ε·u/(2Δ))
    (McSherry & Talwar 2007), the largest logit subtracted first."""
    logits = epsilon * np.asarray(scores, dtype=float) / (2 * sensitivity)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def _probability_cases():
    return [dict(scores=np.array([3.0, 1.0, 2.5, 0.0]), epsilon=1.0, sensitivity=1.0),
            dict(scores=np.array([10.0, 12.0, 11.0]), epsilon=0.5, sensitivity=2.0),
            dict(scores=np.array([583.0, 509.0, 508.0, 507.0, 485.0]), epsilon=8.0, sensitivity=1.0)]


def _softmax(logits):
    weights = np.exp(logits - np.max(logits))
    return weights / weights.sum()


def _overflow(case, answer, expected):
    if not np.all(np.isfinite(answer)):
        return ("your probabilities contain inf or nan: exp(ε·u/(2Δ)) overflows for large counts. "
                "Subtract the largest logit before exponentiating (it cancels in the ratio).")
    return None


def exponential_probabilities(attempt) -> Feedback:
    """Check ``attempt(scores, epsilon, sensitivity)``: the exponential mechanism's probabilities."""
    return grade("exponential_probabilities", attempt, reference=exponential_probabilities_solution,
                 cases=_probability_cases(), mistakes=[
                     (lambda scores, epsilon, sensitivity: _softmax(epsilon * scores / sensitivity),
                      "you dropped the factor 2: exp(ε·u/Δ) is ε-DP only when every score moves in the "
                      "same direction between neighbours; the general mechanism uses exp(ε·u/(2Δ))."),
                     (lambda scores, epsilon, sensitivity: _softmax(scores / (2 * epsilon * sensitivity)),
                      "ε belongs in the numerator: a larger budget must make the best candidate MORE "
                      "likely, exp(ε·u/(2Δ))."),
                     (lambda scores, epsilon, sensitivity: np.asarray(scores) / np.sum(scores),
                      "probabilities proportional to the scores are not DP (and ignore ε): weight each "
                      "candidate by exp(ε·u/(2Δ))."),
                 ], diagnose=_overflow,
                 praise="Ratios of probabilities change by at most e^ε when any score moves by Δ.")


def gumbel_top_k_solution(scores, k, epsilon, sensitivity, gumbel):
    """One-shot Gumbel top-k (Durfee & Rogers 2019): the k largest
    u_i + b·G_i with b = 2Δ/ε, best first; ties: the smaller index."""
    scale = 2 * sensitivity / epsilon
    noisy = np.asarray(scores, dtype=float) + scale * np.asarray(gumbel)
    return np.argsort(-noisy, kind="stable")[:k]


def _top_k_cases():
    rng = np.random.default_rng(19)
    return [dict(scores=np.array([5.0, 1.0, 4.0, 3.0, 2.0, 0.0]), k=3, epsilon=2.0, sensitivity=1.0,
                 gumbel=rng.gumbel(size=6)),
            dict(scores=rng.integers(0, 30, 40).astype(float), k=5, epsilon=1.0, sensitivity=1.0,
                 gumbel=rng.gumbel(size=40)),
            dict(scores=rng.integers(0, 30, 25).astype(float), k=4, epsilon=0.5, sensitivity=2.0,
                 gumbel=rng.gumbel(size=25))]


def gumbel_top_k(attempt) -> Feedback:
    """Check ``attempt(scores, k, epsilon, sensitivity, gumbel)``: the one-shot Gumbel top-k.

    ``gumbel`` holds one standard Gumbel draw per candidate; the answer is the ``k`` indices with
    the largest noisy scores, best first (noise scale :math:`2\\Delta/\\varepsilon`).
    """
    def noisy(scores, scale, gumbel):
        return np.asarray(scores) + scale * np.asarray(gumbel)

    return grade("gumbel_top_k", attempt, reference=gumbel_top_k_solution, cases=_top_k_cases(),
                 mistakes=[
                     (lambda scores, k, epsilon, sensitivity, gumbel:
                      np.argsort(-np.asarray(scores), kind="stable")[:k],
                      "you returned the TRUE top-k: without noise the list is not private at all."),
                     (lambda scores, k, epsilon, sensitivity, gumbel:
                      np.argsort(-noisy(scores, 1.0, gumbel), kind="stable")[:k],
                      "scale the noise: standard Gumbel noise is the mechanism only at 2Δ/ε = 1. Add "
                      "(2Δ/ε)·G to each score."),
                     (lambda scores, k, epsilon, sensitivity, gumbel:
                      np.argsort(-noisy(scores, epsilon / (2 * sensitivity), gumbel), kind="stable")[:k],
                      "the noise scale is 2Δ/ε, not ε/(2Δ): more privacy (smaller ε) needs MORE noise."),
                     (lambda scores, k, epsilon, sensitivity, gumbel:
                      np.argsort(-noisy(scores, sensitivity / epsilon, gumbel), kind="stable")[:k],
                      "Δ/ε is the scale for scores that all move in the same direction; the general "
                      "mechanism needs 2Δ/ε."),
                     (lambda scores, k, epsilon, sensitivity, gumbel:
                      np.argsort(noisy(scores, 2 * sensitivity / epsilon, gumbel), kind="stable")[:k],
                      "you returned the k SMALLEST noisy scores: sort by -(score + noise)."),
                 ], praise="Noise once, sort once: the same distribution as k exponential mechanisms "
                           "in a row, so the list costs k·ε.")


SOLUTIONS = {"exponential_probabilities": exponential_probabilities_solution,
             "gumbel_top_k": gumbel_top_k_solution}
"""Reference solution of each checker (the chapter shows them in its solutions)."""
