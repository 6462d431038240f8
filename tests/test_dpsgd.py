"""Tests of privrec.central.dpsgd: the noise, the sampler, the ledger, neighbouring datasets, bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from privrec.central import dpsgd as dpsgd_module
from privrec.central.dpsgd import (
    DPSGD,
    blocked_adam_step,
    dpsgd_steps,
    fit_dpsgd,
    noisy_average,
    row_blocks,
)
from privrec.central.per_example import mf_clipped_gradient_sum
from privrec.dp.accounting import compute_rdp, rdp_to_epsilon
from privrec.dp.ledger import PrivacyLedger, default_delta
from privrec.recsys.data import random_split, synthetic_movielens
from privrec.recsys.metrics import evaluate_ratings
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import ratings_to_tensors


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens(seed=0)


def _model(data, dim=3, seed=1):
    return BiasedMF(data.n_users, data.n_items, dim, global_mean=3.0, init_std=0.5, seed=seed)


def _neighbour(ratings: pd.DataFrame) -> pd.DataFrame:
    """The same table with one rating changed (another item, another value)."""
    other = ratings.copy()
    row = other.index[0]
    other.loc[row, "item"] = (other.loc[row, "item"] + 1) % (other["item"].max() + 1)
    other.loc[row, "rating"] = 6.0 - other.loc[row, "rating"]
    return other


def test_noise_std_on_every_row():
    sigma, clip, q, n = 1.3, 0.7, 0.05, 4000
    expected = sigma * clip / (q * n)
    gen = torch.Generator().manual_seed(0)
    zero = {"table": torch.zeros(500, 4), "scalar": torch.zeros(())}
    draws = torch.stack([noisy_average(zero, noise_multiplier=sigma, clip_norm=clip,
                                       expected_batch_size=q * n, generator=gen)["table"]
                         for _ in range(200)])  # [200, 500, 4]
    assert abs(draws.std().item() / expected - 1) < 0.02
    per_row = draws.square().mean(dim=(0, 2)).sqrt() / expected  # 800 samples per row
    assert per_row.min() > 0.8 and per_row.max() < 1.2
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(draws.numel())


def test_step_noises_untouched_rows(data):
    model = _model(data)
    trainer = DPSGD(model, data.ratings, clip_norm=1.0, noise_multiplier=2.0, sample_rate=0.01)
    users, items, ratings = ratings_to_tensors(data.ratings)
    index = torch.tensor([0, 1, 2])
    clean, _ = mf_clipped_gradient_sum(model, users[index], items[index], ratings[index],
                                       clip_norm=1.0)
    noisy = trainer.noisy_gradient(index)
    untouched = torch.ones(data.n_items, dtype=torch.bool)
    untouched[items[index]] = False
    assert (clean["item_factors"][untouched] == 0).all()
    assert (noisy["item_factors"][untouched] != 0).all()
    residual = noisy["item_factors"] - clean["item_factors"] / trainer.expected_batch_size
    assert abs(residual.std().item() / (2.0 / trainer.expected_batch_size) - 1) < 0.1


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_empty_batch_releases_pure_noise(data, loss):
    """An empty Poisson sample still releases N(0, (sigma C / qN)^2) on every coordinate."""
    sigma, clip, q = 1.5, 0.8, 0.01
    trainer = DPSGD(_model(data, dim=8), data.ratings, clip_norm=clip, noise_multiplier=sigma,
                    sample_rate=q, loss=loss, seed=3)
    expected = sigma * clip / (q * len(data.ratings))
    empty = torch.zeros(0, dtype=torch.long)
    draws = [trainer.noisy_gradient(empty) for _ in range(50)]
    for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
        x = torch.stack([d[name] for d in draws]).double()
        n = x.numel()
        assert abs(x.mean().item()) < 5 * expected / math.sqrt(n), name
        # sample variance: relative standard error sqrt(2 / n)
        assert abs(x.square().mean().item() / expected ** 2 - 1) < 5 * math.sqrt(2 / n), name
        per_coordinate = x.square().mean(0)  # every coordinate noised, none left at zero
        assert (per_coordinate > 0).all(), name

    class EmptyBatches(DPSGD):
        def sample_batch(self) -> torch.Tensor:
            return torch.zeros(0, dtype=torch.long)

    run = EmptyBatches(_model(data), data.ratings, clip_norm=clip, noise_multiplier=sigma,
                       sample_rate=q, loss=loss)
    run.step()
    assert run.ledger.events[0].count == 1 and run.epsilon() > 0


def test_poisson_sampler_rate(data):
    """Batch sizes are Binomial(N, q) and each record joins with probability q (a fixed-size or
    shuffled-batch sampler fails the variance test; a biased one fails the per-record test)."""
    q, draws = 0.05, 2000
    trainer = DPSGD(_model(data), data.ratings, clip_norm=1.0, noise_multiplier=1.0,
                    sample_rate=q, seed=11)
    n = trainer.n_examples
    hits = np.zeros(n)
    sizes = []
    for _ in range(draws):
        batch = trainer.sample_batch().numpy()
        assert np.all(np.diff(batch) > 0)  # sorted ids, no repeats
        hits[batch] += 1
        sizes.append(len(batch))
    sizes = np.array(sizes, dtype=np.float64)
    assert abs(sizes.mean() - q * n) < 5 * math.sqrt(n * q * (1 - q) / draws)
    var = sizes.var(ddof=1)
    assert abs(var / (n * q * (1 - q)) - 1) < 5 * math.sqrt(2 / (draws - 1))
    # every record's inclusion count is Binomial(draws, q): chi-square over records
    expected = draws * q
    chi2 = float((((hits - expected) ** 2) / (expected * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=n) > 1e-4 and stats.chi2.cdf(chi2, df=n) > 1e-4


def test_reported_epsilon_is_the_ledgers_composition(data):
    train, _ = random_split(data.ratings, seed=0)
    result = fit_dpsgd(_model(data, dim=2), train, target_epsilon=4.0, epochs=2, sample_rate=0.1)
    ledger = result.ledger
    assert ledger.unit == "rating" and ledger.n_units == len(train)
    assert ledger.delta == default_delta(len(train))
    (event,) = ledger.events
    assert event.count == dpsgd_steps(epochs=2, sample_rate=0.1) == 20
    assert event.sample_rate == 0.1
    # independent composition: RDP curve of 20 subsampled Gaussian steps, then the conversion
    rdp = compute_rdp(sample_rate=0.1, noise_multiplier=event.noise_multiplier, steps=20,
                      orders=ledger.orders)
    direct = rdp_to_epsilon(orders=ledger.orders, rdp=rdp, delta=ledger.delta)[0]
    assert result.epsilon == ledger.epsilon() == pytest.approx(direct, rel=1e-12)
    assert 3.95 < result.epsilon <= 4.0
    # a noise multiplier 2% smaller would overshoot: the calibration is the smallest
    smaller = compute_rdp(sample_rate=0.1, noise_multiplier=0.98 * event.noise_multiplier,
                          steps=20, orders=ledger.orders)
    assert rdp_to_epsilon(orders=ledger.orders, rdp=smaller, delta=ledger.delta)[0] > 4.0


def test_calibration_accounts_for_earlier_releases(data):
    ledger = PrivacyLedger(unit="rating", n_units=len(data.ratings))
    ledger.record_gaussian("earlier release", noise_multiplier=2.0)
    before = ledger.epsilon()
    result = fit_dpsgd(_model(data, dim=2), data.ratings, target_epsilon=3.0, epochs=1,
                       sample_rate=0.2, ledger=ledger)
    assert result.ledger is ledger and len(ledger.events) == 2
    assert 2.95 < ledger.epsilon() <= 3.0 and before < 3.0


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 0.0}, {"target_epsilon": math.inf}])
def test_zero_noise_is_recorded_and_infinite(data, kwargs):
    result = fit_dpsgd(_model(data, dim=2), data.ratings, epochs=1, sample_rate=0.5, **kwargs)
    (event,) = result.ledger.events
    assert event.noise_multiplier == 0 and event.count == 2
    assert math.isinf(result.epsilon) and math.isinf(result.ledger.epsilon())


def test_epsilon_is_zero_before_any_step(data):
    trainer = DPSGD(_model(data), data.ratings, clip_norm=1.0, noise_multiplier=1.0,
                    sample_rate=0.1)
    assert trainer.epsilon() == 0.0
    trainer.step()
    assert 0.0 < trainer.epsilon() < math.inf


class _StopError(Exception):
    pass


class _Snapshot(DPSGD):
    """Records what an observer can see at the first step, before any noisy release, then stops."""

    seen: list = []

    def sample_batch(self) -> torch.Tensor:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        config = (self.noise_multiplier, self.sample_rate, self.clip_norm, self.ledger.delta,
                  self.ledger.unit, len(self.ledger.events))
        _Snapshot.seen.append((state, config))
        raise _StopError


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_neighbouring_datasets_look_identical_before_the_first_release(data, loss):
    _Snapshot.seen = []
    for train in (data.ratings, _neighbour(data.ratings), data.ratings.iloc[1:]):
        with pytest.raises(_StopError):
            fit_dpsgd(_model(data, dim=2), train, target_epsilon=2.0, epochs=3, sample_rate=0.1,
                      loss=loss, trainer=_Snapshot)
    (a, config_a), (b, config_b), (c, config_c) = _Snapshot.seen
    assert config_a == config_b == config_c  # sigma, q, C, delta, unit: no data statistic
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name


def test_end_to_end_on_synthetic(data):
    train, test = random_split(data.ratings, seed=0)
    before = evaluate_ratings(_model(data, dim=2), test)["rmse"]
    model = _model(data, dim=2)
    result = fit_dpsgd(model, train, target_epsilon=8.0, epochs=20, sample_rate=0.2,
                       clip_norm=1.0, lr=0.05, reg=0.05, validation=test)
    assert result.model is model and result.seconds > 0
    assert len(result.history["val_rmse"]) == 20
    assert result.epsilon <= 8.0
    assert result.history["val_rmse"][-1] == evaluate_ratings(model, test)["rmse"] < before


@pytest.mark.parametrize("kwargs, match", [
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"clip_norm": math.nan}, "clip_norm"),
    ({"noise_multiplier": -0.1}, "noise_multiplier"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.5}, "sample_rate"),
    ({"lr": 0.0}, "lr"),
    ({"reg": -1.0}, "reg"),
    ({"trainable": ("nope",)}, "trainable"),
    ({"loss": "hinge"}, "loss"),
    ({"n_negatives": 0}, "n_negatives"),
    ({"seed": -1}, "seed"),
    ({"loss": "logistic", "ledger": PrivacyLedger(unit="rating", n_units=1500)}, "unit"),
])
def test_dpsgd_rejects_bad_parameters(data, kwargs, match):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        DPSGD(BiasedMF(data.n_users, data.n_items, 2), data.ratings, **args)


def test_fit_rejects_bad_parameters(data):
    model = BiasedMF(data.n_users, data.n_items, 2)
    with pytest.raises(ValueError, match="exactly one"):
        fit_dpsgd(model, data.ratings)
    with pytest.raises(ValueError, match="exactly one"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        fit_dpsgd(model, data.ratings, target_epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="delta"):  # delta * n above the book's 0.01
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, delta=1e-4)
    with pytest.raises(ValueError, match="epochs"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, epochs=0)
    with pytest.raises(ValueError, match="loss"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, loss="logistic", validation=data.ratings)
    with pytest.raises(ValueError, match="expected_batch_size"):
        noisy_average({"w": torch.zeros(2)}, noise_multiplier=1.0, clip_norm=1.0,
                      expected_batch_size=0.0, generator=torch.Generator())
    with pytest.raises(TypeError, match="model"):
        DPSGD(torch.nn.Linear(2, 2), data.ratings, clip_norm=1.0, noise_multiplier=1.0,
              sample_rate=0.1)


# -- the blocked passes (issue 24.4): same numbers, cache-sized working sets -------------------

def test_row_blocks_cover_the_table_in_multiples_of_16():
    for shape in [(1000, 32), (16, 3), (5,), (40_005,), (3, 1), (0, 4)]:
        table = torch.zeros(shape)
        blocks = row_blocks(table, block_elements=4096)
        covered = torch.cat([torch.arange(len(table))[b] for b in blocks])
        assert torch.equal(covered, torch.arange(len(table)))
        sizes = [table[b].numel() for b in blocks]
        assert all(s % 16 == 0 for s in sizes[:-1]) and (len(sizes) == 1 or sizes[-1] >= 16)
    assert row_blocks(torch.zeros(())) == [...]


@pytest.mark.parametrize("shape", [(5_003, 7), (70_001,), (300, 32)])
def test_blocked_noise_is_the_whole_table_draw(shape):
    summed = {"w": torch.randn(shape, generator=torch.Generator().manual_seed(0))}
    blocked = noisy_average(summed, noise_multiplier=1.3, clip_norm=0.7, expected_batch_size=9.0,
                            generator=torch.Generator().manual_seed(1))["w"]
    draw = torch.randn(shape, generator=torch.Generator().manual_seed(1)).mul_(1.3 * 0.7)
    assert torch.equal(blocked, (summed["w"] + draw) / 9.0)


def test_blocked_adam_is_torch_adam():
    def run(step):
        torch.manual_seed(0)
        table = torch.nn.Parameter(torch.randn(20_011, 32))
        scalar = torch.nn.Parameter(torch.tensor(0.5))
        opt = torch.optim.Adam([table, scalar], lr=0.03)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            table.grad = torch.randn(20_011, 32, generator=gen)
            scalar.grad = torch.randn((), generator=gen)
            step(opt)
        return table.detach().clone(), scalar.detach().clone(), opt.state[table]["exp_avg_sq"]

    assert len(row_blocks(torch.zeros(20_011, 32))) > 1
    ours, theirs = run(blocked_adam_step), run(lambda opt: opt.step())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_chunked_clipped_sum_equals_one_pass(data, loss, monkeypatch):
    index = torch.arange(len(data.ratings))
    whole = DPSGD(_model(data), data.ratings, clip_norm=0.5, noise_multiplier=1.0,
                  sample_rate=0.1, loss=loss, seed=3).clipped_sum(index)
    monkeypatch.setattr(dpsgd_module, "BATCH_CHUNK", 64)
    chunked = DPSGD(_model(data), data.ratings, clip_norm=0.5, noise_multiplier=1.0,
                    sample_rate=0.1, loss=loss, seed=3).clipped_sum(index)
    for name, value in whole.items():
        if name == "global_bias":  # a sum of chunk sums: rounding only
            assert torch.allclose(chunked[name], value, rtol=1e-5, atol=1e-5)
        else:  # scattered in the same order
            assert torch.equal(chunked[name], value), name
