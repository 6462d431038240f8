"""Auto-checked exercises of chapters 4–7 (federated, user-level, large models, attacks).

Use them through :mod:`privrec.course.exercises` (``from privrec.course import exercises as check``).
"""

from __future__ import annotations

import math

import numpy as np

from .exercise_grading import Feedback, clip_each, grade

__all__ = ["FEDERATED_SOLUTIONS", "fedavg", "fedavgm_step", "dp_fedavg", "group_epsilon",
           "lora_parameter_count", "cold_start_scores", "roc_auc", "tpr_bound"]


def _updates(seed, shapes):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(k, 4)) * 1.5, rng.integers(1, 60, size=k).astype(float))
            for k in shapes]


# ---------------------------------------------------------------------------------------------
# Chapter 4: FedAvg's weighted average; the FedAvgM server step
# ---------------------------------------------------------------------------------------------

def fedavg_solution(updates, n_examples):
    """FedAvg's server average Σₖ nₖΔₖ / Σₖ nₖ (McMahan et al. 2017, Alg. 1)."""
    n = np.asarray(n_examples, dtype=float)
    return (n[:, None] * np.asarray(updates, dtype=float)).sum(axis=0) / n.sum()


def fedavg(attempt) -> Feedback:
    """Check ``attempt(updates, n_examples)``: the (non-private) FedAvg average of client updates.

    ``updates`` is ``(clients, d)``, ``n_examples`` the number of ratings of each client.
    """
    cases = [dict(updates=u, n_examples=n) for u, n in _updates(4, (3, 5, 8))]
    return grade("fedavg", attempt, reference=fedavg_solution, cases=cases, mistakes=[
        (lambda updates, n_examples: np.mean(updates, axis=0),
         "a plain mean gives a client with 2 ratings the same say as one with 50; FedAvg weights "
         "each update by its number of examples: Σ nₖΔₖ / Σ nₖ."),
        (lambda updates, n_examples: (np.asarray(n_examples)[:, None] * updates).sum(axis=0),
         "normalise the weighted sum by the total number of examples Σ nₖ."),
        (lambda updates, n_examples: (np.asarray(n_examples)[:, None] * updates).mean(axis=0),
         "divide the weighted sum by Σ nₖ, not by the number of clients."),
    ], praise="Weighted by examples: right without DP (chapter 5 explains why not under DP).")


def fedavgm_step_solution(weights, velocity, update, *, server_lr, momentum):
    """FedAvgM (Hsu, Qi & Brown 2019): v ← βv + Δ, θ ← θ + η v; returns (θ, v)."""
    velocity = momentum * np.asarray(velocity, dtype=float) + np.asarray(update, dtype=float)
    return np.asarray(weights, dtype=float) + server_lr * velocity, velocity


def fedavgm_step(attempt) -> Feedback:
    """Check ``attempt(weights, velocity, update, *, server_lr, momentum)`` -> ``(weights, velocity)``.

    ``update`` is the averaged client update Δ (pointing where the clients moved).
    """
    rng = np.random.default_rng(6)
    cases = [dict(weights=rng.normal(size=5), velocity=rng.normal(size=5), update=rng.normal(size=5),
                  server_lr=lr, momentum=b) for lr, b in ((1.0, 0.9), (0.5, 0.7), (2.0, 0.5))]

    def ema(weights, velocity, update, *, server_lr, momentum):
        v = momentum * np.asarray(velocity) + (1 - momentum) * np.asarray(update)
        return np.asarray(weights) + server_lr * v, v

    def update_step(weights, velocity, update, *, server_lr, momentum):
        v = momentum * np.asarray(velocity) + np.asarray(update)
        return np.asarray(weights) + server_lr * np.asarray(update), v

    def descent(weights, velocity, update, *, server_lr, momentum):
        v = momentum * np.asarray(velocity) + np.asarray(update)
        return np.asarray(weights) - server_lr * v, v

    return grade("fedavgm_step", attempt, reference=fedavgm_step_solution, cases=cases, mistakes=[
        (ema, "FedAvgM accumulates v ← βv + Δ, not the moving average βv + (1−β)Δ (that is Adam's "
              "first moment, used by FedAdam)."),
        (update_step, "step with the velocity: θ ← θ + η v; stepping with Δ ignores the momentum."),
        (descent, "Δ already points where the clients moved (new − old), so the server ADDS it: "
                  "θ ← θ + η v."),
    ], praise="Server momentum: v ← βv + Δ, θ ← θ + η v.")


# ---------------------------------------------------------------------------------------------
# Chapter 5: DP-FedAvg's aggregate; group privacy
# ---------------------------------------------------------------------------------------------

def dp_fedavg_solution(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise):
    """DP-FedAvg (McMahan et al. 2018): (Σₖ clip(Δₖ) + σ·C·z) / (qN), every client weighted 1."""
    total = clip_each(updates, clip_norm).sum(axis=0)
    return (total + noise_multiplier * clip_norm * np.asarray(noise)) / expected_clients


def _dp_fedavg_mistakes():
    def weighted(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise):
        n = np.asarray(n_examples, dtype=float)
        total = (n[:, None] * clip_each(updates, clip_norm)).sum(axis=0)
        return (total + noise_multiplier * clip_norm * np.asarray(noise)) / n.sum()

    def realised(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise):
        return dp_fedavg_solution(updates, n_examples, clip_norm=clip_norm, noise=noise,
                                  noise_multiplier=noise_multiplier, expected_clients=len(updates))

    def unclipped(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise):
        total = np.asarray(updates).sum(axis=0)
        return (total + noise_multiplier * clip_norm * np.asarray(noise)) / expected_clients

    def sigma_only(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise):
        total = clip_each(updates, clip_norm).sum(axis=0)
        return (total + noise_multiplier * np.asarray(noise)) / expected_clients

    return [
        (weighted, "you weighted the clients by their number of examples: a user with many ratings "
                   "then moves the average by more than C/(qN), so the noise no longer covers one "
                   "user. Under DP every client gets weight 1: (Σ clip(Δₖ) + noise) / (qN)."),
        (realised, "you divided by the number of clients that TOOK PART; under Poisson sampling it "
                   "depends on who joined. Divide by the expected number qN."),
        (unclipped, "clip each client's update to norm ≤ C before summing."),
        (sigma_only, "the noise std is σ·C, not σ."),
    ]


def dp_fedavg(attempt) -> Feedback:
    """Check ``attempt(updates, n_examples, *, clip_norm, noise_multiplier, expected_clients, noise)``.

    ``updates`` is ``(clients, d)`` for the clients sampled this round, ``noise`` a standard normal
    vector of length ``d``. The answer is the user-level DP average that the server applies.
    """
    rng = np.random.default_rng(8)
    cases = [dict(updates=u, n_examples=n, clip_norm=c, noise_multiplier=s, expected_clients=m,
                  noise=rng.normal(size=4))
             for (u, n), c, s, m in zip(_updates(9, (4, 6, 9)), (1.0, 0.5, 2.0), (1.0, 1.5, 0.8),
                                        (5, 10, 7), strict=False)]
    return grade("dp_fedavg", attempt, reference=dp_fedavg_solution, cases=cases,
                 mistakes=_dp_fedavg_mistakes(),
                 praise="One user moves the average by at most C/(qN), whatever their number of ratings.")


def group_epsilon_solution(epsilon, group_size):
    """Group privacy for pure ε-DP: a group of k records is protected at k·ε (Dwork & Roth, Thm 2.2)."""
    return group_size * epsilon


def group_epsilon(attempt) -> Feedback:
    """Check ``attempt(epsilon, group_size)``: the pure-DP guarantee for a user with k ratings."""
    cases = [dict(epsilon=0.5, group_size=4), dict(epsilon=1.0, group_size=100),
             dict(epsilon=0.1, group_size=737)]
    return grade("group_epsilon", attempt, reference=group_epsilon_solution, cases=cases, mistakes=[
        (lambda epsilon, group_size: epsilon,
         "a rating-level ε does not protect a user: each of their k ratings costs ε, so k·ε."),
        (lambda epsilon, group_size: math.sqrt(group_size) * epsilon,
         "√k·ε is what the Gaussian mechanism's ℓ2 sensitivity gives for one bounded release; "
         "group privacy of a pure ε-DP mechanism is k·ε."),
        (lambda epsilon, group_size: epsilon / group_size,
         "a larger group is protected LESS: multiply, k·ε."),
    ], praise="A user with hundreds of ratings gets no meaningful rating-level protection.")


# ---------------------------------------------------------------------------------------------
# Chapter 6: LoRA's parameter count; cold-start scores from text
# ---------------------------------------------------------------------------------------------

def lora_parameter_count_solution(d_in, d_out, rank):
    """Trainable parameters of a LoRA update W + BA, B ∈ R^{d_out×r}, A ∈ R^{r×d_in} (Hu et al. 2022)."""
    return rank * (d_in + d_out)


def lora_parameter_count(attempt) -> Feedback:
    """Check ``attempt(d_in, d_out, rank)``: how many numbers a client uploads for one LoRA layer."""
    cases = [dict(d_in=384, d_out=32, rank=4), dict(d_in=768, d_out=768, rank=8),
             dict(d_in=4096, d_out=1024, rank=16)]
    return grade("lora_parameter_count", attempt, reference=lora_parameter_count_solution,
                 cases=cases, mistakes=[
                     (lambda d_in, d_out, rank: d_in * d_out,
                      "d_in·d_out is the FROZEN weight matrix; LoRA trains only B (d_out×r) and "
                      "A (r×d_in)."),
                     (lambda d_in, d_out, rank: rank * d_in * d_out,
                      "the two factors are ADDED, not multiplied: r·d_in + r·d_out."),
                     (lambda d_in, d_out, rank: rank * (d_in + d_out) + d_in * d_out,
                      "the pretrained weights stay frozen and are never uploaded: count only A and B."),
                 ], praise="Fewer shared numbers: less to noise, fewer bytes per round.")


def cold_start_scores_solution(user_vectors, text_embeddings, adapter):
    """Scores (users × items) of items nobody rated: users · (text embedding · adapter)ᵀ."""
    items = np.asarray(text_embeddings, dtype=float) @ np.asarray(adapter, dtype=float)
    return np.asarray(user_vectors, dtype=float) @ items.T


def cold_start_scores(attempt) -> Feedback:
    """Check ``attempt(user_vectors, text_embeddings, adapter)``: a ``(users, items)`` score matrix.

    ``user_vectors`` is ``(users, d)``, ``text_embeddings`` ``(items, t)`` from the frozen text
    encoder, ``adapter`` the learned ``(t, d)`` map into the recommender's space.
    """
    rng = np.random.default_rng(12)
    cases = [dict(user_vectors=rng.normal(size=(u, d)), text_embeddings=rng.normal(size=(i, d)),
                  adapter=rng.normal(size=(d, d))) for u, i, d in ((3, 5, 4), (2, 6, 3))]
    return grade("cold_start_scores", attempt, reference=cold_start_scores_solution, cases=cases,
                 mistakes=[
                     (lambda user_vectors, text_embeddings, adapter:
                      cold_start_scores_solution(user_vectors, text_embeddings, adapter).T,
                      "your matrix is items × users: return one row per USER (users · itemsᵀ)."),
                     (lambda user_vectors, text_embeddings, adapter:
                      np.asarray(user_vectors) @ np.asarray(text_embeddings).T,
                      "you skipped the adapter: text embeddings live in the encoder's space; map them "
                      "with text_embeddings @ adapter first."),
                     (lambda user_vectors, text_embeddings, adapter:
                      cold_start_scores_solution(user_vectors, text_embeddings, np.asarray(adapter).T),
                      "the adapter maps t → d: multiply text_embeddings @ adapter (not adapter.T)."),
                 ], praise="A new item is scored from its text alone: no rating, no privacy cost.")


# ---------------------------------------------------------------------------------------------
# Chapter 9: ROC AUC with ties; the DP cap on an attack's TPR
# ---------------------------------------------------------------------------------------------

def roc_auc_solution(member_scores, nonmember_scores):
    """Pr[member score > non-member score] + ½ Pr[equal]: the area under the ROC curve."""
    a = np.asarray(member_scores, dtype=float)[:, None]
    b = np.asarray(nonmember_scores, dtype=float)[None, :]
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size))


def roc_auc(attempt) -> Feedback:
    """Check ``attempt(member_scores, nonmember_scores)``: the attack's AUC (higher = "member")."""
    rng = np.random.default_rng(7)
    cases = [dict(member_scores=rng.integers(0, 5, 30).astype(float),
                  nonmember_scores=rng.integers(0, 4, 40).astype(float)),
             dict(member_scores=np.array([0.9, 0.5, 0.5, 0.2]), nonmember_scores=np.array([0.5, 0.1])),
             dict(member_scores=rng.normal(0.3, 1, 25), nonmember_scores=rng.normal(0, 1, 20))]
    def tie_share(member_scores, nonmember_scores):
        return 0.5 * (np.asarray(member_scores)[:, None] == np.asarray(nonmember_scores)[None, :]).mean()

    def strict(member_scores, nonmember_scores):
        return (roc_auc_solution(member_scores, nonmember_scores)
                - tie_share(member_scores, nonmember_scores))

    def loose(member_scores, nonmember_scores):
        return (roc_auc_solution(member_scores, nonmember_scores)
                + tie_share(member_scores, nonmember_scores))

    return grade("roc_auc", attempt, reference=roc_auc_solution, cases=cases, mistakes=[
        (strict, "equal scores count as HALF a win: with '>' only, ties count as losses and a "
                 "coin-flip attack with coarse scores looks worse than chance."),
        (loose, "equal scores count as HALF a win: with '>=' ties count as wins and the attack looks "
                "better than it is."),
        (lambda member_scores, nonmember_scores: 1 - roc_auc_solution(member_scores, nonmember_scores),
         "your AUC is inverted: a higher score must mean 'member'."),
    ], praise="Ties count ½, so an uninformative attack scores exactly 0.5.")


def tpr_bound_solution(epsilon, delta, fpr):
    """The largest TPR an attack on an (ε, δ)-DP model can reach at ``fpr`` (tight, two-sided).

    (ε, δ)-DP bounds both error rates of any test between neighbouring data sets (Kairouz, Oh and
    Viswanath 2015, Theorem 2.1): TPR ≤ e^ε·FPR + δ, and the miss rate FNR = 1 − TPR ≥
    e^{−ε}(1 − δ − FPR). So TPR ≤ min(1, e^ε·FPR + δ, 1 − e^{−ε}(1 − δ − FPR)); the second bound
    is the binding one at large FPR.
    """
    return min(1.0, math.exp(epsilon) * fpr + delta,
               1.0 - math.exp(-epsilon) * (1.0 - delta - fpr))


def _tpr_mistakes():
    def one_sided(epsilon, delta, fpr):
        return min(1.0, math.exp(epsilon) * fpr + delta)

    def no_delta(epsilon, delta, fpr):
        return min(1.0, math.exp(epsilon) * fpr, 1.0 - math.exp(-epsilon) * (1.0 - fpr))

    def uncapped(epsilon, delta, fpr):
        return math.exp(epsilon) * fpr + delta

    def linear(epsilon, delta, fpr):
        return min(1.0, (1 + epsilon) * fpr + delta, 1.0 - (1.0 - delta - fpr) / (1 + epsilon))

    return [
        (one_sided, "min(1, e^ε·FPR + δ) is valid but not the largest reachable TPR: (ε, δ)-DP also "
                    "bounds the miss rate, 1 − TPR ≥ e^(−ε)(1 − δ − FPR); take the smaller bound."),
        (no_delta, "add δ: an (ε, δ)-DP guarantee allows TPR ≤ e^ε·FPR + δ (and the miss-rate bound "
                   "uses 1 − δ − FPR)."),
        (uncapped, "a rate is at most 1, and (ε, δ)-DP also bounds the miss rate: "
                   "TPR ≤ min(1, e^ε·FPR + δ, 1 − e^(−ε)(1 − δ − FPR))."),
        (linear, "1 + ε is e^ε only for tiny ε; use the exact e^ε."),
    ]


def tpr_bound(attempt) -> Feedback:
    """Check ``attempt(epsilon, delta, fpr)``: the DP cap on a membership attack's true-positive rate.

    The hidden cases include large false-positive rates, where the miss-rate side of the
    (ε, δ)-DP region is the binding constraint (see :func:`tpr_bound_solution`).
    """
    cases = [dict(epsilon=1.0, delta=1e-5, fpr=0.01), dict(epsilon=4.0, delta=1e-5, fpr=0.001),
             dict(epsilon=8.0, delta=1e-7, fpr=0.01), dict(epsilon=0.5, delta=0.001, fpr=0.1),
             dict(epsilon=1.0, delta=1e-5, fpr=0.5), dict(epsilon=2.0, delta=1e-5, fpr=0.3)]
    return grade("tpr_bound", attempt, reference=tpr_bound_solution, cases=cases,
                 mistakes=_tpr_mistakes(),
                 praise="Both sides of the (ε, δ) region; at large ε the cap is vacuous: DP then "
                        "promises nothing an attack can see.")


FEDERATED_SOLUTIONS = {"fedavg": fedavg_solution, "fedavgm_step": fedavgm_step_solution,
                       "dp_fedavg": dp_fedavg_solution, "group_epsilon": group_epsilon_solution,
                       "lora_parameter_count": lora_parameter_count_solution,
                       "cold_start_scores": cold_start_scores_solution,
                       "roc_auc": roc_auc_solution, "tpr_bound": tpr_bound_solution}
