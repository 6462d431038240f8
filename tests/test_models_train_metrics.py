"""privrec.recsys.models, privrec.recsys.train and privrec.recsys.metrics: behaviour and ValueError paths."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from privrec.recsys.data import leave_last_out_split, random_split, synthetic_movielens
from privrec.recsys.metrics import (
    canonical_order,
    evaluate_ranking,
    evaluate_ratings,
    heldout_ndcg,
    mae,
    ranking_metrics,
    rmse,
    top_k,
)
from privrec.recsys.models import BiasedMF
from privrec.recsys.train import (
    fit_bias_baseline,
    fit_explicit,
    fit_implicit,
    global_mean_model,
    popularity_scores,
)


@pytest.fixture(scope="module")
def syn():
    ml = synthetic_movielens(n_users=80, n_items=60, n_ratings=2400, seed=0)
    train, test = random_split(ml.ratings, seed=0)
    return ml, train, test


def test_model_parameter_groups_and_prediction():
    m = BiasedMF(5, 7, 3, global_mean=3.5, seed=0)
    assert [p.shape for p in m.user_parameters()] == [(5, 3), (5,)]
    assert [p.shape for p in m.shared_parameters()] == [(7, 3), (7,), ()]
    users, items = torch.tensor([0, 4]), torch.tensor([6, 0])
    expected = 3.5 + (m.user_factors[users] * m.item_factors[items]).sum(1)
    assert torch.allclose(m(users, items), expected)
    assert torch.allclose(m.score_all()[users, items], expected)
    assert BiasedMF(5, 7, 0).score_all().shape == (5, 7)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_users": 0}, "n_users"), ({"n_items": -1}, "n_items"), ({"dim": -2}, "dim"),
    ({"global_mean": float("nan")}, "global_mean"), ({"init_std": -1.0}, "init_std"),
])
def test_model_rejects_bad_sizes(kwargs, match):
    args = {"n_users": 3, "n_items": 3, "dim": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        BiasedMF(args.pop("n_users"), args.pop("n_items"), args.pop("dim"), **args)


def test_model_rejects_bad_ids():
    m = BiasedMF(3, 4, 2)
    with pytest.raises(ValueError, match=r"users ids must lie in \[0, 3\)"):
        m(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(TypeError, match="items must hold integer ids"):
        m(torch.tensor([0]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="same length"):
        m(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="1-D"):
        m(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


def test_metrics_values_and_errors():
    assert rmse([1.0, 3.0], [2.0, 5.0]) == pytest.approx(math.sqrt(2.5))
    assert mae(np.array([1.0, 3.0]), torch.tensor([2.0, 5.0])) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="same length"):
        rmse([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="predictions contains NaN"):
        rmse([float("nan")], [1.0])
    with pytest.raises(ValueError, match="empty"):
        mae([], [])


def test_ranking_metrics_by_hand():
    train = pd.DataFrame({"user": [0, 1], "item": [0, 0], "rating": [5.0, 5.0]})
    test = pd.DataFrame({"user": [0, 1], "item": [1, 3], "rating": [5.0, 5.0]})
    scores = torch.tensor([[9.0, 8.0, 7.0, 1.0], [9.0, 1.0, 2.0, 3.0]])
    # User 0: item 0 is masked, item 1 ranks first. User 1: item 3 ranks first among 1..3.
    assert ranking_metrics(scores, train, test, k=1) == {"hr": 1.0, "ndcg": 1.0}
    scores[1, 3] = 0.0  # now last of three candidates: rank 2 (0-based)
    out = ranking_metrics(scores, train, test, k=3)
    assert out["hr"] == 1.0 and out["ndcg"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert ranking_metrics(scores, train, test, k=2)["hr"] == 0.5
    # Ties count against the item: a constant scorer earns nothing at k=1.
    assert ranking_metrics(torch.ones(2, 4), train, test, k=1)["hr"] == 0.0
    with pytest.raises(ValueError, match="k must be"):
        ranking_metrics(scores, train, test, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        ranking_metrics(scores, train, test, k=1.5)
    with pytest.raises(ValueError, match="also in train"):
        ranking_metrics(scores, train, train)
    with pytest.raises(ValueError, match="scores contains NaN"):
        ranking_metrics(torch.full((2, 4), float("nan")), train, test)


def test_training_beats_baselines_on_synthetic(syn):
    ml, train, test = syn
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    mean_rmse = evaluate_ratings(global_mean_model(train, **kw), test)["rmse"]
    bias_rmse = evaluate_ratings(fit_bias_baseline(train, **kw), test)["rmse"]
    model = BiasedMF(ml.n_users, ml.n_items, 4, global_mean=float(train["rating"].mean()), seed=0)
    history = fit_explicit(model, train, epochs=40, batch_size=128, reg=0.02, validation=test,
                           progress=False)
    curves = history.history
    assert history.model is model and history.ledger is None and history.epsilon == float("inf")
    assert len(curves["train_loss"]) == 40 and len(curves["val_rmse"]) == 40
    assert curves["train_loss"][-1] < curves["train_loss"][0]
    assert curves["val_rmse"][-1] < bias_rmse < mean_rmse


def test_training_is_seeded(syn):
    ml, train, _ = syn

    def run():
        m = BiasedMF(ml.n_users, ml.n_items, 4, seed=1)
        fit_explicit(m, train, epochs=2, seed=5, progress=False)
        return m.item_factors.detach().clone()

    assert torch.equal(run(), run())


def test_implicit_training_learns_to_rank():
    # Four taste groups, each rating only its own quarter of the catalogue: popularity cannot tell
    # them apart, an implicit MF model must.
    rng = np.random.default_rng(0)
    rows = [(u, i) for u in range(80) for i in rng.choice(np.arange(10) + 10 * (u % 4), 7, replace=False)]
    ratings = pd.DataFrame({"user": [u for u, _ in rows], "item": [i for _, i in rows],
                            "rating": 5.0, "timestamp": np.arange(len(rows))})
    train, test = leave_last_out_split(ratings)
    model = BiasedMF(80, 40, 4, seed=0)
    fit_implicit(model, train, epochs=60, batch_size=64, lr=0.05, progress=False)
    pop = ranking_metrics(popularity_scores(train, n_users=80, n_items=40), train, test, k=5)
    with torch.no_grad():
        ours = ranking_metrics(model.score_all(), train, test, k=5)
    assert ours["hr"] > 0.9 > pop["hr"] + 0.5 and ours["ndcg"] <= ours["hr"]


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"batch_size": 0}, "batch_size"), ({"reg": -1.0}, "reg"),
])
def test_fit_explicit_rejects_bad_hyperparameters(syn, kwargs, match):
    ml, train, _ = syn
    with pytest.raises(ValueError, match=match):
        fit_explicit(BiasedMF(ml.n_users, ml.n_items, 2), train, **kwargs)


def test_fit_rejects_mismatched_data(syn):
    ml, train, _ = syn
    with pytest.raises(ValueError, match="train\\['item'\\] has id"):
        fit_explicit(BiasedMF(ml.n_users, 5, 2), train)
    with pytest.raises(TypeError, match="model must be a BiasedMF"):
        fit_explicit(torch.nn.Linear(2, 2), train)
    with pytest.raises(ValueError, match="n_negatives"):
        fit_implicit(BiasedMF(ml.n_users, ml.n_items, 2), train, n_negatives=0)


def test_heldout_ndcg_by_hand():
    model = BiasedMF(2, 3, 0)
    with torch.no_grad():
        model.item_bias.copy_(torch.tensor([3.0, 2.0, 1.0]))  # predicted order: item 0, 1, 2
    test = pd.DataFrame({"user": [0, 0, 0, 1], "item": [0, 1, 2, 0], "rating": [1.0, 5.0, 3.0, 4.0]})
    gains = np.array([2**1 - 1, 2**5 - 1, 2**3 - 1], dtype=float)
    disc = 1 / np.log2(np.arange(3) + 2)
    expected = (gains * disc).sum() / (np.sort(gains, kind="stable")[::-1] * disc).sum()
    assert heldout_ndcg(model, test, k=10) == pytest.approx(expected)  # user 1 (one rating) skipped
    with torch.no_grad():
        model.item_bias.copy_(torch.tensor([1.0, 3.0, 2.0]))  # the ideal order
    assert heldout_ndcg(model, test, k=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be"):
        heldout_ndcg(model, test, k=0)


def test_cached_json_memoises_and_keys_on_config(tmp_path):
    from privrec.course import book

    calls = []

    def compute():
        calls.append(1)
        return {"rmse": 0.9, "eps": math.inf}

    first = book.cached_json("demo", {"a": 1}, compute, modules=(book,), cache_dir=tmp_path)
    again = book.cached_json("demo", {"a": 1}, compute, modules=(book,), cache_dir=tmp_path)
    other = book.cached_json("demo", {"a": 2}, compute, modules=(book,), cache_dir=tmp_path)
    assert first == again == other and first["eps"] == math.inf and len(calls) == 2


def test_cached_json_does_not_reuse_results_of_other_arithmetic(tmp_path, monkeypatch):
    """A result computed with other CPU kernels (its floats differ in the last bits) is recomputed:
    a chapter run from a warm cache must print what it prints from an empty one."""
    from privrec.course import book

    calls = []
    book.cached_json("demo", {"a": 1}, lambda: calls.append(1) or {}, cache_dir=tmp_path)
    import os
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", os.environ.get("ATEN_CPU_CAPABILITY", "") + "-other")
    book.cached_json("demo", {"a": 1}, lambda: calls.append(1) or {}, cache_dir=tmp_path)
    assert len(calls) == 2


def test_top_k_breaks_ties_by_smaller_id():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert top_k(scores, 3).tolist() == [1, 2, 4]
    assert top_k(scores, 5).tolist() == [1, 2, 4, 3, 0]
    # Many ties: the answer is the id order, whatever the sort kernel does with equal keys.
    assert top_k(np.zeros(1000), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
        top_k(scores, 6)
    with pytest.raises(ValueError, match="scores contains NaN"):
        top_k([1.0, float("nan")], 1)


def _permuted(frame, seed):
    return frame.iloc[np.random.default_rng(seed).permutation(len(frame))].reset_index(drop=True)


def test_results_do_not_depend_on_row_order(syn):
    """Every metric and the closed-form baseline give bit-identical answers on permuted rows."""
    ml, train, test = syn
    kw = {"n_users": ml.n_users, "n_items": ml.n_items}
    model = BiasedMF(ml.n_users, ml.n_items, 4, global_mean=3.5, seed=0)
    # Coarse scores with many ties, so the tie rule matters.
    with torch.no_grad():
        scores = (model.score_all() * 4).round()
    assert len(torch.unique(scores)) < scores.numel() / 10
    tied = BiasedMF(ml.n_users, ml.n_items, 0)  # three predicted values: ties inside every user
    with torch.no_grad():
        tied.item_bias.copy_(torch.arange(ml.n_items) % 3)
    for seed in range(3):
        p_train, p_test = _permuted(train, seed), _permuted(test, seed + 10)
        assert ranking_metrics(scores, p_train, p_test) == ranking_metrics(scores, train, test)
        assert evaluate_ranking(model, p_train, p_test) == evaluate_ranking(model, train, test)
        assert evaluate_ratings(model, p_test) == evaluate_ratings(model, test)
        assert heldout_ndcg(model, p_test) == heldout_ndcg(model, test)
        assert heldout_ndcg(tied, p_test) == heldout_ndcg(tied, test)
        a, b = fit_bias_baseline(p_train, **kw), fit_bias_baseline(train, **kw)
        assert torch.equal(a.item_bias, b.item_bias) and torch.equal(a.user_bias, b.user_bias)
        assert torch.equal(popularity_scores(p_train, **kw), popularity_scores(train, **kw))
        assert canonical_order(p_train).reset_index(drop=True).equals(
            canonical_order(train).reset_index(drop=True))


def test_pessimistic_tie_rule_is_order_free():
    # Item 2 (the test item) ties with items 0 and 3: its rank is 1 (item 1 higher) + 2 ties = 3.
    train = pd.DataFrame({"user": [0], "item": [4], "rating": [5.0]})
    test = pd.DataFrame({"user": [0], "item": [2], "rating": [5.0]})
    scores = torch.tensor([[1.0, 2.0, 1.0, 1.0, 9.0]])
    assert ranking_metrics(scores, train, test, k=3)["hr"] == 0.0
    out = ranking_metrics(scores, train, test, k=4)
    assert out["hr"] == 1.0 and out["ndcg"] == pytest.approx(1 / math.log2(5))
    # Relabelling the items (moving the tied candidates after the test item) changes nothing.
    perm = torch.tensor([4, 3, 1, 0, 2])  # new id of each old item
    relabelled = torch.empty_like(scores)
    relabelled[0, perm] = scores[0]
    moved = ranking_metrics(relabelled, train.assign(item=[2]), test.assign(item=[1]), k=4)
    assert moved == out
