"""The federated engine: one simulator for every model, and matrix factorisation as one such model.

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

:class:`FederatedSimulator` runs the protocol for any :class:`~privrec.federated.updates.FederatedModel`
with any strategy (:mod:`privrec.federated.strategies`, or the DP wrapper
:class:`privrec.federated.dpfedavg.DPFedAvg`).
It holds only what a server holds: the shared state. A cohort is trained and aggregated in chunks
of about ``chunk_ratings`` examples, so a round's memory does not grow with the cohort.

:class:`FederatedMF` is biased matrix factorisation as a federated model. Each client minimises
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core.checks import int_in
from ..core.results import FitResult
from .mf import PUBLIC_GLOBAL_MEAN, FederatedMF
from .strategies import FedAvg
from .updates import ClientUpdates, FederatedModel

__all__ = ["FederatedSimulator", "FederatedMF", "RoundRecord", "wire_bytes", "BYTES_PER_FLOAT",
           "BYTES_PER_INDEX", "PUBLIC_GLOBAL_MEAN"]

#: Wire sizes used by the communication accounting (float32 values, int32 row indices).
BYTES_PER_FLOAT = 4
BYTES_PER_INDEX = 4


@dataclass
class RoundRecord:
    """What one round did: participants and bytes on the wire (float32 values, int32 indices)."""

    clients: torch.Tensor
    bytes_down: int
    bytes_up: int
    rows_up: int


def wire_bytes(updates: ClientUpdates, shapes: dict[str, torch.Size], *,
               dense: bool = False) -> tuple[int, int]:
    """``(bytes, rows)`` the clients of ``updates`` send.

    Sparse: each uploaded row as float32 plus one int32 index per row (tables uploaded with the
    same rows share the index), dense parameters as float32. Dense: every client sends the whole
    shared model, ``rows`` then counts every row of every row table.
    """
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


class FederatedSimulator:
    """Run federated rounds of ``model`` under ``strategy``; holds only the server's state.

    Parameters
    ----------
    model:
        A :class:`~privrec.federated.updates.FederatedModel` (e.g. :class:`FederatedMF`); its user
        parameters stay inside it (the clients' devices).
    strategy:
        :class:`~privrec.federated.strategies.FedAvg` (default, all clients), ``FedAvgM``, ``FedAdam``, or
        :class:`~privrec.federated.dpfedavg.DPFedAvg` wrapping one of them.
    chunk_ratings:
        Clients are trained and aggregated in groups of about this many examples (memory bound).
    keep_updates:
        Keep the last round's uploads in :attr:`last_updates` (for attacks and tests; costs the
        memory of a whole cohort's upload).
    num_threads:
        torch intra-op threads while a round runs (restored afterwards); ``None`` keeps torch's
        setting. A round is many small tensor ops, which gain little from a second thread.

    Attributes
    ----------
    shared:
        The server's shared parameters (name -> tensor).
    last_broadcast:
        What the server sent in the last round (an attacker on the server knows it).
    last_updates:
        The last round's :class:`~privrec.federated.updates.ClientUpdates` (``keep_updates=True`` only).
    """

    def __init__(self, model: FederatedModel, strategy=None, *, chunk_ratings: int = 1 << 20,
                 keep_updates: bool = False, num_threads: int | None = 1) -> None:
        for method in ("shared_state", "local_training"):
            if not callable(getattr(model, method, None)):
                raise TypeError(f"model must be a FederatedModel (no {method}), got "
                                f"{type(model).__name__}")
        self.model = model
        self.strategy = FedAvg() if strategy is None else strategy
        for method in ("sample", "start", "accumulate", "finish", "step"):
            if not callable(getattr(self.strategy, method, None)):
                raise TypeError(f"strategy must be a strategy (no {method}), got "
                                f"{type(self.strategy).__name__}")
        unit = getattr(getattr(self.strategy, "ledger", None), "unit", None)
        model_unit = getattr(model, "privacy_unit", None)
        if unit is not None and model_unit is not None and unit != model_unit:
            raise ValueError(f"the strategy's ledger unit is {unit!r} but the model's clients "
                             f"protect a {model_unit!r}")
        self.chunk_ratings = int_in("chunk_ratings", chunk_ratings, 1)
        self.keep_updates = bool(keep_updates)
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
        """One round: sample, broadcast, local training, aggregate, server step; count bytes."""
        with _torch_threads(self.num_threads):
            clients = self.strategy.sample(self.model.n_clients)            # step 2: who
            broadcast = {k: v.clone() for k, v in self.shared.items()}      # step 2: what
            total = self.strategy.start(self.shared)
            up, rows, kept = 0, 0, []
            for chunk in self._chunks(clients):
                updates = self.model.local_training(broadcast, chunk)       # step 3
                self.strategy.accumulate(total, updates)                    # step 4
                chunk_up, chunk_rows = self._upload_size(updates)
                up, rows = up + chunk_up, rows + chunk_rows
                kept += [updates] if self.keep_updates else []
            self.strategy.step(self.shared, self.strategy.finish(total))    # step 5
            self._after_round(broadcast, kept)
            down = len(clients) * self.shared_size * BYTES_PER_FLOAT
            return RoundRecord(clients, int(down), int(up), int(rows))

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

    def _chunks(self, clients: torch.Tensor) -> list[torch.Tensor]:
        split = getattr(self.model, "chunks", None)
        return split(clients, self.chunk_ratings) if split else [clients]

    def _upload_size(self, updates: ClientUpdates) -> tuple[int, int]:
        shapes = {k: v.shape for k, v in self.shared.items()}
        return wire_bytes(updates, shapes, dense=getattr(self.model, "upload", "") == "dense")

    def _after_round(self, broadcast: dict[str, torch.Tensor], kept: list[ClientUpdates]) -> None:
        self.rounds_done += 1
        self.last_broadcast = broadcast
        self.last_updates = ClientUpdates.concat(kept) if self.keep_updates else None
        if not all(bool(torch.isfinite(v).all()) for v in self.shared.values()):
            raise RuntimeError(f"training diverged in round {self.rounds_done} (non-finite shared "
                               f"parameters); lower the local or server learning rate")

    def __repr__(self) -> str:
        return f"FederatedSimulator({self.model!r}, {self.strategy!r})"
