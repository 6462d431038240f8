"""Local training of matrix factorisation on a cohort of clients (the inside of step 3).

Used by :class:`privrec.federated.engine.FederatedMF`. Everything here runs "on the clients": it reads
the broadcast shared parameters and the clients' own ratings and user rows, and returns what the
clients upload, a :class:`~privrec.federated.updates.ClientUpdates` of item-row, item-bias and global-bias
changes. Nothing here is O(users x items): ratings are stored grouped by client
(:class:`RatingStore`, CSR), a cohort is gathered chunk by chunk, and every per-pair structure is
built by sorting the chunk's own ids.

* :func:`solve_user_ridge` -- the closed-form user step (ALS half-step);
* :func:`train_vectorised` -- all clients of a chunk as one batched tensor program over (client,
  item) pairs: a client's local copy of the item table exists only on the rows it rated;
* :func:`train_loop` -- the plain reference, one client at a time with a full copy of the model;
* :func:`sample_fake_items` -- FedRec's fake items (Lin et al. 2020).

Each local step divides a row's gradient by the client's number of examples touching that row (a
Jacobi preconditioner), so one learning rate suits a row seen once and a row seen 300 times.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .updates import ClientUpdates, RowUpdates

__all__ = ["RatingStore", "Batch", "solve_user_ridge", "train_vectorised", "train_loop",
           "sample_fake_items"]


@dataclass
class Batch:
    """The ratings of some clients (real ratings, then any fake ones)."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    clients: torch.Tensor      # client of each rating
    is_fake: torch.Tensor      # bool: FedRec fake-item rows


def _compact(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(present ids sorted, inverse, counts)`` by sorting (no array of the id-space size)."""
    return torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)


class RatingStore:
    """Ratings grouped by client, then user, then item (CSR over clients; int32 ids).

    Parameters
    ----------
    users, items, ratings:
        1-D arrays of equal length (ids already validated).
    client_of_user:
        ``[n_users]`` owner of each user.
    n_clients:
        Number of clients.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                 client_of_user: np.ndarray, n_clients: int) -> None:
        owner = np.asarray(client_of_user)[users]
        d_owner, d_user, d_item = np.diff(owner), np.diff(users), np.diff(items)
        ordered = (d_owner > 0) | ((d_owner == 0) & ((d_user > 0) | ((d_user == 0) & (d_item >= 0))))
        if not bool(ordered.all()):
            order = np.lexsort((items, users, owner))
            users, items, ratings, owner = users[order], items[order], ratings[order], owner[order]
        self.users = torch.as_tensor(np.ascontiguousarray(users, dtype=np.int32))
        self.items = torch.as_tensor(np.ascontiguousarray(items, dtype=np.int32))
        self.ratings = torch.as_tensor(np.ascontiguousarray(ratings, dtype=np.float32))
        counts = torch.as_tensor(np.bincount(owner, minlength=n_clients))
        self.client_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    def __len__(self) -> int:
        return len(self.ratings)

    def counts(self, clients: torch.Tensor) -> torch.Tensor:
        """Number of ratings of each client in ``clients``."""
        return self.client_ptr[clients + 1] - self.client_ptr[clients]

    def chunks(self, clients: torch.Tensor, max_ratings: int) -> list[torch.Tensor]:
        """Split the sorted ``clients`` into consecutive groups of about ``max_ratings`` ratings
        (a group exceeds it only by its last client)."""
        before = torch.cumsum(self.counts(clients), 0) - self.counts(clients)
        _, sizes = torch.unique_consecutive(before // max_ratings, return_counts=True)
        return list(torch.split(clients, sizes.tolist())) if len(clients) else []

    def gather(self, clients: torch.Tensor) -> Batch:
        """The real ratings of ``clients`` (int64 ids, float32 ratings)."""
        lens = self.counts(clients)
        shift = self.client_ptr[clients] - (torch.cumsum(lens, 0) - lens)
        index = torch.arange(int(lens.sum())) + torch.repeat_interleave(shift, lens)
        users = self.users[index].long()
        return Batch(users, self.items[index].long(), self.ratings[index],
                     torch.repeat_interleave(clients, lens), torch.zeros(len(index), dtype=torch.bool))


def item_outer(item_factors: torch.Tensor) -> torch.Tensor:
    """``[n_items, (d+1)^2]`` float64 outer products :math:`x_ix_i^\\top`, :math:`x_i=(q_i,1)`."""
    x = torch.cat([item_factors, torch.ones(len(item_factors), 1)], 1).double()
    return (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)


def solve_user_ridge(rows: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *,
                     n_rows: int, item_factors: torch.Tensor, item_bias: torch.Tensor,
                     global_bias: torch.Tensor, reg: float, bias_reg: float,
                     outer: torch.Tensor | None = None) -> torch.Tensor:
    """Closed-form user factors and biases, ``[n_rows, dim + 1]`` (last column the bias).

    For row (user) :math:`u` with ratings :math:`R_u`, solves
    :math:`(\\sum_{i\\in R_u} x_i x_i^\\top + n_u\\Lambda)\\,w_u = \\sum_{i\\in R_u}
    (r_{ui}-\\mu-b_i)\\,x_i` with :math:`x_i=(q_i,1)`, :math:`\\Lambda=\\mathrm{diag}(\\lambda,\\dots,
    \\lambda,\\lambda_b)` -- the ALS user step (Hu, Koren & Volinsky 2008; Zhou et al. 2008) for the
    per-rating regularised objective. All users are solved in one batched call; ``outer`` may
    pass :func:`item_outer` precomputed for the same ``item_factors``.
    """
    dim = item_factors.shape[1]
    x = torch.cat([item_factors, torch.ones(len(item_factors), 1)], 1).double()
    outer = item_outer(item_factors) if outer is None else outer
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
    penalty = torch.full((dim + 1,), float(reg), dtype=torch.double)
    penalty[-1] = bias_reg
    gram = gram + counts.double().clamp(min=1)[:, None, None] * torch.diag(penalty)
    return torch.linalg.solve(gram, rhs).float()


def solve_users(mf, shared: dict[str, torch.Tensor], batch: Batch) -> None:
    """Step 3a (closed form): each user of ``batch`` solves its row on its real ratings."""
    real = ~batch.is_fake
    active, local, _ = _compact(batch.users[real])
    solution = solve_user_ridge(local, batch.items[real], batch.ratings[real], n_rows=len(active),
                                item_factors=shared["item_factors"], item_bias=shared["item_bias"],
                                global_bias=shared["global_bias"], reg=mf.reg,
                                bias_reg=mf.bias_reg, outer=mf.outer_for(shared))
    mf.user_factors[active] = solution[:, :-1]
    mf.user_bias[active] = solution[:, -1]


def _pairs(batch: Batch, rating_client: torch.Tensor, n_items: int, one_per_client: bool):
    """(client, item) pairs of a batch: ``(pair index of each rating or None, client position,
    item and example count of each pair)``."""
    if one_per_client:  # each rating is its own pair: per-pair sums are the identity
        return None, rating_client, batch.items, torch.ones(len(batch.items))
    keys, pair, n_pair = _compact(rating_client * n_items + batch.items)
    return pair, keys // n_items, keys % n_items, n_pair.float()


def train_vectorised(mf, shared: dict[str, torch.Tensor], batch: Batch) -> ClientUpdates:
    """All clients of ``batch`` at once over (client, item) pairs (see the module docstring)."""
    if mf.user_solver == "closed_form":
        solve_users(mf, shared, batch)
    clients, rating_client, n_client = _compact(batch.clients)
    n_client = n_client.float()
    pair, pair_client, pair_item, n_pair = _pairs(batch, rating_client, mf.n_items,
                                                  mf.one_user_per_client)

    def per_pair(values: torch.Tensor) -> torch.Tensor:
        return values if pair is None else torch.zeros(
            (len(pair_item),) + values.shape[1:]).index_add_(0, pair, values)

    def at_rating(values: torch.Tensor) -> torch.Tensor:
        return values if pair is None else values[pair]

    q0, b0, mu0 = shared["item_factors"][pair_item], shared["item_bias"][pair_item], \
        shared["global_bias"]
    q, b, mu = q0.clone(), b0.clone(), mu0.expand(len(clients)).clone()
    gradient_users = mf.user_solver == "gradient"
    active, users, n_user = _compact(batch.users)
    p, bu = mf.user_factors[active].clone(), mf.user_bias[active].clone()
    lr = mf.local_lr
    for _ in range(mf.local_epochs):
        p_r, bu_r, q_r = p[users], bu[users], at_rating(q)
        err = batch.ratings - (mu[rating_client] + bu_r + at_rating(b) + (p_r * q_r).sum(1))
        grad_q = per_pair(-2.0 * err[:, None] * p_r)
        grad_b = per_pair(-2.0 * err)
        grad_mu = torch.zeros_like(mu).index_add_(0, rating_client, -2.0 * err)
        if gradient_users:
            grad_p = torch.zeros_like(p).index_add_(0, users, -2.0 * err[:, None] * q_r)
            grad_bu = torch.zeros_like(bu).index_add_(0, users, -2.0 * err)
            p = p - lr * (grad_p / n_user[:, None] + 2.0 * mf.reg * p)
            bu = bu - lr * (grad_bu / n_user + 2.0 * mf.bias_reg * bu)
        q = q - lr * (grad_q / n_pair[:, None] + 2.0 * mf.reg * q)
        b = b - lr * (grad_b / n_pair + 2.0 * mf.bias_reg * b)
        mu = mu - lr * grad_mu / n_client
    if gradient_users:
        mf.user_factors[active], mf.user_bias[active] = p, bu
    return ClientUpdates(clients, n_client,
                         {"item_factors": RowUpdates(pair_client, pair_item, q - q0, n_pair),
                          "item_bias": RowUpdates(pair_client, pair_item, b - b0, n_pair)},
                         {"global_bias": mu - mu0})


def _one_client_loop(mf, shared: dict[str, torch.Tensor], users, items, ratings):
    """One client's local epochs on full copies; returns ``(rows touched, dq, db, dmu)``."""
    q, b, mu = (shared[k].clone() for k in ("item_factors", "item_bias", "global_bias"))
    p, bu = mf.user_factors.clone(), mf.user_bias.clone()
    n_item = torch.bincount(items, minlength=mf.n_items).float().clamp(min=1)
    n_user = torch.bincount(users, minlength=len(p)).float().clamp(min=1)
    touched_items, touched_users = torch.unique(items), torch.unique(users)
    lr = mf.local_lr
    for _ in range(mf.local_epochs):
        err = ratings - (mu + bu[users] + b[items] + (p[users] * q[items]).sum(1))
        grad_q = torch.zeros_like(q).index_add_(0, items, -2.0 * err[:, None] * p[users])
        grad_b = torch.zeros_like(b).index_add_(0, items, -2.0 * err)
        if mf.user_solver == "gradient":
            grad_p = torch.zeros_like(p).index_add_(0, users, -2.0 * err[:, None] * q[items])
            grad_bu = torch.zeros_like(bu).index_add_(0, users, -2.0 * err)
            new_p = p - lr * (grad_p / n_user[:, None] + 2.0 * mf.reg * p)
            new_bu = bu - lr * (grad_bu / n_user + 2.0 * mf.bias_reg * bu)
            p[touched_users], bu[touched_users] = new_p[touched_users], new_bu[touched_users]
        new_q = q - lr * (grad_q / n_item[:, None] + 2.0 * mf.reg * q)
        new_b = b - lr * (grad_b / n_item + 2.0 * mf.bias_reg * b)
        q[touched_items], b[touched_items] = new_q[touched_items], new_b[touched_items]
        mu = mu - lr * (-2.0 * err.sum() / len(err))
    if mf.user_solver == "gradient":
        mf.user_factors[touched_users] = p[touched_users]
        mf.user_bias[touched_users] = bu[touched_users]
    return (touched_items, (q - shared["item_factors"])[touched_items],
            (b - shared["item_bias"])[touched_items], (mu - shared["global_bias"]).reshape(1))


def train_loop(mf, shared: dict[str, torch.Tensor], batch: Batch) -> ClientUpdates:
    """One client at a time, each with a full copy of the shared model (the reference)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("pos", "row", "dq", "db", "dmu",
                                                            "n_pair", "clients", "examples")}
    for position, k in enumerate(torch.unique(batch.clients).tolist()):
        mine = batch.clients == k
        users, items, ratings = batch.users[mine], batch.items[mine], batch.ratings[mine]
        if mf.user_solver == "closed_form":
            for u in torch.unique(users[~batch.is_fake[mine]]).tolist():
                own = mine & ~batch.is_fake & (batch.users == u)
                solve_users(mf, shared, Batch(batch.users[own], batch.items[own],
                                              batch.ratings[own], batch.clients[own],
                                              batch.is_fake[own]))
        rows, dq, db, dmu = _one_client_loop(mf, shared, users, items, ratings)
        for key, value in (("pos", torch.full((len(rows),), position)), ("row", rows),
                           ("dq", dq), ("db", db), ("dmu", dmu),
                           ("n_pair", torch.bincount(items, minlength=mf.n_items)[rows].float()),
                           ("clients", torch.tensor([k])),
                           ("examples", torch.tensor([float(len(ratings))]))):
            parts[key].append(value)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return ClientUpdates(cat["clients"], cat["examples"],
                         {"item_factors": RowUpdates(cat["pos"], cat["row"], cat["dq"],
                                                     cat["n_pair"]),
                          "item_bias": RowUpdates(cat["pos"], cat["row"], cat["db"],
                                                  cat["n_pair"])},
                         {"global_bias": cat["dmu"]})


def sample_fake_items(users: torch.Tensor, items: torch.Tensor, *, n_items: int, rate: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user of the real ratings ``(users, items)`` draws ``round(rate * n_u)`` distinct
    items it did not rate (FedRec, Lin et al. 2020); returns ``(fake users, fake items)``.

    Uniform candidates with rejection (rated or repeated items are dropped); the rare user who
    runs short falls back to a random permutation of all its unrated items. Rated items are
    recognised by sorted ``user * n_items + item`` keys, never a users x items matrix.
    """
    active, _, n_u = _compact(users)
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
