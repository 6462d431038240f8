"""Tests for privrec.federated.partitions: sizes, seeds, skew, tie-breaking, user subsampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privrec.federated import partitions as parts
from privrec.recsys.data import synthetic_movielens

Partition, cross_device, iid_partition = parts.Partition, parts.cross_device, parts.iid_partition
demographic_partition = parts.demographic_partition
dirichlet_genre_partition, subsample_users = parts.dirichlet_genre_partition, parts.subsample_users
ML = synthetic_movielens(n_users=50, n_items=70, n_ratings=1200, seed=3)
TRAIN, NU = ML.ratings, ML.n_users


def test_iid_partition_sizes_and_seed():
    a = iid_partition(NU, 7, seed=0)
    assert a.users_per_client().max() - a.users_per_client().min() <= 1
    assert np.array_equal(a.client_of_user, iid_partition(NU, 7, seed=0).client_of_user)
    assert not np.array_equal(a.client_of_user, iid_partition(NU, 7, seed=1).client_of_user)
    assert cross_device(NU).users_per_client().tolist() == [1] * NU
    assert cross_device(NU).privacy_unit == "user" and a.privacy_unit == "silo"
    assert a.examples_per_client(TRAIN).sum() == len(TRAIN)


def test_age_bands_are_ordered_and_balanced():
    age = demographic_partition(ML.users, by="age", n_silos=4)
    sizes = age.users_per_client()
    assert sizes.sum() == NU and sizes.max() - sizes.min() <= 1
    ages = ML.users["age"].to_numpy()
    for k in range(1, 4):
        assert ages[age.client_of_user == k].min() >= ages[age.client_of_user == k - 1].max()
    assert demographic_partition(ML.users, by="gender").n_clients == ML.users["gender"].nunique()


def _label_entropy(part: Partition) -> float:
    """Mean over silos of the entropy of their genre mix: lower = more skewed."""
    first = ML.items.set_index("item")["genres"].str.split("|").str[0]
    g = first.loc[TRAIN["item"].to_numpy()].to_numpy()
    owner = part.client_of_user[TRAIN["user"].to_numpy()]
    ent = []
    for k in range(part.n_clients):
        _, counts = np.unique(g[owner == k], return_counts=True)
        if counts.sum():
            p = counts / counts.sum()
            ent.append(-(p * np.log(p)).sum())
    return float(np.mean(ent))


def test_dirichlet_skew_follows_alpha_and_is_seeded():
    def parts(alpha):
        return [dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=4, alpha=alpha,
                                          seed=s) for s in range(5)]
    assert np.mean([_label_entropy(p) for p in parts(0.05)]) < np.mean(
        [_label_entropy(p) for p in parts(100.0)])
    d = dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=4, alpha=0.5, seed=3)
    assert np.array_equal(d.client_of_user, dirichlet_genre_partition(
        TRAIN, ML.items, n_users=NU, n_silos=4, alpha=0.5, seed=3).client_of_user)


def test_dirichlet_label_ties_go_to_the_first_genre_whatever_the_row_order():
    items = pd.DataFrame({"item": [0, 1, 2], "genres": ["Drama", "Comedy|Drama", "Action"]})
    # User 0 rated one Drama and one Comedy film: a tie, broken towards "Comedy".
    ratings = pd.DataFrame({"user": [0, 0, 1], "item": [0, 1, 2], "rating": [4.0, 3.0, 5.0]})
    one = dirichlet_genre_partition(ratings, items, n_users=3, n_silos=2, alpha=1.0, seed=0)
    flipped = dirichlet_genre_partition(ratings.iloc[::-1].reset_index(drop=True), items,
                                        n_users=3, n_silos=2, alpha=1.0, seed=0)
    assert np.array_equal(one.client_of_user, flipped.client_of_user)
    assert list(parts._favourite_genre(ratings, items, 3)) == ["Comedy", "Action", "none"]


def test_subsample_users_renumbers_and_keeps_all_their_ratings():
    sub, kept = subsample_users(TRAIN, n_users=NU, keep=20, seed=1)
    assert len(kept) == 20 and np.all(np.diff(kept) > 0)
    assert set(sub["user"]) <= set(range(20))
    original = TRAIN[TRAIN["user"].isin(kept)]
    assert len(sub) == len(original)
    back = sub.assign(user=kept[sub["user"].to_numpy()])
    pd.testing.assert_frame_equal(back.reset_index(drop=True), original.reset_index(drop=True),
                                  check_dtype=False)
    again, kept2 = subsample_users(TRAIN, n_users=NU, keep=20, seed=1)
    assert np.array_equal(kept, kept2) and again.equals(sub)


@pytest.mark.parametrize("call, match", [
    (lambda: iid_partition(NU, 0), "n_silos"),
    (lambda: iid_partition(NU, NU + 1), "n_silos"),
    (lambda: iid_partition(NU, 2, seed=-1), "seed"),
    (lambda: dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=0), "n_silos"),
    (lambda: dirichlet_genre_partition(TRAIN, ML.items, n_users=NU, n_silos=3, alpha=0.0), "alpha"),
    (lambda: demographic_partition(ML.users, by="zip"), "by"),
    (lambda: Partition(np.array([0, 1, 5]), 3), "client_of_user"),
    (lambda: subsample_users(TRAIN, n_users=NU, keep=NU + 1), "keep"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
