"""Secure aggregation by pairwise additive masking (Bonawitz et al. 2017), simulated for teaching.

Every pair of clients :math:`(i, j)` in a round shares a seed :math:`s_{ij}`. Client :math:`i`
uploads its update, quantised to integers modulo :math:`2^{32}`, plus the mask

.. math:: m_i = \\sum_{j > i} \\mathrm{PRG}(s_{ij}) - \\sum_{j < i} \\mathrm{PRG}(s_{ij}) \\pmod{2^{32}},

so each upload on its own is uniformly distributed, while in the sum over all clients every
:math:`\\mathrm{PRG}(s_{ij})` appears once with each sign and cancels exactly. If client :math:`j`
drops out after the masks were fixed, the survivors reveal their seeds :math:`s_{ij}` with
:math:`j` and the server removes those masks (in the real protocol through Shamir secret shares
of the seeds, which also survive survivors' dropping; the double masking that stops a server
from unmasking a client by falsely declaring it dropped is omitted here).

What is simulated, and so must not be mistaken for a secure implementation:

* the key agreement: seeds come from a hash of the round seed and the pair's ids, not from a
  Diffie-Hellman exchange, so anyone who knows the round seed can unmask;
* the PRG is torch's Mersenne Twister, not a cryptographic generator;
* no secret sharing, signatures or authenticated channels.

The arithmetic, the exact cancellation, the dropout recovery and the cost (each client generates
one mask per neighbour, :math:`O(k\\,d)` work for :math:`k` neighbours) are real. With
``neighbours=k`` each client pairs with :math:`k` others on a ring rather than with everybody, the
cheaper variant of Bell et al. (2020).

:func:`distributed_gaussian_noise` adds *distributed DP*: each of :math:`m` clients adds
:math:`\\mathcal N(0, \\sigma^2/m)` to its update before masking, so the server only ever sees a
sum carrying :math:`\\mathcal N(0,\\sigma^2)` noise. Secure aggregation itself adds no noise; it
hides the individual uploads, which central DP (:class:`privrec.federated.dpfedavg.DPFedAvg`, whose server
sees every clipped update in plaintext) does not. Caveats a deployment must handle:

* **Cohort size.** The shares are sized for :math:`m` clients. Under Poisson sampling the realised
  cohort is random; a cohort smaller than :math:`m` sums to *less* than the planned noise, and
  every dropout lowers it further (deployments over-provision the shares for the expected
  dropout rate). Central DP-FedAvg adds its noise once on the server, so there the noise
  is fixed whatever the cohort.
* **Discrete noise.** Real distributed DP uses discrete noise (the distributed discrete Gaussian
  of Kairouz et al. 2021): adding continuous noise, rounding to fixed point and summing modulo
  :math:`2^{32}` (with possible wrap-around) is not the mechanism the Gaussian analysis covers.
  This module quantises after adding continuous noise and only demonstrates the arithmetic.
* **Double masking.** Bonawitz et al. add a second, self mask per client so that a server that
  falsely declares a live client dropped (and asks for its pairwise seeds) still cannot unmask its
  update; it is omitted here.
* **Collusion.** Clients who collude with the server can subtract their own noise shares from the
  sum, leaving only the honest clients' share of the noise: :math:`t` colluders reduce the variance
  to :math:`\\sigma^2 (m-t)/m`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import id_array, instance, int_in, non_negative, positive
from ..dp.primitives import gaussian_noise

__all__ = [
    "MODULUS",
    "SecureAggregationRound",
    "quantise",
    "dequantise",
    "distributed_gaussian_noise",
]

#: Arithmetic is modulo 2**32, as in Bonawitz et al.'s implementation.
MODULUS = 2**32



def quantise(values: torch.Tensor, *, scale: float = 2.0**16) -> torch.Tensor:
    """Fixed-point encode floats into ``[0, 2**32)`` (int64 holding uint32 values).

    ``scale`` trades precision (``1/scale``) against range: the *sum* over clients must stay within
    ``±2**31 / scale`` or it wraps around.
    """
    scale = positive("scale", scale)
    if not torch.is_tensor(values) or not values.dtype.is_floating_point:
        raise TypeError("values must be a floating-point tensor")
    if not torch.isfinite(values).all():
        raise ValueError("values contains NaN or infinite entries")
    fixed = torch.round(values.double() * scale).long()
    if fixed.abs().max() >= MODULUS // 2:
        raise ValueError(f"values exceed the representable range ±{MODULUS // 2 / scale:g} at "
                         f"scale={scale:g}; lower the scale")
    return fixed % MODULUS


def dequantise(encoded: torch.Tensor, *, scale: float = 2.0**16) -> torch.Tensor:
    """Inverse of :func:`quantise` for a (sum of) encoded values, as float64."""
    scale = positive("scale", scale)
    if not isinstance(encoded, torch.Tensor) or encoded.is_floating_point():
        raise TypeError(f"encoded must be an integer tensor (from quantise), got "
                        f"{getattr(encoded, 'dtype', type(encoded).__name__)}")
    signed = torch.where(encoded >= MODULUS // 2, encoded - MODULUS, encoded)
    return signed.double() / scale


def _pair_seed(round_seed: int, i: int, j: int) -> int:
    # Stand-in for the Diffie-Hellman shared secret of clients i and j (symmetric in i, j).
    lo, hi = min(i, j), max(i, j)
    digest = hashlib.sha256(f"{round_seed}:{lo}:{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _prg(seed: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, MODULUS, (size,), generator=gen, dtype=torch.int64)


@dataclass
class SecureAggregationRound:
    """One round of masked aggregation among the clients ``client_ids``.

    Parameters
    ----------
    client_ids:
        Distinct ids of the clients that committed to the round (their masks include each other).
    size:
        Length of each client's (flattened) update.
    round_seed:
        Seeds the simulated key agreement.
    neighbours:
        ``None``: every pair of clients shares a mask (the original protocol). An even ``k``:
        each client shares masks with the ``k/2`` next and ``k/2`` previous clients on a ring.
    scale:
        Fixed-point scale of :func:`quantise`.
    """

    client_ids: tuple[int, ...]
    size: int
    round_seed: int = 0
    neighbours: int | None = None
    scale: float = 2.0**16

    def __post_init__(self) -> None:
        ids = tuple(id_array("client_ids", self.client_ids).tolist())
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise ValueError("client_ids must hold at least two distinct ids")
        self.size = int_in("size", self.size, 1)
        if self.neighbours is not None and not (
                isinstance(self.neighbours, (int, np.integer)) and self.neighbours >= 2
                and self.neighbours % 2 == 0 and self.neighbours < len(ids)):
            raise ValueError(f"neighbours must be None or an even int in [2, {len(ids) - 1}], "
                             f"got {self.neighbours!r}")
        positive("scale", self.scale)
        self.client_ids = ids
        self._position = {c: k for k, c in enumerate(ids)}

    def peers(self, client: int) -> list[int]:
        """The clients that ``client`` shares a pairwise mask with."""
        k = self._position[client]
        n = len(self.client_ids)
        if self.neighbours is None:
            return [c for c in self.client_ids if c != client]
        half = self.neighbours // 2
        return [self.client_ids[(k + d) % n] for d in range(-half, half + 1) if d != 0]

    def mask(self, client: int) -> torch.Tensor:
        """Client ``client``'s total mask: + PRG for peers after it, - PRG for peers before it."""
        total = torch.zeros(self.size, dtype=torch.int64)
        k = self._position[client]
        for peer in self.peers(client):
            stream = _prg(_pair_seed(self.round_seed, client, peer), self.size)
            total += stream if self._position[peer] > k else -stream
        return total % MODULUS

    def masked_upload(self, client: int, update: torch.Tensor) -> torch.Tensor:
        """What ``client`` sends: its quantised update plus its mask, modulo ``2**32``."""
        if client not in self._position:
            raise ValueError(f"client {client} is not in this round's client_ids")
        update = instance("update", update, torch.Tensor).reshape(-1)
        if update.numel() != self.size:
            raise ValueError(f"update must have {self.size} entries, got {update.numel()}")
        return (quantise(update, scale=self.scale) + self.mask(client)) % MODULUS

    def aggregate(self, uploads: dict[int, torch.Tensor]) -> torch.Tensor:
        """Server side: the float sum of the surviving clients' updates.

        ``uploads`` maps each surviving client to its masked upload; clients of the round that are
        missing dropped out, and the survivors' masks with them are reconstructed from the seeds the
        survivors reveal.
        """
        for client, upload in instance("uploads", uploads, dict).items():
            instance(f"uploads[{client!r}]", upload, torch.Tensor)
        unknown = set(uploads) - set(self.client_ids)
        if unknown:
            raise ValueError(f"uploads from clients outside the round: {sorted(unknown)}")
        if not uploads:
            raise ValueError("uploads must not be empty")
        total = torch.zeros(self.size, dtype=torch.int64)
        for upload in uploads.values():
            total = (total + upload) % MODULUS
        dropped = [c for c in self.client_ids if c not in uploads]
        for gone in dropped:
            for survivor in self.peers(gone):
                if survivor not in uploads:
                    continue
                # The survivor's mask contains +-PRG(s_{survivor,gone}); remove it.
                stream = _prg(_pair_seed(self.round_seed, survivor, gone), self.size)
                sign = 1 if self._position[gone] > self._position[survivor] else -1
                total = (total - sign * stream) % MODULUS
        return dequantise(total, scale=self.scale)


def distributed_gaussian_noise(n_clients: int, size: int, *, total_std: float,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise shares ``[n_clients, size]``: each row :math:`\\mathcal N(0, \\sigma^2/n)`, so the sum
    over all clients is :math:`\\mathcal N(0, \\sigma^2)` with :math:`\\sigma` = ``total_std``.

    If fewer than ``n_clients`` clients contribute (a small Poisson cohort, dropouts) or some
    collude and subtract their shares, the sum carries less noise than planned: :math:`k` honest
    shares give variance :math:`k\\sigma^2/n`. Deployments over-provision the per-client share for
    the expected dropout rate.
    """
    n_clients, size = int_in("n_clients", n_clients, 1), int_in("size", size, 1)
    total_std = non_negative("total_std", total_std)
    gen = torch.default_generator if generator is None else generator
    return gaussian_noise((n_clients, size), std=total_std / np.sqrt(n_clients), generator=gen,
                          dtype=torch.float64)
