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

from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.checks import instance, int_in, positive, real_array, tensor_dict
from ..recsys.models import as_index_tensor
from .updates import ClientUpdates, RowUpdates, as_float64

__all__ = ["RatingStore", "rating_arrays", "Batch", "compact_ids", "BUCKET_GROWTH", "item_table",
           "BroadcastTable", "user_normal_equations", "solve_user_ridge", "solve_users",
           "train_vectorised", "train_loop"]


@dataclass
class Batch:
    """The ratings of some clients (real ratings, then any fake ones); read-only. ``memo`` keeps
    index structures derived from it (:meth:`derived`): a batch trained again (the same clients
    in every round of a full cohort: FederatedMF keeps its last batches) reuses them."""

    users: torch.Tensor
    items: torch.Tensor
    ratings: torch.Tensor
    clients: torch.Tensor      # client of each rating
    is_fake: torch.Tensor      # bool: FedRec fake-item rows
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def derived(self, key: str, build: Callable[[], object]) -> object:
        """``build()``, computed once per batch under ``key``."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]


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


#: The layout of a closed-form user solve, fixed by its ratings' rows and items (:func:`ridge_plan`,
#: built once per batch): ``sort`` puts the ratings in row order (None: they are), ``items`` in that
#: order; ``order`` lists the rows bucket by bucket (rows of similar rating counts, padded with the
#: table's zero row), ``counts`` their ``[n_rows, 1]`` float64 counts (at least 1), ``buckets``
#: each bucket's ``[rows, length]`` item-table rows and target positions (padding: the last).
RidgePlan = namedtuple("RidgePlan", "n_rows sort items order counts buckets")


def ridge_plan(rows: torch.Tensor, items: torch.Tensor, *, n_rows: int,
               n_items: int) -> RidgePlan:
    """:class:`RidgePlan` of the ratings ``(rows, items)`` (ids already checked), ``n_items`` the
    item table's padding row."""
    sort = None
    if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):
        sort = torch.argsort(rows, stable=True)
        rows, items = rows[sort], items[sort]
    counts = torch.bincount(rows, minlength=n_rows)
    start = torch.cumsum(counts, 0) - counts
    padded = torch.cat([items, items.new_full((1,), n_items)])       # last: the padding row
    top = max(int(counts.max()), 1) if n_rows else 1
    edges = torch.unique(torch.ceil(BUCKET_GROWTH ** torch.arange(
        int(np.ceil(np.log(top) / np.log(BUCKET_GROWTH))) + 1, dtype=torch.float64)).long())
    bucket = torch.searchsorted(edges, counts)                       # edges[bucket] >= count
    order = torch.argsort(bucket, stable=True)
    levels, sizes = torch.unique_consecutive(bucket[order], return_counts=True)
    buckets = []
    for level, group in zip(levels.tolist(), torch.split(order, sizes.tolist()), strict=True):
        step = torch.arange(int(edges[level]))
        pos = torch.where(step < counts[group, None], start[group, None] + step, len(items))
        buckets.append((padded[pos], pos))
    return RidgePlan(n_rows, sort, items, order, counts.double().clamp(min=1)[order, None],
                     buckets)


def user_normal_equations(plan: RidgePlan, target: torch.Tensor, *,
                          table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gram, rhs)`` of the ratings of ``plan`` with targets ``target`` (in row order),
    ``table`` the :func:`item_table`: ``gram[k]`` is :math:`\\sum_{i\\in R_u} x_ix_i^\\top` and
    ``rhs[k]`` is :math:`\\sum_{i\\in R_u} t_{ui}x_i` for row ``u = plan.order[k]``. Each bucket is
    one batched product of the inputs with the target in the free slot, :math:`[x_i, t_{ui}]`
    (a dense kernel; per-item outer products would read :math:`D^2` numbers per rating)."""
    dim = table.shape[1] - 1                                          # D = factors + bias
    target = torch.cat([target, target.new_zeros(1)])
    full = table.new_empty(plan.n_rows, dim + 1, dim + 1)
    done = 0
    for rows, pos in plan.buckets:
        inputs = table.index_select(0, rows.view(-1)).view(*rows.shape, dim + 1)
        inputs[..., dim] = target.index_select(0, pos.view(-1)).view(pos.shape)
        torch.bmm(inputs.transpose(1, 2), inputs, out=full[done:done + len(rows)])
        done += len(rows)
    return full[:, :dim, :dim], full[:, :dim, dim]


def solve_planned(plan: RidgePlan, ratings: torch.Tensor, *, item_bias: torch.Tensor,
                  global_bias: torch.Tensor, reg: float, bias_reg: float,
                  table: torch.Tensor) -> torch.Tensor:
    """:func:`solve_user_ridge` on ``plan`` (float64 ``ratings`` in row order; rows in order)."""
    target = ratings - as_float64(global_bias) - as_float64(item_bias.index_select(0, plan.items))
    gram, rhs = user_normal_equations(plan, target, table=table)
    penalty = torch.full((table.shape[1] - 1,), float(reg), dtype=torch.double)
    penalty[-1] = bias_reg
    gram.diagonal(dim1=1, dim2=2).add_(plan.counts * penalty)
    return torch.linalg.solve(gram, rhs).float()


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
    plan = ridge_plan(rows, items, n_rows=n_rows, n_items=len(item_factors))
    ratings = ratings.double() if plan.sort is None else ratings[plan.sort].double()
    solution = torch.empty(n_rows, item_factors.shape[1] + 1)
    solution[plan.order] = solve_planned(
        plan, ratings, item_bias=item_bias, global_bias=global_bias, reg=reg, bias_reg=bias_reg,
        table=item_table(item_factors) if table is None else table)
    return solution


def _check_step_arguments(shared: object, batch: object) -> None:
    tensor_dict("shared", shared)
    instance("batch", batch, Batch)


def _user_layout(batch: Batch, n_items: int) -> tuple[torch.Tensor, RidgePlan, torch.Tensor]:
    """The users present in the batch's real ratings, their plan and float64 ratings in row order."""
    users, items, ratings = batch.users, batch.items, batch.ratings
    if bool(batch.is_fake.any()):
        real = ~batch.is_fake
        users, items, ratings = users[real], items[real], ratings[real]
    active, local, _ = compact_ids(users)
    plan = ridge_plan(local, as_index_tensor(items, name="items", upper=n_items),
                      n_rows=len(active), n_items=n_items)
    return active, plan, (ratings if plan.sort is None else ratings[plan.sort]).double()


def solve_users(mf, shared: dict[str, torch.Tensor], batch: Batch) -> None:
    """Step 3a (closed form): each user of ``batch`` solves its row on its real ratings."""
    _check_step_arguments(shared, batch)
    item_factors = shared["item_factors"]
    n_items = len(item_factors)
    active, plan, ratings = batch.derived(f"users/{n_items}", lambda: _user_layout(batch, n_items))
    solution = solve_planned(plan, ratings, item_bias=shared["item_bias"],
                             global_bias=shared["global_bias"], reg=mf.reg, bias_reg=mf.bias_reg,
                             table=mf.item_table(item_factors))
    rows = active[plan.order]
    mf.user_factors[rows] = solution[:, :-1]
    mf.user_bias[rows] = solution[:, -1]


#: A batch's compact clients, its (client, item) pairs (``pair``: the pair of each rating, None
#: when each rating is its own pair) and its compact users; ``unit_*``: every count is 1.
_Layout = namedtuple("_Layout", "clients rating_client n_client pair pair_client pair_item n_pair "
                                "active users n_user unit_pair unit_user")


def _layout(batch: Batch, n_items: int, one_per_client: bool) -> _Layout:
    """``_Layout`` of ``batch`` (a client of one user: each rating is its own pair)."""
    clients, rating_client, n_client = compact_ids(batch.clients)
    if one_per_client:
        pair, pair_client, pair_item = None, rating_client, batch.items
        n_pair = torch.ones(len(batch.items))
    else:
        keys, pair, n_pair = compact_ids(rating_client * n_items + batch.items)
        pair_client, pair_item, n_pair = keys // n_items, keys % n_items, n_pair.float()
    active, users, n_user = compact_ids(batch.users)
    return _Layout(clients, rating_client, n_client.float(), pair, pair_client, pair_item, n_pair,
                   active, users, n_user, bool((n_pair == 1).all()), bool((n_user == 1).all()))


def _step(grad: torch.Tensor, count: torch.Tensor, value: torch.Tensor, *, lr: float,
          reg: float, unit: bool) -> torch.Tensor:
    """:math:`\\eta_l(g/n + 2\\lambda\\theta)`, the preconditioned step, in one buffer (a division
    by counts that are all 1 (``unit``), every cross-device pair, is skipped: it is exact)."""
    out = value * (2.0 * reg)
    out += grad if unit else grad / count.reshape(-1, *[1] * (grad.dim() - 1))
    return out.mul_(lr)


def train_vectorised(mf, shared: dict[str, torch.Tensor], batch: Batch) -> ClientUpdates:
    """All clients of ``batch`` at once over (client, item) pairs (see the module docstring)."""
    _check_step_arguments(shared, batch)
    if mf.user_solver == "closed_form":
        solve_users(mf, shared, batch)
    n_items, one_per_client = mf.n_items, mf.one_user_per_client
    at = batch.derived(f"layout/{n_items}/{one_per_client}",
                       lambda: _layout(batch, n_items, one_per_client))
    pair, pair_item, users, rating_client = at.pair, at.pair_item, at.users, at.rating_client

    def per_pair(values: torch.Tensor) -> torch.Tensor:
        return values if pair is None else torch.zeros(
            (len(pair_item),) + values.shape[1:]).index_add_(0, pair, values)

    def at_rating(values: torch.Tensor) -> torch.Tensor:
        return values if pair is None else values.index_select(0, pair)

    q0, b0, mu0 = (shared["item_factors"].index_select(0, pair_item),
                   shared["item_bias"].index_select(0, pair_item), shared["global_bias"])
    q, b, mu = q0, b0, mu0.expand(len(at.clients)).clone()   # never changed in place
    gradient_users = mf.user_solver == "gradient"
    p, bu = mf.user_factors.index_select(0, at.active), mf.user_bias.index_select(0, at.active)
    lr = mf.local_lr
    for _ in range(mf.local_epochs):
        p_r, bu_r, q_r = p.index_select(0, users), bu.index_select(0, users), at_rating(q)
        err = batch.ratings - (mu.index_select(0, rating_client) + bu_r + at_rating(b)
                               + (p_r * q_r).sum(1))
        minus_2err = -2.0 * err
        grad_q = per_pair(p_r * minus_2err[:, None])
        grad_b = per_pair(minus_2err)
        grad_mu = torch.zeros_like(mu).index_add_(0, rating_client, minus_2err)
        if gradient_users:
            grad_p = torch.zeros_like(p).index_add_(0, users, q_r * minus_2err[:, None])
            grad_bu = torch.zeros_like(bu).index_add_(0, users, minus_2err)
            p = p - _step(grad_p, at.n_user, p, lr=lr, reg=mf.reg, unit=at.unit_user)
            bu = bu - _step(grad_bu, at.n_user, bu, lr=lr, reg=mf.bias_reg, unit=at.unit_user)
        q = q - _step(grad_q, at.n_pair, q, lr=lr, reg=mf.reg, unit=at.unit_pair)
        b = b - _step(grad_b, at.n_pair, b, lr=lr, reg=mf.bias_reg, unit=at.unit_pair)
        mu = mu - lr * grad_mu / at.n_client
    if gradient_users:
        mf.user_factors[at.active], mf.user_bias[at.active] = p, bu
    return ClientUpdates(at.clients, at.n_client, {
        "item_factors": RowUpdates(at.pair_client, pair_item, q.sub_(q0), at.n_pair),
        "item_bias": RowUpdates(at.pair_client, pair_item, b.sub_(b0), at.n_pair)},
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
