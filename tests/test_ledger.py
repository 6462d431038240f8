"""Tests of privrec.dp.ledger as DP code uses it: merging, units, the delta rule, calibration."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from privrec.dp import ledger as ledger_module
from privrec.dp.accounting import compute_rdp, get_epsilon, laplace_rdp, rdp_to_epsilon
from privrec.dp.ledger import MAX_DELTA_TIMES_N, PrivacyEvent, PrivacyLedger, default_delta


def test_doctests():
    assert doctest.testmod(ledger_module).failed == 0


def test_equal_consecutive_events_merge_and_compose_like_one():
    ledger = PrivacyLedger(unit="rating", n_units=10_000)
    for _ in range(30):
        ledger.record_gaussian("step", noise_multiplier=1.1, sample_rate=0.02)
    ledger.record_gaussian("step", noise_multiplier=1.1, sample_rate=0.05)
    ledger.record_gaussian("step", noise_multiplier=1.1, sample_rate=0.02, count=5)
    assert [e.count for e in ledger.events] == [30, 1, 5]
    rdp = (compute_rdp(sample_rate=0.02, noise_multiplier=1.1, steps=35, orders=ledger.orders)
           + compute_rdp(sample_rate=0.05, noise_multiplier=1.1, steps=1, orders=ledger.orders))
    assert ledger.epsilon() == pytest.approx(
        rdp_to_epsilon(orders=ledger.orders, rdp=rdp, delta=ledger.delta)[0], rel=1e-12)


def test_unit_mismatch_is_a_value_error():
    ledger = PrivacyLedger(unit="rating", n_units=100)
    with pytest.raises(ValueError, match="unit"):
        ledger.record(PrivacyEvent("round", "gaussian", 1.0, 0.1, 1, "user"))
    with pytest.raises(ValueError, match="unit"):
        PrivacyLedger(unit="movie", n_units=100)
    with pytest.raises(TypeError, match="PrivacyEvent"):
        ledger.record(("step", 1.0))


@pytest.mark.parametrize("n", [1, 9, 10, 943, 80_000, 99_999, 100_000, 10**7])
def test_delta_rule(n):
    delta = default_delta(n)
    assert delta * n <= MAX_DELTA_TIMES_N * (1 + 1e-12)
    assert 10 * delta * n > MAX_DELTA_TIMES_N  # the largest power of ten that obeys the rule
    assert PrivacyLedger(unit="user", n_units=n).delta == delta
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(unit="user", n_units=n, delta=min(0.5, 10 * delta))


def test_laplace_rdp_tends_to_pure_epsilon():
    for eps in (0.1, 1.0, 3.0):
        curve = laplace_rdp(noise_multiplier=1 / eps, orders=[2.0, 10.0, 1e3, 1e6])
        assert np.all(np.diff(curve) > 0) and np.all(curve <= eps)
        assert curve[-1] == pytest.approx(eps, rel=1e-4)
    ledger = PrivacyLedger(unit="rating", delta=1e-7)
    ledger.record_laplace("value", epsilon=1.0)
    # the RDP route to (epsilon, delta) is a valid bound a hair above the pure epsilon here
    # (orders stop at 10^4); composing many Laplace releases is where it pays off
    assert 1.0 <= ledger.epsilon() <= 1.001


def test_table_shares_sum_to_one_and_alone_is_each_event():
    ledger = PrivacyLedger(unit="interaction", n_units=50_000)
    ledger.record_gaussian("counts", noise_multiplier=3.0)
    ledger.record_gaussian("step", noise_multiplier=1.0, sample_rate=0.01, count=2000)
    ledger.record_laplace("histogram", epsilon=0.2)
    table = ledger.table()
    assert table["share of epsilon"].sum() == pytest.approx(1.0, abs=1e-12)
    assert table.loc[1, "epsilon alone"] == pytest.approx(get_epsilon(
        noise_multiplier=1.0, sample_rate=0.01, steps=2000, delta=ledger.delta), rel=1e-12)
    assert table["epsilon alone"].max() < ledger.epsilon() < table["epsilon alone"].sum()
    summary = ledger.summary()
    assert summary.startswith("interaction-level (epsilon = ") and "delta = 1e-07" in summary


def test_zero_noise_is_infinite_and_empty_is_zero():
    ledger = PrivacyLedger(unit="rating", n_units=100)
    assert ledger.epsilon() == 0.0
    ledger.record_gaussian("step", noise_multiplier=0.0, sample_rate=0.1)
    assert math.isinf(ledger.epsilon())


def test_calibrate_is_the_smallest_noise_within_target():
    ledger = PrivacyLedger(unit="rating", n_units=80_000)
    ledger.record_gaussian("biases", noise_multiplier=5.0, count=2)
    spent = ledger.epsilon()

    def steps(z):
        return [PrivacyEvent("step", "gaussian", z, 0.01, 500, "rating")]

    z = ledger.calibrate(steps, target_epsilon=2.0)
    assert ledger.epsilon() == spent  # calibrate records nothing
    trial = ledger.copy()
    trial.record(steps(z)[0])
    assert 1.99 <= trial.epsilon() <= 2.0
    worse = ledger.copy()
    worse.record(steps(0.98 * z)[0])
    assert worse.epsilon() > 2.0
