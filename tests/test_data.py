"""privrec.recsys.data: loaders, splits, the synthetic twin, and their ValueError paths."""

import numpy as np
import pandas as pd
import pytest

from privrec.recsys import data
from privrec.recsys.data import (
    cold_start_split,
    leave_last_out_split,
    load_movielens100k,
    random_split,
    restrict_ids,
    synthetic_movielens,
    validate_ratings,
)


@pytest.fixture(scope="module")
def ml():
    return load_movielens100k()


def test_ml100k_shapes_and_ids(ml):
    r = ml.ratings
    assert len(r) == 100_000 and ml.n_users == 943 and ml.n_items == 1682
    assert r["user"].min() == 0 and r["user"].max() == 942
    assert r["item"].min() == 0 and r["item"].max() == 1681
    assert set(r["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert not r.duplicated(["user", "item"]).any()
    # Every user rated at least 20 movies (a documented property of ML-100K).
    assert r.groupby("user").size().min() == 20
    # Ids follow the GroupLens raw ids: user 0 is raw user 1, item 0 is Toy Story.
    assert ml.users.loc[0, "raw_id"] == 1 and ml.items.loc[0, "title"] == "Toy Story"
    assert ml.items.loc[0, "year"] == 1995 and "Animation" in ml.items.loc[0, "genres"].split("|")


def test_grouplens_directory_source(tmp_path, monkeypatch):
    (tmp_path / "u.data").write_text("1\t10\t4\t881250949\n2\t10\t3\t881250950\n2\t20\t5\t881250951\n")
    flags = "|".join(["0"] * 19)
    comedy = "|".join("1" if g == "Comedy" else "0" for g in data.GENRES)
    (tmp_path / "u.item").write_text(
        f"10|Alpha (1995)|01-Jan-1995||http://x|{comedy}\n20|Beta (1970)|01-Jan-1970||http://y|{flags}\n",
        encoding="latin-1")
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    loaded = load_movielens100k(tmp_path)
    assert loaded.n_users == 2 and loaded.n_items == 2
    assert loaded.items["title"].tolist() == ["Alpha", "Beta"]
    assert loaded.items["genres"].tolist() == ["Comedy", ""]
    assert loaded.ratings["item"].tolist() == [0, 0, 1]
    # The environment variable is honoured too.
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert load_movielens100k().n_users == 2


def test_missing_sources_explain_how_to_get_data(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="source=.*u.data"):
        load_movielens100k(tmp_path)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_recbole_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="recbole==1.2.1"):
        load_movielens100k(cache_dir=tmp_path, download=False)

    def offline(url, timeout):
        raise data.urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*recbole==1.2.1"):
        load_movielens100k(cache_dir=tmp_path)


def test_download_rejects_a_corrupt_archive(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "_recbole_dir", lambda: None)

    class FakeResponse:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"not the real archive"

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse())
    with pytest.raises(OSError, match="expected 0e33842e"):
        load_movielens100k(download=True, cache_dir=tmp_path)
    assert not (tmp_path / "ml-100k.zip").exists()


def test_random_split_is_seeded_and_disjoint(ml):
    train, test = random_split(ml.ratings, seed=3)
    assert len(test) == 20_000 and len(train) == 80_000
    again, _ = random_split(ml.ratings, seed=3)
    pd.testing.assert_frame_equal(train, again)
    other, _ = random_split(ml.ratings, seed=4)
    assert not train.equals(other)
    key = lambda df: set(zip(df["user"], df["item"], strict=True))  # noqa: E731
    assert not key(train) & key(test)


def test_leave_last_out_holds_each_users_latest(ml):
    train, test = leave_last_out_split(ml.ratings)
    assert len(test) == ml.n_users and test["user"].is_unique
    latest = ml.ratings.groupby("user")["timestamp"].max()
    assert (test.set_index("user")["timestamp"] == latest).all()
    assert len(train) + len(test) == len(ml.ratings)


@pytest.mark.parametrize("kwargs, match", [
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.5}, "test_fraction"),
    ({"seed": -1}, "seed"),
])
def test_random_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_split(synthetic_movielens().ratings, **kwargs)


def test_validate_ratings_paths():
    good = synthetic_movielens().ratings
    with pytest.raises(TypeError, match="ratings must be a pandas DataFrame"):
        validate_ratings(good.to_numpy())
    with pytest.raises(ValueError, match="missing column"):
        validate_ratings(good.drop(columns="rating"))
    with pytest.raises(ValueError, match="integer ids"):
        validate_ratings(good.assign(user=good["user"].astype(float)))
    with pytest.raises(ValueError, match="outside"):
        validate_ratings(good, n_items=3)
    with pytest.raises(ValueError, match="negative"):
        validate_ratings(good.assign(item=good["item"] - 1))
    with pytest.raises(ValueError, match="NaN"):
        validate_ratings(good.assign(rating=np.where(good.index == 0, np.nan, good["rating"])))


def test_synthetic_twin_schema_and_seed():
    a, b = synthetic_movielens(seed=1), synthetic_movielens(seed=1)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    assert list(a.ratings.columns) == list(load_movielens100k().ratings.columns)
    assert a.ratings.dtypes.equals(load_movielens100k().ratings.dtypes)
    assert a.ratings["user"].nunique() == a.n_users and a.ratings["item"].nunique() == a.n_items
    with pytest.raises(ValueError, match="n_ratings"):
        synthetic_movielens(n_users=5, n_items=5, n_ratings=100)
    with pytest.raises(ValueError, match="dim"):
        synthetic_movielens(dim=0)


def test_leave_last_out_breaks_timestamp_ties_by_item_id_whatever_the_row_order():
    ratings = pd.DataFrame({"user": [0, 0, 0, 1, 1, 2], "item": [5, 2, 9, 1, 3, 4],
                            "rating": np.ones(6, np.float32),
                            "timestamp": [10, 30, 30, 7, 7, 1]})
    train, test = leave_last_out_split(ratings)
    assert test["item"].tolist() == [9, 3]  # ties at the latest time: the larger item id
    assert test["user"].tolist() == [0, 1]  # user 2 has one rating: it stays in training
    assert train[["user", "item"]].values.tolist() == [[0, 5], [0, 2], [1, 1], [2, 4]]
    for seed in range(5):
        shuffled = ratings.sample(frac=1.0, random_state=seed)
        _, again = leave_last_out_split(shuffled)
        pd.testing.assert_frame_equal(again, test)


def test_leave_last_out_survives_a_non_unique_index(ml):
    doubled = ml.ratings.iloc[:500].set_index(np.zeros(500, dtype=int))
    train, test = leave_last_out_split(doubled)
    assert len(train) + len(test) == 500
    assert not set(zip(train["user"], train["item"], strict=True)) & set(
        zip(test["user"], test["item"], strict=True))


def test_cold_start_split_holds_items_out_entirely(ml):
    split = cold_start_split(ml.ratings, n_items=ml.n_items, fraction=0.1, seed=0)
    assert len(split.cold_items) == 168 and len(split.warm_items) == ml.n_items - 168
    assert np.array_equal(np.union1d(split.cold_items, split.warm_items), np.arange(ml.n_items))
    assert not np.isin(split.train["item"], split.cold_items).any()
    assert len(split.train) + len(split.test) == len(ml.ratings)
    # Test items are renumbered to positions among the cold items; the mapping round-trips.
    assert split.test["item"].between(0, 167).all()
    original = split.cold_items[split.test["item"]]
    held = ml.ratings[np.isin(ml.ratings["item"], split.cold_items)]
    assert np.array_equal(original, held["item"].to_numpy())
    again = cold_start_split(ml.ratings, n_items=ml.n_items, fraction=0.1, seed=0)
    assert np.array_equal(again.cold_items, split.cold_items)
    other = cold_start_split(ml.ratings, n_items=ml.n_items, fraction=0.1, seed=1)
    assert not np.array_equal(other.cold_items, split.cold_items)
    with pytest.raises(ValueError, match="fraction"):
        cold_start_split(ml.ratings, n_items=ml.n_items, fraction=1.0)
    with pytest.raises(ValueError, match="fraction"):
        cold_start_split(ml.ratings, n_items=ml.n_items, fraction=0.0001)


def test_restrict_ids_numbering_follows_the_given_order():
    ratings = pd.DataFrame({"user": [0, 1, 2, 3], "item": [3, 1, 3, 2],
                            "rating": np.ones(4, np.float32)})
    kept = restrict_ids(ratings, column="item", ids=[3, 1])
    assert kept["item"].tolist() == [0, 1, 0] and kept["user"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct"):
        restrict_ids(ratings, column="item", ids=[1, 1])
    with pytest.raises(ValueError, match="column"):
        restrict_ids(ratings, column="rating", ids=[1])
