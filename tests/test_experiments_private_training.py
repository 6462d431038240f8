"""Tests of chapter 3's harnesses: privrec.course.experiments.private_training(_studies)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from privrec.central.dpsgd import fit_dpsgd
from privrec.central.private_stats import bias_events, private_biases
from privrec.course.experiments import private_training as ex
from privrec.course.experiments import private_training_studies as st
from privrec.dp.ledger import PrivacyLedger
from privrec.recsys.data import leave_last_out_split, random_split, synthetic_movielens
from privrec.recsys.metrics import evaluate_ratings
from privrec.recsys.models import BiasedMF

NAIVE = {"dim": 2, "epochs": 1, "sample_rate": 0.2, "clip_norm": 1.0, "lr": 0.05}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVREC_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def protocol():
    real, twin = synthetic_movielens(seed=0), synthetic_movielens(seed=1)
    return ex.Protocol(real.ratings, real.n_users, real.n_items,
                       *random_split(real.ratings, test_fraction=0.2, seed=0),
                       *leave_last_out_split(real.ratings),
                       *random_split(twin.ratings, test_fraction=0.2, seed=0),
                       *leave_last_out_split(twin.ratings))


def _files(cache):
    return sorted((cache / "results").glob("ch3-run-*.json")) if (cache / "results").exists() else []


def test_run_is_cached_once_and_keyed_on_the_data_content(protocol, cache, monkeypatch):
    first = ex.run(protocol, "DP-SGD", protocol.train, protocol.test, **NAIVE)
    assert len(_files(cache)) == 1 and math.isinf(first["epsilon"])
    monkeypatch.setattr(ex, "_fit", lambda *a, **k: pytest.fail("a cached run was retrained"))
    copy = protocol.train.copy()  # same content, new object: the same run
    assert ex.run(protocol, "DP-SGD", copy, protocol.test, **NAIVE) == first
    monkeypatch.undo()
    monkeypatch.setenv("PRIVREC_CACHE", str(cache))
    shuffled = protocol.train.sample(frac=1.0, random_state=0).reset_index(drop=True)
    ex.run(protocol, "DP-SGD", shuffled, protocol.test, **NAIVE)  # other row order: other run
    assert len(_files(cache)) == 2


def test_dpsgd_run_spends_exactly_what_fit_dpsgd_calibrates(protocol):
    result = ex.run(protocol, "DP-SGD", protocol.train, protocol.test, target_epsilon=4.0,
                    seed=3, **NAIVE)
    model = BiasedMF(protocol.n_users, protocol.n_items, 2, global_mean=3.0, seed=3)
    fit = fit_dpsgd(model, protocol.train, target_epsilon=4.0, seed=3,
                    **{k: v for k, v in NAIVE.items() if k != "dim"})
    ledger = PrivacyLedger.from_json(result["ledger"])
    assert ledger.events[0].noise_multiplier == fit.ledger.events[0].noise_multiplier
    assert result["epsilon"] == fit.ledger.epsilon() <= 4.0
    assert result["rmse"] == pytest.approx(evaluate_ratings(model, protocol.test)["rmse"], abs=1e-12)


def test_private_bias_only_spends_the_whole_budget_on_the_bias_releases(protocol):
    fit = ex.fit_private_bias_only(protocol.train, n_users=protocol.n_users,
                                   n_items=protocol.n_items, target_epsilon=2.0)
    assert 1.98 <= fit.ledger.epsilon() <= 2.0 and fit.ledger.unit == "rating"
    assert [e.name for e in fit.ledger.events] == [e.name for e in bias_events(1.0, unit="rating")]
    assert fit.model.dim == 0
    ranking = ex.fit_private_bias_only(protocol.rank_train, n_users=protocol.n_users,
                                       n_items=protocol.n_items, target_epsilon=2.0,
                                       loss="logistic")
    assert ranking.ledger.unit == "interaction" and 1.98 <= ranking.ledger.epsilon() <= 2.0
    exact = ex.fit_private_bias_only(protocol.train, n_users=protocol.n_users,
                                     n_items=protocol.n_items, target_epsilon=math.inf)
    plain = private_biases(protocol.train, n_users=protocol.n_users, n_items=protocol.n_items,
                           noise_multiplier=0.0)
    assert math.isinf(exact.ledger.epsilon())
    assert np.array_equal(exact.model.item_bias.detach().numpy(), plain.item_bias.numpy())


def test_private_bias_only_is_noisier_at_smaller_epsilon(protocol):
    exact = ex.fit_private_bias_only(protocol.train, n_users=protocol.n_users,
                                     n_items=protocol.n_items, target_epsilon=math.inf)
    errors = {}
    for eps in (0.5, 8.0):
        gaps = [ex.fit_private_bias_only(protocol.train, n_users=protocol.n_users,
                                         n_items=protocol.n_items, target_epsilon=eps, seed=s,
                                         noise_aware=False).model.item_bias.detach().numpy()
                - exact.model.item_bias.detach().numpy() for s in range(20)]
        errors[eps] = float(np.mean(np.square(gaps)))
    assert errors[0.5] > 4 * errors[8.0]


def test_noise_aware_rule_adds_a_twin_decision(protocol):
    rule = ex.noise_aware_rule(protocol, {"bias_share": 0.5})
    assert rule(math.inf) == {"bias_share": 0.5, "noise_aware": True}  # no noise: a tie
    assert isinstance(rule(1.0)["noise_aware"], bool)
    assert ex.bias_noise(1.0, n_units=len(protocol.train)) > ex.bias_noise(
        8.0, n_units=len(protocol.train)) > 0


def test_run_rejects_an_unknown_method(protocol):
    with pytest.raises(ValueError, match="method"):
        ex.run(protocol, "magic", protocol.train, protocol.test, **NAIVE)


def test_input_perturbation_curve_at_infinity_is_the_unperturbed_run(protocol):
    monkey = {"squared": {"dim": 2, "epochs": 1, "batch_size": 256, "lr": 0.01},
              "logistic": {"dim": 2, "epochs": 1, "batch_size": 256, "lr": 0.01, "reg": 1e-4,
                           "loss": "logistic"}}
    original = dict(ex.NONPRIVATE)
    ex.NONPRIVATE.update(monkey)
    try:
        curve = ex.input_perturbation_curve(protocol, epsilons=(1.0, math.inf))
        plain = ex.run(protocol, "non-private", protocol.train, protocol.test, **monkey["squared"])
    finally:
        ex.NONPRIVATE.update(original)
    assert curve.loc[math.inf, "rmse"] == plain["rmse"]
    assert curve.loc[math.inf, "reported"] == len(protocol.rank_train)
    assert curve.loc[1.0, "reported"] > len(protocol.rank_train)  # fake interactions


def _ledger(sigma, sample_rate=0.1):
    book = PrivacyLedger(unit="rating", n_units=1000)
    book.record_gaussian("DP-SGD step", noise_multiplier=sigma, sample_rate=sample_rate, count=50)
    return book


def test_sweep_table_puts_runs_that_differ_in_sigma_in_one_table():
    books = {1.0: _ledger(2.0), 4.0: _ledger(1.0).to_json()}
    header, table = st.sweep_table(books)
    assert "rating-level, δ = 1e-05" in header and "DP-SGD step x 50" in header
    assert table["σ[1]"].tolist() == [2.0, 1.0]
    assert table["ε"].tolist() == [_ledger(2.0).epsilon(), _ledger(1.0).epsilon()]
    with pytest.raises(ValueError, match="differ only in noise"):
        st.sweep_table({1: _ledger(2.0), 2: _ledger(2.0, sample_rate=0.2)})


def test_grid_search_takes_the_first_best_point_in_grid_order():
    frame, best = st.grid_search(lambda a, b: 1.0, {"a": (1, 2), "b": ("x", "y")})
    assert best == {"a": 1, "b": "x"} and list(frame.index.names) == ["a", "b"]
    _, best = st.grid_search(lambda a, b: a * (b == "y"), {"a": (1, 2), "b": ("x", "y")},
                             minimise=False)
    assert best == {"a": 2, "b": "y"}


def test_t_interval_and_paired_verdicts():
    mean, low, high = st.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302652729911275 / math.sqrt(3))
    with pytest.raises(ValueError, match="len\\(values\\)"):
        st.t_interval([1.0])
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.1, 8)
    frame = pd.DataFrame({"base": base, "lower": base - 0.5 + rng.normal(0, 0.01, 8),
                          "higher": base + 0.5 + rng.normal(0, 0.01, 8),
                          "same": base + rng.normal(0, 0.05, 8)})
    verdicts = st.paired_intervals(frame, "base")["verdict"].to_dict()
    assert verdicts == {"lower": "better", "higher": "worse", "same": "tie"}
    assert st.paired_intervals(frame, "base", lower_is_better=False)["verdict"]["lower"] == "worse"


def test_validation_tuning_composes_every_run_on_one_ledger(protocol):
    tuned = st.validation_tuning(protocol, NAIVE, {"lr": (0.01, 0.05)}, epsilon=4.0, seeds=(0, 1))
    whole, published = (PrivacyLedger.from_json(tuned[k]) for k in ("whole", "published"))
    steps = published.events[0].count
    assert [e.count for e in whole.events] == [2 * steps, steps]
    assert whole.epsilon() > published.epsilon() and len(tuned["test"]) == 2
    assert tuned["choice"]["lr"] in (0.01, 0.05)


def test_demonstrations_report_what_the_chapter_says(protocol):
    assert "(max abs difference below 1e-5): True" in ex.fast_path_check()
    demo = ex.sparse_noise_demo(protocol, sample_rate=0.2)
    assert "moved rows = the batch's items: True" in demo
    assert f"rows that moved: {protocol.n_items} of {protocol.n_items}" in demo
