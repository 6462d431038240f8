"""Fixtures shared by several test files."""

import pytest

from privrec.recsys.data import synthetic_movielens
from privrec.recsys.lora import top_layer_inputs
from privrec.recsys.text_encoder import encode_items, item_texts


@pytest.fixture(scope="session")
def lora_setup(tmp_path_factory):
    """(ratings of 30 users on 24 items, MiniLM's frozen top-layer inputs of the item texts, their
    sentence embeddings): the catalogue the LoRA tests (central and federated) share."""
    ml = synthetic_movielens(30, 24, 300, seed=0)
    cache = tmp_path_factory.mktemp("cache")
    texts = item_texts(ml.items)
    return ml, top_layer_inputs(texts, cache_dir=cache), encode_items(texts, cache_dir=cache)


@pytest.fixture(scope="session")
def seqdata():
    """40 users' ratings of 30 items: the histories the sequential-model tests share."""
    return synthetic_movielens(n_users=40, n_items=30, n_ratings=600, seed=0)
