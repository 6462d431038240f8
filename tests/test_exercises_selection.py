"""The selection exercises' checkers pass right answers and name each wrong one (chapter 2)."""

from __future__ import annotations

import numpy as np
import pytest

from privrec.course import exercises_selection as check
from privrec.dp.selection import exponential_mechanism_probabilities


def _stable_softmax(scores, epsilon, sensitivity):
    return exponential_mechanism_probabilities(scores, epsilon=epsilon, sensitivity=sensitivity)


@pytest.mark.parametrize("answer", [
    check.SOLUTIONS["exponential_probabilities"],
    _stable_softmax,  # the library agrees with the reference
])
def test_right_probabilities_pass(answer):
    assert check.exponential_probabilities(answer)


@pytest.mark.parametrize("answer, words", [
    (lambda scores, epsilon, sensitivity: _stable_softmax(scores, 2 * epsilon, sensitivity),
     "factor 2"),
    (lambda scores, epsilon, sensitivity: np.exp(epsilon * scores / (2 * sensitivity))
     / np.exp(epsilon * scores / (2 * sensitivity)).sum(), "overflows"),
    (lambda scores, epsilon, sensitivity: scores / scores.sum(), "not DP"),
    (lambda scores, epsilon, sensitivity: _stable_softmax(scores, 1 / epsilon, sensitivity),
     "numerator"),
])
def test_wrong_probabilities_are_named(answer, words):
    with np.errstate(over="ignore", invalid="ignore"):
        feedback = check.exponential_probabilities(answer)
    assert not feedback and words in feedback.hint


@pytest.mark.parametrize("answer", [
    check.SOLUTIONS["gumbel_top_k"],
    # equivalent: scale the scores instead of the noise
    lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(
        -(epsilon * scores / (2 * sensitivity) + gumbel), kind="stable")[:k],
])
def test_right_top_k_passes(answer):
    assert check.gumbel_top_k(answer)


@pytest.mark.parametrize("answer, words", [
    (lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(-scores, kind="stable")[:k],
     "TRUE top-k"),
    (lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(-(scores + gumbel), kind="stable")[:k],
     "scale the noise"),
    (lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(
        -(scores + epsilon / (2 * sensitivity) * gumbel), kind="stable")[:k], "MORE noise"),
    (lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(
        -(scores + sensitivity / epsilon * gumbel), kind="stable")[:k], "same direction"),
    (lambda scores, k, epsilon, sensitivity, gumbel: np.argsort(
        scores + 2 * sensitivity / epsilon * gumbel, kind="stable")[:k], "SMALLEST"),
    (lambda scores, k, epsilon, sensitivity, gumbel: list(range(k)), "expected"),
])
def test_wrong_top_k_is_named(answer, words):
    feedback = check.gumbel_top_k(answer)
    assert not feedback and words in feedback.hint


def test_not_attempted_is_not_a_pass():
    def stub(scores, k, epsilon, sensitivity, gumbel):
        raise NotImplementedError

    assert not check.gumbel_top_k(stub)
