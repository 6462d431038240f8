"""Biased matrix factorisation as a federated model (the :class:`~privrec.federated.protocols.FederatedModel`
protocol), trained by :class:`privrec.federated.engine.FederatedSimulator`.

The model object stands for the clients' devices: it holds every client's ratings and user rows
(``user_factors``, ``user_bias``), which the protocol never uploads. The server's state is the
simulator's ``shared`` dict (``item_factors``, ``item_bias``, ``global_bias``); its round-0 value
comes from public configuration only (:func:`initial_shared_state`, the one function a simulator
and a deployed server both call). Local training itself is in :mod:`privrec.federated.mf_local`;
FedRec's defence (fake items with pseudo-ratings, Lin et al. 2020) is here, an option of the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import torch

from ..core.checks import (
    choice,
    function,
    in_range,
    instance,
    int_in,
    non_negative,
    positive,
    real,
    tensor_dict,
)
from ..core.checks import seed as check_seed
from ..recsys.data import validate_ratings
from ..recsys.metrics import evaluate_ratings
from ..recsys.models import BiasedMF, as_index_tensor
from .mf_local import (
    Batch,
    BroadcastTable,
    RatingStore,
    compact_ids,
    rating_arrays,
    solve_users,
    train_loop,
    train_vectorised,
)
from .partitions import Partition, partition_or_default
from .updates import ClientUpdates

__all__ = ["FederatedMF", "BiasOnlyClients", "PUBLIC_GLOBAL_MEAN", "initial_parameters",
           "initial_shared_state", "sample_fake_items", "add_fake_items", "train_groups",
           "RecentBatches", "KEPT_BATCHES"]

#: How many recently gathered batches a :class:`FederatedMF` keeps for reuse.
KEPT_BATCHES = 8

#: The server's initial global bias: the middle of the 1-5 star scale, a public constant (the
#: training mean would be a statistic of the private data, released by the first broadcast).
PUBLIC_GLOBAL_MEAN = 3.0


def initial_parameters(*, n_users: int, n_items: int, dim: int, seed: int = 0,
                       global_mean: float = PUBLIC_GLOBAL_MEAN, init_std: float = 0.1) -> BiasedMF:
    """The round-0 :class:`~privrec.recsys.models.BiasedMF`: seeded Gaussian factors, zero biases,
    :math:`\\mu` = ``global_mean``. Public configuration only: no rating is read."""
    return BiasedMF(n_users, n_items, dim, global_mean=real("global_mean", global_mean),
                    init_std=non_negative("init_std", init_std), seed=check_seed("seed", seed))


def initial_shared_state(*, n_users: int, n_items: int, dim: int, seed: int = 0,
                         global_mean: float = PUBLIC_GLOBAL_MEAN,
                         init_std: float = 0.1) -> dict[str, torch.Tensor]:
    """The server's initial shared state (``item_factors``, ``item_bias``, ``global_bias``),
    built from public configuration only -- the one function the simulator
    (:meth:`FederatedMF.shared_state`) and a deployed server (the Flower ServerApp) both use.

    ``n_users`` is part of the configuration because the seeded generator draws the user rows
    before the item rows (:class:`~privrec.recsys.models.BiasedMF`'s order); the user rows
    themselves stay with the clients.
    """
    init = initial_parameters(n_users=n_users, n_items=n_items, dim=dim, seed=seed,
                              global_mean=global_mean, init_std=init_std)
    return {name: getattr(init, name).detach().clone() for name in BiasedMF.shared_parameter_names}


def train_groups(train: Callable[[torch.Tensor], ClientUpdates],
                 groups: list[torch.Tensor]) -> ClientUpdates:
    """``train`` each group of clients on its own thread, the uploads concatenated in group
    order -- devices training in parallel. Exactly the numbers of one call on all the clients
    when no client's training depends on another's. (torch ops release the GIL; leave torch's
    own intra-op threads at one, the groups are the parallelism.)"""
    function("train", train)
    if not instance("groups", groups, list):
        raise ValueError("groups must not be empty")
    if len(groups) == 1:
        return train(groups[0])
    with ThreadPoolExecutor(len(groups)) as pool:
        return ClientUpdates.concat(list(pool.map(train, groups)))


class RecentBatches:
    """A :class:`~privrec.federated.mf_local.RatingStore`'s batches of the last
    :data:`KEPT_BATCHES` client sets gathered: the same (read-only) batch for the same clients, so
    its derived index structures (:meth:`Batch.derived`) serve every round of a run whose cohort
    does not change. Safe across threads."""

    def __init__(self, store: RatingStore) -> None:
        self.store, self.batches, self._lock = store, {}, threading.Lock()

    def __call__(self, clients: torch.Tensor) -> Batch:
        key = clients.numpy().tobytes()
        with self._lock:
            batch = self.batches.pop(key, None)
        if batch is None:
            batch = self.store.gather(clients)
        with self._lock:
            self.batches[key] = batch
            while len(self.batches) > KEPT_BATCHES:
                del self.batches[next(iter(self.batches))]
        return batch


class FederatedMF:
    """Clients of federated :class:`~privrec.recsys.models.BiasedMF`: their ratings and user rows.

    Parameters
    ----------
    train:
        Ratings table; each rating lives on the client that holds its user. (For large synthetic
        data use :meth:`from_arrays`, which skips pandas.)
    n_users, n_items:
        Id-space sizes (public).
    partition:
        Users to clients; default :func:`~privrec.federated.partitions.cross_device`.
    dim:
        Embedding dimension.
    local_epochs:
        Gradient steps each client takes on its item rows per round (full batch).
    local_lr:
        :math:`\\eta_l` of those steps (per-row normalised gradients). A row rated once by user
        :math:`u` is stable when :math:`\\eta_l(\\lVert p_u\\rVert^2+\\lambda) < 1`; 0.5 is stable
        on MovieLens-100K with closed-form users, gradient-trained users need about 0.2.
    reg, bias_reg:
        :math:`\\lambda`, :math:`\\lambda_b` (per rating, as in :func:`~privrec.recsys.train.fit_explicit`).
    user_solver:
        ``"closed_form"``: clients solve their user rows exactly by ridge regression at the start
        of each round (FCF); ``"gradient"``: they take the same gradient steps on them.
    upload:
        ``"sparse"``: a client sends the rows it changed plus their int32 indices; ``"dense"``: it
        sends the whole shared table (unchanged rows as zeros). Changes the byte count only.
    fake_items:
        FedRec's defence (Lin et al. 2020): each user adds ``round(fake_items * n_u)`` items it
        did not rate, with pseudo-ratings, to its local training. ``0`` disables it.
    pseudo_rating:
        ``"user_mean"`` (FedRec's user averaging) or ``"predicted"`` (the current model).
    engine:
        ``"vectorised"`` or ``"loop"`` (the reference; same numbers, much slower).
    workers:
        A chunk's clients train in this many groups on parallel threads, as devices do: the same
        numbers, as no client's training depends on another's (with fake items: one group).
    global_mean:
        The initial global bias :math:`\\mu` broadcast in round 1; default
        :data:`PUBLIC_GLOBAL_MEAN`, a public constant. Passing the training mean is a release of
        private data: do it only for non-private runs.
    init_std, seed:
        Initialisation of the factors (seeded like :class:`~privrec.recsys.models.BiasedMF`) and seed
        of the fake-item sampling.
    """

    def __init__(self, train: pd.DataFrame, *, n_users: int, n_items: int, **kwargs) -> None:
        validate_ratings(train, n_users=n_users, n_items=n_items, name="train")
        self._setup(train["user"].to_numpy(np.int64), train["item"].to_numpy(np.int64),
                    train["rating"].to_numpy(np.float32), n_users=n_users, n_items=n_items,
                    **kwargs)

    @classmethod
    def from_arrays(cls, users, items, ratings, *, n_users: int, n_items: int,
                    **kwargs) -> FederatedMF:
        """Build from id and rating arrays (numpy or torch) without a DataFrame; already sorted
        by (client, user, item) arrays are used as they are (no copy of a large sort)."""
        users, items, ratings = rating_arrays(users, items, ratings, n_users=n_users,
                                              n_items=n_items)
        model = cls.__new__(cls)
        model._setup(users, items, ratings, n_users=n_users, n_items=n_items, **kwargs)
        return model

    def _setup(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, *, n_users: int,
               n_items: int, partition: Partition | None = None, dim: int = 32,
               local_epochs: int = 1, local_lr: float = 0.5, reg: float = 0.1,
               bias_reg: float = 0.01, user_solver: str = "closed_form", upload: str = "sparse",
               fake_items: float = 0.0, pseudo_rating: str = "user_mean",
               engine: str = "vectorised", workers: int = 1,
               global_mean: float = PUBLIC_GLOBAL_MEAN, init_std: float = 0.1,
               seed: int = 0) -> None:
        self.n_users, self.n_items = int_in("n_users", n_users, 1), int_in("n_items", n_items, 1)
        if len(ratings) == 0:
            raise ValueError("train must not be empty")
        self.partition = partition_or_default(partition, self.n_users)
        #: The FederatedModel protocol's ``n_clients`` and ``privacy_unit`` (what a client-level
        #: guarantee protects: ``"user"`` cross-device, ``"silo"``), fixed by the partition.
        self.n_clients, self.privacy_unit = self.partition.n_clients, self.partition.privacy_unit
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
        self.workers = int_in("workers", workers, 1)
        self.seed = check_seed("seed", seed)
        self.store = RatingStore(users, items, ratings, self.partition.client_of_user,
                                 self.partition.n_clients)
        self.one_user_per_client = self.partition.one_user_per_client
        #: Owner (client) of each user, and the generator of FedRec's fake items.
        self.owner = torch.as_tensor(self.partition.client_of_user)
        self.fake_generator = torch.Generator().manual_seed(self.seed)
        self.item_table = BroadcastTable()  # the user solve's float64 item inputs, per broadcast
        self._gathered = RecentBatches(self.store)
        #: The public configuration of the round-0 model (:func:`initial_shared_state`).
        self.initial_config = {"n_users": self.n_users, "n_items": self.n_items, "dim": self.dim,
                               "seed": self.seed, "global_mean": global_mean, "init_std": init_std}
        init = initial_parameters(**self.initial_config)
        #: The devices' state: user rows, never uploaded.
        self.user_factors = init.user_factors.detach().clone()
        self.user_bias = init.user_bias.detach().clone()

    # -- the FederatedModel protocol ----------------------------------------------------------

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The initial shared parameters, :func:`initial_shared_state` of :attr:`initial_config`:
        seeded noise and :data:`PUBLIC_GLOBAL_MEAN` (or the ``global_mean`` given)."""
        return initial_shared_state(**self.initial_config)

    def chunks(self, clients: torch.Tensor, max_ratings: int) -> list[torch.Tensor]:
        """Consecutive groups of the sorted ``clients`` holding about ``max_ratings`` ratings."""
        clients = as_index_tensor(clients, name="clients", upper=self.n_clients)
        return self.store.chunks(clients, int_in("max_ratings", max_ratings, 1))

    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Step 3 for the sorted ``clients``: solve user rows, local epochs, return the item-side
        changes (in ``workers`` parallel groups)."""
        tensor_dict("shared", shared)
        clients = as_index_tensor(clients, name="clients", upper=self.n_clients)
        if bool((clients[1:] <= clients[:-1]).any()):
            raise ValueError("clients must be sorted and distinct (as strategies sample them)")
        workers = self.workers if self.fake_items == 0 else 1
        total = int(self.store.counts(clients).sum())
        groups = self.store.chunks(clients, max(1, -(-total // workers)))
        return train_groups(partial(self._train, shared), groups or [clients])

    def _train(self, shared: dict[str, torch.Tensor], clients: torch.Tensor) -> ClientUpdates:
        batch = self._gathered(clients)
        if self.fake_items > 0:
            batch = add_fake_items(self, shared, batch)
        engine = train_vectorised if self.engine == "vectorised" else train_loop
        return engine(self, shared, batch)

    # -- what a client does with the released model (no communication) ------------------------

    def personalise(self, shared: dict[str, torch.Tensor], *, max_ratings: int = 1 << 16) -> None:
        """Every client refits its users to ``shared`` (closed-form mode; post-processing).

        In ``"gradient"`` mode the stored user rows are kept as trained.
        """
        tensor_dict("shared", shared)
        max_ratings = int_in("max_ratings", max_ratings, 1)
        if self.user_solver != "closed_form":
            return
        for chunk in self.store.chunks(torch.arange(self.n_clients), max_ratings):
            solve_users(self, shared, self._gathered(chunk))

    def released_model(self, shared: dict[str, torch.Tensor]) -> BiasedMF:
        """A :class:`BiasedMF` of ``shared`` and every user's row after :meth:`personalise` -- a
        simulation convenience for evaluation; no party in the protocol holds this object."""
        self.personalise(shared)
        model = BiasedMF(self.n_users, self.n_items, self.dim)
        with torch.no_grad():
            for name, value in {**shared, "user_factors": self.user_factors,
                                "user_bias": self.user_bias}.items():
                getattr(model, name).copy_(value)
        return model

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        """Test RMSE/MAE of :meth:`released_model` (predictions clamped to 1..5)."""
        validate_ratings(test, n_users=self.n_users, n_items=self.n_items, name="test")
        return evaluate_ratings(self.released_model(shared), test)

    def __repr__(self) -> str:
        return (f"FederatedMF({self.partition.name}, dim={self.dim}, "
                f"local_epochs={self.local_epochs}, local_lr={self.local_lr:g}, "
                f"user_solver={self.user_solver!r}, engine={self.engine!r})")


class BiasOnlyClients:
    """The bias-only model :math:`\\mu + b_u + b_i` as federated clients (a FederatedModel).

    A :class:`FederatedMF` of dimension 1 whose factors start at zero and
    whose item factors are never shared: with :math:`p_u = v_i = 0` the closed-form user solve
    keeps :math:`p_u = 0` and no factor receives a gradient, so each client solves :math:`b_u`
    on the device and uploads the change of the item biases and :math:`\\mu` only. The shared
    state, the clipped norm and the noise cover exactly those :math:`|I| + 1` numbers.
    """

    FACTORS = "item_factors"

    def __init__(self, ratings: pd.DataFrame, *, n_users: int, n_items: int, **kwargs) -> None:
        self.clients = FederatedMF(ratings, n_users=n_users, n_items=n_items, dim=1,
                                   init_std=0.0, **kwargs)
        self._zero = torch.zeros(n_items, 1)

    n_clients = property(lambda self: self.clients.n_clients)
    privacy_unit = property(lambda self: self.clients.privacy_unit)
    upload = property(lambda self: self.clients.upload)

    def _with_factors(self, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.FACTORS: self._zero, **shared}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Item biases and :math:`\\mu` (public initial values)."""
        return {k: v for k, v in self.clients.shared_state().items() if k != self.FACTORS}

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        return self.clients.chunks(clients, max_examples)

    def local_training(self, shared: dict[str, torch.Tensor], clients: torch.Tensor):
        """FederatedMF's local training at zero factors; the (all-zero) factor rows are dropped."""
        uploads = self.clients.local_training(self._with_factors(shared), clients)
        factors = uploads.rows.pop(self.FACTORS)
        if bool(factors.values.any()):
            raise RuntimeError("a bias-only client changed a factor row")
        return uploads

    def released_model(self, shared: dict[str, torch.Tensor]) -> BiasedMF:
        """Every user's personalised model (factors zero): the bias-only predictions."""
        return self.clients.released_model(self._with_factors(shared))

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        return evaluate_ratings(self.released_model(shared), test)


# -- FedRec's defence (Lin et al. 2020): fake items with pseudo-ratings --------------------------

def sample_fake_items(users: torch.Tensor, items: torch.Tensor, *, n_items: int, rate: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user of the real ratings ``(users, items)`` draws ``round(rate * n_u)`` distinct
    items it did not rate (FedRec, Lin et al. 2020); returns ``(fake users, fake items)``.

    Uniform candidates with rejection (rated or repeated items are dropped); the rare user who
    runs short falls back to a random permutation of all its unrated items. Rated items are
    recognised by sorted ``user * n_items + item`` keys, never a users x items matrix.
    """
    n_items, rate = int_in("n_items", n_items, 1), non_negative("rate", rate)
    instance("generator", generator, torch.Generator)
    users = as_index_tensor(users, name="users", upper=torch.iinfo(torch.int64).max // n_items)
    items = as_index_tensor(items, name="items", upper=n_items)
    active, _, n_u = compact_ids(users)
    counts = torch.minimum(torch.round(rate * n_u.double()).long(), n_items - n_u)
    draws = 2 * counts + 8
    owner = torch.repeat_interleave(torch.arange(len(active)), draws)
    candidate = torch.randint(n_items, (len(owner),), generator=generator)
    rated_keys = users * n_items + items
    key = active[owner] * n_items + candidate
    keep = ~torch.isin(key, rated_keys)
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
        keys = torch.rand(len(short), n_items, generator=generator)
        mine = torch.isin(users, active[short])
        row_of = torch.searchsorted(active[short], users[mine])
        keys[row_of, items[mine]] = 2.0
        order = torch.argsort(keys, dim=1, stable=True)
        take = torch.arange(n_items)[None, :] < counts[short, None]
        rows = torch.arange(len(short))[:, None].expand_as(order)[take]
        redo = torch.isin(f_users, active[short])
        f_users = torch.cat([f_users[~redo], active[short][rows]])
        f_items = torch.cat([f_items[~redo], order[take]])
    return f_users, f_items


def add_fake_items(mf, shared: dict[str, torch.Tensor], batch: Batch) -> Batch:
    """``batch`` with FedRec's fake items (Lin et al. 2020) appended: ``mf.fake_items * n_u``
    unrated items per user (:func:`sample_fake_items`, ``mf.fake_generator``), rated with the
    user's mean real rating (``mf.pseudo_rating == "user_mean"``) or the broadcast model's
    prediction with the user's current row (``"predicted"``)."""
    tensor_dict("shared", shared)
    instance("batch", batch, Batch)
    f_users, f_items = sample_fake_items(batch.users, batch.items, n_items=mf.n_items,
                                         rate=mf.fake_items, generator=mf.fake_generator)
    if mf.pseudo_rating == "user_mean":
        active, inverse, counts = torch.unique(batch.users, return_inverse=True, return_counts=True)
        mean = torch.zeros(len(active)).index_add_(0, inverse, batch.ratings) / counts
        f_ratings = mean[torch.searchsorted(active, f_users)]
    else:
        f_ratings = (shared["global_bias"] + mf.user_bias[f_users] + shared["item_bias"][f_items]
                     + (mf.user_factors[f_users] * shared["item_factors"][f_items]).sum(1))
    return Batch(torch.cat([batch.users, f_users]), torch.cat([batch.items, f_items]),
                 torch.cat([batch.ratings, f_ratings]), torch.cat([batch.clients, mf.owner[f_users]]),
                 torch.cat([batch.is_fake, torch.ones(len(f_users), dtype=torch.bool)]))
