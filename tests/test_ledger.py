"""Tests of privrec.dp.ledger as DP code uses it: merging, units, the delta rule, calibration."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from privrec.dp import ledger as ledger_module
from privrec.dp.accounting import (
    compute_rdp,
    get_epsilon,
    laplace_rdp,
    pure_dp_rdp,
    rdp_to_epsilon,
)
from privrec.dp.ledger import (
    MAX_DELTA_TIMES_N,
    Mechanism,
    PrivacyEvent,
    PrivacyLedger,
    RDPAccountant,
    Unit,
    default_delta,
)


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
    # the RDP route alone gives a hair above 1 (orders stop at 10^4); the ledger takes the
    # minimum with pure composition, so one Laplace release reports its epsilon exactly
    rdp_route = rdp_to_epsilon(orders=ledger.orders, rdp=ledger.rdp(), delta=ledger.delta)[0]
    assert 1.0 < rdp_route <= 1.001
    assert ledger.epsilon() == 1.0 and ledger.privacy_spent()[1] == math.inf


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
    assert summary.startswith("interaction-level (ε = ") and "δ = 1e-07" in summary


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


# -- typed events, pure-epsilon selection events, JSON, the Opacus-shaped accountant ----------

def test_events_are_typed_and_old_positional_calls_still_work():
    old = PrivacyEvent("DP-SGD step", "gaussian", 1.0, 0.01, 1000, "rating")
    new = PrivacyEvent.gaussian("DP-SGD step", noise_multiplier=1.0, sample_rate=0.01, count=1000,
                                unit=Unit.RATING)
    assert old == new and old.mechanism is Mechanism.GAUSSIAN and old.unit is Unit.RATING
    assert old.mechanism == "gaussian" and f"{old.unit}" == "rating"  # StrEnum: reads as a str
    assert PrivacyLedger(unit=Unit.USER, n_units=10).unit == "user"
    laplace = PrivacyEvent(name="counts", mechanism="laplace", epsilon=0.5, unit="rating")
    assert laplace.noise_multiplier == 2.0 and laplace.pure_epsilon == 0.5
    with pytest.raises(ValueError, match="noise_multiplier must be 1/epsilon"):
        PrivacyEvent(name="c", mechanism="laplace", epsilon=0.5, noise_multiplier=3.0)
    with pytest.raises(ValueError, match="takes epsilon and no noise_multiplier"):
        PrivacyEvent(name="c", mechanism="exponential", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_rate must be 1"):
        PrivacyEvent(name="c", mechanism="exponential", epsilon=1.0, sample_rate=0.5)


def test_events_have_dp_accountings_shape():
    dp_accounting = pytest.importorskip("dp_accounting")
    event = PrivacyEvent.gaussian("step", noise_multiplier=1.1, sample_rate=0.01, count=300,
                                  unit="rating")
    assert event.to_dp_event() == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 300)
    once = PrivacyEvent.gaussian("sum", noise_multiplier=2.0, unit="rating")
    assert once.to_dp_event() == dp_accounting.GaussianDpEvent(2.0)
    pure = PrivacyEvent.pure("top-1", epsilon=0.4, count=3, unit="user")
    assert pure.to_dp_event() == dp_accounting.SelfComposedDpEvent(
        dp_accounting.ZCDpEvent(rho=0.4 ** 2 / 2), 3)


def test_pure_rdp_curve_is_the_minimum_of_pure_and_zcdp():
    eps, orders = 0.3, np.array([1.5, 2.0, 4.0, 6.0, 7.0, 50.0])
    curve = pure_dp_rdp(epsilon=eps, orders=orders)
    np.testing.assert_allclose(curve, np.minimum(eps, orders * eps ** 2 / 2), rtol=1e-15)
    # the exact Laplace curve of the same epsilon sits below the generic pure-DP curve
    assert np.all(laplace_rdp(noise_multiplier=1 / eps, orders=orders) <= curve + 1e-15)


def test_pure_events_cross_checked_against_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import RdpAccountant

    orders = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]
    ledger = PrivacyLedger(unit="user", n_units=943, orders=orders)
    ledger.record_laplace("counts", epsilon=0.5, count=4)
    ledger.record_pure("top-10 selection", epsilon=0.05, count=10, mechanism="report_noisy_max")
    theirs = RdpAccountant(orders=orders)
    theirs.compose(dp_accounting.ComposedDpEvent([e.to_dp_event() for e in ledger.events]))
    zcdp = np.asarray(orders) * 10 * 0.05 ** 2 / 2  # dp-accounting's curve of the selections
    laplace = ledger.events[0].rdp(np.asarray(orders, dtype=float))
    np.testing.assert_allclose(theirs._rdp, laplace + zcdp, rtol=1e-12)  # Laplace: same curve
    # ours is the minimum of that zCDP curve and the pure epsilon, never above dp-accounting's
    assert np.all(ledger.rdp() <= theirs._rdp + 1e-12)
    assert ledger.epsilon() <= theirs.get_epsilon(ledger.delta) + 1e-9
    assert ledger.epsilon() <= 4 * 0.5 + 10 * 0.05  # never above basic composition


def test_one_pure_event_reports_its_epsilon_and_many_compose_below_the_sum():
    for mechanism in ("laplace", "exponential", "report_noisy_max"):
        one = PrivacyLedger(unit="user", n_units=943)
        one.record_pure("release", epsilon=8.0, mechanism=mechanism)
        assert one.epsilon() == 8.0 and one.epsilon(delta=1e-9) == 8.0
    many = PrivacyLedger(unit="user", n_units=943)
    many.record_pure("top-1 pick", epsilon=0.05, count=200)
    rdp_route = rdp_to_epsilon(orders=many.orders, rdp=many.rdp(), delta=many.delta)[0]
    assert many.epsilon() == rdp_route < 200 * 0.05  # RDP beats the sum of 10 for many picks
    few = PrivacyLedger(unit="user", n_units=943)
    few.record_pure("top-1 pick", epsilon=1.0, count=3)
    assert few.epsilon() == 3.0  # and the sum beats RDP for a few large ones


def test_mixed_ledger_takes_the_better_of_the_two_routes():
    ledger = PrivacyLedger(unit="rating", n_units=80_000)
    ledger.record_pure("most popular item", epsilon=2.0)
    ledger.record_gaussian("step", noise_multiplier=1.0, sample_rate=0.01, count=100)
    gaussian_alone = get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100,
                                 delta=ledger.delta)
    rdp_route = rdp_to_epsilon(orders=ledger.orders, rdp=ledger.rdp(), delta=ledger.delta)[0]
    assert ledger.epsilon() == pytest.approx(min(rdp_route, 2.0 + gaussian_alone), rel=1e-12)
    # a pure curve never exceeds its epsilon, so with a Gaussian beside it the RDP route is
    # already within the split route (basic composition of the pure part)
    assert ledger.epsilon() <= 2.0 + gaussian_alone + 1e-12
    table = ledger.table()
    assert table["share of epsilon"].sum() == pytest.approx(1.0, abs=1e-12)


def test_json_round_trip_is_exact(tmp_path):
    ledger = PrivacyLedger(unit="interaction", n_units=50_000)
    ledger.record_gaussian("counts", noise_multiplier=3.0)
    ledger.record_gaussian("step", noise_multiplier=1.0173, sample_rate=1 / 3, count=2000)
    ledger.record_laplace("histogram", epsilon=0.2)
    ledger.record_pure("top-10", epsilon=0.1, count=10, mechanism="exponential")
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.events == ledger.events and again.epsilon() == ledger.epsilon()
    assert (again.unit, again.n_units, again.delta) == (ledger.unit, ledger.n_units, ledger.delta)
    ledger.save(tmp_path / "ledger.json")
    loaded = PrivacyLedger.load(str(tmp_path / "ledger.json"))
    assert loaded.events == ledger.events and loaded.epsilon() == ledger.epsilon()
    assert loaded.summary() == ledger.summary()
    custom = PrivacyLedger(unit="user", delta=1e-6, orders=[2.0, 8.0, 32.0])
    custom.record_gaussian("round", noise_multiplier=0.9, sample_rate=0.1, count=7)
    back = PrivacyLedger.from_dict(custom.to_dict())
    assert back.orders.tolist() == [2.0, 8.0, 32.0] and back.epsilon() == custom.epsilon()
    with pytest.raises(FileNotFoundError, match="path"):
        PrivacyLedger.load(tmp_path / "missing.json")


def test_json_round_trip_fails_when_an_event_is_lost():
    ledger = PrivacyLedger(unit="rating", n_units=100)
    ledger.record_gaussian("a", noise_multiplier=1.0, count=3)
    data = ledger.to_dict()
    data["events"][0]["count"] = 2
    assert PrivacyLedger.from_dict(data).epsilon() < ledger.epsilon()


def test_extend_prefixes_and_merges_ledgers():
    tuning = PrivacyLedger(unit="rating", n_units=1000)
    tuning.record_gaussian("step", noise_multiplier=1.0, sample_rate=0.1, count=10)
    whole = PrivacyLedger(unit="rating", n_units=1000)
    whole.extend(tuning, prefix="tuning: ")
    whole.extend(tuning.events, prefix="tuning: ")
    assert [e.name for e in whole.events] == ["tuning: step"] and whole.events[0].count == 20
    with pytest.raises(ValueError, match="unit"):
        PrivacyLedger(unit="user", n_units=10).extend(tuning)


def test_rdp_accountant_has_no_placeholder_delta():
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=100)
    assert accountant.delta is None and "delta=None" in repr(accountant)
    with pytest.raises(ValueError, match="delta must be given"):
        accountant.epsilon()
    with pytest.raises(ValueError, match="delta must be given"):
        accountant.summary()
    summary = accountant.summary(delta=1e-5)
    assert "δ = 1e-05" in summary and "5e-01" not in summary
    again = RDPAccountant.from_json(accountant.to_json())
    assert isinstance(again, RDPAccountant) and again.delta is None
    assert again.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
