"""Federated matrix factorisation: FedAvg with user parameters kept on the clients.

The protocol follows the six steps of the source article (Sec. 3.2), made precise by FedAvg
(McMahan et al. 2017) and federated collaborative filtering (Ammad-ud-din et al. 2019):

1. *Data stays local.* Client :math:`k` holds its ratings :math:`D_k` and, for each of its users,
   the user factor :math:`p_u` and bias :math:`b_u` (these never leave the client).
2. *Start from the global model.* The server broadcasts the shared parameters
   :math:`\\theta = (Q, b_I, \\mu)` to the :math:`m` clients sampled this round.
3. *Local training.* Each client first solves its users' parameters in closed form (ridge
   regression on the received item factors, as in FCF), then runs ``local_epochs`` gradient steps
   on its copy of the item rows it rated and of :math:`\\mu`.
4. *Aggregation.* Clients upload the change of the rows they touched; the server averages them,
   weighting each client by its number of examples that touch the row (``weighting="per_row"``,
   FedAvg's :math:`n_k/n` applied row by row) or by its total example count over all rows
   (``weighting="per_client"``, FedAvg verbatim).
5. *Broadcast.* The server applies the average with a server learning rate and, for
   :class:`FedAvgM` (Hsu et al. 2019), momentum; the new model goes out at the next round.
6. *Repeat* steps 2-5.

Each client minimises the same per-rating objective as :func:`privrec.train.fit_explicit`,

.. math:: \\sum_{(u,i)\\in D_k} (r_{ui}-\\mu-b_u-b_i-p_u^\\top q_i)^2
          + \\lambda(\\lVert p_u\\rVert^2+\\lVert q_i\\rVert^2) + \\lambda_b(b_u^2+b_i^2),

so federated and centralised training aim at the same optimum. A local step divides each row's
gradient by the client's number of examples touching that row (a Jacobi preconditioner), so one
learning rate suits a row seen once and a row seen 300 times.

Two simulation engines give the same numbers: ``engine="vectorised"`` runs all clients of a
round as one batched tensor program over (client, item) pairs — a client's local copy of the item
table is only materialised on the rows it rated — and ``engine="loop"`` is the plain reference
that loops over clients, each with a full copy of the model.

Cross-device (every user a client) and cross-silo (K owners, each a partition of the users) are
both a :class:`Partition`; see :func:`cross_device`, :func:`iid_partition`,
:func:`demographic_partition` and :func:`dirichlet_genre_partition`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .checks import choice, in_range, int_in, positive
from .data import validate_ratings
from .metrics import evaluate_ratings
from .models import BiasedMF

__all__ = [
    "Partition",
    "cross_device",
    "iid_partition",
    "demographic_partition",
    "dirichlet_genre_partition",
    "FedAvg",
    "FedAvgM",
    "FederatedMF",
    "RoundRecord",
    "FedHistory",
    "BYTES_PER_FLOAT",
    "BYTES_PER_INDEX",
]

#: Wire sizes used by the communication accounting (float32 values, int32 row indices).
BYTES_PER_FLOAT = 4
BYTES_PER_INDEX = 4


# ----------------------------------------------------------------------------------------------
# Who holds which users
# ----------------------------------------------------------------------------------------------

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
        return len(self.client_of_user)

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


def iid_partition(n_users: int, n_silos: int, *, seed: int = 0) -> Partition:
    """K silos of (almost) equal size holding a seeded random shuffle of the users."""
    n_users = int_in("n_users", n_users, 1)
    n_silos = int_in("n_silos", n_silos, 1, n_users)
    rng = np.random.default_rng(int_in("seed", seed, 0))
    owners = np.empty(n_users, dtype=np.int64)
    owners[rng.permutation(n_users)] = np.arange(n_users) % n_silos
    return Partition(owners, n_silos, f"IID, K={n_silos}")


def demographic_partition(users: pd.DataFrame, *, by: str = "age", n_silos: int = 4) -> Partition:
    """Non-IID silos by a demographic attribute.

    ``by="age"`` cuts users into ``n_silos`` age bands of equal population (quantiles), so each
    silo is one age group; ``by="gender"`` or ``by="occupation"`` makes one silo per value
    (``n_silos`` is then ignored).
    """
    by = choice("by", by, ("age", "gender", "occupation"))
    if by == "age":
        n_silos = int_in("n_silos", n_silos, 1, len(users))
        ranks = users["age"].rank(method="first").to_numpy() - 1
        owners = (ranks * n_silos // len(users)).astype(np.int64)
        return Partition(owners, n_silos, f"age bands, K={n_silos}")
    codes, uniques = pd.factorize(users[by], sort=True)
    return Partition(codes.astype(np.int64), len(uniques), f"{by}, K={len(uniques)}")


def dirichlet_genre_partition(ratings: pd.DataFrame, items: pd.DataFrame, *, n_users: int,
                              n_silos: int, alpha: float = 0.5, seed: int = 0) -> Partition:
    """Non-IID silos by taste: label-skew Dirichlet partition (Hsu et al. 2019) over genres.

    Each user's label is the genre that appears most often among the films they rated (first
    listed genre of each film). For every genre, the shares of its users going to the K silos are
    drawn from :math:`\\mathrm{Dir}(\\alpha\\mathbf 1_K)`: small :math:`\\alpha` gives silos dominated
    by a few genres, large :math:`\\alpha` approaches the IID partition.
    """
    validate_ratings(ratings, n_users=n_users)
    n_silos = int_in("n_silos", n_silos, 1, n_users)
    alpha = positive("alpha", alpha)
    rng = np.random.default_rng(int_in("seed", seed, 0))
    first_genre = items.set_index("item")["genres"].str.split("|").str[0]
    genre = first_genre.loc[ratings["item"].to_numpy()].to_numpy()
    table = pd.DataFrame({"user": ratings["user"].to_numpy(), "genre": genre})
    label = table.groupby("user")["genre"].agg(lambda g: g.value_counts().index[0])
    labels = np.full(n_users, "none", dtype=object)
    labels[label.index.to_numpy()] = label.to_numpy()
    owners = np.empty(n_users, dtype=np.int64)
    for g in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(labels == g))
        shares = rng.dirichlet(np.full(n_silos, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for silo, chunk in enumerate(np.split(members, cuts)):
            owners[chunk] = silo
    return Partition(owners, n_silos, f"Dirichlet(alpha={alpha:g}) over genres, K={n_silos}")


# ----------------------------------------------------------------------------------------------
# Strategies: who takes part, how updates are combined, how the server steps
# ----------------------------------------------------------------------------------------------

class FedAvg:
    """Federated averaging (McMahan et al. 2017) of the shared MF parameters.

    Parameters
    ----------
    clients_per_round:
        :math:`m`, the number of clients sampled (without replacement) each round; ``None`` means
        all clients. Must lie in ``[1, n_clients]`` (checked when the strategy meets a partition).
    server_lr:
        :math:`\\eta_s`; the server adds :math:`\\eta_s` times the aggregated client change.
        ``1.0`` is FedAvg as published (the new model is the weighted mean of the client models).
    weighting:
        ``"per_row"``: each shared row is the mean of the client changes that touched it, weighted
        by the clients' example counts on that row. ``"per_client"``: every row is weighted by the
        clients' total example counts :math:`n_k/\\sum_k n_k`, counting untouched rows as zero
        change (FedAvg verbatim; rarely rated items then barely move).
    seed:
        Seeds the client sampling.
    """

    name = "FedAvg"

    def __init__(self, *, clients_per_round: int | None = None, server_lr: float = 1.0,
                 weighting: str = "per_row", seed: int = 0) -> None:
        if clients_per_round is not None:
            int_in("clients_per_round", clients_per_round, 1)
        self.clients_per_round = clients_per_round
        self.server_lr = positive("server_lr", server_lr)
        self.weighting = choice("weighting", weighting, ("per_row", "per_client"))
        self.seed = int_in("seed", seed, 0)
        self._rng = np.random.default_rng(self.seed)

    def check(self, n_clients: int) -> None:
        """Raise ``ValueError`` if ``clients_per_round`` does not fit ``n_clients``."""
        if self.clients_per_round is not None:
            int_in("clients_per_round", self.clients_per_round, 1, n_clients)

    def sample_clients(self, n_clients: int) -> np.ndarray:
        """Step 2: the sorted ids of this round's clients (seeded, without replacement)."""
        m = n_clients if self.clients_per_round is None else self.clients_per_round
        if m == n_clients:
            return np.arange(n_clients)
        return np.sort(self._rng.choice(n_clients, size=m, replace=False))

    def aggregate(self, upload: dict[str, torch.Tensor], *, n_items: int,
                  dim: int) -> dict[str, torch.Tensor]:
        """Step 4: the weighted mean of the client changes (see ``weighting``)."""
        items, n_pair = upload["pair_item"], upload["pair_examples"]
        examples = upload["examples"]
        if self.weighting == "per_row":
            weight = n_pair
            denom = torch.zeros(n_items).index_add_(0, items, weight).clamp(min=1e-12)
        else:
            weight = examples[upload["pair_client"]]
            denom = examples.sum().expand(n_items)
        change_q = torch.zeros(n_items, dim).index_add_(
            0, items, weight[:, None] * upload["item_factors"]) / denom[:, None]
        change_b = torch.zeros(n_items).index_add_(0, items, weight * upload["item_bias"]) / denom
        change_mu = (examples * upload["global_bias"]).sum() / examples.sum().clamp(min=1e-12)
        return {"item_factors": change_q, "item_bias": change_b, "global_bias": change_mu}

    def server_update(self, params: dict[str, torch.Tensor],
                      change: dict[str, torch.Tensor]) -> None:
        """Step 5: apply the aggregated change in place, :math:`\\theta\\leftarrow\\theta+\\eta_s\\Delta`."""
        for key, delta in change.items():
            params[key].add_(delta, alpha=self.server_lr)

    def __repr__(self) -> str:
        return (f"{self.name}(clients_per_round={self.clients_per_round}, "
                f"server_lr={self.server_lr:g}, weighting={self.weighting!r})")


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu, Qi & Brown 2019).

    The server keeps a velocity :math:`v \\leftarrow \\beta v + \\Delta` and steps
    :math:`\\theta \\leftarrow \\theta + \\eta_s v`; ``server_momentum=0`` is plain :class:`FedAvg`.

    Parameters
    ----------
    server_momentum:
        :math:`\\beta \\in [0, 1)`.
    **kwargs:
        As :class:`FedAvg`.
    """

    name = "FedAvgM"

    def __init__(self, *, server_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_momentum = in_range("server_momentum", server_momentum, 0.0, 1.0,
                                         closed_high=False)
        self._velocity: dict[str, torch.Tensor] = {}

    def server_update(self, params: dict[str, torch.Tensor],
                      change: dict[str, torch.Tensor]) -> None:
        for key, delta in change.items():
            v = self._velocity.get(key)
            v = delta.clone() if v is None else v.mul_(self.server_momentum).add_(delta)
            self._velocity[key] = v
            params[key].add_(v, alpha=self.server_lr)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", server_momentum={self.server_momentum:g})"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------

@dataclass
class RoundRecord:
    """What one round did: participants and bytes on the wire (float32 values, int32 indices)."""

    clients: np.ndarray
    bytes_down: int
    bytes_up: int
    rows_up: int


@dataclass
class FedHistory:
    """Per-round record of :meth:`FederatedMF.fit`; ``test_rmse[j]`` is after round ``rounds[j]``."""

    rounds: list[int] = field(default_factory=list)
    test_rmse: list[float] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.bytes_down) + sum(self.bytes_up))


@dataclass
class _RoundData:
    """The ratings of one round's clients, as tensors (real ratings, then any fake ones)."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    clients: torch.Tensor      # client of each rating
    is_fake: torch.Tensor      # bool, fake-item filling (FedRec) rows


# ----------------------------------------------------------------------------------------------
# The simulation
# ----------------------------------------------------------------------------------------------

class FederatedMF:
    """Simulate federated training of :class:`~privrec.models.BiasedMF`.

    The object plays both roles, kept apart: :attr:`server` holds only the shared parameters
    (``item_factors``, ``item_bias``, ``global_bias``) and :attr:`clients` stands for the users'
    devices (``user_factors``, ``user_bias``), which the protocol never uploads.

    Parameters
    ----------
    train:
        Ratings table; each rating lives on the client that holds its user.
    n_users, n_items:
        Id-space sizes.
    strategy:
        :class:`FedAvg` or :class:`FedAvgM` (default ``FedAvg()``: all clients, plain averaging).
    partition:
        Users to clients; default :func:`cross_device`.
    dim:
        Embedding dimension.
    local_epochs:
        Gradient steps each client takes on its item rows per round (its data is small, so one
        epoch is one full-batch step).
    local_lr:
        :math:`\\eta_l` of those steps (per-row normalised gradients, see the module docstring).
        A row rated once by user :math:`u` is stable when
        :math:`\\eta_l(\\lVert p_u\\rVert^2+\\lambda) < 1`; 0.5 is stable on MovieLens-100K with
        closed-form users, gradient-trained users need about 0.2.
    reg, bias_reg:
        :math:`\\lambda`, :math:`\\lambda_b` (per rating, as in :func:`~privrec.train.fit_explicit`).
    user_solver:
        ``"closed_form"``: clients solve their user factor and bias exactly by ridge regression at
        the start of each round (FCF); ``"gradient"``: they take the same gradient steps on them as
        on the item rows.
    upload:
        ``"sparse"``: a client sends the rows it changed plus their int32 indices; ``"dense"``: it
        sends the whole shared table (unchanged rows as zeros).
    fake_items:
        FedRec's defence (Lin et al. 2020): each user adds ``round(fake_items * n_u)`` items it did
        not rate, with pseudo-ratings, to its local training, so the uploaded rows no longer equal
        its rated set. ``0`` disables it.
    pseudo_rating:
        ``"user_mean"``: a fake item gets the user's mean rating (FedRec's user-averaging);
        ``"predicted"``: the current model's prediction for the user.
    engine:
        ``"vectorised"`` or ``"loop"`` (the reference; same numbers, much slower).
    init_std, seed:
        Initialisation of the factors (the model's own seeding) and of the fake-item sampling.
    num_threads:
        torch intra-op threads while a round runs (restored afterwards); ``None`` keeps torch's
        setting. The default 1 is deliberate: a round is many small tensor ops, which gain little
        from a second thread and lose a lot when the cores are shared with other processes.
    """

    def __init__(self, train: pd.DataFrame, *, n_users: int, n_items: int,
                 strategy: FedAvg | None = None, partition: Partition | None = None,
                 dim: int = 32, local_epochs: int = 1, local_lr: float = 0.5, reg: float = 0.1,
                 bias_reg: float = 0.01, user_solver: str = "closed_form",
                 upload: str = "sparse", fake_items: float = 0.0,
                 pseudo_rating: str = "user_mean", engine: str = "vectorised",
                 init_std: float = 0.1, seed: int = 0, num_threads: int | None = 1) -> None:
        self.n_users = int_in("n_users", n_users, 1)
        self.n_items = int_in("n_items", n_items, 1)
        validate_ratings(train, n_users=self.n_users, n_items=self.n_items, name="train")
        if len(train) == 0:
            raise ValueError("train must not be empty")
        self.strategy = FedAvg() if strategy is None else strategy
        if not isinstance(self.strategy, FedAvg):
            raise TypeError(f"strategy must be a FedAvg, got {type(self.strategy).__name__}")
        self.partition = cross_device(self.n_users) if partition is None else partition
        if not isinstance(self.partition, Partition):
            raise TypeError(f"partition must be a Partition, got {type(self.partition).__name__}")
        if self.partition.n_users != self.n_users:
            raise ValueError(f"partition covers {self.partition.n_users} users, expected "
                             f"n_users={self.n_users}")
        self.strategy.check(self.partition.n_clients)
        self.dim = int_in("dim", dim, 1)
        self.local_epochs = int_in("local_epochs", local_epochs, 1)
        self.local_lr = positive("local_lr", local_lr)
        self.reg = in_range("reg", reg, 0.0, np.inf, closed_high=False)
        self.bias_reg = in_range("bias_reg", bias_reg, 0.0, np.inf, closed_high=False)
        self.user_solver = choice("user_solver", user_solver, ("closed_form", "gradient"))
        if self.user_solver == "closed_form" and (self.reg == 0 or self.bias_reg == 0):
            raise ValueError("user_solver='closed_form' needs reg > 0 and bias_reg > 0")
        self.upload = choice("upload", upload, ("sparse", "dense"))
        self.fake_items = in_range("fake_items", fake_items, 0.0, 100.0, closed_high=True)
        self.pseudo_rating = choice("pseudo_rating", pseudo_rating, ("user_mean", "predicted"))
        self.engine = choice("engine", engine, ("vectorised", "loop"))
        self.seed = int_in("seed", seed, 0)
        self.num_threads = None if num_threads is None else int_in("num_threads", num_threads, 1)

        # Sorted by user, so any subset of the ratings is grouped by user (CSR-ready).
        order = np.lexsort((train["item"].to_numpy(), train["user"].to_numpy()))
        self._users = torch.as_tensor(train["user"].to_numpy(np.int64)[order])
        self._items = torch.as_tensor(train["item"].to_numpy(np.int64)[order])
        self._ratings = torch.as_tensor(train["rating"].to_numpy(np.float32)[order])
        self._owner = torch.as_tensor(self.partition.client_of_user)
        self._client_of_rating = self._owner[self._users]
        self._n_per_user = torch.bincount(self._users, minlength=self.n_users)
        self._user_mean = (torch.zeros(self.n_users).index_add_(0, self._users, self._ratings)
                           / self._n_per_user.clamp(min=1))
        self._rated = torch.zeros(self.n_users, self.n_items, dtype=torch.bool)
        self._rated[self._users, self._items] = True
        self._fake_gen = torch.Generator().manual_seed(self.seed)
        # Cross-device: a (client, item) pair is a single rating, so no per-pair sums are needed.
        self._one_user_per_client = bool(
            (self.partition.users_per_client() <= 1).all())

        init = BiasedMF(self.n_users, self.n_items, self.dim,
                        global_mean=float(self._ratings.mean()), init_std=init_std, seed=self.seed)
        #: The server's state: shared parameters only (no user rows).
        self.server: dict[str, torch.Tensor] = {
            name: getattr(init, name).detach().clone() for name in BiasedMF.shared_parameter_names}
        #: The devices' state: user rows, never uploaded.
        self.clients: dict[str, torch.Tensor] = {
            name: getattr(init, name).detach().clone() for name in BiasedMF.user_parameter_names}
        self.rounds_done = 0
        #: The last round's client changes as the server received them (for :mod:`privrec.attacks`):
        #: ``clients`` (ids) and ``examples`` (their counts); per uploaded row ``pair_client``
        #: (position in ``clients``), ``pair_item``, ``pair_examples``, and the row changes
        #: ``item_factors``, ``item_bias``; per client ``global_bias``.
        self.last_upload: dict[str, torch.Tensor] | None = None
        #: What the server sent in the last round (an attacker on the server knows it).
        self.last_broadcast: dict[str, torch.Tensor] | None = None

    # -- sizes --------------------------------------------------------------------------------

    @property
    def shared_size(self) -> int:
        """Number of floats in the shared model (what a broadcast carries)."""
        return self.n_items * (self.dim + 1) + 1

    # -- the round ----------------------------------------------------------------------------

    def round(self) -> RoundRecord:
        """Run one round of the protocol (steps 2-5) and return its communication record."""
        with _torch_threads(self.num_threads):
            # Step 2: sample this round's clients; the broadcast is the current shared model.
            clients = self.strategy.sample_clients(self.partition.n_clients)
            self.last_broadcast = {k: v.clone() for k, v in self.server.items()}
            # Step 3: local training (user rows solved and kept on the client), then the upload.
            if len(clients) == 0:  # possible under Poisson sampling (DP-FedAvg): nobody uploads
                upload = _empty_upload(self.dim)
            elif self.engine == "vectorised":
                upload = self._local_training_vectorised(self._round_data(clients))
            else:
                upload = self._local_training_loop(self._round_data(clients))
            self.last_upload = upload
            # Steps 4-5: the strategy combines the changes and steps the server model.
            change = self.strategy.aggregate(upload, n_items=self.n_items, dim=self.dim)
            self.strategy.server_update(self.server, change)
            self.rounds_done += 1
            if not all(bool(torch.isfinite(v).all()) for v in self.server.values()):
                raise RuntimeError(f"training diverged in round {self.rounds_done} (non-finite "
                                   f"shared parameters); lower local_lr (now {self.local_lr:g}) "
                                   f"or the server learning rate")
            return self._accounting(clients, upload)

    def fit(self, rounds: int, *, test: pd.DataFrame | None = None,
            eval_every: int = 1) -> FedHistory:
        """Run ``rounds`` rounds, recording bytes each round and test RMSE every ``eval_every``."""
        rounds = int_in("rounds", rounds, 1)
        eval_every = int_in("eval_every", eval_every, 1)
        if test is not None:
            validate_ratings(test, n_users=self.n_users, n_items=self.n_items, name="test")
        history = FedHistory()
        for r in range(1, rounds + 1):
            record = self.round()
            history.bytes_down.append(record.bytes_down)
            history.bytes_up.append(record.bytes_up)
            if test is not None and (r % eval_every == 0 or r == rounds):
                history.rounds.append(self.rounds_done)
                history.test_rmse.append(self.evaluate(test)["rmse"])
        return history

    # -- step 3a: clients' own parameters -------------------------------------------------------

    def _round_data(self, clients: np.ndarray) -> _RoundData:
        taking_part = torch.zeros(self.partition.n_clients, dtype=torch.bool)
        taking_part[torch.as_tensor(clients)] = True
        keep = taking_part[self._client_of_rating]
        users, items, ratings = self._users[keep], self._items[keep], self._ratings[keep]
        fake = torch.zeros(len(users), dtype=torch.bool)
        if self.fake_items > 0:
            f_users, f_items = self._sample_fake_items(users)
            if self.pseudo_rating == "user_mean":
                f_ratings = self._user_mean[f_users]
            else:
                f_ratings = self._predict(f_users, f_items)
            users = torch.cat([users, f_users])
            items = torch.cat([items, f_items])
            ratings = torch.cat([ratings, f_ratings])
            fake = torch.cat([fake, torch.ones(len(f_users), dtype=torch.bool)])
        return _RoundData(users, items, ratings, self._owner[users], fake)

    def _sample_fake_items(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each user of the round draws ``round(fake_items * n_u)`` distinct unrated items.

        Uniform candidates with rejection (rated or repeated items are dropped); the rare user who
        runs short falls back to a random permutation of all its unrated items.
        """
        active = torch.unique(users)
        counts = torch.round(self.fake_items * self._n_per_user[active].double()).long()
        counts = torch.minimum(counts, self.n_items - self._n_per_user[active])
        draws = 2 * counts + 8
        owner = torch.repeat_interleave(torch.arange(len(active)), draws)
        candidate = torch.randint(self.n_items, (len(owner),), generator=self._fake_gen)
        keep = ~self._rated[active[owner], candidate]
        key = owner * self.n_items + candidate
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(key))
        first = first.scatter_reduce(0, inverse, torch.arange(len(key)), "amin")
        keep &= torch.arange(len(key)) == first[inverse]
        # Rank of each kept candidate within its user; keep the first `count`.
        ends = torch.cumsum(draws, 0)
        kept_before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(keep.long(), 0)])
        rank = kept_before[1:] - kept_before[(ends - draws)[owner]]
        keep &= rank <= counts[owner]
        got = torch.bincount(owner[keep], minlength=len(active))
        f_users, f_items = active[owner[keep]], candidate[keep]
        short = torch.nonzero(got < counts).squeeze(1)
        if len(short):
            keys = torch.rand(len(short), self.n_items, generator=self._fake_gen)
            keys[self._rated[active[short]]] = 2.0
            order = keys.argsort(dim=1)
            take = torch.arange(self.n_items)[None, :] < counts[short, None]
            rows = torch.arange(len(short))[:, None].expand_as(order)[take]
            redo = torch.isin(f_users, active[short])
            f_users = torch.cat([f_users[~redo], active[short][rows]])
            f_items = torch.cat([f_items[~redo], order[take]])
        return f_users, f_items

    def _predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        s = self.server
        return (s["global_bias"] + self.clients["user_bias"][users] + s["item_bias"][items]
                + (self.clients["user_factors"][users] * s["item_factors"][items]).sum(1))

    def _solve_users(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor) -> None:
        """Step 3a (closed-form mode): ridge regression of each user on the received items.

        Minimises :math:`\\sum_i (r_{ui}-\\mu-b_i-b_u-p_u^\\top q_i)^2 + n_u(\\lambda\\lVert p_u
        \\rVert^2+\\lambda_b b_u^2)` over the user's *real* ratings (see :func:`solve_user_ridge`).
        """
        active, local, _ = _compact(users, self.n_users)
        solution = solve_user_ridge(local, items, ratings, n_rows=len(active),
                                    item_factors=self.server["item_factors"],
                                    item_bias=self.server["item_bias"],
                                    global_bias=self.server["global_bias"],
                                    reg=self.reg, bias_reg=self.bias_reg)
        self.clients["user_factors"][active] = solution[:, :-1]
        self.clients["user_bias"][active] = solution[:, -1]

    # -- step 3b: local training, vectorised -------------------------------------------------

    def _local_training_vectorised(self, data: _RoundData) -> dict[str, torch.Tensor]:
        """All clients at once over (client, item) pairs: local copies exist only for rated rows."""
        if self.user_solver == "closed_form":
            real = ~data.is_fake
            self._solve_users(data.users[real], data.items[real], data.ratings[real])
        n_items = self.n_items
        clients, rating_client, n_client = _compact(data.clients, self.partition.n_clients)
        n_client = n_client.float()
        if self._one_user_per_client:
            # Each rating is its own (client, item) pair: per-pair sums are the identity.
            pair, pair_client, pair_item = None, rating_client, data.items
            n_pair = torch.ones(len(data.items))
        else:
            keys, pair, n_pair = _compact(data.clients * n_items + data.items,
                                          self.partition.n_clients * n_items)
            pair_client = torch.searchsorted(clients, keys // n_items)
            pair_item, n_pair = keys % n_items, n_pair.float()

        def per_pair(values: torch.Tensor) -> torch.Tensor:
            if pair is None:
                return values
            return torch.zeros((len(pair_item),) + values.shape[1:]).index_add_(0, pair, values)

        def at_rating(values: torch.Tensor) -> torch.Tensor:
            return values if pair is None else values[pair]

        q = self.server["item_factors"][pair_item].clone()
        b = self.server["item_bias"][pair_item].clone()
        mu = self.server["global_bias"].expand(len(clients)).clone()
        users, active_users = data.users, None
        if self.user_solver == "gradient":
            active_users, users, n_user = _compact(data.users, self.n_users)
            n_user = n_user.float()
            p = self.clients["user_factors"][active_users].clone()
            bu = self.clients["user_bias"][active_users].clone()
        else:
            p = self.clients["user_factors"][data.users]
            bu = self.clients["user_bias"][data.users]
        for _ in range(self.local_epochs):
            p_r = p if active_users is None else p[users]
            bu_r = bu if active_users is None else bu[users]
            q_r = at_rating(q)
            err = data.ratings - (mu[rating_client] + bu_r + at_rating(b) + (p_r * q_r).sum(1))
            grad_q = per_pair(-2.0 * err[:, None] * p_r)
            grad_b = per_pair(-2.0 * err)
            grad_mu = torch.zeros_like(mu).index_add_(0, rating_client, -2.0 * err)
            if active_users is not None:
                grad_p = torch.zeros_like(p).index_add_(0, users, -2.0 * err[:, None] * q_r)
                grad_bu = torch.zeros_like(bu).index_add_(0, users, -2.0 * err)
                p = p - self.local_lr * (grad_p / n_user[:, None] + 2.0 * self.reg * p)
                bu = bu - self.local_lr * (grad_bu / n_user + 2.0 * self.bias_reg * bu)
            q = q - self.local_lr * (grad_q / n_pair[:, None] + 2.0 * self.reg * q)
            b = b - self.local_lr * (grad_b / n_pair + 2.0 * self.bias_reg * b)
            mu = mu - self.local_lr * grad_mu / n_client
        if active_users is not None:
            self.clients["user_factors"][active_users] = p
            self.clients["user_bias"][active_users] = bu
        return {
            "clients": clients, "examples": n_client,
            "pair_client": pair_client, "pair_item": pair_item, "pair_examples": n_pair,
            "item_factors": q - self.server["item_factors"][pair_item],
            "item_bias": b - self.server["item_bias"][pair_item],
            "global_bias": mu - self.server["global_bias"],
        }

    # -- step 3b: local training, the plain reference ------------------------------------------

    def _local_training_loop(self, data: _RoundData) -> dict[str, torch.Tensor]:
        """One client at a time, each with a full copy of the shared model (the reference)."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "clients", "examples", "pair_client", "pair_item", "pair_examples", "item_factors",
            "item_bias", "global_bias")}
        clients = torch.unique(data.clients)
        for position, k in enumerate(clients.tolist()):
            mine = data.clients == k
            users, items, ratings = data.users[mine], data.items[mine], data.ratings[mine]
            if self.user_solver == "closed_form":
                real = ~data.is_fake[mine]
                for u in torch.unique(users[real]).tolist():
                    own = real & (users == u)
                    self._solve_users(users[own], items[own], ratings[own])
            q = self.server["item_factors"].clone()
            b = self.server["item_bias"].clone()
            mu = self.server["global_bias"].clone()
            p = self.clients["user_factors"].clone()
            bu = self.clients["user_bias"].clone()
            n_item = torch.bincount(items, minlength=self.n_items).float().clamp(min=1)
            n_user = torch.bincount(users, minlength=self.n_users).float().clamp(min=1)
            touched_items = torch.unique(items)
            touched_users = torch.unique(users)
            for _ in range(self.local_epochs):
                err = ratings - (mu + bu[users] + b[items] + (p[users] * q[items]).sum(1))
                grad_q = torch.zeros_like(q).index_add_(0, items, -2.0 * err[:, None] * p[users])
                grad_b = torch.zeros_like(b).index_add_(0, items, -2.0 * err)
                grad_mu = -2.0 * err.sum() / len(err)
                if self.user_solver == "gradient":
                    grad_p = torch.zeros_like(p).index_add_(0, users, -2.0 * err[:, None] * q[items])
                    grad_bu = torch.zeros_like(bu).index_add_(0, users, -2.0 * err)
                    new_p = p - self.local_lr * (grad_p / n_user[:, None] + 2.0 * self.reg * p)
                    new_bu = bu - self.local_lr * (grad_bu / n_user + 2.0 * self.bias_reg * bu)
                    p[touched_users], bu[touched_users] = new_p[touched_users], new_bu[touched_users]
                new_q = q - self.local_lr * (grad_q / n_item[:, None] + 2.0 * self.reg * q)
                new_b = b - self.local_lr * (grad_b / n_item + 2.0 * self.bias_reg * b)
                q[touched_items], b[touched_items] = new_q[touched_items], new_b[touched_items]
                mu = mu - self.local_lr * grad_mu
            if self.user_solver == "gradient":
                self.clients["user_factors"][touched_users] = p[touched_users]
                self.clients["user_bias"][touched_users] = bu[touched_users]
            # What the client uploads: the rows that changed (its rated rows) and mu.
            out["clients"].append(torch.tensor([k]))
            out["examples"].append(torch.tensor([float(len(ratings))]))
            out["pair_client"].append(torch.full((len(touched_items),), position))
            out["pair_item"].append(touched_items)
            out["pair_examples"].append(torch.bincount(items, minlength=self.n_items)[touched_items]
                                        .float())
            out["item_factors"].append((q - self.server["item_factors"])[touched_items])
            out["item_bias"].append((b - self.server["item_bias"])[touched_items])
            out["global_bias"].append((mu - self.server["global_bias"]).reshape(1))
        return {k: torch.cat(v) for k, v in out.items()}

    # -- step 4: aggregation ---------------------------------------------------------------------

    def _accounting(self, clients: np.ndarray, upload: dict[str, torch.Tensor]) -> RoundRecord:
        m = len(clients)
        down = m * self.shared_size * BYTES_PER_FLOAT
        if self.upload == "dense":
            up = len(upload["clients"]) * self.shared_size * BYTES_PER_FLOAT
            rows = len(upload["clients"]) * self.n_items
        else:
            rows = len(upload["pair_item"])
            up = (rows * ((self.dim + 1) * BYTES_PER_FLOAT + BYTES_PER_INDEX)
                  + len(upload["clients"]) * BYTES_PER_FLOAT)
        return RoundRecord(clients=clients, bytes_down=int(down), bytes_up=int(up),
                           rows_up=int(rows))

    # -- evaluation (simulation only) ------------------------------------------------------------

    def personalise(self) -> None:
        """Every client refits its users to the current global model (no communication).

        Evaluation calls this first, as a deployed client would before recommending; in
        ``"gradient"`` mode the stored user rows are kept as trained.
        """
        if self.user_solver != "closed_form":
            return
        solution = solve_user_ridge(self._users, self._items, self._ratings, n_rows=self.n_users,
                                    item_factors=self.server["item_factors"],
                                    item_bias=self.server["item_bias"],
                                    global_bias=self.server["global_bias"],
                                    reg=self.reg, bias_reg=self.bias_reg)
        seen = self._n_per_user > 0
        self.clients["user_factors"][seen] = solution[seen, :-1]
        self.clients["user_bias"][seen] = solution[seen, -1]

    def to_model(self) -> BiasedMF:
        """A :class:`BiasedMF` assembling server and client state — a simulation convenience for
        evaluation; no party in the protocol ever holds this object."""
        model = BiasedMF(self.n_users, self.n_items, self.dim)
        with torch.no_grad():
            for name, value in {**self.server, **self.clients}.items():
                getattr(model, name).copy_(value)
        return model

    def evaluate(self, test: pd.DataFrame) -> dict[str, float]:
        """Test RMSE/MAE after :meth:`personalise` (predictions clamped to 1..5)."""
        with _torch_threads(self.num_threads):
            self.personalise()
            return evaluate_ratings(self.to_model(), test)

    def __repr__(self) -> str:
        return (f"FederatedMF({self.strategy!r}, {self.partition.name}, dim={self.dim}, "
                f"local_epochs={self.local_epochs}, local_lr={self.local_lr:g}, "
                f"engine={self.engine!r})")


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _empty_upload(dim: int) -> dict[str, torch.Tensor]:
    long, flt = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return {"clients": long, "examples": flt, "pair_client": long, "pair_item": long,
            "pair_examples": flt, "item_factors": torch.zeros(0, dim), "item_bias": flt,
            "global_bias": flt}


def _compact(ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(present ids sorted, inverse, counts)`` of ``ids`` in ``[0, size)`` without sorting."""
    counts = torch.bincount(ids, minlength=size)
    present = counts > 0
    remap = torch.cumsum(present, 0) - 1
    return present.nonzero().squeeze(1), remap[ids], counts[present]


def solve_user_ridge(rows: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *,
                     n_rows: int, item_factors: torch.Tensor, item_bias: torch.Tensor,
                     global_bias: torch.Tensor, reg: float, bias_reg: float) -> torch.Tensor:
    """Closed-form user factors and biases, ``[n_rows, dim + 1]`` (last column the bias).

    For row (user) :math:`u` with ratings :math:`R_u`, solves
    :math:`(\\sum_{i\\in R_u} x_i x_i^\\top + n_u\\Lambda)\\,w_u = \\sum_{i\\in R_u}
    (r_{ui}-\\mu-b_i)\\,x_i` with :math:`x_i=(q_i,1)`, :math:`\\Lambda=\\mathrm{diag}(\\lambda,\\dots,
    \\lambda,\\lambda_b)` — the ALS user step (Hu, Koren & Volinsky 2008; Zhou et al. 2008) for the
    per-rating regularised objective. All users are solved in one batched call.
    """
    dim = item_factors.shape[1]
    x = torch.cat([item_factors, torch.ones(len(item_factors), 1)], 1).double()
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)
    if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):
        order = torch.argsort(rows, stable=True)
        rows, items, ratings = rows[order], items[order], ratings[order]
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    # Both sums over a user's rated rows are sparse products with the user-by-item pattern.
    target = ratings.double() - global_bias.double() - item_bias.double()[items]
    with warnings.catch_warnings():  # torch flags CSR as beta; the two products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        indicator = torch.sparse_csr_tensor(crow, items, torch.ones(len(rows), dtype=torch.double),
                                            (n_rows, len(x)), check_invariants=False)
        weighted = torch.sparse_csr_tensor(crow, items, target, (n_rows, len(x)),
                                           check_invariants=False)
        gram = (indicator @ outer).reshape(n_rows, dim + 1, dim + 1)
        rhs = weighted @ x
    counts = counts.double().clamp(min=1)
    penalty = torch.full((dim + 1,), float(reg), dtype=torch.double)
    penalty[-1] = bias_reg
    gram = gram + counts[:, None, None] * torch.diag(penalty)
    return torch.linalg.solve(gram, rhs).float()
