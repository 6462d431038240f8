"""Who holds which users: cross-device and cross-silo partitions for the federated engine.

"Number of clients" means two things in practice (Kairouz et al. 2021, Table 1):
**cross-device** federated learning has one client per user (a phone each, :func:`cross_device`),
**cross-silo** has a handful of data owners, each holding many users' data. A silo partition can
be IID (:func:`iid_partition`), split by a demographic attribute (:func:`demographic_partition`)
or skewed by taste with a Dirichlet label prior (:func:`dirichlet_genre_partition`, Hsu et al.
2019). Every partition is deterministic given its seed; ties are broken by id or by name.

The privacy unit follows the partition: with one user per client a client-level guarantee is
user-level, with silos it is **silo-level** (:attr:`Partition.privacy_unit`), a different
neighbouring relation.

:func:`subsample_users` keeps a seeded subset of users and renumbers them ``0..k-1`` (for smaller
experiments that must still look like a dense id space).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.checks import choice, int_in, positive
from ..core.checks import seed as check_seed
from ..recsys.data import restrict_ids, validate_ratings

__all__ = ["Partition", "cross_device", "partition_or_default", "iid_partition", "demographic_partition",
           "dirichlet_genre_partition", "subsample_users"]


@dataclass(frozen=True)
class Partition:
    """Assignment of users to clients.

    Attributes
    ----------
    client_of_user:
        ``[n_users]`` int64 array, the client that holds each user (and all of the user's data).
    n_clients:
        Number of clients; a client may hold no user (it then never contributes).
    name:
        A label for plots and tables.

    Raises
    ------
    ValueError
        If ``client_of_user`` is not a 1-D integer array with values in ``[0, n_clients)``.
    """

    client_of_user: np.ndarray
    n_clients: int
    name: str = "partition"

    def __post_init__(self) -> None:
        owners = np.asarray(self.client_of_user)
        if owners.ndim != 1 or not np.issubdtype(owners.dtype, np.integer):
            raise ValueError("client_of_user must be a 1-D integer array")
        int_in("n_clients", self.n_clients, 1)
        if owners.size and (owners.min() < 0 or owners.max() >= self.n_clients):
            raise ValueError(f"client_of_user must lie in [0, {self.n_clients}), got range "
                             f"[{owners.min()}, {owners.max()}]")
        object.__setattr__(self, "client_of_user", owners.astype(np.int64))

    @property
    def n_users(self) -> int:
        """Number of users covered."""
        return len(self.client_of_user)

    @property
    def one_user_per_client(self) -> bool:
        """True when no client holds two users (cross-device)."""
        return bool((self.users_per_client() <= 1).all())

    @property
    def privacy_unit(self) -> str:
        """``"user"`` when every client holds at most one user, else ``"silo"``."""
        return "user" if self.one_user_per_client else "silo"

    def users_per_client(self) -> np.ndarray:
        """``[n_clients]`` number of users each client holds."""
        return np.bincount(self.client_of_user, minlength=self.n_clients)

    def examples_per_client(self, ratings: pd.DataFrame) -> np.ndarray:
        """``[n_clients]`` number of ratings each client holds."""
        return np.bincount(self.client_of_user[ratings["user"].to_numpy()],
                           minlength=self.n_clients)


def cross_device(n_users: int) -> Partition:
    """Every user is a client (the phone-per-user setting)."""
    n_users = int_in("n_users", n_users, 1)
    return Partition(np.arange(n_users), n_users, "cross-device")


def partition_or_default(partition: Partition | None, n_users: int) -> Partition:
    """``partition`` checked to cover exactly ``n_users`` users; ``None``: :func:`cross_device`."""
    if partition is None:
        return cross_device(n_users)
    if not isinstance(partition, Partition):
        raise TypeError(f"partition must be a Partition, got {type(partition).__name__}")
    if partition.n_users != n_users:
        raise ValueError(f"partition covers {partition.n_users} users, expected n_users={n_users}")
    return partition


def iid_partition(n_users: int, n_silos: int, *, seed: int = 0) -> Partition:
    """K silos of (almost) equal size holding a seeded random shuffle of the users."""
    n_users = int_in("n_users", n_users, 1)
    n_silos = int_in("n_silos", n_silos, 1, n_users)
    rng = np.random.default_rng(check_seed("seed", seed))
    owners = np.empty(n_users, dtype=np.int64)
    owners[rng.permutation(n_users)] = np.arange(n_users) % n_silos
    return Partition(owners, n_silos, f"IID, K={n_silos}")


def demographic_partition(users: pd.DataFrame, *, by: str = "age", n_silos: int = 4) -> Partition:
    """Non-IID silos by a demographic attribute.

    ``by="age"`` cuts users into ``n_silos`` age bands of equal population (ranks, ties broken by
    user order), so each silo is one age group; ``by="gender"`` or ``by="occupation"`` makes one
    silo per value in sorted order (``n_silos`` is then ignored).
    """
    by = choice("by", by, ("age", "gender", "occupation"))
    if by == "age":
        n_silos = int_in("n_silos", n_silos, 1, len(users))
        ranks = users["age"].rank(method="first").to_numpy() - 1
        owners = (ranks * n_silos // len(users)).astype(np.int64)
        return Partition(owners, n_silos, f"age bands, K={n_silos}")
    codes, uniques = pd.factorize(users[by], sort=True)
    return Partition(codes.astype(np.int64), len(uniques), f"{by}, K={len(uniques)}")


def _favourite_genre(ratings: pd.DataFrame, items: pd.DataFrame, n_users: int) -> np.ndarray:
    """Each user's most frequent first-listed genre; ties go to the alphabetically first genre,
    users without ratings get ``"none"``."""
    first_genre = items.set_index("item")["genres"].str.split("|").str[0]
    table = pd.DataFrame({"user": ratings["user"].to_numpy(),
                          "genre": first_genre.loc[ratings["item"].to_numpy()].to_numpy()})
    counts = table.groupby(["user", "genre"]).size().reset_index(name="n")
    counts = counts.sort_values(["user", "n", "genre"], ascending=[True, False, True],
                                kind="stable")
    best = counts.drop_duplicates("user", keep="first")
    labels = np.full(n_users, "none", dtype=object)
    labels[best["user"].to_numpy()] = best["genre"].to_numpy()
    return labels


def dirichlet_genre_partition(ratings: pd.DataFrame, items: pd.DataFrame, *, n_users: int,
                              n_silos: int, alpha: float = 0.5, seed: int = 0) -> Partition:
    """Non-IID silos by taste: label-skew Dirichlet partition (Hsu et al. 2019) over genres.

    Each user's label is the genre that appears most often among the films they rated (first
    listed genre of each film; ties go to the alphabetically first genre). For every genre, in
    sorted order, the shares of its users going to the K silos are drawn from
    :math:`\\mathrm{Dir}(\\alpha\\mathbf 1_K)`: small :math:`\\alpha` gives silos dominated by a few
    genres, large :math:`\\alpha` approaches the IID partition.

    Parameters
    ----------
    ratings, items:
        The ratings table and the item table (with a ``genres`` column, ``|``-separated).
    n_users:
        Size of the user id space.
    n_silos:
        :math:`K`, in ``[1, n_users]``.
    alpha:
        Dirichlet concentration, > 0.
    seed:
        Seeds the shuffles and the Dirichlet draws.

    Returns
    -------
    Partition
    """
    validate_ratings(ratings, n_users=n_users)
    n_silos = int_in("n_silos", n_silos, 1, n_users)
    alpha = positive("alpha", alpha)
    rng = np.random.default_rng(check_seed("seed", seed))
    labels = _favourite_genre(ratings, items, n_users)
    owners = np.empty(n_users, dtype=np.int64)
    for genre in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(labels == genre))
        shares = rng.dirichlet(np.full(n_silos, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for silo, chunk in enumerate(np.split(members, cuts)):
            owners[chunk] = silo
    return Partition(owners, n_silos, f"Dirichlet(alpha={alpha:g}) over genres, K={n_silos}")


def subsample_users(ratings: pd.DataFrame, *, n_users: int, keep: int,
                    seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Keep ``keep`` users drawn without replacement (seeded) and renumber them ``0..keep-1``.

    Returns
    -------
    (ratings, kept):
        The kept users' ratings with new user ids (new id ``j`` is old id ``kept[j]``; ``kept`` is
        sorted, so the renumbering preserves order), and the ``[keep]`` old ids.
    """
    validate_ratings(ratings, n_users=n_users)
    keep = int_in("keep", keep, 1, n_users)
    rng = np.random.default_rng(check_seed("seed", seed))
    kept = np.sort(rng.choice(n_users, size=keep, replace=False), kind="stable")
    return restrict_ids(ratings, column="user", ids=kept), kept
