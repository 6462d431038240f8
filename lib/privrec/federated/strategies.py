"""Server strategies: who takes part in a round, how uploads are combined, how the server steps.

One small family of server optimisers (Reddi et al. 2021, Algorithm 1 with a server optimiser):

* :class:`FedAvg` (McMahan et al. 2017): :math:`\\theta \\leftarrow \\theta + \\eta_s\\Delta`;
* :class:`FedAvgM` (Hsu, Qi & Brown 2019): server momentum, :math:`v \\leftarrow \\beta v + \\Delta`,
  :math:`\\theta \\leftarrow \\theta + \\eta_s v`;
* :class:`FedAdam` (Reddi et al. 2021, Algorithm 2): Adam on the pseudo-gradient :math:`\\Delta`.

Each strategy is used by the engine (:class:`privrec.federated.engine.FederatedSimulator`) in four calls:
:meth:`~FedAvg.sample` the cohort (fixed size, without replacement), :meth:`~FedAvg.start` a
running sum, :meth:`~FedAvg.accumulate` one chunk of the cohort's uploads
(:class:`~privrec.federated.updates.ClientUpdates`) at a time, :meth:`~FedAvg.finish` the weighted mean
:math:`\\Delta` and :meth:`~FedAvg.step` the server model. Streaming the sum chunk by chunk keeps
a round with a million clients in bounded memory.

Differential privacy is a wrapper around any of these (:class:`privrec.federated.dpfedavg.DPFedAvg`): it
replaces sampling and aggregation and hands the noisy mean to the wrapped strategy's
:meth:`~FedAvg.step`, which is post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.checks import choice, in_range, instance, int_in, positive, tensor_dict
from ..core.checks import seed as check_seed
from .updates import ClientUpdates

__all__ = ["RunningSum", "check_chunk", "add_weighted", "FedAvg", "FedAvgM", "FedAdam"]


@dataclass
class RunningSum:
    """A round's aggregate in progress: weighted sums of the changes and of their weights."""

    sums: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    clients: int = 0

    @classmethod
    def zeros_like(cls, shared: dict[str, torch.Tensor]) -> RunningSum:
        """An empty sum shaped like the shared parameters ``shared``."""
        return cls({k: torch.zeros_like(v) for k, v in tensor_dict("shared", shared).items()})


def check_chunk(total: object, updates: object) -> None:
    """``TypeError`` unless ``total`` is a :class:`RunningSum` and ``updates`` a
    :class:`~privrec.federated.updates.ClientUpdates` (a strategy's ``accumulate`` arguments)."""
    instance("total", total, RunningSum)
    instance("updates", updates, ClientUpdates)


def _like(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return weight.reshape(-1, *[1] * (values.dim() - 1)).to(values.dtype)


def add_weighted(sums: dict[str, torch.Tensor], updates: ClientUpdates,
                 client_weight: torch.Tensor, *, per_row: bool = False) -> None:
    """Add :math:`\\sum_k w_k\\Delta_k` to ``sums`` in place.

    ``client_weight[k]`` weighs client ``k`` (its position in ``updates``); with ``per_row`` a row
    table's pairs are weighted by their own example counts instead (FedAvg row by row).
    """
    tensor_dict("sums", sums)
    instance("updates", updates, ClientUpdates)
    instance("client_weight", client_weight, torch.Tensor)
    weights: dict[int, tuple[torch.Tensor, bool]] = {}  # per pairs tensor, shared by tables
    for name, part in updates.rows.items():
        key = id(part.examples if per_row else part.client_pos)
        if key not in weights:
            weight = part.examples if per_row else client_weight.index_select(0, part.client_pos)
            weights[key] = weight, bool((weight == 1).all())
        weight, unit = weights[key]
        if unit:  # every pair of a cross-device round: exact, one pass less
            sums[name].index_add_(0, part.row, part.values)
        else:
            sums[name].index_add_(0, part.row, part.values * _like(weight, part.values))
    for name, value in updates.dense.items():
        sums[name] += (value * _like(client_weight, value)).sum(0).reshape(sums[name].shape)


class FedAvg:
    """Federated averaging (McMahan et al. 2017).

    Parameters
    ----------
    clients_per_round:
        :math:`m`, the number of clients sampled uniformly without replacement each round;
        ``None`` means all clients.
    server_lr:
        :math:`\\eta_s`; ``1.0`` is FedAvg as published (the new model is the weighted mean of the
        client models).
    weighting:
        ``"per_row"``: each row of a row-sparse table moves by the mean of the changes that touched
        it, weighted by the clients' example counts on that row; dense parameters by the clients'
        example counts. ``"per_client"``: every coordinate is weighted by the clients' total
        example counts :math:`n_k/\\sum_k n_k`, untouched rows counting as zero change (FedAvg
        verbatim; rarely rated items then barely move).
    seed:
        Seeds the client sampling.

    Raises
    ------
    ValueError
        For a bad value (a ``clients_per_round`` above the number of clients is reported by
        :meth:`sample`).
    """

    name = "FedAvg"

    def __init__(self, *, clients_per_round: int | None = None, server_lr: float = 1.0,
                 weighting: str = "per_row", seed: int = 0) -> None:
        if clients_per_round is not None:
            int_in("clients_per_round", clients_per_round, 1)
        self.clients_per_round = clients_per_round
        self.server_lr = positive("server_lr", server_lr)
        self.weighting = choice("weighting", weighting, ("per_row", "per_client"))
        self.seed = check_seed("seed", seed)
        self._rng = np.random.default_rng(self.seed)
        self._state: dict[str, dict[str, torch.Tensor]] = {}

    def sample(self, n_clients: int) -> torch.Tensor:
        """The sorted ids of this round's clients (seeded, without replacement)."""
        n_clients = int_in("n_clients", n_clients, 1)
        m = n_clients if self.clients_per_round is None else int_in(
            "clients_per_round", self.clients_per_round, 1, n_clients)
        if m == n_clients:
            return torch.arange(n_clients)
        return torch.as_tensor(np.sort(self._rng.choice(n_clients, size=m, replace=False), kind="stable"))

    def start(self, shared: dict[str, torch.Tensor]) -> RunningSum:
        """An empty running sum for the shared parameters ``shared``."""
        return RunningSum.zeros_like(shared)

    def accumulate(self, total: RunningSum, updates: ClientUpdates) -> None:
        """Add one chunk of the cohort's uploads to ``total`` (weighted by example counts)."""
        check_chunk(total, updates)
        per_row = self.weighting == "per_row"
        add_weighted(total.sums, updates, updates.examples, per_row=per_row)
        for name, part in updates.rows.items():
            if per_row:
                if name not in total.weights:  # once per round, not once per chunk
                    total.weights[name] = torch.zeros(len(total.sums[name]))
                total.weights[name].index_add_(0, part.row, part.examples)
        for name in [*updates.rows, *updates.dense]:
            if not (per_row and name in updates.rows):
                weight = total.weights.setdefault(name, torch.zeros(()))
                weight += updates.examples.sum()
        total.clients += len(updates)

    def finish(self, total: RunningSum) -> dict[str, torch.Tensor]:
        """The weighted mean change :math:`\\Delta` (zero where nobody contributed)."""
        instance("total", total, RunningSum)
        change = {}
        for name, value in total.sums.items():
            weight = total.weights.get(name)
            if weight is not None:
                weight = weight.clamp(min=1e-12)
                value = value / weight.reshape(weight.shape + (1,) * (value.dim() - weight.dim()))
            change[name] = value
        return change

    def step(self, shared: dict[str, torch.Tensor], change: dict[str, torch.Tensor]) -> None:
        """Apply the server update in place, :math:`\\theta\\leftarrow\\theta+\\eta_s\\,d(\\Delta)`."""
        tensor_dict("shared", shared)
        unknown = sorted(set(tensor_dict("change", change)) - set(shared))
        if unknown:
            raise ValueError(f"change names parameters that shared lacks: {unknown}")
        for key, delta in change.items():
            shared[key].add_(self._direction(key, delta), alpha=self.server_lr)

    def _direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _buffer(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._state.setdefault(name, {}).setdefault(key, torch.zeros_like(like))

    def __repr__(self) -> str:
        return (f"{self.name}(clients_per_round={self.clients_per_round}, "
                f"server_lr={self.server_lr:g}, weighting={self.weighting!r})")


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu, Qi & Brown 2019).

    The server keeps a velocity :math:`v \\leftarrow \\beta v + \\Delta` and steps
    :math:`\\theta \\leftarrow \\theta + \\eta_s v`; ``server_momentum=0`` is plain :class:`FedAvg`.

    Parameters
    ----------
    server_momentum:
        :math:`\\beta \\in [0, 1)`.
    **kwargs:
        As :class:`FedAvg`.
    """

    name = "FedAvgM"

    def __init__(self, *, server_momentum: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.server_momentum = in_range("server_momentum", server_momentum, 0.0, 1.0,
                                        closed_high=False)

    def _direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        velocity = self._buffer("velocity", key, delta)
        return velocity.mul_(self.server_momentum).add_(delta)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", server_momentum={self.server_momentum:g})"


class FedAdam(FedAvg):
    """Adaptive server optimiser FedAdam (Reddi et al. 2021, Algorithm 2).

    .. math:: m \\leftarrow \\beta_1 m + (1-\\beta_1)\\Delta,\\quad
              v \\leftarrow \\beta_2 v + (1-\\beta_2)\\Delta^2,\\quad
              \\theta \\leftarrow \\theta + \\eta_s\\, m / (\\sqrt v + \\tau)

    (no bias correction, as in the paper; :math:`\\tau` sets the degree of adaptivity).

    Parameters
    ----------
    beta1, beta2:
        Moment decay rates in ``[0, 1)``.
    tau:
        Adaptivity :math:`\\tau > 0`.
    server_lr:
        :math:`\\eta_s` (default 0.01: FedAdam steps are of size about :math:`\\eta_s` per
        coordinate, not :math:`\\eta_s\\Delta`).
    **kwargs:
        As :class:`FedAvg`.
    """

    name = "FedAdam"

    def __init__(self, *, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 server_lr: float = 0.01, **kwargs) -> None:
        super().__init__(server_lr=server_lr, **kwargs)
        self.beta1 = in_range("beta1", beta1, 0.0, 1.0, closed_high=False)
        self.beta2 = in_range("beta2", beta2, 0.0, 1.0, closed_high=False)
        self.tau = positive("tau", tau)

    def _direction(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._buffer("m", key, delta).mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        v = self._buffer("v", key, delta).mul_(self.beta2).addcmul_(delta, delta,
                                                                    value=1 - self.beta2)
        return m / (v.sqrt() + self.tau)

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", beta1={self.beta1:g}, beta2={self.beta2:g}, "
                f"tau={self.tau:g})")
