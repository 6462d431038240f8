"""Federated clients for implicit feedback: every user a device holding its positives and user rows.

:class:`FederatedImplicit` follows :class:`privrec.federated.protocols.FederatedModel`, so the federated
engine (:mod:`privrec.federated.engine`) and its DP-FedAvg wrapper train
:class:`~privrec.recsys.two_tower.TwoTowerRecommender` -- and :class:`~privrec.recsys.models.BiasedMF`,
with the same client code -- on implicit feedback.

References: McMahan et al. (2018), DP recurrent language models, ICLR.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.checks import int_in, non_negative, positive, tensor_dict, untied
from ..core.checks import seed as check_seed
from ..recsys.data import validate_ratings
from ..recsys.metrics import evaluate_ranking
from ..recsys.models import as_index_tensor
from ..recsys.two_tower import implicit_batch, negative_pool, parameter_names, shared_size
from .updates import ClientUpdates, RowUpdates

__all__ = ["ImplicitClients", "FederatedImplicit"]


class _Unchecked(nn.Module):
    """Routes ``forward`` to ``predict_unchecked`` so ``torch.func.functional_call`` can use it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.model.predict_unchecked(users, items)


class ImplicitClients:
    """What every population of implicit-feedback clients shares: each user a client holding its
    positives (in a CSR layout) and its user rows, the step settings, one generator for the
    positives and negatives the clients draw, and the upload of item-indexed tables as the rows a
    client touched. :class:`FederatedImplicit` and :class:`~privrec.federated.lora.FederatedLoRA`
    differ only in how a cohort computes its gradients.
    """

    #: What one client protects (the DP wrapper's ledger unit) and how it uploads.
    privacy_unit, upload = "user", "sparse"

    def __init__(self, model: nn.Module, train: pd.DataFrame, *, local_steps: int,
                 local_batch: int, n_negatives: int, client_lr: float, user_lr: float,
                 reg: float, negative_items: object, personalise_steps: int, seed: int) -> None:
        self.user_names, self.shared_names = parameter_names(model)
        validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
        self.model, self.n_clients = model, model.n_users
        self.train = train[["user", "item", "rating"]]  # what evaluate excludes from candidates
        self.pool = negative_pool(model, negative_items)
        self.local_steps = int_in("local_steps", local_steps, 1)
        self.local_batch = int_in("local_batch", local_batch, 1)
        self.n_negatives = int_in("n_negatives", n_negatives, 1)
        self.client_lr = non_negative("client_lr", client_lr)
        self.user_lr, self.reg = positive("user_lr", user_lr), non_negative("reg", reg)
        self.personalise_steps = int_in("personalise_steps", personalise_steps, 0)
        self.generator = torch.Generator().manual_seed(check_seed("seed", seed))
        users = torch.as_tensor(train["user"].to_numpy(np.int64))
        order = torch.argsort(users, stable=True)  # CSR layout: each user's items, in row order
        self.items_by_user = torch.as_tensor(train["item"].to_numpy(np.int64))[order]
        self.counts = torch.bincount(users, minlength=self.n_clients)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.tables = tuple(n for n in self.shared_names if n.startswith("item_"))

    @property
    def examples_per_client(self) -> int:
        """Examples one client with data trains on in a round."""
        return self.local_steps * self.local_batch * (1 + self.n_negatives)

    def _draw(self, clients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = self.counts[clients, None]
        offsets = (torch.rand(len(clients), self.local_batch, generator=self.generator)
                   * counts).long().minimum(counts - 1)
        # index_select: the same gather as advanced indexing, without its overhead
        positives = self.items_by_user.index_select(
            0, (self.starts[clients, None] + offsets).reshape(-1)).reshape(offsets.shape)
        return implicit_batch(positives, self.pool, n_negatives=self.n_negatives,
                              generator=self.generator)

    def _cohort(self, shared: dict[str, torch.Tensor], clients: torch.Tensor):
        """``(clients, active, local)``: the checked cohort (sorted, distinct), those of its
        clients that hold data, and each active client's own copy of ``shared``."""
        tensor_dict("shared", shared)
        clients = as_index_tensor(clients, name="clients", upper=self.n_clients)
        if bool((clients[1:] <= clients[:-1]).any()):
            raise ValueError("clients must be sorted and distinct (as the engine samples them)")
        active = clients[self.counts[clients] > 0]
        local = {n: shared[n].detach().expand(len(active), *shared[n].shape).clone()
                 for n in self.shared_names}
        return clients, active, local

    def _package(self, clients: torch.Tensor, changes: dict[str, torch.Tensor],
                 position: torch.Tensor, touched: list[torch.Tensor]) -> ClientUpdates:
        """The uploads: ``changes`` ``[len(clients), ...]`` dense, item tables as touched rows."""
        n_items = self.model.n_items
        touched = torch.cat(touched, 1) if touched else torch.zeros(0, 0, dtype=torch.long)
        pairs = (position[:, None] * n_items + touched).reshape(-1)
        pairs, uses = torch.unique(pairs, return_counts=True)  # sorted by (client, row)
        client_pos, row = pairs // n_items, pairs % n_items
        rows = {n: RowUpdates(client_pos, row, changes[n].flatten(0, 1).index_select(0, pairs),
                              uses.float()) for n in self.tables}  # row client_pos*n_items+row
        dense = {n: changes[n] for n in self.shared_names if n not in self.tables}
        examples = torch.where(self.counts[clients] > 0, float(self.examples_per_client), 0.0)
        return ClientUpdates(clients, examples, rows, dense)


class FederatedImplicit(ImplicitClients):
    """Every user a client holding its positives and its user rows: the
    :class:`~privrec.federated.protocols.FederatedModel` for implicit feedback, for any model that names its
    ``user_parameter_names`` and ``shared_parameter_names`` (:class:`TwoTowerRecommender`,
    :class:`~privrec.recsys.models.BiasedMF`).

    In :meth:`local_training` each client of the cohort runs ``local_steps`` SGD steps on its own
    loss -- ``local_batch`` of its positives (with replacement), ``n_negatives`` uniform negatives
    each, binary cross-entropy, L2 ``reg`` on its user rows -- over its copy of the shared
    parameters (step ``client_lr``) and its user rows (step ``user_lr``); all clients run as one
    ``torch.func.vmap`` program. The user rows stay in the model (the devices). The upload is the
    change of the shared parameters: dense for the adapter, biases and :math:`\\mu`; for tables
    indexed by item id (names starting with ``item_``) only the rows the client touched -- its
    positives *and* its sampled negatives -- with the ids of those rows. The upload is what the
    server sees; DP noise is added to the aggregate, so the sparsity pattern (which items a client
    touched) is visible to the server unless secure aggregation hides the individual uploads.

    Parameters
    ----------
    model, train:
        The model (its shared parameters are the server's initial state); ratings (positives).
    negative_items:
        Pool of negatives (default all items; pass the warm items in a cold-start experiment).
    personalise_steps:
        Steps each client takes on its own rows against the released model (no communication).
    seed:
        Seeds the clients' sampling of positives and negatives.

    Raises
    ------
    TypeError, ValueError
        For a model without the two name lists, bad ratings or bad step settings.
    """

    def __init__(self, model: nn.Module, train: pd.DataFrame, *, local_steps: int = 2,
                 local_batch: int = 16, n_negatives: int = 4, client_lr: float = 5.0,
                 user_lr: float = 1.0, reg: float = 1e-4, negative_items: object = None,
                 personalise_steps: int = 20, seed: int = 0) -> None:
        super().__init__(model, train, local_steps=local_steps, local_batch=local_batch,
                         n_negatives=n_negatives, client_lr=client_lr, user_lr=user_lr, reg=reg,
                         negative_items=negative_items, personalise_steps=personalise_steps,
                         seed=seed)
        wrapper = _Unchecked(untied("model", model))  # functional_call below skips untying

        def loss(shared, user, items, labels):
            params = {f"model.{n}": v for n, v in (shared | user).items()}
            users = torch.zeros(items.shape[-1], dtype=torch.long)
            # tie_weights=False: the model ties no weights, so the untying pass is skipped
            logits = torch.func.functional_call(wrapper, params, (users, items),
                                                tie_weights=False)
            penalty = sum(v.square().sum() for v in user.values())
            return nn.functional.binary_cross_entropy_with_logits(logits, labels) + reg * penalty

        self._grad_both = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)),
                                          in_dims=(0, 0, 0, None))
        self._grad_user = torch.func.vmap(torch.func.grad(loss, argnums=1),
                                          in_dims=(None, 0, 0, None))

    @property
    def shared_size(self) -> int:
        """Number of shared parameters (the size of the server's state)."""
        return shared_size(self.model)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The model's current shared parameters (seeded initialisation, no data statistic)."""
        return {n: getattr(self.model, n).detach().clone() for n in self.shared_names}

    def load_shared(self, shared: dict[str, torch.Tensor]) -> None:
        """Write a (released) shared state into the model."""
        missing = sorted(set(self.shared_names) - set(tensor_dict("shared", shared)))
        if missing:
            raise ValueError(f"shared lacks the model's shared parameters {missing}")
        with torch.no_grad():
            for n in self.shared_names:
                getattr(self.model, n).copy_(shared[n])

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        """One group, whatever ``max_examples``: the cohort draws its examples from one generator
        in one call, so any split would change the draws (and the numbers)."""
        int_in("max_examples", max_examples, 1)
        return [torch.as_tensor(clients)] if len(clients) else []

    def _user_rows(self, clients: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: getattr(self.model, n).detach().index_select(0, clients)[:, None]
                for n in self.user_names}

    def _store_user_rows(self, clients: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n in self.user_names:
                getattr(self.model, n).index_copy_(0, clients, rows[n][:, 0])  # distinct ids

    @torch.no_grad()  # torch.func.grad still differentiates; nothing else builds a graph
    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Train the (sorted) ``clients`` from ``shared``; return their uploads (class docstring).

        ``examples``: the examples each client trained on (equal for all clients with data, so
        FedAvg's weighting is a plain mean; 0 and a zero change for a client without data)."""
        clients, active, local = self._cohort(shared, clients)
        users, touched = self._user_rows(active), []
        for _ in range(self.local_steps if len(active) else 0):
            items, labels = self._draw(active)
            g_shared, g_user = self._grad_both(local, users, items, labels)
            for n, v in local.items():  # in place: these are the clients' own copies
                v.sub_(g_shared[n], alpha=self.client_lr)
            users = {n: v - self.user_lr * g_user[n] for n, v in users.items()}
            touched.append(items)
        self._store_user_rows(active, users)  # stays on the devices
        position = torch.searchsorted(clients, active)
        changes = {n: v.sub_(shared[n]) for n, v in local.items()}
        if len(active) < len(clients):
            changes = {n: torch.zeros(len(clients), *v.shape[1:]).index_copy_(0, position, v)
                       for n, v in changes.items()}
        return self._package(clients, changes, position, touched)

    @torch.no_grad()
    def released_model(self, shared: dict[str, torch.Tensor]) -> nn.Module:
        """The model with the released ``shared`` state, after every client refitted its user rows
        to it for ``personalise_steps`` local steps (no communication)."""
        self.load_shared(shared)
        active = (self.counts > 0).nonzero().squeeze(1)
        users = self._user_rows(active)
        for _ in range(self.personalise_steps if len(active) else 0):
            items, labels = self._draw(active)
            grads = self._grad_user(shared, users, items, labels)
            users = {n: v - self.user_lr * grads[n] for n, v in users.items()}
        self._store_user_rows(active, users)
        return self.model

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        """HR@10 and NDCG@10 of :meth:`released_model` (each user's training positives excluded
        from the candidates; :func:`~privrec.recsys.metrics.evaluate_ranking`)."""
        validate_ratings(test, n_users=self.model.n_users, n_items=self.model.n_items, name="test")
        return evaluate_ranking(self.released_model(shared), self.train, test)
