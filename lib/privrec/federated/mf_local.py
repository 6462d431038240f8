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
* :func:`train_loop` -- the plain reference, one client at a time with a full copy of the model.

FedRec's fake items (Lin et al. 2020), an option of the model, are in :mod:`privrec.federated.mf`.

Each local step divides a row's gradient by the client's number of examples touching that row (a
Jacobi preconditioner), so one learning rate suits a row seen once and a row seen 300 times.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import function, instance, int_in, positive, real_array, tensor_dict
from ..recsys.models import as_index_tensor
from .updates import ClientUpdates, RowUpdates

__all__ = ["RatingStore", "rating_arrays", "Batch", "compact_ids", "BUCKET_GROWTH", "item_table",
           "BroadcastTable", "user_normal_equations", "solve_user_ridge", "solve_users",
           "train_vectorised", "train_groups", "train_loop"]


@dataclass
class Batch:
    """The ratings of some clients (real ratings, then any fake ones)."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    clients: torch.Tensor      # client of each rating
    is_fake: torch.Tensor      # bool: FedRec fake-item rows


def compact_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(present ids sorted, inverse, counts)`` by sorting (no array of the id-space size); ids
    already sorted (a chunk's clients and, cross-device, its users) take one linear pass."""
    if len(ids) < 2 or bool((ids[1:] >= ids[:-1]).all()):
        return torch.unique_consecutive(ids, return_inverse=True, return_counts=True)
    return torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)


def rating_arrays(users: object, items: object, ratings: object, *, n_users: int,
                  n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(users, items, ratings)`` numpy arrays (int64, int64, float32) for a
    :class:`RatingStore`: ids in range, equal lengths, finite ratings (a numeric array is not
    copied to float64 first)."""
    users = as_index_tensor(users, name="users", upper=int_in("n_users", n_users, 1)).numpy()
    items = as_index_tensor(items, name="items", upper=int_in("n_items", n_items, 1)).numpy()
    if not (isinstance(ratings, np.ndarray) and ratings.dtype.kind in "iuf"):
        ratings = real_array("ratings", ratings)
    ratings = ratings.astype(np.float32, copy=False)
    if ratings.shape != users.shape or items.shape != users.shape:
        raise ValueError("users, items and ratings must have the same length")
    if not np.isfinite(ratings).all():
        raise ValueError("ratings contains NaN or infinite values")
    return users, items, ratings


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
        n_clients = int_in("n_clients", n_clients, 1)
        for name, array in (("users", users), ("items", items), ("ratings", ratings)):
            if instance(name, array, np.ndarray).shape != np.shape(users):
                raise ValueError("users, items and ratings must have the same length")
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


#: Users are grouped by rating count into buckets of lengths ``ceil(BUCKET_GROWTH ** k)``, so a
#: bucket pads each user's ratings by less than this factor.
BUCKET_GROWTH = 1.25


def item_table(item_factors: torch.Tensor) -> torch.Tensor:
    """``[n_items + 1, dim + 2]`` float64 rows :math:`(q_i, 1, 0)`: the inputs :math:`x_i=(q_i,1)`
    of the user solve with a free slot for the target, and a last all-zero row for padding."""
    n_items, dim = instance("item_factors", item_factors, torch.Tensor).shape
    table = torch.zeros(n_items + 1, dim + 2, dtype=torch.float64)
    table[:n_items, :dim] = item_factors
    table[:n_items, dim] = 1.0
    return table


class BroadcastTable:
    """:func:`item_table` of the current broadcast, built once per broadcast (not once per chunk:
    for a large catalogue the table outweighs a chunk's ratings). Safe across threads: the entry
    is one tuple, replaced whole."""

    def __init__(self) -> None:
        self._entry: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __call__(self, item_factors: torch.Tensor) -> torch.Tensor:
        entry = self._entry
        if entry is None or entry[0] is not item_factors or entry[1] != item_factors._version:
            entry = (item_factors, item_factors._version, item_table(item_factors))
            self._entry = entry
        return entry[2]


def user_normal_equations(rows: torch.Tensor, items: torch.Tensor, target: torch.Tensor, *,
                          n_rows: int, table: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, gram, rhs)`` of the ratings ``(rows, items, target)`` sorted by row, ``table``
    the :func:`item_table`: ``gram[k]`` is :math:`\\sum_{i\\in R_u} x_ix_i^\\top` and ``rhs[k]``
    is :math:`\\sum_{i\\in R_u} t_{ui}x_i` for row ``u = order[k]``.

    Rows with similar rating counts share a bucket (``order`` lists the rows bucket by bucket),
    padded to a common length with the zero row, and each bucket is one batched matrix product of
    the inputs with the target in the free slot, :math:`[x_i, t_{ui}]`, whose last column is the
    right-hand side -- a dense kernel, where a sparse product with a table of per-item outer
    products would read :math:`D^2` numbers per rating.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    start = torch.cumsum(counts, 0) - counts
    dim = table.shape[1] - 1                                          # D = factors + bias
    items = torch.cat([items, items.new_full((1,), len(table) - 1)])  # last: the padding row
    target = torch.cat([target, target.new_zeros(1)])
    top = max(int(counts.max()), 1) if n_rows else 1
    edges = torch.unique(torch.ceil(BUCKET_GROWTH ** torch.arange(
        int(np.ceil(np.log(top) / np.log(BUCKET_GROWTH))) + 1, dtype=torch.float64)).long())
    bucket = torch.searchsorted(edges, counts)                       # edges[bucket] >= count
    order = torch.argsort(bucket, stable=True)
    full = table.new_empty(n_rows, dim + 1, dim + 1)
    levels, sizes = torch.unique_consecutive(bucket[order], return_counts=True)
    done = 0
    for level, group in zip(levels.tolist(), torch.split(order, sizes.tolist()), strict=True):
        step = torch.arange(int(edges[level]))
        pos = torch.where(step < counts[group, None], start[group, None] + step, len(items) - 1)
        inputs = table[items[pos]]                                   # [users, length, D + 1]
        inputs[..., dim] = target[pos]
        torch.bmm(inputs.transpose(1, 2), inputs, out=full[done:done + len(group)])
        done += len(group)
    return order, full[:, :dim, :dim], full[:, :dim, dim]


def solve_user_ridge(rows: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, *,
                     n_rows: int, item_factors: torch.Tensor, item_bias: torch.Tensor,
                     global_bias: torch.Tensor, reg: float, bias_reg: float,
                     table: torch.Tensor | None = None) -> torch.Tensor:
    """Closed-form user factors and biases, ``[n_rows, dim + 1]`` (last column the bias).

    For row (user) :math:`u` with ratings :math:`R_u`, solves
    :math:`(\\sum_{i\\in R_u} x_i x_i^\\top + n_u\\Lambda)\\,w_u = \\sum_{i\\in R_u}
    (r_{ui}-\\mu-b_i)\\,x_i` with :math:`x_i=(q_i,1)`, :math:`\\Lambda=\\mathrm{diag}(\\lambda,\\dots,
    \\lambda,\\lambda_b)` -- the ALS user step (Hu, Koren & Volinsky 2008; Zhou et al. 2008) for the
    per-rating regularised objective, in float64 (:func:`user_normal_equations`), all users in
    one batched solve. ``table`` may pass :func:`item_table` of ``item_factors``, built once.
    """
    instance("item_factors", item_factors, torch.Tensor)
    n_rows = int_in("n_rows", n_rows, 0)
    rows = as_index_tensor(rows, name="rows", upper=n_rows)
    items = as_index_tensor(items, name="items", upper=len(item_factors))
    if instance("ratings", ratings, torch.Tensor).shape != rows.shape or items.shape != rows.shape:
        raise ValueError("rows, items and ratings must have the same length")
    reg, bias_reg = positive("reg", reg), positive("bias_reg", bias_reg)
    dim = item_factors.shape[1]
    if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):
        order = torch.argsort(rows, stable=True)
        rows, items, ratings = rows[order], items[order], ratings[order]
    target = ratings.double() - global_bias.double() - item_bias[items].double()
    order, gram, rhs = user_normal_equations(
        rows, items, target, n_rows=n_rows, table=item_table(item_factors) if table is None else table)
    penalty = torch.full((dim + 1,), float(reg), dtype=torch.double)
    penalty[-1] = bias_reg
    counts = torch.bincount(rows, minlength=n_rows).double().clamp(min=1)
    gram.diagonal(dim1=1, dim2=2).add_(counts[order, None] * penalty)
    solution = torch.empty(n_rows, dim + 1)
    solution[order] = torch.linalg.solve(gram, rhs).float()
    return solution


def _check_step_arguments(shared: object, batch: object) -> None:
    tensor_dict("shared", shared)
    instance("batch", batch, Batch)


def solve_users(mf, shared: dict[str, torch.Tensor], batch: Batch) -> None:
    """Step 3a (closed form): each user of ``batch`` solves its row on its real ratings."""
    _check_step_arguments(shared, batch)
    users, items, ratings = batch.users, batch.items, batch.ratings
    if bool(batch.is_fake.any()):
        real = ~batch.is_fake
        users, items, ratings = users[real], items[real], ratings[real]
    active, local, _ = compact_ids(users)
    solution = solve_user_ridge(local, items, ratings, n_rows=len(active),
                                item_factors=shared["item_factors"], item_bias=shared["item_bias"],
                                global_bias=shared["global_bias"], reg=mf.reg,
                                bias_reg=mf.bias_reg, table=mf.item_table(shared["item_factors"]))
    mf.user_factors[active] = solution[:, :-1]
    mf.user_bias[active] = solution[:, -1]


def _pairs(batch: Batch, rating_client: torch.Tensor, n_items: int, one_per_client: bool):
    """(client, item) pairs of a batch: ``(pair index of each rating or None, client position,
    item and example count of each pair)``."""
    if one_per_client:  # each rating is its own pair: per-pair sums are the identity
        return None, rating_client, batch.items, torch.ones(len(batch.items))
    keys, pair, n_pair = compact_ids(rating_client * n_items + batch.items)
    return pair, keys // n_items, keys % n_items, n_pair.float()


def _step(grad: torch.Tensor, count: torch.Tensor, value: torch.Tensor, *, lr: float,
          reg: float) -> torch.Tensor:
    """:math:`\\eta_l(g/n + 2\\lambda\\theta)`, the preconditioned step, in one buffer (a division
    by counts that are all 1, every cross-device pair, is skipped: it is exact)."""
    out = value * (2.0 * reg)
    out += grad if bool((count == 1).all()) else grad / count.reshape(-1, *[1] * (grad.dim() - 1))
    return out.mul_(lr)


def train_vectorised(mf, shared: dict[str, torch.Tensor], batch: Batch) -> ClientUpdates:
    """All clients of ``batch`` at once over (client, item) pairs (see the module docstring)."""
    _check_step_arguments(shared, batch)
    if mf.user_solver == "closed_form":
        solve_users(mf, shared, batch)
    clients, rating_client, n_client = compact_ids(batch.clients)
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
    q, b, mu = q0, b0, mu0.expand(len(clients)).clone()   # never changed in place
    gradient_users = mf.user_solver == "gradient"
    active, users, n_user = compact_ids(batch.users)
    p, bu = mf.user_factors[active], mf.user_bias[active]   # indexing copies
    lr = mf.local_lr
    for _ in range(mf.local_epochs):
        p_r, bu_r, q_r = p[users], bu[users], at_rating(q)
        err = batch.ratings - (mu[rating_client] + bu_r + at_rating(b) + (p_r * q_r).sum(1))
        minus_2err = -2.0 * err
        grad_q = per_pair(p_r * minus_2err[:, None])
        grad_b = per_pair(minus_2err)
        grad_mu = torch.zeros_like(mu).index_add_(0, rating_client, minus_2err)
        if gradient_users:
            grad_p = torch.zeros_like(p).index_add_(0, users, q_r * minus_2err[:, None])
            grad_bu = torch.zeros_like(bu).index_add_(0, users, minus_2err)
            p = p - _step(grad_p, n_user, p, lr=lr, reg=mf.reg)
            bu = bu - _step(grad_bu, n_user, bu, lr=lr, reg=mf.bias_reg)
        q = q - _step(grad_q, n_pair, q, lr=lr, reg=mf.reg)
        b = b - _step(grad_b, n_pair, b, lr=lr, reg=mf.bias_reg)
        mu = mu - lr * grad_mu / n_client
    if gradient_users:
        mf.user_factors[active], mf.user_bias[active] = p, bu
    return ClientUpdates(clients, n_client,
                         {"item_factors": RowUpdates(pair_client, pair_item, q.sub_(q0), n_pair),
                          "item_bias": RowUpdates(pair_client, pair_item, b.sub_(b0), n_pair)},
                         {"global_bias": mu - mu0})


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
    _check_step_arguments(shared, batch)
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
