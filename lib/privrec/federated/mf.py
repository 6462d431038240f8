"""Biased matrix factorisation as a federated model (the :class:`~privrec.federated.updates.FederatedModel`
protocol), trained by :class:`privrec.federated.engine.FederatedSimulator`.

The model object stands for the clients' devices: it holds every client's ratings and user rows
(``user_factors``, ``user_bias``), which the protocol never uploads. The server's state is the
simulator's ``shared`` dict (``item_factors``, ``item_bias``, ``global_bias``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..core.checks import choice, in_range, int_in, positive, real
from ..core.checks import seed as check_seed
from ..recsys.data import validate_ratings
from ..recsys.metrics import evaluate_ratings
from ..recsys.models import BiasedMF, as_index_tensor
from .mf_local import (
    Batch,
    RatingStore,
    item_outer,
    sample_fake_items,
    solve_users,
    train_loop,
    train_vectorised,
)
from .partitions import Partition, cross_device
from .updates import ClientUpdates

__all__ = ["FederatedMF", "PUBLIC_GLOBAL_MEAN"]

#: The server's initial global bias: the middle of the 1-5 star scale, a public constant (the
#: training mean would be a statistic of the private data, released by the first broadcast).
PUBLIC_GLOBAL_MEAN = 3.0


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
        users = as_index_tensor(users, name="users", upper=int_in("n_users", n_users, 1)).numpy()
        items = as_index_tensor(items, name="items", upper=int_in("n_items", n_items, 1)).numpy()
        ratings = np.asarray(ratings, dtype=np.float32)
        if ratings.shape != users.shape or items.shape != users.shape:
            raise ValueError("users, items and ratings must have the same length")
        if not np.isfinite(ratings).all():
            raise ValueError("ratings contains NaN or infinite values")
        model = cls.__new__(cls)
        model._setup(users, items, ratings, n_users=n_users, n_items=n_items, **kwargs)
        return model

    def _setup(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray, *, n_users: int,
               n_items: int, partition: Partition | None = None, dim: int = 32,
               local_epochs: int = 1, local_lr: float = 0.5, reg: float = 0.1,
               bias_reg: float = 0.01, user_solver: str = "closed_form", upload: str = "sparse",
               fake_items: float = 0.0, pseudo_rating: str = "user_mean",
               engine: str = "vectorised", global_mean: float = PUBLIC_GLOBAL_MEAN,
               init_std: float = 0.1, seed: int = 0) -> None:
        self.n_users, self.n_items = int_in("n_users", n_users, 1), int_in("n_items", n_items, 1)
        if len(ratings) == 0:
            raise ValueError("train must not be empty")
        self.partition = cross_device(self.n_users) if partition is None else partition
        if not isinstance(self.partition, Partition):
            raise TypeError(f"partition must be a Partition, got {type(self.partition).__name__}")
        if self.partition.n_users != self.n_users:
            raise ValueError(f"partition covers {self.partition.n_users} users, expected "
                             f"n_users={self.n_users}")
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
        self.seed = check_seed("seed", seed)
        self.store = RatingStore(users, items, ratings, self.partition.client_of_user,
                                 self.partition.n_clients)
        self.one_user_per_client = self.partition.one_user_per_client
        self._owner = torch.as_tensor(self.partition.client_of_user)
        self._fake_gen = torch.Generator().manual_seed(self.seed)
        self._outer: tuple[torch.Tensor, int, torch.Tensor] | None = None
        init = BiasedMF(self.n_users, self.n_items, self.dim, global_mean=real(
            "global_mean", global_mean), init_std=init_std, seed=self.seed)
        self._initial = {name: getattr(init, name).detach().clone()
                         for name in BiasedMF.shared_parameter_names}
        #: The devices' state: user rows, never uploaded.
        self.user_factors = init.user_factors.detach().clone()
        self.user_bias = init.user_bias.detach().clone()

    # -- the FederatedModel protocol ----------------------------------------------------------

    @property
    def n_clients(self) -> int:
        """Number of clients of the partition."""
        return self.partition.n_clients

    @property
    def privacy_unit(self) -> str:
        """What a client-level guarantee protects: ``"user"`` (cross-device) or ``"silo"``."""
        return self.partition.privacy_unit

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The initial shared parameters: seeded noise and :data:`PUBLIC_GLOBAL_MEAN` (or the
        ``global_mean`` given); never a statistic of the ratings."""
        return {k: v.clone() for k, v in self._initial.items()}

    def chunks(self, clients: torch.Tensor, max_ratings: int) -> list[torch.Tensor]:
        """Consecutive groups of ``clients`` holding about ``max_ratings`` ratings each."""
        return self.store.chunks(clients, max_ratings)

    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Step 3 for ``clients``: solve user rows, local epochs, return the item-side changes."""
        batch = self.store.gather(torch.as_tensor(clients, dtype=torch.long))
        if self.fake_items > 0:
            batch = self._with_fake_items(shared, batch)
        engine = train_vectorised if self.engine == "vectorised" else train_loop
        return engine(self, shared, batch)

    # -- helpers of local training ------------------------------------------------------------

    def outer_for(self, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """:func:`~privrec.federated.mf_local.item_outer` of the broadcast, computed once per broadcast."""
        q = shared["item_factors"]
        if self._outer is None or self._outer[0] is not q or self._outer[1] != q._version:
            self._outer = (q, q._version, item_outer(q))
        return self._outer[2]

    def _with_fake_items(self, shared: dict[str, torch.Tensor], batch: Batch) -> Batch:
        f_users, f_items = sample_fake_items(batch.users, batch.items, n_items=self.n_items,
                                             rate=self.fake_items, generator=self._fake_gen)
        if self.pseudo_rating == "user_mean":
            active, inverse, counts = torch.unique(batch.users, return_inverse=True,
                                                   return_counts=True)
            mean = torch.zeros(len(active)).index_add_(0, inverse, batch.ratings) / counts
            f_ratings = mean[torch.searchsorted(active, f_users)]
        else:
            f_ratings = (shared["global_bias"] + self.user_bias[f_users]
                         + shared["item_bias"][f_items]
                         + (self.user_factors[f_users] * shared["item_factors"][f_items]).sum(1))
        return Batch(torch.cat([batch.users, f_users]), torch.cat([batch.items, f_items]),
                     torch.cat([batch.ratings, f_ratings]),
                     torch.cat([batch.clients, self._owner[f_users]]),
                     torch.cat([batch.is_fake, torch.ones(len(f_users), dtype=torch.bool)]))

    # -- what a client does with the released model (no communication) ------------------------

    def personalise(self, shared: dict[str, torch.Tensor], *, max_ratings: int = 1 << 20) -> None:
        """Every client refits its users to ``shared`` (closed-form mode; post-processing).

        In ``"gradient"`` mode the stored user rows are kept as trained.
        """
        if self.user_solver != "closed_form":
            return
        for chunk in self.store.chunks(torch.arange(self.n_clients), max_ratings):
            solve_users(self, shared, self.store.gather(chunk))

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
