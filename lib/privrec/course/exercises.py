"""Auto-checked exercises: the reader writes a function, one call checks it on hidden cases.

Usage in a chapter:

>>> from privrec.course import exercises as check
>>> def my_scale(sensitivity, epsilon):
...     return 1 / (epsilon * sensitivity)
>>> check.laplace_scale(my_scale)  # doctest: +ELLIPSIS
TRY AGAIN laplace_scale: that is the article's 1/(ε·Δs): it SHRINKS the noise as...
>>> check.laplace_scale(lambda sensitivity, epsilon: sensitivity / epsilon)  # doctest: +ELLIPSIS
PASS laplace_scale: correct on all 4 hidden cases. ...

Every checker returns a :class:`~privrec.course.exercise_grading.Feedback` (one paragraph in a
notebook, wrapped at 80 characters, truthy when the attempt is right; "YOUR TURN" while the stub is
unanswered) and names the common mistake it recognises: the article's inverted
Laplace scale :math:`1/(\\varepsilon\\Delta s)`, dividing a DP-SGD sum by the realised batch instead
of :math:`qN`, noise on touched rows only, tuning on test data, unstable tie-breaking in top-K,
example-weighted averaging under DP, … ``SOLUTIONS`` maps each checker to its reference solution
(the chapters show it in their solutions). Chapters 1–3 are here, 4–6 and 9 in
:mod:`privrec.course.exercises_federated` (re-exported).
"""

from __future__ import annotations

import math

import numpy as np

from .exercise_grading import Feedback, clip_each, grade
from .exercises_federated import (
    FEDERATED_SOLUTIONS,
    cold_start_scores,
    dp_fedavg,
    fedavg,
    fedavgm_step,
    group_epsilon,
    lora_parameter_count,
    roc_auc,
    tpr_bound,
)

__all__ = ["Feedback", "SOLUTIONS", "top_k", "choose_config", "laplace_scale",
           "krr_keep_probability", "dp_sgd_gradient", "noisy_table_gradient", "fedavg",
           "fedavgm_step", "dp_fedavg", "group_epsilon", "lora_parameter_count",
           "cold_start_scores", "roc_auc", "tpr_bound"]


# ---------------------------------------------------------------------------------------------
# Chapter 1: top-K with an explicit tie rule; choosing hyperparameters on validation data
# ---------------------------------------------------------------------------------------------

def top_k_solution(scores, k):
    """Each row's ``k`` highest-scoring item ids, best first, ties broken by the smaller id."""
    scores = np.asarray(scores, dtype=float)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _top_k_cases():
    rng = np.random.default_rng(11)
    return [dict(scores=rng.normal(size=(3, 12)).round(3), k=4),
            dict(scores=rng.integers(0, 4, size=(4, 40)).astype(float), k=10),
            dict(scores=np.array([[1.0, 2.0, 2.0, 0.5, 2.0, 1.0]]), k=2)]


def _top_k_ties(case, answer, expected):
    scores = np.asarray(case["scores"], dtype=float)
    if answer.shape == expected.shape and np.all((answer >= 0) & (answer < scores.shape[1])):
        picked = np.take_along_axis(scores, answer.astype(int), axis=1)
        wanted = np.take_along_axis(scores, expected.astype(int), axis=1)
        if np.array_equal(picked, wanted):
            return ("your items have the right scores, but equal scores are ordered differently: "
                    "break ties by the smaller item id with a stable sort, e.g. "
                    "np.argsort(-scores, axis=1, kind='stable') (a bare argsort/topk orders ties "
                    "differently on different CPUs).")
    return None


def top_k(attempt) -> Feedback:
    """Check ``attempt(scores, k)``: an array ``(users, k)`` of item ids, best first, ties -> smaller id.

    Parameters
    ----------
    attempt:
        The reader's function; ``scores`` is a ``(users, items)`` NumPy array.

    Returns
    -------
    Feedback
    """
    return grade("top_k", attempt, reference=top_k_solution, cases=_top_k_cases(), mistakes=[
        (lambda scores, k: np.argsort(scores, axis=1, kind="stable")[:, :k],
         "you returned the k LOWEST scores: sort by -score (descending)."),
        (lambda scores, k: np.argsort(scores, axis=1, kind="stable")[:, ::-1][:, :k],
         "reversing an ascending sort puts the LARGER id first among equal scores; the book's rule "
         "is the smaller id first: np.argsort(-scores, axis=1, kind='stable')."),
    ], diagnose=_top_k_ties, praise="Ties are broken by item id, so every CPU ranks the same.")


def choose_config_solution(results):
    """Index of the configuration with the smallest validation RMSE (ties: the first listed)."""
    return min(range(len(results)), key=lambda i: results[i]["val_rmse"])


def _config_cases():
    def rows(val, test):
        return [dict(dim=d, reg=r, val_rmse=v, test_rmse=t)
                for (d, r), v, t in zip([(16, 0.03), (16, 0.1), (64, 0.03), (64, 0.1)], val, test,
                                        strict=True)]
    return [dict(results=rows([0.95, 0.93, 0.94, 0.96], [0.94, 0.935, 0.92, 0.95])),
            dict(results=rows([0.91, 0.92, 0.90, 0.90], [0.89, 0.91, 0.92, 0.93])),
            dict(results=rows([0.97, 0.96, 0.99, 0.98], [0.98, 0.97, 0.95, 0.99])),
            # a tie in validation RMSE where the later configuration has the lower TEST RMSE: only
            # the stated tie rule (first listed) picks index 1; a test-RMSE tie-break picks 2
            dict(results=rows([0.93, 0.92, 0.92, 0.95], [0.90, 0.94, 0.91, 0.93]))]


def _config_mistakes():
    def by_test(results):
        return min(range(len(results)), key=lambda i: results[i]["test_rmse"])

    def tie_by_test(results):
        return min(range(len(results)), key=lambda i: (results[i]["val_rmse"], results[i]["test_rmse"]))

    def largest(results):
        return max(range(len(results)), key=lambda i: results[i]["val_rmse"])

    def last_of_ties(results):
        return max(range(len(results)), key=lambda i: (-results[i]["val_rmse"], i))

    return [
        (by_test, "you chose by TEST RMSE: that makes the reported test score optimistic. Choose on "
                  "the validation split carved from the training data; test once."),
        (tie_by_test, "you broke a tie in validation RMSE with TEST RMSE: that is still choosing on "
                      "the test set. Break ties by a rule fixed in advance (the first listed)."),
        (largest, "you chose the LARGEST validation RMSE: a lower RMSE is better."),
        (last_of_ties, "on a tie in validation RMSE keep the FIRST configuration listed (an explicit, "
                       "reproducible tie rule)."),
    ]


def choose_config(attempt) -> Feedback:
    """Check ``attempt(results)``: the index of the configuration to report.

    ``results`` is a list of dicts with ``dim``, ``reg``, ``val_rmse`` and ``test_rmse``; the
    answer is chosen on validation data only, ties going to the first listed configuration. One
    hidden case has a validation tie whose later member has the lower test RMSE, so an attempt
    that consults ``test_rmse`` anywhere (even only to break ties) fails.
    """
    return grade("choose_config", attempt, reference=choose_config_solution, cases=_config_cases(),
                 mistakes=_config_mistakes(),
                 praise="Chosen on validation data with a fixed tie rule; the test set stays "
                        "untouched.")


# ---------------------------------------------------------------------------------------------
# Chapter 2: the Laplace scale; k-ary randomized response
# ---------------------------------------------------------------------------------------------

def laplace_scale_solution(sensitivity, epsilon):
    """The Laplace scale b = Δ₁/ε of an ε-DP release (Dwork & Roth 2014, Def. 3.3)."""
    return sensitivity / epsilon


LAPLACE_CASES = [dict(sensitivity=1.0, epsilon=0.5), dict(sensitivity=4.0, epsilon=0.1),
                 dict(sensitivity=2.0, epsilon=2.0), dict(sensitivity=0.5, epsilon=8.0)]


def laplace_scale(attempt) -> Feedback:
    """Check ``attempt(sensitivity, epsilon)``: the scale b of Laplace noise for an ε-DP release."""
    return grade("laplace_scale", attempt, reference=laplace_scale_solution, cases=LAPLACE_CASES,
                 mistakes=[
                     (lambda sensitivity, epsilon: 1 / (epsilon * sensitivity),
                      "that is the article's 1/(ε·Δs): it SHRINKS the noise as the sensitivity grows. "
                      "The scale must grow with the sensitivity and shrink with ε: b = Δ₁/ε."),
                     (lambda sensitivity, epsilon: epsilon / sensitivity,
                      "ε/Δ is the article's formula read as a rate: it adds MORE noise for a LARGER ε. "
                      "Use b = Δ₁/ε."),
                     (lambda sensitivity, epsilon: 1 / epsilon,
                      "1/ε is right only for sensitivity 1: scale by the sensitivity, b = Δ₁/ε."),
                     (lambda sensitivity, epsilon: sensitivity * epsilon,
                      "Δ·ε adds more noise for weaker privacy: divide, b = Δ₁/ε."),
                 ], praise="b = Δ₁/ε: more sensitivity or a smaller ε means more noise.")


def krr_keep_probability_solution(epsilon, k):
    """Probability that k-ary randomized response reports the true value: e^ε / (e^ε + k − 1)."""
    return math.exp(epsilon) / (math.exp(epsilon) + k - 1)


def krr_keep_probability(attempt) -> Feedback:
    """Check ``attempt(epsilon, k)``: k-RR's probability of reporting the true category."""
    cases = [dict(epsilon=1.0, k=2), dict(epsilon=1.0, k=5), dict(epsilon=0.5, k=19),
             dict(epsilon=3.0, k=10)]
    return grade("krr_keep_probability", attempt, reference=krr_keep_probability_solution,
                 cases=cases, mistakes=[
                     (lambda epsilon, k: math.exp(epsilon) / (1 + math.exp(epsilon)),
                      "e^ε/(1+e^ε) is the BINARY case: with k categories the truth competes with k−1 "
                      "others, p = e^ε/(e^ε+k−1)."),
                     (lambda epsilon, k: math.exp(epsilon) / (math.exp(epsilon) + k),
                      "the denominator counts the true value once and the k−1 OTHER values: "
                      "e^ε + k − 1, not e^ε + k."),
                     (lambda epsilon, k: 1 / k,
                      "1/k is pure noise (ε = 0): the truth must be e^ε times as likely as any other "
                      "value."),
                 ], praise="The ratio p/q = e^ε between truth and any other value is exactly the budget.")


# ---------------------------------------------------------------------------------------------
# Chapter 3: the DP-SGD gradient; noise on every row of an embedding table
# ---------------------------------------------------------------------------------------------

def dp_sgd_gradient_solution(per_example_grads, *, clip_norm, noise_multiplier,
                             expected_batch_size, noise):
    """(Σᵢ clip(gᵢ) + σ·C·z) / (qN) with z ~ N(0, I) given (Abadi et al. 2016, Alg. 1)."""
    total = clip_each(per_example_grads, clip_norm).sum(axis=0)
    return (total + noise_multiplier * clip_norm * np.asarray(noise)) / expected_batch_size


def _dpsgd_cases():
    rng = np.random.default_rng(3)
    return [dict(per_example_grads=rng.normal(size=(n, 5)) * scale, clip_norm=c,
                 noise_multiplier=s, expected_batch_size=b, noise=rng.normal(size=5))
            for n, scale, c, s, b in ((7, 1.0, 1.0, 1.1, 10), (12, 0.3, 0.5, 2.0, 8),
                                      (3, 2.0, 1.5, 0.7, 5))]


def dp_sgd_gradient(attempt) -> Feedback:
    """Check ``attempt(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise)``.

    ``per_example_grads`` is ``(batch, d)``: one row per sampled example (the batch came from
    Poisson sampling, so its size varies); ``noise`` is a standard normal vector of length ``d``
    to scale. The answer is the noisy average gradient of DP-SGD.
    """
    def realised(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise):
        return dp_sgd_gradient_solution(per_example_grads, clip_norm=clip_norm, noise=noise,
                                        noise_multiplier=noise_multiplier,
                                        expected_batch_size=len(per_example_grads))

    def sigma_only(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise):
        total = clip_each(per_example_grads, clip_norm).sum(axis=0) + noise_multiplier * np.asarray(noise)
        return total / expected_batch_size

    def unclipped(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise):
        total = np.asarray(per_example_grads).sum(axis=0)
        return (total + noise_multiplier * clip_norm * np.asarray(noise)) / expected_batch_size

    def clip_sum(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise):
        total = clip_each(np.asarray(per_example_grads).sum(axis=0), clip_norm)
        return (total + noise_multiplier * clip_norm * np.asarray(noise)) / expected_batch_size

    def noise_after(per_example_grads, *, clip_norm, noise_multiplier, expected_batch_size, noise):
        mean = clip_each(per_example_grads, clip_norm).sum(axis=0) / expected_batch_size
        return mean + noise_multiplier * clip_norm * np.asarray(noise)

    return grade("dp_sgd_gradient", attempt, reference=dp_sgd_gradient_solution,
                 cases=_dpsgd_cases(), mistakes=[
                     (realised, "you divided by the REALISED batch size: under Poisson sampling it "
                                "depends on who was sampled, so it leaks membership. Divide by the "
                                "expected batch size qN (a public constant)."),
                     (sigma_only, "the noise std is σ·C, not σ: the noise multiplier is relative to "
                                  "the clip norm (the sensitivity of the clipped sum)."),
                     (unclipped, "you did not clip: without clipping one example can move the sum "
                                 "arbitrarily far, and no amount of noise bounds its influence."),
                     (clip_sum, "clip EACH example's gradient to norm ≤ C, then sum; clipping the sum "
                                "bounds nothing about one example's contribution."),
                     (noise_after, "add the noise to the SUM, then divide the noisy sum by qN; noise "
                                   "added after dividing is qN times too large."),
                 ], praise="Clip per example, sum, add N(0, σ²C²), divide by qN.")


def noisy_table_gradient_solution(rows, row_grads, *, n_rows, std, noise):
    """Scatter-add the clipped row gradients into the table and add noise to EVERY row."""
    table = np.zeros((n_rows, np.shape(row_grads)[1]))
    np.add.at(table, np.asarray(rows, dtype=int), np.asarray(row_grads, dtype=float))
    return table + std * np.asarray(noise)


def noisy_table_gradient(attempt) -> Feedback:
    """Check ``attempt(rows, row_grads, *, n_rows, std, noise)``: the noisy gradient of a table.

    ``rows[j]`` is the embedding row that example ``j`` touches (rows may repeat), ``row_grads``
    the already clipped ``(len(rows), d)`` gradients, ``noise`` a standard normal ``(n_rows, d)``
    array. The answer is the ``(n_rows, d)`` noisy summed gradient.
    """
    rng = np.random.default_rng(5)
    cases = [dict(rows=np.array(r), row_grads=rng.normal(size=(len(r), 3)), n_rows=n, std=s,
                  noise=rng.normal(size=(n, 3)))
             for r, n, s in (([0, 2, 2, 5], 7, 1.2), ([1, 1, 1], 4, 0.5), ([3, 0, 4, 4, 6], 9, 2.0))]

    def touched_only(rows, row_grads, *, n_rows, std, noise):
        table = noisy_table_gradient_solution(rows, row_grads, n_rows=n_rows, std=0.0, noise=noise)
        touched = np.unique(np.asarray(rows, dtype=int))
        table[touched] += std * np.asarray(noise)[touched]
        return table

    def overwritten(rows, row_grads, *, n_rows, std, noise):
        table = np.zeros((n_rows, np.shape(row_grads)[1]))
        table[np.asarray(rows, dtype=int)] = row_grads
        return table + std * np.asarray(noise)

    return grade("noisy_table_gradient", attempt, reference=noisy_table_gradient_solution,
                 cases=cases, mistakes=[
                     (touched_only, "noise only on the TOUCHED rows: which rows are non-zero then "
                                    "reveals which items were in the batch. Add noise to every row "
                                    "of the table."),
                     (overwritten, "repeated rows were OVERWRITTEN: table[rows] = grads keeps only "
                                   "the last gradient of a row; accumulate with np.add.at (or "
                                   "torch's index_add_)."),
                     (lambda rows, row_grads, *, n_rows, std, noise: noisy_table_gradient_solution(
                         rows, row_grads, n_rows=n_rows, std=1.0, noise=noise),
                      "scale the standard normal noise by std."),
                 ], praise="Every row is noised, so the released gradient hides which items were rated.")


SOLUTIONS = {"top_k": top_k_solution, "choose_config": choose_config_solution,
             "laplace_scale": laplace_scale_solution,
             "krr_keep_probability": krr_keep_probability_solution,
             "dp_sgd_gradient": dp_sgd_gradient_solution,
             "noisy_table_gradient": noisy_table_gradient_solution, **FEDERATED_SOLUTIONS}
