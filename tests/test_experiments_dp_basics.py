"""Chapter 2's harnesses (privrec.course.experiments.dp_basics, dp_pitfalls, composition)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from privrec.course.experiments import composition, dp_basics, dp_pitfalls
from privrec.dp.accounting import get_epsilon
from privrec.recsys.data import synthetic_movielens


@pytest.fixture(scope="module")
def ml():
    return synthetic_movielens(n_users=80, n_items=60, n_ratings=1500, seed=4)


def _widths(text: str) -> int:
    return max(len(line) for line in text.splitlines())


# -- dp_basics ------------------------------------------------------------------------------------

def test_delta_rule_and_trivial_release():
    table = dp_basics.delta_table(n_users=943, n_ratings=100_000, n_train=80_000)
    assert (table["δ·n"] <= 0.01 + 1e-12).all() and list(table["unit"]) == ["user", "rating", "rating"]
    report = dp_basics.trivial_release_report(943, draws=20_000, seed=0)
    assert "0.00106" in report and _widths(report) <= 80


def test_laplace_examples_scale_exactly_with_one_over_epsilon(ml):
    counts = dp_basics.item_counts(ml.ratings, n_items=ml.n_items)
    titles = pd.Series([f"m{i}" for i in range(ml.n_items)])
    table = dp_basics.laplace_count_examples(counts, titles, (0, 1), epsilons=(0.1, 1.0, 10.0))
    errors = (table["released"] - table["count"]).abs().to_numpy().reshape(2, 3)
    # the same seeded standard draw, scaled by 1/ε (up to the rounding of the released value)
    assert np.allclose(errors[:, 0] / 100, errors[:, 2], atol=0.06)


def test_private_average_is_clipped_and_unbiased_at_large_epsilon():
    rng = np.random.default_rng(0)
    wild = np.array([100.0, -50.0, 3.0])
    assert 1.0 <= dp_basics.private_average(wild, epsilon=0.01, generator=rng) <= 5.0
    vals = np.array([4.0, 5.0, 3.0, 4.0] * 50)
    draws = [dp_basics.private_average(vals, epsilon=50.0, generator=rng) for _ in range(50)]
    assert abs(np.mean(draws) - 4.0) < 0.01


def test_private_average_errors_fall_with_popularity(ml):
    errors = dp_basics.private_average_errors(ml.ratings, n_items=ml.n_items, releases=50)
    assert (errors["n"] >= 2).all()
    assert np.corrcoef(np.log(errors["n"]), np.log(errors["private RMSE"]))[0, 1] < -0.5
    bands = dp_basics.error_bands(errors, edges=(2, 10, 1000))
    assert bands["movies"].sum() == len(errors)


def test_average_split_reports_its_optimum():
    vals = np.array([5.0] * 300 + [4.0] * 200)
    table = dp_basics.average_split_rmse(vals, shares=(0.3, 0.5, 0.9), draws=20_000)
    assert len(table) == 4 and "optimum" in table.iloc[-1, 0]
    assert table["RMSE (stars)"].iloc[-1] <= 1.1 * table["RMSE (stars)"].iloc[:-1].min()
    assert 0.5 < dp_basics.optimal_sum_share(vals) < 1


def test_gaussian_table_and_capping(ml):
    sigmas = dp_basics.gaussian_sigma_table((0.5, 2.0), delta=1e-5)
    assert sigmas["classic σ"].iloc[0] > sigmas["analytic σ"].iloc[0]
    assert math.isnan(sigmas["classic σ"].iloc[1])
    per_user = ml.ratings.groupby("user").size()
    caps = (1, 5, int(per_user.max()))
    capping = dp_basics.capping_table(ml.ratings, n_items=ml.n_items, caps=caps, delta=1e-3)
    assert capping["bias RMSE"].is_monotonic_decreasing and capping["bias RMSE"].iloc[-1] == 0
    assert (capping["Laplace RMSE"] >= capping["bias RMSE"]).all()
    report = dp_basics.capping_report(capping, epsilon=1.0)
    assert "oracle" in report and _widths(report) <= 80


def test_the_private_cap_is_paid_for_on_the_ledger(ml):
    release = dp_basics.private_cap_release(ml.ratings, n_items=ml.n_items, q=0.5,
                                            cap_epsilon=0.1, epsilon=1.0, seed=0)
    ledger = release["ledger"]
    assert ledger.unit == "user" and [str(e.mechanism) for e in ledger.events] == [
        "exponential", "gaussian"]
    assert 0.95 <= ledger.epsilon() <= 1.0 + 1e-9
    assert 1 <= release["tau"] <= ml.n_items and release["rmse"] > release["sigma"] * 0.99
    summary = dp_basics.compact_summary(ledger)
    assert summary.startswith("user-level ε =") and _widths(summary) <= 80


def test_local_dp_tables_improve_with_epsilon(ml):
    rr = dp_basics.rr_popularity_table(ml.ratings, n_users=ml.n_users, n_items=ml.n_items,
                                       epsilons=(0.5, 4.0))
    assert rr["RMSE (ratings)"].iloc[1] < rr["RMSE (ratings)"].iloc[0]
    assert (rr["user-level ε"] == rr["per-bit ε"] * ml.n_items).all()
    krr = dp_basics.krr_genre_table(ml.ratings, ml.items["genres"], epsilons=(0.5, 8.0), seeds=5)
    assert krr["mean L1 error"].iloc[1] < krr["mean L1 error"].iloc[0]


def test_explore_inputs_and_print_table(ml, capsys):
    counts = dp_basics.item_counts(ml.ratings, n_items=ml.n_items)
    inputs = dp_basics.explore_inputs(ml.ratings, counts, (0,), eps_grid=np.array([0.5, 1.0]),
                                      delta=1e-5)
    assert set(inputs["sigma"]) == {0.5, 1.0} and len(inputs[0]) == 4
    dp_basics.print_table(pd.DataFrame({"a": [1.23456], "b": [math.nan]}), ".2f")
    assert capsys.readouterr().out.split() == ["a", "b", "1.23", "-"]


# -- dp_pitfalls ----------------------------------------------------------------------------------

def test_the_articles_definition_accepts_a_leak_and_rejects_laplace():
    demo = dp_pitfalls.article_definition_demo(2000.0, epsilon=0.1, runs=20_000)
    leaky, laplace = demo.iloc[:2], demo.iloc[2]
    assert (leaky["article's test"] == "passes").all() and (leaky["Pr[5 | D2]"] == 0).all()
    assert (leaky["Pr[5 | D1]"] > 0).all() and laplace["article's test"] == "fails"


def test_the_audit_flags_the_articles_scale():
    audit = dp_pitfalls.laplace_reading_audit(2000.0, epsilons=(0.5,), runs=100_000)
    verdicts = dict(zip(audit["scale"], audit["verdict"], strict=True))
    assert verdicts["correct, b = Δ1/ε"] == "ok" and verdicts["article as scale"] == "VIOLATES"


def test_belief_bounds_and_the_attacker():
    table = dp_pitfalls.posterior_table((0.1, 1.0), priors=(0.5,))
    assert table["from prior 0.5"].iloc[1] == pytest.approx(math.e / (1 + math.e))
    attacker = dp_pitfalls.rr_attacker_table((1.0,), n=20_000)
    assert abs(attacker["attacker right"].iloc[0] - attacker["theory"].iloc[0]) < 0.02
    assert _widths(dp_pitfalls.range_vs_sensitivity(pd.Series([7, 73]), epsilon=0.5)) <= 80


def test_floating_point_laplace_identifies_its_input():
    rates = dp_pitfalls.float_leak_rates(n=3000, seed=1)
    assert rates["y0 from 0"] == 1.0 and rates["y1 from 1"] == 1.0
    assert rates["y0 never from 1"] > 0.3 and rates["y1 never from 0"] > 0.3
    assert _widths(dp_pitfalls.float_leak_report(n=500)) <= 80


def test_discrete_laplace_and_the_halved_scale():
    report = dp_pitfalls.discrete_laplace_report(np.array([5, 7]), audit_draws=2000)
    assert report.startswith("discrete-Laplace counts") and _widths(report) <= 80
    assert 0.5 < dp_pitfalls.halved_scale_audit(epsilon=0.5, draws=200_000) <= 1.0


# -- composition ----------------------------------------------------------------------------------

def test_advanced_composition_overtakes_sequential():
    cross = composition.advanced_crossover(epsilon=0.05, delta_prime=1e-7)
    assert cross["advanced"][-1] < cross["sequential"][-1] and cross["crossover"] > 1
    assert "advanced beats" in composition.crossover_report(epsilon=0.05, delta_prime=1e-7)
    table = composition.advanced_by_delta(epsilon=0.05, steps=100)
    assert table["advanced ε'"].is_monotonic_increasing


def test_rdp_beats_eps_delta_composition_for_long_runs():
    curves = composition.composition_curves((1.0,), sample_rate=0.01, delta=1e-7, max_steps=2000)
    last = curves.iloc[-1]
    assert last["rdp"] < last["composed"] / 5
    assert "σ = 1.0" in composition.looser_steps(curves)
    table = composition.rdp_epsilon_table((1.0,), sample_rate=0.01, steps=100, delta=1e-7)
    assert table["ε"].iloc[0] == get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100,
                                             delta=1e-7)


def test_cross_checks_against_opacus_and_dp_accounting():
    text = composition.opacus_cross_check(sigma=1.0, sample_rate=0.01, steps=1000, delta=1e-7)
    opacus, ours = re.findall(r"\d+\.\d+", text.split("\n")[0])
    assert opacus == ours
    pld = composition.pld_table(sigma=1.0, sample_rate=0.01, delta=1e-7, steps=(10, 100))
    assert (pld["PLD (dp-accounting)"] <= pld["RDP (privrec)"]).all()
    orders = composition.order_table((8.0,), sample_rate=0.01, steps=100, delta=1e-7)
    assert orders["default"].iloc[0] <= orders["Opacus α≤63"].iloc[0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="epsilon"):
        dp_pitfalls.article_definition_demo(10.0, epsilon=0.0)
    with pytest.raises(ValueError, match="seed"):
        dp_basics.private_average_errors(pd.DataFrame({"user": [0], "item": [0], "rating": [3.0]}),
                                         n_items=1, seed=-1)
    with pytest.raises(TypeError, match="steps"):
        composition.composed_epsilon(1.0, 2.5, sample_rate=0.1, delta=1e-5)
