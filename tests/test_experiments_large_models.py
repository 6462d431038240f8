"""Chapters 6-7's harness: the public twin, splits, evaluation, tuning and grids (small and fast)."""

import math

import numpy as np
import pandas as pd
import pytest

from privrec.course.experiments import large_models as lm
from privrec.recsys.data import synthetic_movielens
from privrec.recsys.two_tower import shared_size

TINY = lm.Protocol(rounds=2, sample_rate=0.5, local_steps=1, local_batch=2, personalise_steps=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    import os
    before = os.environ.get("PRIVREC_CACHE")
    os.environ["PRIVREC_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ml = synthetic_movielens(20, 90, 400, seed=0)
    yield ml, lm.Catalogue(ml.items, 20)
    if before is None:
        del os.environ["PRIVREC_CACHE"]
    else:
        os.environ["PRIVREC_CACHE"] = before


def test_public_twin_is_seeded_and_reads_no_ratings(small):
    ml, _ = small
    a = lm.public_twin(ml.items, n_users=12, mean_count=10, min_count=3, seed=4)
    b = lm.public_twin(ml.items, n_users=12, mean_count=10, min_count=3, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(lm.public_twin(ml.items, n_users=12, mean_count=10, min_count=3, seed=5))
    counts = a.groupby("user").size()
    assert len(counts) == 12 and counts.min() >= 3
    assert not a.duplicated(["user", "item"]).any()


def test_same_shared_size_for_metadata_and_minilm(small):
    _, cat = small
    meta, text = (lm.new_model(k, cat) for k in ("metadata", "MiniLM"))
    assert shared_size(meta) == shared_size(text)
    with pytest.raises(ValueError, match="kind"):
        lm.new_model("BERT", cat)


def test_best_breaks_ties_by_the_smaller_setting():
    table = pd.DataFrame({"model": ["a", "a", "a"], "clip_norm": [0.5, 0.25, 1.0],
                          "score": [0.3, 0.3, 0.1]})
    assert lm.best(table, "score", ["clip_norm"]).loc["a", "clip_norm"] == 0.25


def test_grid_ledgers_and_warm_cold_evaluation(small):
    ml, cat = small
    split = lm.warm_cold_split(ml.ratings, n_items=90, seed=0)
    assert not np.isin(split.train["item"], split.cold_items).any()
    chosen = {"MiniLM": {"client_lr": 1.0, "user_lr": 1.0, "clip_norm": 0.5},
              "MF": {"client_lr": 1.0, "user_lr": 1.0, "clip_norm": 0.5}}
    grid = lm.epsilon_grid(("MiniLM", "MF"), (2, math.inf), catalogue=cat, split=split,
                           protocol=TINY, chosen=chosen)
    assert {"ndcg", "cold ndcg"} <= set(grid.columns)
    ledgers = lm.ledger_table(grid, TINY)
    assert len(ledgers) == 1 and ledgers["ledger ε"].iloc[0] == pytest.approx(2.0, abs=0.01)
    assert grid.loc[grid["target epsilon"] == math.inf, "relative loss"].eq(0).all()
    lines = lm.grid_summary(grid, baseline=0.0, epsilon=2)
    assert len(lines) == 4 and max(map(len, lines)) <= 80 and "beats popularity" in lines[0]
    bad = grid.copy()
    bad.loc[0, "ledger"] = "{}"
    with pytest.raises(ValueError, match="ledgers"):
        lm.ledger_table(bad, TINY)


def test_tuning_reads_only_the_twin(small):
    ml, cat = small
    twin = lm.twin_split(ml.items, n_users=20, seed=1)
    out = lm.tune_on_twin(("MiniLM",), catalogue=cat, twin=twin, protocol=TINY,
                          steps=((1.0, 1.0), (2.0, 1.0)), clips=(0.25, 0.5))
    assert set(out["chosen"]["MiniLM"]) == {"client_lr", "user_lr", "clip_norm"}
    assert len(out["steps"]) == 2 and len(out["clips"]) == 2


def test_chapter_7_checkers_reject_the_typical_wrong_answers():
    from privrec.course import exercises_lora as check

    def average_of_products(a, b, delta_a, delta_b):
        return np.einsum("kor,kri->koi", b + delta_b, a + delta_a).mean(0) - b @ a

    assert check.federated_lora_product(check.SOLUTIONS["federated_lora_product"]).passed
    wrong = check.federated_lora_product(average_of_products)
    assert not wrong.passed and "average of the clients' products" in wrong.hint
    assert check.lora_upload_floats(check.SOLUTIONS["lora_upload_floats"]).passed
    wrong = check.lora_upload_floats(lambda d_in, d_out, rank, ffa: rank * (d_in + d_out))
    assert not wrong.passed and "only B" in wrong.hint
