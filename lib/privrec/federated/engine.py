"""The federated engine: one round function for every deployment, and the simulator that drives it.

The protocol follows the six steps of the source article (Sec. 3.2), made precise by FedAvg
(McMahan et al. 2017) and federated collaborative filtering (Ammad-ud-din et al. 2019):

1. *Data stays local.* Client :math:`k` holds its ratings :math:`D_k` and its users' own
   parameters (for MF the user factor :math:`p_u` and bias :math:`b_u`); these never leave it.
2. *Start from the global model.* The server broadcasts the shared parameters (for MF
   :math:`\\theta = (Q, b_I, \\mu)`) to the clients sampled this round.
3. *Local training.* Each client trains on its own data from the broadcast.
4. *Aggregation.* Clients upload their change of the shared parameters
   (:class:`~privrec.federated.updates.ClientUpdates`); the strategy combines them.
5. *Broadcast.* The strategy's server optimiser steps the shared model; it goes out next round.
6. *Repeat* steps 2-5.

:func:`federated_round` is the server's side of one round (steps 2, 4, 5) for any
:class:`~privrec.federated.protocols.Strategy` (:mod:`privrec.federated.strategies`, or the DP
wrapper :class:`privrec.federated.dpfedavg.DPFedAvg`); step 3 is a function it is handed, so the
clients may train here (:class:`FederatedSimulator`) or on other machines (the Flower ServerApp
of ``flower/`` hands it the ClientApps' uploads). :class:`FederatedSimulator` runs it for any
:class:`~privrec.federated.protocols.FederatedModel` and holds only what a server holds: the
shared state. A cohort is trained and aggregated in chunks of about ``chunk_ratings`` examples,
so a round's memory does not grow with the cohort.

:class:`FederatedMF` (:mod:`privrec.federated.mf`, imported here for convenience) is biased
matrix factorisation as a federated model. Each client minimises
the same per-rating objective as :func:`privrec.recsys.train.fit_explicit`,

.. math:: \\sum_{(u,i)\\in D_k} (r_{ui}-\\mu-b_u-b_i-p_u^\\top q_i)^2
          + \\lambda(\\lVert p_u\\rVert^2+\\lVert q_i\\rVert^2) + \\lambda_b(b_u^2+b_i^2),

first solving its users' rows in closed form (FCF) or by gradient steps, then taking
``local_epochs`` steps on its copy of the item rows it rated and of :math:`\\mu`
(:mod:`privrec.federated.mf_local`). Cross-device and cross-silo training differ only in the
:class:`~privrec.federated.partitions.Partition`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..core.checks import choice, conforms, flag, function, instance, int_in, tensor_dict
from ..core.results import FitResult
from .mf import PUBLIC_GLOBAL_MEAN, FederatedMF
from .protocols import FederatedModel, Strategy
from .strategies import FedAvg
from .updates import ClientUpdates

__all__ = ["federated_round", "FederatedSimulator", "FederatedMF", "RoundRecord", "wire_bytes",
           "BYTES_PER_FLOAT", "BYTES_PER_INDEX", "PUBLIC_GLOBAL_MEAN"]

#: Wire sizes used by the communication accounting (float32 values, int32 row indices).
BYTES_PER_FLOAT = 4
BYTES_PER_INDEX = 4


@dataclass
class RoundRecord:
    """What one round did: participants and bytes on the wire (float32 values, int32 indices).

    ``clients`` were sampled and sent the broadcast; ``realised`` are those whose uploads were
    aggregated (in a simulation the same; in a deployment, those that answered in time).
    """

    clients: torch.Tensor
    bytes_down: int
    bytes_up: int
    rows_up: int
    realised: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def wire_bytes(updates: ClientUpdates, shapes: dict[str, torch.Size], *,
               dense: bool = False) -> tuple[int, int]:
    """``(bytes, rows)`` the clients of ``updates`` send.

    Sparse: each uploaded row as float32 plus one int32 index per row (tables uploaded with the
    same rows share the index), dense parameters as float32. Dense: every client sends the whole
    shared model, ``rows`` then counts every row of every row table.
    """
    instance("updates", updates, ClientUpdates)
    instance("shapes", shapes, dict)
    dense = flag("dense", dense)
    n = len(updates)
    size = sum(int(np.prod(s)) for s in shapes.values())
    if dense:
        return n * size * BYTES_PER_FLOAT, n * sum(shapes[k][0] for k in updates.rows)
    total, indexed = 0, set()
    for part in updates.rows.values():
        total += part.values.numel() * BYTES_PER_FLOAT
        if id(part.row) not in indexed:
            indexed.add(id(part.row))
            total += len(part.row) * BYTES_PER_INDEX
    total += sum(v.numel() for v in updates.dense.values()) * BYTES_PER_FLOAT
    rows = max((len(p.row) for p in updates.rows.values()), default=0)
    return total, rows


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


def federated_round(shared: dict[str, torch.Tensor], strategy: Strategy, *, n_clients: int,
                    train_cohort: Callable[[dict[str, torch.Tensor], torch.Tensor],
                                           Iterable[ClientUpdates]],
                    upload: str = "sparse", round_number: int | None = None) -> RoundRecord:
    """The server's side of one round (steps 2, 4 and 5), whoever trains the clients.

    1. ``clients = strategy.sample(n_clients)``; 2. the broadcast, a copy of ``shared``;
    3. for each chunk of uploads that ``train_cohort(broadcast, clients)`` yields,
    ``strategy.accumulate`` (and the bytes are counted); 4. ``strategy.finish`` the change and
    ``strategy.step`` the shared model, **in place**. ``train_cohort`` is step 3, the clients'
    side: :class:`FederatedSimulator` yields ``model.local_training`` chunk by chunk; a Flower
    ServerApp sends the broadcast to the sampled ClientApps and yields their decoded uploads
    (clients that did not answer are simply absent; an empty cohort still finishes and steps,
    so a DP round is noised and recorded).

    Parameters
    ----------
    shared:
        The server's shared parameters; updated in place.
    strategy:
        Any :class:`~privrec.federated.protocols.Strategy` (FedAvg, DPFedAvg, ...).
    n_clients:
        The population the strategy samples from.
    train_cohort:
        ``(broadcast, clients) -> iterable of ClientUpdates``.
    upload:
        ``"sparse"`` or ``"dense"``: how the uploads' bytes are counted (:func:`wire_bytes`).
    round_number:
        Named in the error raised when the model diverges.

    Returns
    -------
    RoundRecord
        Sampled and realised clients, bytes down and up.

    Raises
    ------
    RuntimeError
        If a shared parameter is no longer finite after the step.
    """
    _check_round_arguments(shared, strategy, n_clients, train_cohort, upload)
    clients = strategy.sample(n_clients)
    broadcast = {k: v.clone() for k, v in shared.items()}
    shapes = {k: v.shape for k, v in shared.items()}
    total = strategy.start(shared)
    up, rows, realised = 0, 0, []
    for updates in train_cohort(broadcast, clients):
        strategy.accumulate(total, updates)
        chunk_up, chunk_rows = wire_bytes(updates, shapes, dense=upload == "dense")
        up, rows = up + chunk_up, rows + chunk_rows
        realised.append(updates.clients)
    _server_step(shared, strategy, total, round_number)
    down = len(clients) * sum(v.numel() for v in shared.values()) * BYTES_PER_FLOAT
    done = torch.cat(realised) if realised else torch.zeros(0, dtype=torch.long)
    return RoundRecord(clients, int(down), int(up), int(rows), done)


def _server_step(shared: dict[str, torch.Tensor], strategy: Strategy, total,
                 round_number: int | None) -> None:
    """Step 5: the strategy's change applied to ``shared``, which must stay finite."""
    strategy.step(shared, strategy.finish(total))
    if not all(bool(torch.isfinite(v).all()) for v in shared.values()):
        where = "" if round_number is None else f" in round {round_number}"
        raise RuntimeError(f"training diverged{where} (non-finite shared parameters); lower the "
                           f"local or server learning rate")


def _check_round_arguments(shared, strategy, n_clients, train_cohort, upload) -> None:
    tensor_dict("shared", shared)
    conforms("strategy", strategy, Strategy)
    int_in("n_clients", n_clients, 1)
    function("train_cohort", train_cohort)
    choice("upload", upload, ("sparse", "dense"))


class FederatedSimulator:
    """Run federated rounds of ``model`` under ``strategy``; holds only the server's state.

    Parameters
    ----------
    model:
        A :class:`~privrec.federated.protocols.FederatedModel` (e.g. :class:`FederatedMF`); its user
        parameters stay inside it (the clients' devices).
    strategy:
        Any :class:`~privrec.federated.protocols.Strategy`: :class:`~privrec.federated.strategies.FedAvg`
        (default, all clients), ``FedAvgM``, ``FedAdam``, or
        :class:`~privrec.federated.dpfedavg.DPFedAvg` wrapping one of them.
    chunk_ratings:
        Clients are trained and aggregated in groups of about this many examples (memory bound;
        the default keeps a chunk's tensors near the CPU caches). The numbers do not depend on it
        when each client draws its own randomness; a model that draws randomness shared by a
        chunk (:class:`~privrec.federated.sequential.FederatedSequential`'s sampled negatives)
        gives other numbers for another chunk size, so its runs fix the chunk size.
    keep_updates:
        Keep the last round's uploads in :attr:`last_updates` (for attacks and tests; costs the
        memory of a whole cohort's upload).
    num_threads:
        torch intra-op threads while a round runs (restored afterwards); ``None`` keeps torch's
        setting. A round is many mid-sized tensor ops that gain little from a second intra-op
        thread; to use several cores, let the clients train in parallel groups instead
        (:class:`FederatedMF`'s ``workers``).

    Attributes
    ----------
    shared:
        The server's shared parameters (name -> tensor).
    last_broadcast:
        What the server sent in the last round (an attacker on the server knows it).
    last_updates:
        The last round's :class:`~privrec.federated.updates.ClientUpdates` (``keep_updates=True`` only).
    """

    def __init__(self, model: FederatedModel, strategy: Strategy | None = None, *,
                 chunk_ratings: int = 1 << 16, keep_updates: bool = False,
                 num_threads: int | None = 1) -> None:
        self.model = conforms("model", model, FederatedModel)
        self.strategy = FedAvg() if strategy is None else conforms("strategy", strategy, Strategy)
        unit = getattr(getattr(self.strategy, "ledger", None), "unit", None)
        if unit is not None and unit != model.privacy_unit:
            raise ValueError(f"the strategy's ledger unit is {unit!r} but the model's clients "
                             f"protect a {model.privacy_unit!r}")
        self.chunk_ratings = int_in("chunk_ratings", chunk_ratings, 1)
        self.keep_updates = flag("keep_updates", keep_updates)
        self.num_threads = None if num_threads is None else int_in("num_threads", num_threads, 1)
        self.shared = {k: v.detach().clone() for k, v in model.shared_state().items()}
        self.rounds_done = 0
        self.last_broadcast: dict[str, torch.Tensor] | None = None
        self.last_updates: ClientUpdates | None = None

    @property
    def ledger(self):
        """The strategy's :class:`~privrec.dp.ledger.PrivacyLedger` (``None`` if not private)."""
        return getattr(self.strategy, "ledger", None)

    def round(self) -> RoundRecord:
        """One round of :func:`federated_round`, the clients trained here chunk by chunk."""
        kept: list[ClientUpdates] = []

        def train_cohort(broadcast, clients):                   # step 3, on the clients
            self.last_broadcast = broadcast
            for chunk in self.model.chunks(clients, self.chunk_ratings):
                updates = self.model.local_training(broadcast, chunk)
                kept.extend([updates] if self.keep_updates else [])
                yield updates

        with _torch_threads(self.num_threads):
            record = federated_round(self.shared, self.strategy, n_clients=self.model.n_clients,
                                     train_cohort=train_cohort, upload=self.model.upload,
                                     round_number=self.rounds_done + 1)
        self.rounds_done += 1
        self.last_updates = ClientUpdates.concat(kept) if self.keep_updates else None
        return record

    def fit(self, rounds: int, *, test: pd.DataFrame | None = None,
            eval_every: int = 1) -> FitResult:
        """Run ``rounds`` rounds; record bytes every round and test metrics every ``eval_every``.

        Returns
        -------
        FitResult
            ``model``: the model each client would use (:meth:`released_model`); ``history``:
            ``round``/``test_rmse`` at evaluations, ``bytes_down``/``bytes_up`` every round;
            ``ledger``: the DP wrapper's ledger, ``None`` for a non-private strategy.
        """
        rounds = int_in("rounds", rounds, 1)
        eval_every = int_in("eval_every", eval_every, 1)
        history: dict[str, list[float]] = {"round": [], "test_rmse": [], "bytes_down": [],
                                           "bytes_up": []}
        start = time.perf_counter()
        for r in range(1, rounds + 1):
            record = self.round()
            history["bytes_down"].append(record.bytes_down)
            history["bytes_up"].append(record.bytes_up)
            if test is not None and (r % eval_every == 0 or r == rounds):
                history["round"].append(self.rounds_done)
                history["test_rmse"].append(self.evaluate(test)["rmse"])
        seconds = time.perf_counter() - start
        return FitResult(self.released_model(), history, self.ledger, seconds)

    def released_model(self):
        """The model a client uses: the model's ``released_model(shared)`` (personalised)."""
        return self.model.released_model(self.shared)

    def evaluate(self, test: pd.DataFrame) -> dict[str, float]:
        """The model's ``evaluate(shared, test)`` on the current shared state."""
        with _torch_threads(self.num_threads):
            return self.model.evaluate(self.shared, test)

    @property
    def shared_size(self) -> int:
        """Number of floats in the shared model (what a broadcast carries)."""
        return sum(v.numel() for v in self.shared.values())

    def __repr__(self) -> str:
        return f"FederatedSimulator({self.model!r}, {self.strategy!r})"
