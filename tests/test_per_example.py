"""Tests of privrec.central.per_example: the closed-form per-rating gradients against torch.func."""

from __future__ import annotations

import pytest
import torch

from privrec.central.per_example import (
    MF_PARAMETER_NAMES,
    clip_and_sum,
    mf_clipped_gradient_sum,
    mf_implicit_clipped_gradient_sum,
    mf_implicit_loss,
    mf_loss,
    mf_per_example_gradients,
    per_example_gradients,
    per_example_norms,
    trainable_names,
)
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import ratings_to_tensors


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
    reference, ref_norms = clip_and_sum(dense, clip_norm=clip_norm)
    fast, norms = mf_clipped_gradient_sum(model, users, items, ratings, clip_norm=clip_norm,
                                          reg=reg, bias_reg=bias_reg)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for name in MF_PARAMETER_NAMES:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-5)
    if clip_norm < 1:  # clipping was active for most examples
        assert (norms > clip_norm).float().mean() > 0.5
    if clip_norm == 1e6:  # the unclipped sum is the autograd gradient of the summed loss
        model.zero_grad()
        mf_loss(model, users, items, ratings, reg=reg, bias_reg=bias_reg).backward()
        for name in MF_PARAMETER_NAMES:
            torch.testing.assert_close(fast[name], getattr(model, name).grad, rtol=1e-4, atol=1e-4)


def test_clipped_rows_have_norm_at_most_clip(data):
    """Each example's clipped contribution, isolated, has norm min(norm, C)."""
    model = _model(data)
    users, items, ratings = (t[:30] for t in ratings_to_tensors(data.ratings))
    for j in range(30):
        one = slice(j, j + 1)
        summed, norm = mf_clipped_gradient_sum(model, users[one], items[one], ratings[one],
                                               clip_norm=0.4)
        total = torch.sqrt(sum(g.square().sum() for g in summed.values()))
        assert total.item() == pytest.approx(min(norm.item(), 0.4), rel=1e-5)


def test_fast_path_respects_trainable_subset(data):
    model = _model(data)
    users, items, ratings = (t[:50] for t in ratings_to_tensors(data.ratings))
    names = ("user_factors", "item_factors")
    fast, norms = mf_clipped_gradient_sum(model, users, items, ratings, clip_norm=0.5,
                                          trainable=names)
    dense = per_example_gradients(model, _rating_loss(0.0, 0.0), users, items, ratings,
                                  parameters=list(names))
    reference, ref_norms = clip_and_sum(dense, clip_norm=0.5)
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
    for name, ids in (("user_factors", users), ("item_factors", items), ("user_bias", users),
                      ("item_bias", items)):
        torch.testing.assert_close(rows[name], dense[name][j, ids], rtol=1e-5, atol=1e-6)
        dense[name][j, ids] = 0  # ...and everything off those rows is exactly zero
        assert dense[name].abs().max() == 0, name
    torch.testing.assert_close(rows["global_bias"], dense["global_bias"], rtol=1e-5, atol=1e-6)


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
    reference, ref_norms = clip_and_sum(dense, clip_norm=clip_norm)
    fast, norms = mf_implicit_clipped_gradient_sum(model, users, items, clip_norm=clip_norm, reg=reg)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for name in MF_PARAMETER_NAMES:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_zero_sums(data):
    model = _model(data)
    empty = torch.zeros(0, dtype=torch.long)
    summed, norms = mf_clipped_gradient_sum(model, empty, empty, torch.zeros(0), clip_norm=1.0)
    assert norms.shape == (0,)
    for name in MF_PARAMETER_NAMES:
        assert summed[name].shape == getattr(model, name).shape
        assert summed[name].abs().max() == 0
    summed, norms = mf_implicit_clipped_gradient_sum(model, empty, torch.zeros(0, 5, dtype=torch.long),
                                                     clip_norm=1.0)
    assert norms.shape == (0,) and all(g.abs().max() == 0 for g in summed.values())
    assert per_example_norms({"w": torch.zeros(0, 3), "b": torch.zeros(0)}).shape == (0,)


def test_bad_parameters(data):
    model = _model(data)
    with pytest.raises(ValueError, match="trainable"):
        trainable_names(("nope",))
    with pytest.raises(ValueError, match="trainable"):
        trainable_names(())
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_sum({"w": torch.ones(3, 2)}, clip_norm=0.0)
    with pytest.raises(ValueError, match="leading dimension"):
        per_example_gradients(model, _rating_loss(0, 0), torch.zeros(3, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="parameters"):
        per_example_gradients(model, _rating_loss(0, 0), torch.zeros(3, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), torch.zeros(3), parameters=["x"])
    with pytest.raises(ValueError, match="items"):
        mf_implicit_clipped_gradient_sum(model, torch.zeros(3, dtype=torch.long),
                                         torch.zeros(3, dtype=torch.long), clip_norm=1.0)
