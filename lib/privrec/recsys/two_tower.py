"""A two-tower recommender (item tower: frozen text encoder plus a small adapter), trained centrally.

With :math:`x_i = P^\\top(e_i-\\bar e)`, the public embedding :math:`e_i` of item :math:`i`
(:mod:`privrec.recsys.text_encoder`) compressed to its top ``text_dim`` principal coordinates, the score is

.. math:: \\hat s_{ui} = \\mu + b_u + b_i + w^\\top x_i + p_u^\\top (W_0 + AB)^\\top x_i ,

with :math:`W_0` a frozen projection on the top principal directions of the public embeddings and a
LoRA-style low-rank update :math:`A\\in\\mathbb R^{k\\times r}`, :math:`B\\in\\mathbb R^{r\\times d}`,
:math:`B=0` at the start (Hu et al. 2022). The **user** parameters :math:`(p_u, b_u)` stay on the
user's device; the **shared** ones :math:`(A, B, w, \\mu, b_i)` are what a server aggregates and
what DP must protect: a few thousand numbers instead of the :math:`(d+1)|I|` of an item table.

:class:`privrec.federated.two_tower.FederatedImplicit` holds its federated clients: the federated
engine and its DP-FedAvg wrapper train this model -- and :class:`~privrec.recsys.models.BiasedMF`,
with the same client code -- on implicit feedback.

References: Hu et al. (2022), LoRA, ICLR; McMahan et al. (2018), DP recurrent language models, ICLR.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.checks import function, int_in, non_negative, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from .data import validate_ratings
from .models import as_index_tensor, checked_pairs
from .text_encoder import check_embeddings, pca_projection, principal_directions

__all__ = ["TwoTowerRecommender", "shared_size", "fit_two_tower", "parameter_names",
           "negative_pool", "implicit_batch"]


class TwoTowerRecommender(nn.Module):
    """User tower: an embedding and a bias per user. Item tower: frozen text embedding, frozen
    public projection and a small trainable adapter (see the module docstring).

    Parameters
    ----------
    n_users:
        Number of users (rows of the user tower).
    item_embeddings:
        ``[n_items, E]`` frozen public item embeddings (e.g.
        :func:`~privrec.recsys.text_encoder.encode_items`).
    dim:
        :math:`d`, the dimension of the user and item vectors.
    text_dim:
        Keep the top ``text_dim >= dim`` principal coordinates of the embeddings; ``None`` keeps all.
    rank:
        ``r >= 1``: adapter :math:`W_0 + AB` (:math:`A` Gaussian, :math:`B = 0`). ``None``: a full
        trainable :math:`E\\times d` matrix initialised at :math:`W_0`.
    item_bias:
        Add a trainable bias per item id (popularity, which text cannot know). An item nobody rated
        keeps bias 0, so among new items text alone decides.
    init_std:
        Standard deviation of the user vectors and of :math:`A` at initialisation.
    seed:
        Seed of the initialisation. The shared parameters are drawn first, from their own stream,
        so they do not depend on ``n_users`` (adding a user changes nothing the server starts from).

    Raises
    ------
    TypeError, ValueError
        For arguments of the wrong kind or out of range.
    """

    user_parameter_names = ("user_factors", "user_bias")

    def __init__(self, n_users: int, item_embeddings: torch.Tensor, dim: int = 32, *,
                 text_dim: int | None = None, rank: int | None = 4, item_bias: bool = False,
                 init_std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.n_users = int_in("n_users", n_users, 1)
        embeddings = check_embeddings(item_embeddings)
        self.dim = int_in("dim", dim, 1)
        if text_dim is not None:
            text_dim = int_in("text_dim", text_dim, self.dim)
            directions, _ = principal_directions(embeddings, text_dim, name="text_dim")
            embeddings = ((embeddings.double() - embeddings.double().mean(0)) @ directions).float()
        self.text_dim = text_dim
        self.n_items, self.embedding_dim = embeddings.shape
        if rank is not None:
            rank = int_in("rank", rank, 1, min(self.embedding_dim, self.dim))
        self.rank = rank
        if not isinstance(item_bias, bool):
            raise TypeError(f"item_bias must be a bool, got {type(item_bias).__name__}")
        init_std = non_negative("init_std", init_std)
        shared_gen = torch.Generator().manual_seed(check_seed("seed", seed))
        user_gen = torch.Generator().manual_seed(check_seed("seed", seed) + 1)
        self.register_buffer("item_embeddings", embeddings - embeddings.mean(0))
        self.register_buffer("base_projection", pca_projection(embeddings, self.dim))
        self.register_buffer("base_vectors", self.item_embeddings @ self.base_projection)
        if rank is None:
            self.projection = nn.Parameter(self.base_projection.clone())
            names = ("projection", "text_bias", "global_bias")
        else:
            self.adapter_down = nn.Parameter(
                torch.randn(self.embedding_dim, rank, generator=shared_gen) * init_std)
            self.adapter_up = nn.Parameter(torch.zeros(rank, self.dim))
            names = ("adapter_down", "adapter_up", "text_bias", "global_bias")
        self.text_bias = nn.Parameter(torch.zeros(self.embedding_dim))
        self.global_bias = nn.Parameter(torch.zeros(()))
        self.has_item_bias = item_bias
        if item_bias:
            self.item_bias = nn.Parameter(torch.zeros(self.n_items))
            names += ("item_bias",)
        self.shared_parameter_names = names
        self.user_factors = nn.Parameter(
            torch.randn(self.n_users, self.dim, generator=user_gen) * init_std)
        self.user_bias = nn.Parameter(torch.zeros(self.n_users))

    def _item_tower(self, items: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.item_embeddings if items is None else self.item_embeddings[items]
        if self.rank is None:
            out = emb @ torch.cat([self.projection, self.text_bias[:, None]], 1)
            vectors, bias = out[..., :-1], out[..., -1]
        else:
            # One pass over the embeddings for both the adapter and the text bias.
            low = emb @ torch.cat([self.adapter_down, self.text_bias[:, None]], 1)
            base = self.base_vectors if items is None else self.base_vectors[items]
            vectors, bias = base + low[..., :-1] @ self.adapter_up, low[..., -1]
        if self.has_item_bias:
            bias = bias + (self.item_bias if items is None else self.item_bias[items])
        return vectors, bias

    def item_vectors(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, b)``: item vectors ``[n, dim]`` and item biases ``[n]`` (all items by default)."""
        if items is not None:
            items = as_index_tensor(items, name="items", upper=self.n_items)
        return self._item_tower(items)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores (logits) of the (user, item) pairs; ids are checked."""
        users, items = checked_pairs(users, items, n_users=self.n_users, n_items=self.n_items)
        return self.predict_unchecked(users, items)

    def predict_unchecked(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without input checks (inner loops, ``torch.func`` transforms)."""
        q, b = self._item_tower(items)
        return self.global_bias + self.user_bias[users] + b + (self.user_factors[users] * q).sum(-1)

    def score_all(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for each user in ``users`` (all by default): ``[U, n_items]``."""
        users = (torch.arange(self.n_users) if users is None
                 else as_index_tensor(users, name="users", upper=self.n_users))
        q, b = self._item_tower(None)
        return (self.global_bias + self.user_bias[users, None] + b[None, :]
                + self.user_factors[users] @ q.T)

    def user_parameters(self) -> list[nn.Parameter]:
        """The user tower (kept on the client in federated training)."""
        return [getattr(self, n) for n in self.user_parameter_names]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The adapter and biases (aggregated by a server, protected by DP)."""
        return [getattr(self, n) for n in self.shared_parameter_names]

    def extra_repr(self) -> str:
        return (f"n_users={self.n_users}, n_items={self.n_items}, "
                f"embedding_dim={self.embedding_dim}, dim={self.dim}, rank={self.rank}, "
                f"shared={shared_size(self):,}")


def parameter_names(model: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    user = getattr(model, "user_parameter_names", None)
    shared = getattr(model, "shared_parameter_names", None)
    if not isinstance(model, nn.Module) or user is None or shared is None \
            or not hasattr(model, "predict_unchecked"):
        raise TypeError("model must be an nn.Module with user_parameter_names, shared_parameter_"
                        f"names and predict_unchecked, got {type(model).__name__}")
    return tuple(user), tuple(shared)


def shared_size(model: nn.Module) -> int:
    """Number of shared (server-side) parameters of a model listing ``shared_parameter_names``.

    Raises ``TypeError`` if the model does not name its user and shared parameters.
    """
    return sum(getattr(model, n).numel() for n in parameter_names(model)[1])


def negative_pool(model: nn.Module, negative_items: object) -> torch.Tensor:
    pool = (torch.arange(model.n_items) if negative_items is None
            else as_index_tensor(negative_items, name="negative_items", upper=model.n_items))
    if pool.numel() == 0:
        raise ValueError("negative_items must not be empty")
    return torch.unique(pool)  # sorted, so the pool's order never depends on how it was given


def implicit_batch(positives: torch.Tensor, pool: torch.Tensor, *, n_negatives: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Items and labels for implicit feedback: each positive (label 1) followed by ``n_negatives``
    items drawn uniformly from ``pool`` (label 0). ``positives`` is ``[..., B]``; the result is
    ``[..., B * (1 + n_negatives)]`` (the labels broadcast over the leading axes)."""
    n_negatives = int_in("n_negatives", n_negatives, 1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    shape = positives.shape
    negatives = pool[torch.randint(len(pool), (*shape, n_negatives), generator=generator)]
    items = torch.cat([positives[..., None], negatives], -1).reshape(*shape[:-1], -1)
    labels = torch.cat([torch.ones(1), torch.zeros(n_negatives)]).repeat(shape[-1])
    return items, labels


def _l2_penalty(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                shared_names: tuple[str, ...]) -> torch.Tensor:
    """Squared norms of the touched user and item-table rows (batch means), plus those of the
    other shared parameters except :math:`\\mu`."""
    rows = [model.user_factors[users]] + [getattr(model, n)[items] for n in shared_names
                                          if n.startswith("item_")]
    dense = [getattr(model, n) for n in shared_names if not n.startswith("item_")
             and n != "global_bias"]
    return (sum(r.reshape(len(users), -1).square().sum(1).mean() for r in rows)
            + sum(p.square().sum() for p in dense))


def _implicit_epoch(model: nn.Module, users: torch.Tensor, items: torch.Tensor,
                    pool: torch.Tensor, optimiser: torch.optim.Optimizer, gen: torch.Generator, *,
                    batch_size: int, n_negatives: int, reg: float,
                    shared_names: Sequence[str]) -> float:
    """One pass of :func:`fit_two_tower` in a seeded random order; returns the mean loss."""
    order, total = torch.randperm(len(users), generator=gen), 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch, labels = implicit_batch(items[idx, None], pool, n_negatives=n_negatives,
                                       generator=gen)
        u, i = users[idx].repeat_interleave(n_negatives + 1), batch.reshape(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(
            model.predict_unchecked(u, i), labels.repeat(len(idx)))
        optimiser.zero_grad(set_to_none=True)
        (loss + reg * _l2_penalty(model, u, i, shared_names)).backward()
        optimiser.step()
        total += float(loss.detach()) * len(idx)
    return total / len(users)


def fit_two_tower(model: nn.Module, train: pd.DataFrame, *, epochs: int = 20, lr: float = 0.01,
                  batch_size: int = 1024, n_negatives: int = 4, reg: float = 1e-4,
                  negative_items: object = None, seed: int = 0,
                  on_epoch: Callable[[int, nn.Module], None] | None = None) -> FitResult:
    """Central, non-private training on implicit feedback of a two-tower model.

    Every (user, item) of ``train`` is a positive; ``n_negatives`` items drawn uniformly from
    ``negative_items`` (default: all) are negatives. Binary cross-entropy on the score, L2 ``reg``
    on the rows a batch touches (user rows, item-table rows) and on the other shared parameters
    except :math:`\\mu`; mini-batch Adam.

    Parameters
    ----------
    model:
        A :class:`TwoTowerRecommender`, or any model naming its user and shared parameters --
        :class:`~privrec.recsys.models.BiasedMF` is the two-tower model whose item tower is an ID lookup,
        so both train with the same code.
    negative_items:
        Pass the warm items when some items are held out as cold-start items: then no step ever
        touches a cold item (otherwise training learns that exactly those items are never chosen).
    on_epoch:
        Called as ``on_epoch(epoch, model)`` after each epoch (1, 2, ...): one run to ``epochs``
        passes through every shorter run with the same seed, so a search over epochs trains once.

    Returns
    -------
    FitResult
        ``history["loss"]`` is the mean loss of each epoch; ``ledger`` is ``None`` (not private).

    Raises
    ------
    TypeError, ValueError
        For a model without the parameter lists, or bad arguments.
    """
    _, shared_names = parameter_names(model)
    validate_ratings(train, n_users=model.n_users, n_items=model.n_items, name="train")
    if len(train) == 0:
        raise ValueError("train must not be empty")
    pool = negative_pool(model, negative_items)
    epochs, batch_size = int_in("epochs", epochs, 1), int_in("batch_size", batch_size, 1)
    n_negatives = int_in("n_negatives", n_negatives, 1)
    lr, reg = positive("lr", lr), non_negative("reg", reg)
    on_epoch = None if on_epoch is None else function("on_epoch", on_epoch)
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    users = torch.as_tensor(train["user"].to_numpy(np.int64))
    items = torch.as_tensor(train["item"].to_numpy(np.int64))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses.append(_implicit_epoch(model, users, items, pool, optimiser, gen,
                                      batch_size=batch_size, n_negatives=n_negatives, reg=reg,
                                      shared_names=shared_names))
        if on_epoch is not None:
            on_epoch(epoch, model)
    return FitResult(model, {"loss": losses}, None, time.perf_counter() - start)
