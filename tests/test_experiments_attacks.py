"""privrec.course.experiments.attacks (chapter 9's harness) and the DP cap it prints."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.attacks.audit import canaries_to_certify, one_run_epsilon_lower_bound
from privrec.attacks.inference import dp_tpr_bound
from privrec.course.experiments import attacks as experiments


def _result(tpr01: float, tpr1: float, delta: float = 1e-7) -> dict:
    summary = {"auc": 0.5, "tpr@0.1%": tpr01, "tpr@1%": tpr1}
    return {a: dict(summary) for a in experiments.ATTACKS} | {"members": 2500, "non-members": 2500,
                                                               "delta": delta, "ledger": "…"}


def test_dp_tpr_bound_is_the_two_sided_privacy_region():
    # Kairouz et al. (2015): TPR <= e^eps FPR + delta and 1 - TPR >= e^-eps (1 - delta - FPR)
    for eps in (0.1, 1.0, 4.0):
        for delta in (0.0, 1e-5, 0.05):
            for fpr in np.linspace(0, 1, 41):
                bound = dp_tpr_bound(epsilon=eps, delta=delta, fpr=fpr)
                one_sided = min(1.0, math.exp(eps) * fpr + delta)
                assert bound <= one_sided + 1e-12
                assert 1 - bound >= math.exp(-eps) * (1 - delta - fpr) - 1e-12
    # near FPR = 1 the second constraint binds: the one-sided cap (1.0) is not the largest TPR
    assert dp_tpr_bound(epsilon=1.0, delta=0.0, fpr=0.9) < 1.0
    assert dp_tpr_bound(epsilon=math.inf, delta=0.0, fpr=0.0) == 1.0


@pytest.mark.parametrize("kwargs", [{"epsilon": "1", "delta": 0, "fpr": 0.1},
                                    {"epsilon": 1, "delta": -0.1, "fpr": 0.1},
                                    {"epsilon": 1, "delta": 0, "fpr": 1.5}])
def test_dp_tpr_bound_names_bad_arguments(kwargs):
    with pytest.raises((TypeError, ValueError), match="epsilon|delta|fpr"):
        dp_tpr_bound(**kwargs)


def test_cap_violations_separates_noise_from_significance():
    results = {"non-private MF": _result(0.5, 0.9, delta=0.0),
               "DP-SGD eps=1": _result(0.0032, 0.01),   # just above the cap at 0.1%: sampling noise
               "DP-SGD eps=2": _result(0.30, 0.50)}     # far above: a real violation
    above, significant = experiments.cap_violations(results, confidence=0.95)
    assert "DP-SGD eps=1 loss @ FPR 0.1%" in above
    assert "DP-SGD eps=1 loss @ FPR 0.1%" not in significant
    assert "DP-SGD eps=2 lira @ FPR 1%" in significant
    assert not any(name.startswith("non-private") for name in above)


def test_tables_fit_the_text_column():
    results = {"non-private MF": _result(0.06, 0.17, delta=0.0), "DP-SGD eps=16": _result(0.001, 0.01)}
    text = experiments.membership_table(results).to_string(index=False)
    assert max(map(len, text.splitlines())) <= 80
    assert "ε=16" in text and "non-private" in text
    audit = {"DP-SGD (library)": [{"claimed_epsilon": 7.99, "correct_movement": 265, "guesses_movement": 500,
                                   "correct_bias": 313, "guesses_bias": 500, "empirical_epsilon": 0.33,
                                   "flagged": 0.0}]}
    assert max(map(len, experiments.audit_table(audit).to_string(index=False).splitlines())) <= 80


def test_canaries_to_certify_is_the_smallest_design_that_certifies():
    r = canaries_to_certify(epsilon=2.0, delta=1e-6)
    def bound(k):
        return one_run_epsilon_lower_bound(m=2 * k, r=k, v=k, delta=1e-6, confidence=0.95)
    assert bound(r) > 2.0 >= bound(r - 1)
