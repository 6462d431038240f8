"""A Transformer next-item recommender in the SASRec design, trained on each user's history in time.

SASRec (Kang & McAuley 2018) reads a user's last :math:`L` items :math:`s_1,\\dots,s_L` and, at every
position :math:`t`, predicts the next item :math:`s_{t+1}` from :math:`s_1..s_t` only:

1. **Embeddings**: item :math:`s_t` becomes :math:`e_{s_t} + p_t` (a learned item embedding plus a
   learned positional embedding; the window is right-aligned, so the newest item always sits at
   position :math:`L-1`).
2. **Causal self-attention blocks** (here 2, pre-layer-norm as in Xiong et al. 2020): position
   :math:`t` mixes the values of positions :math:`j \\le t` with weights
   :math:`\\mathrm{softmax}_j(q_t^\\top k_j/\\sqrt{d})` (Vaswani et al. 2017, Eq. 1); a mask hides
   the future (:func:`causal_mask`), then a position-wise feed-forward layer; residual connections
   around both.
3. **The shared item embeddings as output layer**: the score of item :math:`i` after position
   :math:`t` is :math:`h_t^\\top e_i + b_i` (the same table :math:`e` as the input, plus a per-item
   offset), trained with the softmax cross-entropy over the catalogue (or a sampled softmax).

Data conventions: :func:`user_sequences` orders each user's items by time, ties broken by item id
(the order of :func:`privrec.recsys.data.leave_last_out_split`, so the held-out item is the item
that follows the training sequence). Item ids are shifted by one inside the model: id 0 is padding.
Evaluation (:func:`next_item_scores`, :func:`evaluate_next_item`) ranks the whole catalogue with
:func:`privrec.recsys.metrics.ranking_metrics` and its tie rule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.checks import in_range, int_in, non_negative, positive
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from .data import validate_ratings
from .metrics import ranking_metrics

__all__ = ["Sequences", "user_sequences", "training_windows", "history_windows", "causal_mask",
           "CausalSelfAttention", "SASRec", "sequence_losses", "fit_sasrec", "next_item_scores",
           "evaluate_next_item"]

#: The model's id of the padding token (item ``i`` is ``i + 1`` inside the model).
PAD = 0


@dataclass(frozen=True)
class Sequences:
    """Every user's items in time order, as one flat array with offsets (CSR layout).

    ``items[starts[u]:starts[u] + counts[u]]`` is user ``u``'s history, oldest first.
    """

    items: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    n_items: int

    def of(self, user: int) -> np.ndarray:
        """User ``user``'s items, oldest first."""
        return self.items[self.starts[user]:self.starts[user] + self.counts[user]]

    def rows(self, users: np.ndarray | None) -> np.ndarray:
        """``users`` as int64 ids (``None``: every user, ``0..len(counts)-1``)."""
        if users is None:
            return np.arange(len(self.counts))
        return np.asarray(users, dtype=np.int64)


def user_sequences(ratings: pd.DataFrame, *, n_users: int, n_items: int) -> Sequences:
    """Each user's items ordered by timestamp, ties broken by the smaller item id.

    Raises ``ValueError`` for a table without a ``timestamp`` column or ids out of range.
    """
    validate_ratings(ratings, n_users=int_in("n_users", n_users, 1),
                     n_items=int_in("n_items", n_items, 1))
    if "timestamp" not in ratings.columns:
        raise ValueError("ratings must have a 'timestamp' column to order each history in time")
    users = ratings["user"].to_numpy(np.int64)
    order = np.lexsort((ratings["item"].to_numpy(), ratings["timestamp"].to_numpy(), users))
    counts = np.bincount(users, minlength=n_users)
    starts = np.cumsum(counts) - counts
    return Sequences(ratings["item"].to_numpy(np.int64)[order], starts, counts, n_items)


def _window(items: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` entries of ``items`` (shifted by one), left-padded with PAD."""
    out = np.full(length, PAD, dtype=np.int64)
    tail = items[-length:] + 1 if length and len(items) else items[:0]
    out[length - len(tail):] = tail
    return out


def training_windows(sequences: Sequences, *, max_len: int,
                     users: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, each ``[users, max_len]``: the last ``max_len + 1`` items of each
    history, the input the first ``max_len`` of them (model ids, 0 = padding), the target the item
    that follows each input position (catalogue ids, -1 where there is nothing to predict).

    A history of ``n`` items gives ``min(n - 1, max_len)`` prediction targets."""
    max_len = int_in("max_len", max_len, 1)
    users = sequences.rows(users)
    inputs = np.zeros((len(users), max_len), dtype=np.int64)
    targets = np.full((len(users), max_len), -1, dtype=np.int64)
    for row, u in enumerate(users):
        history = sequences.of(int(u))
        if len(history) < 2:
            continue
        inputs[row] = _window(history[:-1], max_len)
        targets[row] = _window(history[1:], max_len) - 1
    return torch.as_tensor(inputs), torch.as_tensor(targets)


def history_windows(sequences: Sequences, *, max_len: int,
                    users: np.ndarray | None = None) -> torch.Tensor:
    """``[users, max_len]`` model ids of each user's last ``max_len`` items (0 = padding): the
    input whose last position scores the next item."""
    max_len = int_in("max_len", max_len, 1)
    users = sequences.rows(users)
    return torch.as_tensor(np.stack([_window(sequences.of(int(u)), max_len) for u in users])
                           if len(users) else np.zeros((0, max_len), dtype=np.int64))


def causal_mask(inputs: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]`` boolean: ``True`` where query position ``t`` may attend to key ``j``.

    Allowed are the past and the present (:math:`j \\le t`) of real items; padding is never a key,
    except that every position may attend to itself (so a padding row has one key, not none).
    """
    length = inputs.shape[-1]
    past = torch.ones(length, length, dtype=torch.bool).tril()
    real_key = (inputs != PAD)[:, None, :]
    return (past & real_key) | torch.eye(length, dtype=torch.bool)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with four linear maps (the layout of Opacus's
    ``DPMultiheadAttention``, so per-example gradients come from linear layers only)."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim must be a multiple of n_heads, got dim={dim}, n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, d]``, ``allowed`` ``[B, L, L]`` (:func:`causal_mask`) -> ``[B, L, d]``."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, length, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        logits = logits.masked_fill(~allowed[:, None], -math.inf)
        weights = self.dropout(torch.softmax(logits, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, -1))


class _Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, n_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), allowed))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    """The SASRec-style next-item model (module docstring).

    Parameters
    ----------
    n_items:
        Catalogue size (item ids ``0..n_items-1``; the model adds a padding row).
    dim, max_len, n_blocks, n_heads, dropout:
        Width :math:`d`, window :math:`L`, number of blocks, attention heads, dropout rate.
    seed:
        Seeds the initialisation (the global random state is left untouched).
    """

    def __init__(self, n_items: int, *, dim: int = 64, max_len: int = 50, n_blocks: int = 2,
                 n_heads: int = 1, dropout: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.n_items = int_in("n_items", n_items, 1)
        self.dim, self.max_len = int_in("dim", dim, 1), int_in("max_len", max_len, 1)
        self.dropout_rate = in_range("dropout", dropout, 0.0, 1.0, closed_high=False)
        n_blocks, n_heads = int_in("n_blocks", n_blocks, 1), int_in("n_heads", n_heads, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_seed("seed", seed))
            self.items = nn.Embedding(self.n_items + 1, self.dim)
            self.positions = nn.Embedding(self.max_len, self.dim)
            nn.init.normal_(self.items.weight, std=self.dim ** -0.5)
            nn.init.normal_(self.positions.weight, std=self.dim ** -0.5)
            self.blocks = nn.ModuleList(_Block(self.dim, n_heads, self.dropout_rate)
                                        for _ in range(n_blocks))
            # The output layer IS the item table (weight tying): one parameter, two uses; its
            # bias is a per-item score offset (zero at the start).
            self.output = nn.Linear(self.dim, self.n_items + 1)
        self.norm = nn.LayerNorm(self.dim)
        self.dropout = nn.Dropout(self.dropout_rate)
        nn.init.zeros_(self.output.bias)
        self.output.weight = self.items.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` of model-id windows ``inputs`` ``[B, L]``."""
        length = inputs.shape[-1]
        positions = torch.arange(self.max_len - length, self.max_len).expand_as(inputs)
        x = self.dropout(self.items(inputs) + self.positions(positions))
        allowed = causal_mask(inputs)
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of the ``n_items`` catalogue items (the padding column dropped): ``[..., n_items]``."""
        return self.output(hidden)[..., 1:]

    def extra_repr(self) -> str:
        return f"n_items={self.n_items}, dim={self.dim}, max_len={self.max_len}"


def sequence_losses(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor,
                    negatives: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]``: each sequence's mean next-item cross-entropy over its real targets (0 if none).

    ``negatives=None``: the full softmax over the catalogue. Otherwise a sampled softmax: the
    target competes with the shared catalogue ids ``negatives`` (drawn uniformly, independently
    of the data; a negative equal to the target is left out), which estimates the full softmax up
    to a constant (Jean et al. 2015) at a fraction of its cost. One user's whole sequence is one
    term: the unit of user-level DP-SGD (:mod:`privrec.central.user_dpsgd`)."""
    hidden = model(inputs)
    real = targets >= 0
    safe = targets.clamp(min=0)
    if negatives is None:
        logits = model.logits(hidden)
        nll = nn.functional.cross_entropy(logits.reshape(-1, model.n_items), safe.reshape(-1),
                                          reduction="none").reshape(targets.shape)
    else:
        table, bias = model.items.weight, model.output.bias
        positive = (hidden * table[safe + 1]).sum(-1, keepdim=True) + bias[safe + 1, None]
        negative = (hidden @ table[negatives + 1].T + bias[negatives + 1]).masked_fill(
            negatives == safe[..., None], -math.inf)
        nll = -torch.log_softmax(torch.cat([positive, negative], -1), -1)[..., 0]
    return (nll * real).sum(-1) / real.sum(-1).clamp(min=1)


def fit_sasrec(model: SASRec, train: pd.DataFrame, *, epochs: int = 20, lr: float = 0.003,
               batch_size: int = 128, n_negatives: int | None = 256, weight_decay: float = 0.0,
               seed: int = 0) -> FitResult:
    """Non-private training: Adam on the mean of :func:`sequence_losses` over batches of users.

    Every user with at least two training items is one sequence; each epoch visits them in a
    seeded random order. Returns a :class:`~privrec.core.results.FitResult` with the mean loss per
    epoch in ``history["train_loss"]`` and no ledger.
    """
    if not isinstance(model, SASRec):
        raise TypeError(f"model must be a SASRec, got {type(model).__name__}")
    epochs, batch_size = int_in("epochs", epochs, 1), int_in("batch_size", batch_size, 1)
    n_users = int(train["user"].max()) + 1 if len(train) else 1
    sequences = user_sequences(train, n_users=n_users, n_items=model.n_items)
    inputs, targets = training_windows(sequences, max_len=model.max_len)
    keep = (targets >= 0).any(1)
    inputs, targets = inputs[keep], targets[keep]
    optimiser = torch.optim.Adam(model.parameters(), lr=positive("lr", lr),
                                 weight_decay=non_negative("weight_decay", weight_decay))
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    history: dict[str, list[float]] = {"train_loss": []}
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_seed("seed", seed))  # dropout masks
        for _ in range(epochs):
            order, total = torch.randperm(len(inputs), generator=gen), 0.0
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                negatives = None if n_negatives is None else torch.randperm(
                    model.n_items, generator=gen)[:n_negatives]
                loss = sequence_losses(model, inputs[idx], targets[idx], negatives).mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(idx)
            history["train_loss"].append(total / len(order))
    model.eval()
    return FitResult(model, history, None, time.perf_counter() - start)


@torch.no_grad()
def next_item_scores(model: SASRec, sequences: Sequences, *, batch_size: int = 256) -> torch.Tensor:
    """``[n_users, n_items]``: each user's scores for the item after their whole history."""
    was_training = model.training
    model.eval()
    windows = history_windows(sequences, max_len=model.max_len)
    parts = [model.logits(model(windows[s:s + batch_size])[:, -1])
             for s in range(0, len(windows), int_in("batch_size", batch_size, 1))]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, model.n_items)


def evaluate_next_item(model: SASRec, train: pd.DataFrame, test: pd.DataFrame, *, n_users: int,
                       k: int = 10) -> dict[str, float]:
    """HR@K and NDCG@K of the item after each user's training history, ranked against the whole
    catalogue minus the user's training items, with the book's tie rule
    (:func:`privrec.recsys.metrics.ranking_metrics`)."""
    sequences = user_sequences(train, n_users=n_users, n_items=model.n_items)
    return ranking_metrics(next_item_scores(model, sequences), train, test, k=k)
