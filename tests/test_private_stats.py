"""Tests of privrec.central.private_stats: private biases and popularity, and the bias-residual trainer."""

from __future__ import annotations

import math

import pytest
import torch

from privrec.central import private_stats
from privrec.central.dpsgd import DPSGD
from privrec.central.private_stats import (
    CENTER,
    PrivateBiases,
    bias_events,
    fit_private_bias_residual,
    private_biases,
    private_item_popularity,
)
from privrec.dp.accounting import compute_rdp, rdp_to_epsilon
from privrec.dp.ledger import PrivacyLedger
from privrec.recsys.data import leave_last_out_split, random_split, synthetic_movielens
from privrec.recsys.metrics import evaluate_ratings
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import fit_bias_baseline


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens(seed=0)


def _neighbour(ratings):
    other = ratings.copy()
    row = other.index[0]
    other.loc[row, "item"] = (other.loc[row, "item"] + 1) % (other["item"].max() + 1)
    other.loc[row, "rating"] = 6.0 - other.loc[row, "rating"]
    return other


def test_private_biases_without_noise_match_baseline(data):
    train = data.ratings
    exact = private_biases(train, n_users=data.n_users, n_items=data.n_items, noise_multiplier=0.0,
                           rating_bound=10.0, residual_bound=10.0)
    baseline = fit_bias_baseline(train, n_users=data.n_users, n_items=data.n_items, n_iter=1)
    assert exact.global_mean == pytest.approx(float(train["rating"].mean()), abs=1e-6)
    torch.testing.assert_close(exact.item_bias, baseline.item_bias.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact.user_bias, baseline.user_bias.detach(), rtol=1e-4, atol=1e-5)
    assert [e.count for e in exact.ledger.events] == [1, 1]
    assert math.isinf(exact.ledger.epsilon())  # sigma = 0 is recorded, and costs infinity


def test_private_biases_record_their_releases_on_the_ledger_passed_in(data):
    ledger = PrivacyLedger(unit="rating", n_units=len(data.ratings))
    out = private_biases(data.ratings, n_users=data.n_users, n_items=data.n_items,
                         noise_multiplier=2.0, ledger=ledger)
    assert out.ledger is ledger
    assert ledger.events == bias_events(2.0, unit="rating")
    rdp = 2 * compute_rdp(sample_rate=1.0, noise_multiplier=2.0, steps=1, orders=ledger.orders)
    assert ledger.epsilon() == pytest.approx(
        rdp_to_epsilon(orders=ledger.orders, rdp=rdp, delta=ledger.delta)[0], rel=1e-12)
    with pytest.raises(ValueError, match="unit"):
        private_biases(data.ratings, n_users=data.n_users, n_items=data.n_items,
                       noise_multiplier=2.0, ledger=PrivacyLedger(unit="user", n_units=60))


def test_noisy_sums_have_the_stated_noise_on_every_row():
    """Sums and counts each get N(0, std^2) on every row -- rows nobody rated included."""
    size, std, draws = 400, 1.7, 100
    index = torch.zeros(30, dtype=torch.long)  # every value on row 0: rows 1.. are empty
    values = torch.ones(30, dtype=torch.double)
    gen = torch.Generator().manual_seed(0)
    sums, counts = zip(*(private_stats.noisy_row_sums(index, values, size, std, gen)
                         for _ in range(draws)), strict=True)
    noise = torch.stack(sums)[:, 1:]
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(noise.square().mean().item() / std ** 2 - 1) < 5 * math.sqrt(2 / n)
    assert abs(torch.stack(sums)[:, 0].mean().item() - 30) < 5 * std / math.sqrt(draws)
    # counts are clamped at 0 after the noise: about half the empty rows stay exactly 0
    zero_share = (torch.stack(counts)[:, 1:] == 0).double().mean().item()
    assert abs(zero_share - 0.5) < 5 * math.sqrt(0.25 / n)


def test_private_popularity_is_one_release_on_an_interaction_ledger(data):
    train, _ = leave_last_out_split(data.ratings)
    out = private_item_popularity(train, n_users=data.n_users, n_items=data.n_items,
                                  noise_multiplier=1.0)
    assert out.ledger.unit == "interaction" and out.ledger.events == bias_events(
        1.0, unit="interaction")
    top = int(train["item"].value_counts().idxmax())
    order = torch.argsort(-out.item_bias, stable=True).tolist()
    assert order.index(top) < 5  # noisy popularity still ranks the most rated item near the top


def test_reported_epsilon_is_the_composition_of_bias_and_dpsgd_releases(data):
    train, test = random_split(data.ratings, seed=0)
    result = fit_private_bias_residual(train, n_users=data.n_users, n_items=data.n_items,
                                       target_epsilon=8.0, dim=2, epochs=5, sample_rate=0.2)
    ledger = result.ledger
    names = [e.name for e in ledger.events]
    assert names == ["item sums and counts", "user residual sums and counts", "DP-SGD step"]
    z, step = ledger.events[0].noise_multiplier, ledger.events[2]
    assert step.count == 25 and step.sample_rate == 0.2
    rdp = (2 * compute_rdp(sample_rate=1.0, noise_multiplier=z, steps=1, orders=ledger.orders)
           + compute_rdp(sample_rate=0.2, noise_multiplier=step.noise_multiplier, steps=25,
                         orders=ledger.orders))
    direct = rdp_to_epsilon(orders=ledger.orders, rdp=rdp, delta=ledger.delta)[0]
    assert result.epsilon == pytest.approx(direct, rel=1e-12)
    assert 7.9 < result.epsilon <= 8.0
    # the bias releases alone cost about bias_share of the budget
    alone = rdp_to_epsilon(orders=ledger.orders, rdp=2 * compute_rdp(
        sample_rate=1.0, noise_multiplier=z, steps=1, orders=ledger.orders), delta=ledger.delta)[0]
    assert 0.24 * 8 < alone <= 0.25 * 8
    # and the model learned: its biases and factors beat the global-mean prediction
    flat = BiasedMF(data.n_users, data.n_items, 0, global_mean=CENTER)
    assert evaluate_ratings(result.model, test)["rmse"] < evaluate_ratings(flat, test)["rmse"]


def test_the_model_carries_the_released_biases(data):
    """Predictions use the noisy biases (a prediction test that sees them)."""
    result = fit_private_bias_residual(data.ratings, n_users=data.n_users, n_items=data.n_items,
                                       target_epsilon=4.0, dim=0)
    biases = private_biases(data.ratings, n_users=data.n_users, n_items=data.n_items,
                            noise_multiplier=result.ledger.events[0].noise_multiplier, seed=0)
    users, items = torch.tensor([0, 1, 2]), torch.tensor([5, 0, 7])
    expected = biases.global_mean + biases.user_bias[users] + biases.item_bias[items]
    torch.testing.assert_close(result.model(users, items), expected)
    assert result.history == {} and len(result.ledger.events) == 2


class _StopError(Exception):
    pass


class _Snapshot(DPSGD):
    seen: list = []

    def sample_batch(self) -> torch.Tensor:
        _Snapshot.seen.append(({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                               self.noise_multiplier, self.ledger.delta,
                               [e.name for e in self.ledger.events]))
        raise _StopError


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_neighbours_look_identical_until_a_release(data, loss, monkeypatch):
    """Given the same bias release, the model and configuration DP-SGD starts from are identical
    on neighbouring training sets: no uncharged statistic of the data (e.g. the exact mean)."""
    def same_release(train, *, n_users, n_items, noise_multiplier, ledger, **kwargs):
        for event in bias_events(noise_multiplier, unit=ledger.unit):
            ledger.record(event)
        return PrivateBiases(global_mean=3.3, user_bias=torch.full((n_users,), 0.1),
                             item_bias=torch.full((n_items,), -0.2),
                             noise_multiplier=noise_multiplier, ledger=ledger)

    monkeypatch.setattr(private_stats, "private_biases", same_release)
    monkeypatch.setattr(private_stats, "private_item_popularity", same_release)
    _Snapshot.seen = []
    for train in (data.ratings, _neighbour(data.ratings), data.ratings.iloc[1:]):
        with pytest.raises(_StopError):
            fit_private_bias_residual(train, n_users=data.n_users, n_items=data.n_items,
                                      target_epsilon=3.0, dim=2, epochs=2, sample_rate=0.2,
                                      loss=loss, trainer=_Snapshot)
    (a, *config_a), (b, *config_b), (c, *config_c) = _Snapshot.seen
    assert config_a == config_b == config_c
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def test_without_noise_the_pipeline_reports_infinity(data):
    result = fit_private_bias_residual(data.ratings, n_users=data.n_users, n_items=data.n_items,
                                       target_epsilon=math.inf, dim=2, epochs=1, sample_rate=0.5)
    assert all(e.noise_multiplier == 0 for e in result.ledger.events)
    assert math.isinf(result.epsilon)


def test_bad_parameters(data):
    kwargs = dict(n_users=data.n_users, n_items=data.n_items)
    with pytest.raises(ValueError, match="bias_share"):
        fit_private_bias_residual(data.ratings, target_epsilon=1.0, bias_share=1.0, **kwargs)
    with pytest.raises(ValueError, match="target_epsilon"):
        fit_private_bias_residual(data.ratings, target_epsilon=0.0, **kwargs)
    with pytest.raises(ValueError, match="loss"):
        fit_private_bias_residual(data.ratings, target_epsilon=1.0, loss="hinge", **kwargs)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_biases(data.ratings, noise_multiplier=-1.0, **kwargs)
    with pytest.raises(TypeError, match="ledger"):
        private_biases(data.ratings, noise_multiplier=1.0, ledger="x", **kwargs)
    with pytest.raises(ValueError, match="n_negatives"):
        private_item_popularity(data.ratings, noise_multiplier=1.0, n_negatives=0, **kwargs)
