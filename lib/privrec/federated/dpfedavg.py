"""Client-level differential privacy for federated learning: DP-FedAvg as a wrapper strategy.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018) protects a *client* -- for cross-device
training a user's whole history (unit ``"user"``), for cross-silo training a silo's whole data
(unit ``"silo"``, a different neighbouring relation) -- by changing how the server samples and
aggregates, whatever its optimiser. :class:`DPFedAvg` wraps any
:class:`~privrec.federated.protocols.Strategy` (those of :mod:`privrec.federated.strategies` or
one of your own), as Flower's ``DifferentialPrivacyServerSideFixedClipping`` does:

1. **Poisson client sampling**: each of the :math:`N` clients joins a round independently with
   probability :math:`q` (``sample_rate``), so the expected cohort is :math:`qN`; this is what
   the amplification by sampling in the accountant assumes. The wrapped strategy's own sampling
   and weighting are not used.
2. **Clipping each client's whole update** (every shared parameter together) to :math:`\\ell_2`
   norm :math:`C`: :math:`\\bar\\Delta_k = \\Delta_k\\min(1, C/\\lVert\\Delta_k\\rVert)`.
3. **Uniform sum, Gaussian noise on every shared coordinate, fixed denominator**:
   :math:`\\tilde\\Delta = \\big(\\sum_{k\\in S}\\bar\\Delta_k + \\mathcal N(0,\\sigma^2C^2 I)\\big)/(qN)`.
   Adding or removing one client changes the sum by at most :math:`C`, so the sum is a Gaussian
   mechanism with noise multiplier :math:`\\sigma`. Noise goes on every coordinate, touched or
   not: otherwise the set of noisy rows would reveal which items the cohort rated.
4. **The wrapped strategy's server step** on :math:`\\tilde\\Delta` (momentum, Adam):
   post-processing, free of privacy cost.

Why a fixed denominator: dividing by the realised cohort :math:`|S|` would make the denominator
depend on who took part. :math:`N` (hence :math:`qN`) is treated as public, as Opacus does.
Because the noise is fixed per round, a realised cohort smaller than :math:`qN` carries the same
noise on a smaller signal (the mean is biased towards zero by :math:`|S|/qN`); the guarantee is
unchanged, the utility is lower.

Every round, including a round in which nobody was sampled, is recorded on :attr:`DPFedAvg.ledger`
as one Poisson-subsampled Gaussian event (``noise_multiplier`` :math:`\\sigma`, ``sample_rate``
:math:`q`); at :math:`\\sigma = 0` the ledger reports :math:`\\varepsilon=\\infty`. The reported
:math:`(\\varepsilon,\\delta)` is the ledger's.

What it does *not* protect: the server still sees each client's clipped update in plaintext.
Central DP protects the released model; hiding the uploads from the server needs secure
aggregation (:mod:`privrec.federated.secagg`) or local noise. Noise comes from a floating-point Gaussian
generator (see :mod:`privrec.dp.primitives` for what that means for a production release).
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from ..core.checks import (
    check_sample_rate,
    choice,
    conforms,
    epsilon_or_inf,
    instance,
    int_in,
    non_negative,
    positive,
)
from ..core.checks import seed as check_seed
from ..core.results import FitResult
from ..dp.ledger import PrivacyEvent, PrivacyLedger
from ..dp.primitives import clip_factors, gaussian_noise, poisson_sample
from .engine import FederatedMF, FederatedSimulator
from .protocols import Strategy
from .strategies import FedAvg, RunningSum, add_weighted, check_chunk
from .updates import ClientUpdates

__all__ = ["DPFedAvg", "ROUND_EVENT", "round_events", "fit_dp_fedavg_mf"]

#: The ledger's name for one DP-FedAvg round.
ROUND_EVENT = "DP-FedAvg round"


def round_events(noise_multiplier: float, *, sample_rate: float, rounds: int,
                 unit: str = "user") -> list[PrivacyEvent]:
    """The ledger events of ``rounds`` DP-FedAvg rounds (for :meth:`PrivacyLedger.calibrate`)."""
    return [PrivacyEvent(ROUND_EVENT, "gaussian", noise_multiplier, sample_rate,
                         int_in("rounds", rounds, 1), choice("unit", unit, ("user", "silo")))]


class DPFedAvg:
    """DP-FedAvg around any server strategy (see the module docstring for the algorithm).

    Parameters
    ----------
    strategy:
        Any :class:`~privrec.federated.protocols.Strategy` (``FedAvg``, ``FedAvgM``, ``FedAdam``
        or one of your own); only its ``step`` is used (the server optimiser), so a
        ``clients_per_round`` attribute, where it has one, must be ``None``.
    n_clients:
        :math:`N`, the number of clients (public); must match the model's.
    sample_rate:
        :math:`q \\in (0, 1]`, each client's Poisson probability of joining a round.
    clip_norm:
        :math:`C`, the bound on the :math:`\\ell_2` norm of one client's whole update per round.
    noise_multiplier:
        :math:`\\sigma \\ge 0`; the noise std on the sum is :math:`\\sigma C`, on the mean
        :math:`\\sigma C/(qN)`.
    unit:
        ``"user"`` (one user per client) or ``"silo"`` (one client = one silo).
    delta:
        The ledger's :math:`\\delta` (default :func:`~privrec.dp.ledger.default_delta` of ``n_clients``).
    seed:
        Seeds client sampling (``seed``) and noise (``seed + 1``).

    Attributes
    ----------
    ledger:
        The :class:`~privrec.dp.ledger.PrivacyLedger` of every round run.
    last_norms:
        ``[|S|]`` pre-clipping norms of the last round's client updates.

    Raises
    ------
    TypeError, ValueError
        For a wrong kind or a bad value of any parameter.

    References
    ----------
    McMahan, Ramage, Talwar & Zhang (2018), Learning differentially private recurrent language
    models, Algorithm 1 (the fixed-denominator estimator :math:`\\tilde f_f`).
    """

    def __init__(self, strategy: Strategy, *, n_clients: int, sample_rate: float, clip_norm: float,
                 noise_multiplier: float, unit: str = "user", delta: float | None = None,
                 seed: int = 0) -> None:
        conforms("strategy", strategy, Strategy)
        if getattr(strategy, "clients_per_round", None) is not None:
            raise ValueError("the wrapped strategy's clients_per_round must be None: DPFedAvg "
                             "samples clients itself (Poisson, sample_rate)")
        self.strategy = strategy
        self.n_clients = int_in("n_clients", n_clients, 1)
        self.sample_rate = check_sample_rate(sample_rate)
        self.clip_norm = positive("clip_norm", clip_norm)
        self.noise_multiplier = non_negative("noise_multiplier", noise_multiplier)
        self.ledger = PrivacyLedger(unit=choice("unit", unit, ("user", "silo")),
                                    n_units=self.n_clients, delta=delta)
        self.seed = check_seed("seed", seed)
        self._sampling = torch.Generator().manual_seed(self.seed)
        self._noise = torch.Generator().manual_seed(self.seed + 1)
        self._norms: list[torch.Tensor] = []
        self.last_norms: torch.Tensor | None = None

    @classmethod
    def calibrated(cls, strategy: Strategy, *, target_epsilon: float, rounds: int, n_clients: int,
                   sample_rate: float, unit: str = "user", delta: float | None = None,
                   **kwargs) -> DPFedAvg:
        """The wrapper whose ``rounds`` rounds spend ``target_epsilon`` (``math.inf``: no noise).

        The noise multiplier is the ledger's one search (:meth:`PrivacyLedger.calibrate`).
        """
        target = epsilon_or_inf("target_epsilon", target_epsilon)
        sigma = 0.0
        if math.isfinite(target):
            ledger = PrivacyLedger(unit=unit, n_units=n_clients, delta=delta)
            sigma = ledger.calibrate(lambda z: round_events(z, sample_rate=sample_rate,
                                                            rounds=rounds, unit=unit),
                                     target_epsilon=target)
        return cls(strategy, n_clients=n_clients, sample_rate=sample_rate, noise_multiplier=sigma,
                   unit=unit, delta=delta, **kwargs)

    @property
    def expected_clients(self) -> float:
        """:math:`qN`, the fixed denominator."""
        return self.sample_rate * self.n_clients

    def sample(self, n_clients: int) -> torch.Tensor:
        """Poisson sampling: sorted ids, each client independently with probability ``q``."""
        if int_in("n_clients", n_clients, 1) != self.n_clients:
            raise ValueError(f"the model has {n_clients} clients, this DPFedAvg was built for "
                             f"n_clients={self.n_clients}")
        return poisson_sample(self.n_clients, sample_rate=self.sample_rate,
                              generator=self._sampling)

    def start(self, shared: dict[str, torch.Tensor]) -> RunningSum:
        """An empty sum of clipped updates."""
        self._norms = []
        return RunningSum.zeros_like(shared)

    def accumulate(self, total: RunningSum, updates: ClientUpdates) -> None:
        """Clip each client's whole update to ``clip_norm`` and add it to the sum (uniformly)."""
        check_chunk(total, updates)
        norms = updates.norms()
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("a client update contains NaN or infinite values")
        self._norms.append(norms)
        add_weighted(total.sums, updates, clip_factors(norms, clip_norm=self.clip_norm))
        total.clients += len(updates)

    def finish(self, total: RunningSum) -> dict[str, torch.Tensor]:
        """Noise on every coordinate, divide by :math:`qN`, record the round on the ledger."""
        instance("total", total, RunningSum)
        std = self.noise_multiplier * self.clip_norm
        change = {name: (value + gaussian_noise(value.shape, std=std, generator=self._noise))
                  / self.expected_clients for name, value in total.sums.items()}
        self.ledger.record_gaussian(ROUND_EVENT, noise_multiplier=self.noise_multiplier,
                                    sample_rate=self.sample_rate)
        self.last_norms = torch.cat(self._norms) if self._norms else torch.zeros(0)
        return change

    def step(self, shared: dict[str, torch.Tensor], change: dict[str, torch.Tensor]) -> None:
        """The wrapped strategy's server step on the noisy mean (post-processing)."""
        self.strategy.step(shared, change)

    def __repr__(self) -> str:
        return (f"DPFedAvg({self.strategy!r}, sample_rate={self.sample_rate:g}, "
                f"clip_norm={self.clip_norm:g}, noise_multiplier={self.noise_multiplier:.4g}, "
                f"unit={self.ledger.unit!r})")


def fit_dp_fedavg_mf(train: pd.DataFrame, *, n_users: int, n_items: int, target_epsilon: float,
                     rounds: int, sample_rate: float, clip_norm: float = 1.0,
                     strategy: Strategy | None = None, partition=None, delta: float | None = None,
                     test: pd.DataFrame | None = None, eval_every: int | None = None,
                     seed: int = 0, **model_kwargs) -> FitResult:
    """Train :class:`~privrec.federated.engine.FederatedMF` with DP-FedAvg to ``target_epsilon``.

    Parameters
    ----------
    train, n_users, n_items:
        The clients' ratings and the (public) id-space sizes.
    target_epsilon:
        Client-level :math:`\\varepsilon` after ``rounds`` rounds (``math.inf``: clipping only).
    rounds, sample_rate, clip_norm:
        :math:`T`, :math:`q`, :math:`C`.
    strategy:
        The wrapped server optimiser (default ``FedAvg(server_lr=1.0)``).
    partition:
        Users to clients (default cross-device: unit ``"user"``; silos: unit ``"silo"``).
    delta:
        Default :func:`~privrec.dp.ledger.default_delta` of the number of clients.
    test, eval_every:
        Optional evaluation of the released model every ``eval_every`` rounds (default: last).
    seed:
        Seeds the model, the sampling and the noise.
    **model_kwargs:
        Passed to :class:`~privrec.federated.engine.FederatedMF` (``dim``, ``local_lr``, ...).

    Returns
    -------
    FitResult
        The released model (users personalised on their devices), history, ledger and seconds.
    """
    model = FederatedMF(train, n_users=n_users, n_items=n_items, partition=partition, seed=seed,
                        **model_kwargs)
    wrapper = DPFedAvg.calibrated(FedAvg() if strategy is None else strategy,
                                  target_epsilon=target_epsilon, rounds=rounds,
                                  n_clients=model.n_clients, sample_rate=sample_rate,
                                  unit=model.privacy_unit, delta=delta, clip_norm=clip_norm,
                                  seed=seed)
    sim = FederatedSimulator(model, wrapper)
    return sim.fit(rounds, test=test, eval_every=rounds if eval_every is None else eval_every)
