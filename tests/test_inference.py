"""Attack metrics (AUC, TPR at low FPR), attribute inference and membership inference."""

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.attacks.inference import (
    attack_summary,
    attribute_inference_auc,
    clopper_pearson,
    fit_logistic,
    item_set_features,
    roc_auc,
    tpr_at_fpr,
)
from privrec.attacks.membership import (
    calibrated_loss_scores,
    candidate_split,
    inclusion_masks,
    lira_scores,
    loss_scores,
    membership_attack,
    residuals,
    with_candidates,
)
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import fit_explicit


def pairwise_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean()


def brute_tpr(s, y, fpr):
    best = 0.0
    for t in np.concatenate([np.unique(s), [np.inf]]):
        pred = s >= t
        if pred[y == 0].mean() <= fpr:
            best = max(best, pred[y == 1].mean())
    return best


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_tpr_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 300).astype(float)          # many ties
    y = (rng.random(300) < 0.3 + 0.05 * s).astype(int)
    assert roc_auc(s, y) == pytest.approx(pairwise_auc(s, y), abs=1e-12)
    for f in (0.0, 0.01, 0.1, 0.5, 1.0):
        assert tpr_at_fpr(s, y, fpr=f) == pytest.approx(brute_tpr(s, y, f), abs=1e-12)


def test_ties_do_not_depend_on_row_order():
    s, y = np.array([1.0, 1.0, 1.0, 0.0]), np.array([1, 0, 1, 0])
    perm = np.array([3, 1, 0, 2])
    assert roc_auc(s, y) == roc_auc(s[perm], y[perm]) == 0.75   # 2 wins + 2 ties of 4 pairs
    assert roc_auc(np.ones(10), np.arange(10) % 2) == 0.5
    assert tpr_at_fpr(np.ones(10), np.arange(10) % 2, fpr=0.5) == 0.0   # the tie is all-or-nothing
    summary = attack_summary([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0])
    assert summary == {"auc": 1.0, "tpr@0.1%": 1.0, "tpr@1%": 1.0}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([0.1, 0.2], [0, 1], fpr=1.5)


def test_fit_logistic_reaches_a_stationary_point():
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(200, 5)))
    y = torch.as_tensor((rng.random(200) < 0.5).astype(float))
    w, b = fit_logistic(x, y, l2=2.0)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x.double() @ w + b, y.double(),
                                                                reduction="sum") + w.square().sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and abs(float(b.grad)) < 1e-4


def test_attribute_inference_finds_a_planted_signal_and_not_a_random_one():
    data = synthetic_movielens(300, 60, 4000, seed=0)
    x = item_set_features(data.ratings, n_users=300, n_items=60)
    assert x.sum() == len(data.ratings)
    planted = (x[:, :10].sum(1) > np.median(x[:, :10].sum(1))).astype(int)
    assert attribute_inference_auc(x, planted, l2=1.0) > 0.85
    noise = np.random.default_rng(1).integers(0, 2, 300)
    assert abs(attribute_inference_auc(x, noise, l2=10.0) - 0.5) < 0.1


def test_inclusion_masks_are_complementary_pairs():
    masks = inclusion_masks(50, n_models=6, seed=0)
    assert masks.shape == (6, 50)
    assert np.array_equal(masks[1], ~masks[0]) and np.array_equal(masks.sum(0), np.full(50, 3))
    with pytest.raises(ValueError, match="even"):
        inclusion_masks(50, n_models=3)


def test_lira_separates_planted_gaussians_better_than_the_loss():
    rng = np.random.default_rng(0)
    m = 2000
    hard = rng.normal(0, 1.5, m)                  # per-example difficulty: the loss's confound
    masks = inclusion_masks(m, n_models=8, seed=1)
    # training on a rating halves its residual
    refs = hard * np.where(masks, 0.5, 1.0) + rng.normal(0, 0.2, masks.shape)
    target_in = rng.random(m) < 0.5
    target = hard * np.where(target_in, 0.5, 1.0) + rng.normal(0, 0.2, m)
    lira = roc_auc(lira_scores(target, refs, masks), target_in)
    calibrated = roc_auc(calibrated_loss_scores(target, refs, masks), target_in)
    loss = roc_auc(loss_scores(target), target_in)
    assert lira > 0.9 and calibrated > loss + 0.05
    with pytest.raises(ValueError, match="IN"):
        lira_scores(target, refs[:2], masks[:2])


def test_membership_attack_end_to_end_on_an_overfit_model():
    data = synthetic_movielens(60, 80, 1500, seed=0)
    base, candidates = candidate_split(data.ratings, n_candidates=400, seed=0)
    assert len(base) + len(candidates) == 1500
    assert len(with_candidates(base, candidates, np.arange(400) < 10)) == len(base) + 10

    def train(ratings: pd.DataFrame, seed: int) -> BiasedMF:
        model = BiasedMF(60, 80, 16, global_mean=3.5, seed=seed)
        fit_explicit(model, ratings, epochs=60, batch_size=256, reg=0.0, bias_reg=0.0, seed=seed,
                     progress=False)
        return model

    out = membership_attack(train, base, candidates, n_reference=4, seed=0)
    assert set(out) == {"loss", "calibrated loss", "lira", "members", "non-members"}
    assert out["members"] + out["non-members"] == 400
    assert out["lira"]["auc"] > 0.7 and out["loss"]["auc"] > 0.55
    assert residuals(train(base, 0), candidates).shape == (400,)


def test_clopper_pearson_matches_known_values_and_covers():
    assert clopper_pearson(0, 100)[0] == 0.0 and clopper_pearson(100, 100)[1] == 1.0
    low, high = clopper_pearson(5, 20)
    assert low == pytest.approx(0.0866, abs=1e-4) and high == pytest.approx(0.4910, abs=1e-4)
    rng = np.random.default_rng(0)
    intervals = [clopper_pearson(int(k), 200) for k in rng.binomial(200, 0.03, 500)]
    hits = [lo <= 0.03 <= hi for lo, hi in intervals]
    assert np.mean(hits) >= 0.95 - 3 * np.sqrt(0.05 * 0.95 / 500)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(5, 4)
