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

__all__ = [
    "clip_updates",
    "dp_aggregate",
    "poisson_sample_clients",
    "user_level_epsilon",
    "noise_multiplier_for_target",
]


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def clip_updates(updates: torch.Tensor, *, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each row of ``updates`` ``[m, d]`` to :math:`\\ell_2` norm at most ``clip_norm``.

    Returns ``(clipped, norms)`` where ``norms`` are the norms before clipping (their distribution
    is what adaptive clipping, Andrew et al. 2021, tracks).
    """
    clip_norm = _positive_finite("clip_norm", clip_norm)
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
    if isinstance(noise_multiplier, bool) or not np.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    expected_clients = _positive_finite("expected_clients", expected_clients)
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
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
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
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    clients_per_round = _positive_finite("clients_per_round", clients_per_round)
    if clients_per_round > n_clients:
        raise ValueError(f"clients_per_round must be in (0, n_clients={n_clients}], "
                         f"got {clients_per_round}")
    return get_noise_multiplier(target_epsilon=target_epsilon, delta=delta,
                                sample_rate=clients_per_round / n_clients, steps=rounds)
