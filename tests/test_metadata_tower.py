"""The metadata tower: public catalogue fields, same two-tower model, same shared size."""

import pandas as pd
import pytest
import torch

from privrec.recsys.data import synthetic_movielens
from privrec.recsys.metadata_tower import metadata_features, metadata_two_tower, title_words
from privrec.recsys.two_tower import TwoTowerRecommender, shared_size


def test_features_are_the_catalogue_fields():
    items = pd.DataFrame({"title": ["Heat (1995)", "Net, The (1995)", "Heat Wave"],
                          "year": [1995, 1995, None], "genres": ["Action|Crime", "Thriller", "unknown"]})
    f = metadata_features(items, n_words=3)
    assert f.shape == (3, 18 + 8 + 1 + 3)
    assert f[0, :18].sum() == 2 and f[2, :18].sum() == 0  # genres; "unknown" is no genre
    assert f[0, 18 + 7] == 1 and f[2, 18:26].sum() == 0     # 1990s; unknown year: no decade
    assert f[:, -3:].sum(0).tolist() == [2.0, 1.0, 1.0]     # "heat" twice, then ties by word
    assert title_words("Net, The (1995)") == ["net"]


def test_same_shared_size_as_the_text_model():
    ml = synthetic_movielens(20, 90, 400, seed=0)
    meta = metadata_two_tower(20, ml.items, 4, text_dim=8, rank=2, n_words=40)
    text = TwoTowerRecommender(20, torch.randn(90, 384), 4, text_dim=8, rank=2, item_bias=True)
    assert shared_size(meta) == shared_size(text)


def test_bad_input():
    with pytest.raises(TypeError, match="items"):
        metadata_features([1, 2])
    with pytest.raises(ValueError, match="missing"):
        metadata_features(pd.DataFrame({"title": ["a"]}))
    with pytest.raises(ValueError, match="n_words"):
        metadata_features(pd.DataFrame({"title": ["a"], "year": [1], "genres": ["Drama"]}), n_words=0)
