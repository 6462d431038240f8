"""Tests of privrec.dpsgd: the fast path against torch.func, the noise, the accounting, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from privrec.accounting import get_epsilon, get_noise_multiplier
from privrec.data import leave_last_out_split, random_split, synthetic_movielens
from privrec.dpsgd import (
    DPSGD,
    MF_PARAMETER_NAMES,
    add_gaussian_noise,
    clip_and_sum,
    fit_dpsgd,
    fit_private_bias_residual,
    laplace_perturb_ratings,
    mf_clipped_gradient_sum,
    mf_implicit_clipped_gradient_sum,
    mf_implicit_loss,
    mf_loss,
    mf_per_example_gradients,
    per_example_gradients,
    private_biases,
    randomized_response_interactions,
)
from privrec.metrics import evaluate_ratings
from privrec.models import BiasedMF
from privrec.train import fit_bias_baseline, ratings_to_tensors


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens(seed=0)


def _model(data, dim=3, seed=1):
    model = BiasedMF(data.n_users, data.n_items, dim, global_mean=3.5, init_std=0.5, seed=seed)
    with torch.no_grad():  # non-zero biases so every term of the closed form matters
        gen = torch.Generator().manual_seed(seed)
        model.user_bias.normal_(0, 0.3, generator=gen)
        model.item_bias.normal_(0, 0.3, generator=gen)
    return model


def _rating_loss(reg, bias_reg):
    def loss(model, users, items, ratings):
        return mf_loss(model, users, items, ratings, reg=reg, bias_reg=bias_reg)
    return loss


@pytest.mark.parametrize("clip_norm", [0.3, 2.0, 1e6])
def test_fast_path_matches_torch_func(data, clip_norm):
    model = _model(data)
    users, items, ratings = (t[:200] for t in ratings_to_tensors(data.ratings))
    reg, bias_reg = 0.05, 0.02
    dense = per_example_gradients(model, _rating_loss(reg, bias_reg), users, items, ratings,
                                  parameters=list(MF_PARAMETER_NAMES))
    assert dense["user_factors"].shape == (200, data.n_users, 3)
    reference, ref_norms = clip_and_sum(dense, clip_norm)
    fast, norms = mf_clipped_gradient_sum(model, users, items, ratings, clip_norm=clip_norm,
                                          reg=reg, bias_reg=bias_reg)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for name in MF_PARAMETER_NAMES:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-5)
    if clip_norm < 1:  # clipping was active for most examples and every clipped norm is C
        assert (norms > clip_norm).float().mean() > 0.5
    # The unclipped sum is the autograd gradient of the summed loss.
    if clip_norm == 1e6:
        model.zero_grad()
        mf_loss(model, users, items, ratings, reg=reg, bias_reg=bias_reg).backward()
        for name in MF_PARAMETER_NAMES:
            torch.testing.assert_close(fast[name], getattr(model, name).grad, rtol=1e-4, atol=1e-4)


def test_fast_path_respects_trainable_subset(data):
    model = _model(data)
    users, items, ratings = (t[:50] for t in ratings_to_tensors(data.ratings))
    names = ("user_factors", "item_factors")
    fast, norms = mf_clipped_gradient_sum(model, users, items, ratings, clip_norm=0.5,
                                          trainable=names)
    dense = per_example_gradients(model, _rating_loss(0.0, 0.0), users, items, ratings,
                                  parameters=list(names))
    reference, ref_norms = clip_and_sum(dense, 0.5)
    assert set(fast) == set(names)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for name in names:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-5)


def test_per_example_rows_are_the_dense_rows(data):
    model = _model(data)
    users, items, ratings = (t[:20] for t in ratings_to_tensors(data.ratings))
    rows = mf_per_example_gradients(model, users, items, ratings, reg=0.1, bias_reg=0.1)
    dense = per_example_gradients(model, _rating_loss(0.1, 0.1), users, items, ratings)
    j = torch.arange(20)
    torch.testing.assert_close(rows["user_factors"], dense["user_factors"][j, users], rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(rows["item_bias"], dense["item_bias"][j, items], rtol=1e-5, atol=1e-6)
    # ...and everything off those rows is exactly zero.
    dense["user_factors"][j, users] = 0
    assert dense["user_factors"].abs().max() == 0


def test_noise_std_on_every_row():
    sigma, clip, q, n = 1.3, 0.7, 0.05, 4000
    expected = sigma * clip / (q * n)
    gen = torch.Generator().manual_seed(0)
    zero = {"table": torch.zeros(500, 4), "scalar": torch.zeros(())}
    draws = torch.stack([add_gaussian_noise(zero, noise_multiplier=sigma, clip_norm=clip,
                                            expected_batch_size=q * n, generator=gen)["table"]
                         for _ in range(200)])  # [200, 500, 4]
    overall = draws.std().item()
    assert abs(overall / expected - 1) < 0.02
    per_row = draws.square().mean(dim=(0, 2)).sqrt() / expected  # 800 samples per row
    assert per_row.min() > 0.8 and per_row.max() < 1.2
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(draws.numel())


def test_dpsgd_step_noises_untouched_rows(data):
    model = _model(data)
    train = data.ratings
    trainer = DPSGD(model, train, clip_norm=1.0, noise_multiplier=2.0, sample_rate=0.01, seed=0)
    users, items, ratings = ratings_to_tensors(train)
    index = torch.tensor([0, 1, 2])
    clean, _ = mf_clipped_gradient_sum(model, users[index], items[index], ratings[index],
                                       clip_norm=1.0)
    noisy = trainer.noisy_gradient(index)
    untouched = torch.ones(data.n_items, dtype=torch.bool)
    untouched[items[index]] = False
    assert (clean["item_factors"][untouched] == 0).all()
    assert (noisy["item_factors"][untouched] != 0).all()
    residual = noisy["item_factors"] - clean["item_factors"] / trainer.expected_batch_size
    expected = 2.0 * 1.0 / trainer.expected_batch_size
    assert abs(residual.std().item() / expected - 1) < 0.1


def test_epsilon_matches_accountant(data):
    train, _ = random_split(data.ratings, seed=0)
    model = BiasedMF(data.n_users, data.n_items, 2, global_mean=3.0)
    result = fit_dpsgd(model, train, target_epsilon=4.0, delta=1e-5, epochs=2, sample_rate=0.1,
                       clip_norm=1.0, lr=0.01)
    assert result.steps == 20
    sigma = get_noise_multiplier(target_epsilon=4.0, delta=1e-5, sample_rate=0.1, steps=20)
    assert result.noise_multiplier == sigma
    direct = get_epsilon(noise_multiplier=sigma, sample_rate=0.1, steps=20, delta=1e-5)
    assert result.epsilon == pytest.approx(direct, rel=1e-9)
    assert 3.9 < result.epsilon <= 4.0


def test_infinite_epsilon_means_no_noise(data):
    model = BiasedMF(data.n_users, data.n_items, 2, global_mean=3.0)
    result = fit_dpsgd(model, data.ratings, target_epsilon=math.inf, epochs=1, sample_rate=0.5)
    assert result.noise_multiplier == 0 and math.isinf(result.epsilon)


def test_end_to_end_on_synthetic(data):
    train, test = random_split(data.ratings, seed=0)
    start = BiasedMF(data.n_users, data.n_items, 0, global_mean=3.0)
    before = evaluate_ratings(start, test)["rmse"]
    model = BiasedMF(data.n_users, data.n_items, 2, global_mean=3.0)
    result = fit_dpsgd(model, train, target_epsilon=8.0, epochs=20, sample_rate=0.2,
                       clip_norm=1.0, lr=0.05, reg=0.05, validation=test)
    assert len(result.val_rmse) == 20
    assert result.epsilon <= 8.0
    assert evaluate_ratings(model, test)["rmse"] < before  # it learned something
    improved, info = fit_private_bias_residual(train, n_users=data.n_users, n_items=data.n_items,
                                               target_epsilon=8.0, dim=2, epochs=5, sample_rate=0.2)
    assert 7.5 < info.epsilon <= 8.0
    assert evaluate_ratings(improved, test)["rmse"] < before


def test_private_biases_without_noise_match_baseline(data):
    train = data.ratings
    exact = private_biases(train, n_users=data.n_users, n_items=data.n_items, noise_multiplier=0.0,
                           rating_bound=10.0, residual_bound=10.0)
    baseline = fit_bias_baseline(train, n_users=data.n_users, n_items=data.n_items, n_iter=1)
    assert exact.global_mean == pytest.approx(float(train["rating"].mean()), abs=1e-6)
    torch.testing.assert_close(exact.item_bias, baseline.item_bias.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact.user_bias, baseline.user_bias.detach(), rtol=1e-4, atol=1e-5)
    assert math.isinf(exact.epsilon)
    noisy = private_biases(train, n_users=data.n_users, n_items=data.n_items, noise_multiplier=2.0)
    assert 0 < noisy.epsilon < math.inf


def test_laplace_perturbation_scale_and_clamp(data):
    big = data.ratings.sample(20000, replace=True, random_state=0).reset_index(drop=True)
    raw = laplace_perturb_ratings(big, epsilon=2.0, clamp=False, seed=0)
    noise = raw["rating"].to_numpy(np.float64) - big["rating"].to_numpy(np.float64)
    # Laplace(b): mean |x| = b = 4 / 2.
    assert abs(np.abs(noise).mean() / 2.0 - 1) < 0.05
    clamped = laplace_perturb_ratings(big, epsilon=2.0, seed=0)
    assert clamped["rating"].between(1, 5).all()
    assert (clamped[["user", "item"]].to_numpy() == big[["user", "item"]].to_numpy()).all()


def test_randomized_response_flip_rate(data):
    eps = 1.0
    noisy = randomized_response_interactions(data.ratings, n_users=data.n_users,
                                             n_items=data.n_items, epsilon=eps, seed=0)
    truth = set(zip(data.ratings["user"], data.ratings["item"], strict=True))
    reported = set(zip(noisy["user"], noisy["item"], strict=True))
    cells = data.n_users * data.n_items
    flip = 1 / (1 + math.exp(eps))
    false_pos = len(reported - truth) / (cells - len(truth))
    false_neg = len(truth - reported) / len(truth)
    tol = 4 * math.sqrt(flip * (1 - flip) / len(truth))
    assert abs(false_pos - flip) < tol and abs(false_neg - flip) < tol


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
])
def test_dpsgd_rejects_bad_parameters(data, kwargs, match):
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        DPSGD(BiasedMF(data.n_users, data.n_items, 2), data.ratings, **args)


def test_fit_and_helpers_reject_bad_parameters(data):
    model = BiasedMF(data.n_users, data.n_items, 2)
    with pytest.raises(ValueError, match="exactly one"):
        fit_dpsgd(model, data.ratings)
    with pytest.raises(ValueError, match="exactly one"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        fit_dpsgd(model, data.ratings, target_epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="epochs"):
        fit_dpsgd(model, data.ratings, target_epsilon=1.0, epochs=0)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_sum({"w": torch.ones(3, 2)}, 0.0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        add_gaussian_noise({"w": torch.zeros(2)}, noise_multiplier=1.0, clip_norm=1.0,
                           expected_batch_size=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        laplace_perturb_ratings(data.ratings, epsilon=-1.0)
    with pytest.raises(ValueError, match="epsilon"):
        randomized_response_interactions(data.ratings, n_users=data.n_users, n_items=data.n_items,
                                         epsilon=0.0)
    with pytest.raises(ValueError, match="bias_share"):
        fit_private_bias_residual(data.ratings, n_users=data.n_users, n_items=data.n_items,
                                  target_epsilon=1.0, bias_share=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_biases(data.ratings, n_users=data.n_users, n_items=data.n_items,
                       noise_multiplier=-1.0)
    with pytest.raises(TypeError, match="model"):
        DPSGD(torch.nn.Linear(2, 2), data.ratings, clip_norm=1.0, noise_multiplier=1.0,
              sample_rate=0.1)
    with pytest.raises(ValueError, match="leading dimension"):
        per_example_gradients(model, _rating_loss(0, 0), torch.zeros(3, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long), torch.zeros(3))


@pytest.mark.parametrize("clip_norm", [0.2, 1e6])
def test_implicit_fast_path_matches_torch_func_with_duplicate_negatives(data, clip_norm):
    model = _model(data)
    users = torch.as_tensor(data.ratings["user"].to_numpy()[:120])
    gen = torch.Generator().manual_seed(3)
    items = torch.randint(0, 6, (120, 4), generator=gen)  # few items: many repeats in a row
    items[:, 0] = torch.as_tensor(data.ratings["item"].to_numpy()[:120])
    assert any(len(set(row.tolist())) < 4 for row in items)
    reg = 0.03

    def loss(m, u, i):
        return mf_implicit_loss(m, u, i, reg=reg)

    dense = per_example_gradients(model, loss, users, items, parameters=list(MF_PARAMETER_NAMES))
    reference, ref_norms = clip_and_sum(dense, clip_norm)
    fast, norms = mf_implicit_clipped_gradient_sum(model, users, items, clip_norm=clip_norm, reg=reg)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for name in MF_PARAMETER_NAMES:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-5)


def test_implicit_end_to_end(data):
    train, test = leave_last_out_split(data.ratings)
    model, info = fit_private_bias_residual(train, n_users=data.n_users, n_items=data.n_items,
                                            target_epsilon=4.0, dim=2, epochs=3, sample_rate=0.2,
                                            loss="logistic")
    assert info.epsilon <= 4.0
    assert info.biases.item_bias.shape == (data.n_items,)
    # Noisy popularity still ranks the most rated item near the top.
    top = int(train["item"].value_counts().idxmax())
    assert int(info.biases.item_bias.argsort(descending=True).tolist().index(top)) < 5
    scores = model.score_all()
    assert torch.isfinite(scores).all()
