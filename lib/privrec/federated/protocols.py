"""The contracts of the federated engine: what a model and a server strategy must provide.

Two :class:`typing.Protocol` classes name every member that
:func:`privrec.federated.engine.federated_round`, :class:`~privrec.federated.engine.FederatedSimulator`
and :class:`~privrec.federated.dpfedavg.DPFedAvg` use -- nothing more, so a new model or a new
server optimiser plugs in without subclassing anything:

* :class:`FederatedModel` -- the clients' side: the privacy unit a client stands for, how it
  uploads, the data-free initial shared state, chunking a cohort, local training, and what a client
  does with the released model (personalise and evaluate);
* :class:`Strategy` -- the server's side, one round in five calls: ``sample`` the cohort,
  ``start`` a running sum, ``accumulate`` uploads chunk by chunk, ``finish`` the change
  :math:`\\Delta`, ``step`` the shared model (Reddi et al. 2021, Algorithm 1);
* :class:`PrivateStrategy` -- a strategy that also keeps a privacy ledger (DP-FedAvg).

They are ``runtime_checkable``: ``isinstance(obj, Strategy)`` checks that the members exist (not
their signatures); :func:`privrec.core.checks.conforms` turns a failed check into a ``TypeError``
naming the missing members, which is how the engine and the DP wrapper reject a wrong object early.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # only for annotations: no import cycle with the strategies
    import pandas as pd

    from ..dp.ledger import PrivacyLedger
    from .strategies import RunningSum
    from .updates import ClientUpdates

__all__ = ["FederatedModel", "Strategy", "PrivateStrategy"]


@runtime_checkable
class FederatedModel(Protocol):
    """The clients of a federated model (matrix factorisation, two-tower, ...).

    The object stands for the clients' devices: it holds their data and their user parameters,
    which never leave it; the server's state is the ``shared`` dict the engine passes in.
    """

    @property
    def n_clients(self) -> int:
        """Number of clients (public)."""

    @property
    def privacy_unit(self) -> str:
        """What one client stands for under client-level DP: ``"user"`` or ``"silo"``."""

    @property
    def upload(self) -> str:
        """``"sparse"`` (changed rows plus indices) or ``"dense"`` (whole tables): the byte count."""

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The server's initial shared parameters: public constants or seeded noise only, never a
        statistic of the training data (that would be an uncharged release)."""

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        """The sorted ``clients`` split into consecutive groups of about ``max_examples``
        examples (bounds a round's memory)."""

    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        """Train ``clients`` locally from the broadcast ``shared``; user parameters stay inside
        the model; return the cohort's changes of the shared parameters."""

    def released_model(self, shared: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The model the clients use with ``shared`` (personalised on their devices)."""

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        """Test metrics of :meth:`released_model` on ``test``."""


@runtime_checkable
class Strategy(Protocol):
    """A server strategy: who takes part in a round and how their uploads move the shared model."""

    def sample(self, n_clients: int) -> torch.Tensor:
        """The sorted ids of this round's cohort."""

    def start(self, shared: dict[str, torch.Tensor]) -> RunningSum:
        """An empty running sum shaped like ``shared``."""

    def accumulate(self, total: RunningSum, updates: ClientUpdates) -> None:
        """Add one chunk of the cohort's uploads to ``total`` in place."""

    def finish(self, total: RunningSum) -> dict[str, torch.Tensor]:
        """The round's change :math:`\\Delta` of every shared parameter."""

    def step(self, shared: dict[str, torch.Tensor], change: dict[str, torch.Tensor]) -> None:
        """Apply the server update to ``shared`` in place."""


@runtime_checkable
class PrivateStrategy(Strategy, Protocol):
    """A :class:`Strategy` that records every round on a privacy ledger."""

    @property
    def ledger(self) -> PrivacyLedger:
        """The ledger of every round run so far."""

