"""Chapter 8's auto-checked exercises: the causal attention mask and exposure from a rank.

Usage in the chapter::

    from privrec.course import exercises_transformer as check
    check.causal_mask(my_mask)

Each checker returns a :class:`~privrec.course.exercise_grading.Feedback` and names the typical
mistake it recognises; ``SOLUTIONS`` maps each checker to its reference solution.
"""

from __future__ import annotations

import math

import numpy as np

from .exercise_grading import Feedback, grade

__all__ = ["SOLUTIONS", "causal_mask", "exposure_from_rank"]


def causal_mask_solution(length):
    """``(length, length)`` booleans: position ``t`` may attend to ``j`` iff ``j <= t``."""
    return np.tril(np.ones((length, length), dtype=bool))


def causal_mask(attempt) -> Feedback:
    """Check ``attempt(length)``: the boolean matrix of which key ``j`` query ``t`` may see."""
    cases = [dict(length=n) for n in (1, 4, 7)]
    return grade("causal_mask", attempt, reference=causal_mask_solution, cases=cases, mistakes=[
        (lambda length: np.tril(np.ones((length, length), dtype=bool), k=-1),
         "off by one: position t must also see itself (j <= t, not j < t), or the first position "
         "has nothing to attend to and no position sees the item it is predicting from."),
        (lambda length: np.triu(np.ones((length, length), dtype=bool)),
         "that is the FUTURE: rows are queries t, columns keys j; allow j <= t (lower triangle)."),
        (lambda length: np.tril(np.ones((length, length), dtype=bool), k=1),
         "off by one the other way: j = t + 1 is the item to predict; seeing it leaks the answer."),
        (lambda length: np.ones((length, length), dtype=bool),
         "nothing is masked: every position would read the items it has to predict."),
    ], praise="Position t predicts item t + 1 from items 0..t only.")


def exposure_from_rank_solution(rank, space_size):
    """Carlini et al.'s exposure: ``log2(space_size) - log2(rank)`` bits."""
    return math.log2(space_size) - math.log2(rank)


def exposure_from_rank(attempt) -> Feedback:
    """Check ``attempt(rank, space_size)``: the exposure of a secret ranked ``rank`` (1 = most
    likely) among ``space_size`` candidates."""
    cases = [dict(rank=1, space_size=1024), dict(rank=512, space_size=1024),
             dict(rank=3, space_size=1682 ** 4), dict(rank=1000, space_size=10 ** 6)]
    return grade("exposure_from_rank", attempt, reference=exposure_from_rank_solution,
                 cases=cases, mistakes=[
        (lambda rank, space_size: math.log(space_size) - math.log(rank),
         "exposure is in bits: use log2, not the natural log."),
        (lambda rank, space_size: math.log2(rank) - math.log2(space_size),
         "the sign is flipped: a secret ranked FIRST is the most exposed, log2|R| - log2 rank."),
        (lambda rank, space_size: math.log2(rank),
         "log2(rank) alone grows as the secret gets LESS likely; subtract it from log2|R|."),
    ], praise="A secret ranked first among 2^k candidates has exposure k bits; chance is ~1.44.")


SOLUTIONS = {"causal_mask": causal_mask_solution,
             "exposure_from_rank": exposure_from_rank_solution}
