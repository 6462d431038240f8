"""Chapter 9's experiments: attribute inference, membership inference and the one-run audit.

Each ``*_experiment`` runs one measurement of the chapter and returns JSON-ready numbers;
:func:`cached` memoises it on disk, keyed on its settings and on the source of every module it
depends on (:func:`privrec.course.book.cached_json`). The ``*_table`` functions turn results into
the compact tables the page prints (each fits the text column).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd

from ...attacks import audit, inference, membership
from ...attacks.audit import DPSGD, TouchedRowsNoiseDPSGD, UnclippedDPSGD, audit_dpsgd, canary_ratings
from ...attacks.inference import attribute_inference_auc, clopper_pearson, dp_tpr_bound, item_set_features
from ...attacks.membership import candidate_split, membership_attack
from ...central import dpsgd, per_example
from ...central.dpsgd import fit_dpsgd
from ...central.per_example import mf_per_example_gradients, per_example_norms
from ...core.checks import epsilon_or_inf, in_range
from ...dp import accounting, ledger, local_dp, primitives
from ...dp.local_dp import randomized_response
from ...recsys import data, models, train
from ...recsys.models import BiasedMF
from ...recsys.train import fit_explicit, ratings_to_tensors
from ..book import cached_json

__all__ = ["DPSGD_SETTINGS", "MU_PUBLIC", "ATTACKS", "TRAINERS", "cached", "user_attributes",
           "attribute_experiment", "membership_experiment", "audit_experiment", "membership_table",
           "cap_violations", "audit_table", "canary_gradient_norm"]

#: Chapter 3's naive DP-SGD (dim 4), the model every private attack and audit targets.
DPSGD_SETTINGS = {"epochs": 20, "sample_rate": 0.1, "clip_norm": 0.5, "lr": 0.05, "reg": 0.05}
#: The public constant that initialises the global mean of every private model.
MU_PUBLIC = 3.0
ATTACKS = ("loss", "calibrated loss", "lira")
TRAINERS = {"DP-SGD (library)": DPSGD, "noise on touched rows only": TouchedRowsNoiseDPSGD,
            "clipping skipped": UnclippedDPSGD}
_DEPENDS = (inference, membership, audit, local_dp, dpsgd, per_example, primitives, ledger, accounting,
            models, train, data)


def cached(name: str, config: dict, compute: Callable[[], dict]) -> dict:
    """``compute()`` memoised under ``name`` and ``config``, keyed on this module and its dependencies."""
    return cached_json(name, config, compute, modules=(*_DEPENDS, sys.modules[__name__]))


def user_attributes(users: pd.DataFrame) -> dict[str, np.ndarray]:
    """The two binary attributes the chapter infers: gender F and age under 30 (0/1 per user id)."""
    return {"gender F": (users["gender"] == "F").to_numpy().astype(int),
            "age < 30": (users["age"] < 30).to_numpy().astype(int)}


def attribute_experiment(ratings: pd.DataFrame, train_ratings: pd.DataFrame, users: pd.DataFrame, *,
                         n_users: int, n_items: int, rr_epsilons=(0.5, 1, 2, 4, 8),
                         ridge: float = 10.0) -> dict:
    """Held-out AUC of a ridge-logistic attribute attack on item sets, on a non-private MF user
    embedding (dim 32, 15 epochs) and on randomized-response item sets at each per-film ε."""
    items = item_set_features(ratings, n_users=n_users, n_items=n_items)
    mf = BiasedMF(n_users, n_items, 32, global_mean=float(train_ratings["rating"].mean()), seed=0)
    fit_explicit(mf, train_ratings, epochs=15, batch_size=2048, seed=0, progress=False)
    embedding = mf.user_factors.detach().numpy()
    out = {"reported items per user": {"item set": float(items.sum(1).mean())}}
    for name, y in user_attributes(users).items():
        row = {"item set": attribute_inference_auc(items, y, l2=ridge),
               "embedding": attribute_inference_auc(embedding, y, l2=ridge, standardize=True)}
        for eps in rr_epsilons:
            reports = randomized_response(items.astype(np.int64), epsilon=eps, seed=0)
            row[f"RR eps={eps}"] = attribute_inference_auc(reports, y, l2=ridge)
            out["reported items per user"][f"RR eps={eps}"] = float(reports.sum(1).mean())
        out[name] = row
    return out


def membership_experiment(train_ratings: pd.DataFrame, *, n_users: int, n_items: int,
                          epsilons=(1, 4, 16), n_candidates: int = 5000, n_reference: int = 4) -> dict:
    """Loss, calibrated-loss and LiRA membership attacks on non-private MF and on DP-SGD at each
    rating-level ε; each private result carries its target model's ledger summary and δ."""
    base, candidates = candidate_split(train_ratings, n_candidates=n_candidates, seed=0)

    def train_mf(ratings: pd.DataFrame, seed: int) -> BiasedMF:
        model = BiasedMF(n_users, n_items, 32, global_mean=float(ratings["rating"].mean()), seed=seed)
        fit_explicit(model, ratings, epochs=15, batch_size=2048, seed=seed, progress=False)
        return model

    out = {"non-private MF": membership_attack(train_mf, base, candidates, n_reference=n_reference)}
    for eps in epsilons:
        ledgers = []

        def train_dp(ratings: pd.DataFrame, seed: int, eps=eps, ledgers=ledgers) -> BiasedMF:
            model = BiasedMF(n_users, n_items, 4, global_mean=MU_PUBLIC, seed=seed)
            run = fit_dpsgd(model, ratings, target_epsilon=eps, seed=seed, **DPSGD_SETTINGS)
            ledgers.append((run.ledger.summary(), run.ledger.delta))
            return model

        result = membership_attack(train_dp, base, candidates, n_reference=n_reference)
        result["ledger"], result["delta"] = ledgers[0]  # the target is trained first
        out[f"DP-SGD eps={eps}"] = result
    return out


def audit_experiment(train_ratings: pd.DataFrame, *, n_users: int, n_items: int, epsilons=(1, 2, 4, 8),
                     n_canaries: int = 1000) -> dict:
    """The one-run audit (Steinke, Nasr & Jagielski 2023) of the library's DP-SGD and two mutants."""
    return {name: [audit_dpsgd(train_ratings, n_users=n_users, n_items=n_items, target_epsilon=eps,
                               trainer=trainer, n_canaries=n_canaries, global_mean=MU_PUBLIC,
                               **DPSGD_SETTINGS) for eps in epsilons]
            for name, trainer in TRAINERS.items()}


def _epsilon_of(model_name: str) -> float:
    return math.inf if "=" not in model_name else float(model_name.split("=")[1])


def membership_table(results: dict) -> pd.DataFrame:
    """AUC and TPR at FPR 0.1% / 1% per model and attack, beside the DP cap
    (:func:`~privrec.attacks.inference.dp_tpr_bound`; 1 for the non-private model)."""
    rows = []
    for name, result in results.items():
        eps, delta = _epsilon_of(name), result.get("delta", 0.0)
        for attack in ATTACKS:
            r = result[attack]
            rows.append({"model": "non-private" if math.isinf(eps) else f"ε={eps:g}", "attack": attack,
                         "AUC": f"{r['auc']:.3f}", "TPR@0.1%": f"{r['tpr@0.1%']:.4f}",
                         "cap@0.1%": f"{dp_tpr_bound(epsilon=eps, delta=delta, fpr=1e-3):.4f}",
                         "TPR@1%": f"{r['tpr@1%']:.4f}",
                         "cap@1%": f"{dp_tpr_bound(epsilon=eps, delta=delta, fpr=1e-2):.4f}"})
    return pd.DataFrame(rows)


def cap_violations(results: dict, *, confidence: float = 0.95) -> tuple[list[str], list[str]]:
    """Measured points above the DP cap, and those whose excess is significant: the Clopper-Pearson
    lower end of the TPR above the cap at the upper end of the FPR, each interval at
    ``1 - (1 - confidence)/2`` so that the pair holds at ``confidence`` (Bonferroni)."""
    confidence = 1.0 - (1.0 - in_range("confidence", confidence, 0.5, 1.0, closed_high=False)) / 2
    above, significant = [], []
    for name, result in results.items():
        eps = epsilon_or_inf("model epsilon", _epsilon_of(name))
        for attack in ATTACKS:
            for fpr in (1e-3, 1e-2):
                tpr = result[attack][f"tpr@{100 * fpr:g}%"]
                if math.isinf(eps) or tpr <= dp_tpr_bound(epsilon=eps, delta=result["delta"], fpr=fpr):
                    continue
                above.append(f"{name} {attack} @ FPR {100 * fpr:g}%")
                tpr_low = clopper_pearson(round(tpr * result["members"]), result["members"],
                                          confidence=confidence)[0]
                fpr_high = clopper_pearson(math.floor(fpr * result["non-members"]), result["non-members"],
                                           confidence=confidence)[1]
                if tpr_low > dp_tpr_bound(epsilon=eps, delta=result["delta"], fpr=fpr_high):
                    significant.append(above[-1])
    return above, significant


def audit_table(audits: dict) -> pd.DataFrame:
    """One row per trainer and claimed ε: correct guesses of both scores, the empirical lower bound
    and whether the claim is rejected (δ is the same 1e-7 in every run; see the printed ledger)."""
    short = {"DP-SGD (library)": "library", "noise on touched rows only": "touched rows",
             "clipping skipped": "no clipping"}
    return pd.DataFrame([{"trainer": short.get(name, name), "claimed ε": f"{a['claimed_epsilon']:.2f}",
                          "distance": f"{a['correct_movement']}/{a['guesses_movement']}",
                          "bias": f"{a['correct_bias']}/{a['guesses_bias']}",
                          "empirical ε ≥": f"{a['empirical_epsilon']:.2f}",
                          "rejected": "yes" if a["flagged"] else "no"}
                         for name, runs in audits.items() for a in runs])


def canary_gradient_norm(*, n_users: int, n_items: int, n_canaries: int = 1000, seed: int = 0) -> float:
    """Median per-example gradient norm of the audit's canaries at the model's initialisation
    (the dim-4 DP-SGD model of :data:`DPSGD_SETTINGS`): how far above the clip norm one canary is."""
    canaries, _ = canary_ratings(n_users=n_users, n_items=n_items, n_canaries=n_canaries, seed=seed)
    probe = BiasedMF(n_users, n_items + n_canaries, 4, global_mean=MU_PUBLIC, seed=seed)
    users, items, stars = ratings_to_tensors(canaries)
    norms = per_example_norms(mf_per_example_gradients(probe, users, items, stars,
                                                       reg=DPSGD_SETTINGS["reg"]))
    return float(norms.median())
