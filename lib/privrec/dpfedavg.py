"""User-level differential privacy for federated learning: the DP-FedAvg aggregation step.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018) protects a *client* — for a cross-device
recommender, a user's whole history — by three changes to FedAvg:

1. **Poisson client sampling**: each of the :math:`N` clients joins a round independently with
   probability :math:`q`, so the expected cohort is :math:`m = qN` (this is what the privacy
   amplification by sampling in the accountant assumes).
2. **Clipping each client's update** of the shared parameters to :math:`\\ell_2` norm :math:`C`.
3. **Uniform averaging with a fixed denominator and Gaussian noise**:
   :math:`\\tilde\\Delta = \\frac{1}{m}\\big(\\sum_{k\\in S}\\operatorname{clip}_C(\\Delta_k) +
   \\mathcal N(0, \\sigma^2 C^2 I)\\big)`.

Why uniform and fixed: adding or removing one client changes
:math:`\\sum_k \\operatorname{clip}_C(\\Delta_k)` by at most :math:`C`, so the sum has
:math:`\\ell_2` sensitivity :math:`C` and the Gaussian mechanism with noise multiplier
:math:`\\sigma` applies. Weighting by example counts :math:`n_k/\\sum n` would let one heavy
client move the average by an unbounded amount (its weight is data-dependent), and dividing by
the realised cohort size :math:`|S|` makes the denominator itself depend on who participated.

Each round is one Poisson-subsampled Gaussian mechanism with sampling rate :math:`q` and noise
multiplier :math:`\\sigma`, so :mod:`privrec.accounting`'s RDP accountant gives the user-level
:math:`(\\varepsilon,\\delta)` after :math:`T` rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from .accounting import get_epsilon, get_noise_multiplier
from .ledger import RDPAccountant
from .checks import int_in, non_negative, positive
from .federated import FedAvgM, FederatedMF, solve_user_ridge

__all__ = [
    "DPFedAvg",
    "DPFederatedMF",
    "released_model",
    "train_dp_fedavg_mf",
    "clip_updates",
    "dp_aggregate",
    "poisson_sample_clients",
    "user_level_epsilon",
    "noise_multiplier_for_target",
]



def clip_updates(updates: torch.Tensor, *, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``updates`` ``[m, d]`` to :math:`\\ell_2` norm at most ``clip_norm``.

    Returns ``(clipped, norms)`` where ``norms`` are the norms before clipping (their distribution
    is what adaptive clipping, Andrew et al. 2021, tracks).
    """
    clip_norm = positive("clip_norm", clip_norm)
    if not torch.is_tensor(updates) or updates.dim() != 2 or not updates.dtype.is_floating_point:
        raise ValueError("updates must be a 2-D floating-point tensor [clients, parameters]")
    if not torch.isfinite(updates).all():
        raise ValueError("updates contains NaN or infinite values")
    norms = updates.norm(dim=1)
    factor = (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
    return updates * factor[:, None], norms


def dp_aggregate(updates: torch.Tensor, *, clip_norm: float, noise_multiplier: float,
                 expected_clients: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The DP-FedAvg server step: clip, sum, add :math:`\\mathcal N(0,\\sigma^2C^2)`, divide by
    the *expected* cohort size :math:`m = qN`.

    ``updates`` holds one row per participating client (possibly zero rows). The noise std of the
    returned average is ``noise_multiplier * clip_norm / expected_clients`` per coordinate.
    """
    noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
    expected_clients = positive("expected_clients", expected_clients)
    clipped, _ = clip_updates(updates, clip_norm=clip_norm)
    total = clipped.sum(0)
    if noise_multiplier > 0:
        noise = torch.randn(total.shape, generator=generator, dtype=total.dtype)
        total = total + noise * (noise_multiplier * clip_norm)
    return total / expected_clients


def poisson_sample_clients(n_clients: int, *, sample_rate: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Ids of the clients that join this round, each independently with probability ``sample_rate``.

    The cohort size is random (possibly 0); that randomness is part of the privacy analysis.
    """
    n_clients = int_in("n_clients", n_clients, 1)
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if sample_rate == 1:
        return torch.arange(n_clients)
    joined = torch.rand(n_clients, generator=generator) < sample_rate
    return joined.nonzero().flatten()


def user_level_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int,
                       delta: float) -> float:
    """User-level :math:`\\varepsilon` of ``rounds`` DP-FedAvg rounds (RDP accountant)."""
    return get_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=rounds,
                       delta=delta)


def noise_multiplier_for_target(*, target_epsilon: float, delta: float, n_clients: int,
                                clients_per_round: float, rounds: int) -> float:
    """The noise multiplier :math:`\\sigma` that spends ``target_epsilon`` in ``rounds`` rounds
    when ``clients_per_round`` of ``n_clients`` join each round on average (``q = m / N``)."""
    n_clients = int_in("n_clients", n_clients, 1)
    clients_per_round = positive("clients_per_round", clients_per_round)
    if clients_per_round > n_clients:
        raise ValueError(f"clients_per_round must be in (0, n_clients={n_clients}], "
                         f"got {clients_per_round}")
    return get_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                sample_rate=clients_per_round / n_clients, steps=rounds)


# ----------------------------------------------------------------------------------------------
# DP-FedAvg for the federated matrix-factorisation simulator
# ----------------------------------------------------------------------------------------------

class DPFedAvg(FedAvgM):
    """DP-FedAvg (McMahan et al. 2018) as a strategy for :class:`DPFederatedMF`.

    Parameters
    ----------
    clients_per_round:
        Expected cohort size :math:`m`; each client joins a round independently with probability
        :math:`q = m/N` (Poisson sampling), and the average divides by :math:`m`, not by the
        realised cohort size.
    clip_norm:
        :math:`C`, the bound on the :math:`\\ell_2` norm of one client's whole update of the shared
        parameters (item factors, item biases, global bias) in one round.
    noise_multiplier:
        :math:`\\sigma`; the server adds :math:`\\mathcal N(0, \\sigma^2C^2)` to *every* shared
        coordinate of the summed update, touched or not (otherwise the set of noisy rows would
        reveal which items the cohort rated).
    server_lr, server_momentum:
        The server optimiser, inherited from :class:`~privrec.federated.FedAvgM` (DP-FedAvgM when
        momentum > 0); post-processing, so free of privacy cost.
    seed:
        Seeds client sampling and noise.
    """

    name = "DPFedAvg"

    def __init__(self, *, clients_per_round: int, clip_norm: float, noise_multiplier: float,
                 server_lr: float = 1.0, server_momentum: float = 0.0, seed: int = 0) -> None:
        super().__init__(clients_per_round=clients_per_round, server_lr=server_lr,
                         server_momentum=server_momentum, seed=seed)
        self.clip_norm = positive("clip_norm", clip_norm)
        self.noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
        self._noise = torch.Generator().manual_seed(self.seed + 1)
        self._sampling = torch.Generator().manual_seed(self.seed)
        self.accountant = RDPAccountant()
        self.sample_rate: float | None = None
        #: Pre-clipping norms of the last round's client updates (what adaptive clipping tracks).
        self.last_norms: torch.Tensor | None = None

    def sample_clients(self, n_clients: int) -> np.ndarray:
        self.sample_rate = self.clients_per_round / n_clients
        ids = poisson_sample_clients(n_clients, sample_rate=self.sample_rate,
                                     generator=self._sampling)
        return ids.numpy()

    def aggregate(self, upload: dict[str, torch.Tensor], *, n_items: int,
                  dim: int) -> dict[str, torch.Tensor]:
        """Clip each client's sparse update, sum, add noise to every coordinate, divide by m.

        Equivalent to :func:`dp_aggregate` on the clients' dense update vectors, without ever
        materialising them.
        """
        n_round = len(upload["clients"])
        pair_client, items = upload["pair_client"], upload["pair_item"]
        d_q, d_b, d_mu = upload["item_factors"], upload["item_bias"], upload["global_bias"]
        squares = torch.zeros(n_round).index_add_(0, pair_client, d_q.square().sum(1) + d_b.square())
        norms = (squares + d_mu.square()).sqrt()
        factor = (self.clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
        self.last_norms = norms
        per_pair = factor[pair_client]
        total_q = torch.zeros(n_items, dim).index_add_(0, items, per_pair[:, None] * d_q)
        total_b = torch.zeros(n_items).index_add_(0, items, per_pair * d_b)
        total_mu = (factor * d_mu).sum()
        std = self.noise_multiplier * self.clip_norm
        if std > 0:
            total_q += torch.randn(n_items, dim, generator=self._noise) * std
            total_b += torch.randn(n_items, generator=self._noise) * std
            total_mu = total_mu + torch.randn((), generator=self._noise) * std
        m = float(self.clients_per_round)
        if self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return {"item_factors": total_q / m, "item_bias": total_b / m, "global_bias": total_mu / m}

    def epsilon(self, delta: float) -> float:
        """User-level (client-level) :math:`\\varepsilon` spent so far."""
        return self.accountant.get_epsilon(delta)

    def __repr__(self) -> str:
        return (f"DPFedAvg(clients_per_round={self.clients_per_round}, clip_norm={self.clip_norm:g}, "
                f"noise_multiplier={self.noise_multiplier:g}, server_lr={self.server_lr:g}, "
                f"server_momentum={self.server_momentum:g})")


class DPFederatedMF(FederatedMF):
    """:class:`~privrec.federated.FederatedMF` trained with :class:`DPFedAvg`.

    Takes the same arguments as :class:`~privrec.federated.FederatedMF` with a :class:`DPFedAvg`
    strategy. Users' own factors and biases stay on their devices and are re-solved there from the
    released (noisy) item model, which is post-processing: the guarantee covers everything a
    user's data influences that leaves the device.
    """

    def __init__(self, train, *, strategy: DPFedAvg, **kwargs) -> None:
        if not isinstance(strategy, DPFedAvg):
            raise TypeError(f"strategy must be a DPFedAvg, got {type(strategy).__name__}")
        if kwargs.get("fake_items", 0):
            raise ValueError("fake_items must be 0 with DPFedAvg (DP already hides the item set of "
                             "the released model; fake items would only add clipping bias)")
        super().__init__(train, strategy=strategy, **kwargs)


def released_model(server: dict[str, torch.Tensor], train, *, n_users: int, n_items: int,
                   reg: float, bias_reg: float):
    """The model every user gets by personalising the released item model on their own device.

    Each user with ratings in ``train`` solves their factor and bias in closed form against the
    released (noisy) shared parameters — post-processing, so free of privacy cost — whether or not
    the user took part in training. Returns a :class:`~privrec.models.BiasedMF` for evaluation.
    """
    from .models import BiasedMF
    from .train import ratings_to_tensors

    users, items, ratings = ratings_to_tensors(train)
    order = torch.argsort(users, stable=True)
    users, items, ratings = users[order], items[order], ratings[order]
    solution = solve_user_ridge(users, items, ratings, n_rows=n_users,
                                item_factors=server["item_factors"], item_bias=server["item_bias"],
                                global_bias=server["global_bias"], reg=reg, bias_reg=bias_reg)
    dim = server["item_factors"].shape[1]
    model = BiasedMF(n_users, n_items, dim)
    seen = torch.bincount(users, minlength=n_users) > 0
    with torch.no_grad():
        for name, value in server.items():
            getattr(model, name).copy_(value)
        model.user_factors[seen] = solution[seen, :-1]
        model.user_bias[seen] = solution[seen, -1]
    return model


def train_dp_fedavg_mf(train, *, n_users: int, n_items: int, epsilon: float, delta: float,
                       clients_per_round: int, rounds: int, clip_norm: float = 1.0,
                       server_lr: float = 4.0, server_momentum: float = 0.0, dim: int = 4,
                       partition=None, seed: int = 0, **federated_kwargs) -> DPFederatedMF:
    """Train :class:`DPFederatedMF` to user-level ``(epsilon, delta)`` in ``rounds`` rounds.

    The noise multiplier is calibrated with :func:`noise_multiplier_for_target` for Poisson
    sampling of ``clients_per_round`` of the partition's clients; ``epsilon=math.inf`` trains with
    clipping but no noise. The defaults are the settings this book arrived at for ML-100K (see the
    chapter on user-level privacy for how, and for what tuning on private data costs).
    """
    from .federated import cross_device

    partition = cross_device(n_users) if partition is None else partition
    if epsilon == float("inf"):
        sigma = 0.0
    else:
        sigma = noise_multiplier_for_target(target_epsilon=epsilon, delta=delta,
                                            n_clients=partition.n_clients,
                                            clients_per_round=clients_per_round, rounds=rounds)
    strategy = DPFedAvg(clients_per_round=clients_per_round, clip_norm=clip_norm,
                        noise_multiplier=sigma, server_lr=server_lr,
                        server_momentum=server_momentum, seed=seed)
    sim = DPFederatedMF(train, n_users=n_users, n_items=n_items, strategy=strategy,
                        partition=partition, dim=dim, seed=seed, **federated_kwargs)
    for _ in range(rounds):
        sim.round()
    return sim
