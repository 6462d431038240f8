"""Chapter 5's experiments on what central DP does not hide: the uploads a DP-FedAvg server reads,
secure aggregation (and a server that fills a cohort with Sybil clients), distributed DP and the
ways its noise falls short of the plan.

Central DP-FedAvg protects the *released model*; its server receives every update in the clear.
:func:`private_round` runs one round of the tuned DP-FedAvg keeping the uploads, and the other
functions point chapter 4's attacks at what the server receives: the raw uploads, uploads clipped
on the device, uploads masked by secure aggregation
(:class:`~privrec.federated.secagg.SecureAggregationRound`, a teaching simulation), and a "sum"
over a cohort whose other members the server invented.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy.stats import binom

from ...attacks.update_inversion import score_ratings
from ...core.checks import int_in
from ...dp.ledger import PrivacyLedger
from ...dp.primitives import clip_factors
from ...federated.dpfedavg import DPFedAvg, round_events
from ...federated.engine import FederatedMF, FederatedSimulator
from ...federated.secagg import SecureAggregationRound, distributed_gaussian_noise
from ...federated.strategies import FedAvg
from ...federated.updates import ClientUpdates
from .federated import attack_last_round
from .user_level import Setup, noise_multiplier

__all__ = ["heaviest_user", "private_round", "upload_attacks", "dense_uploads", "flagged_items",
           "secure_aggregation", "sybil_cohort", "distributed_noise", "shortfall", "upload_text",
           "shortfall_text"]


def heaviest_user(train: pd.DataFrame, *, n_users: int) -> str:
    """FedAvg's example weight of the heaviest user against the median user's and the uniform
    weight DP-FedAvg uses."""
    per_user = train.groupby("user").size()
    heavy, typical = int(per_user.max()), float(per_user.median())
    return (f"heaviest user: {heavy} training ratings; median user: {typical:.0f}\n"
            f"FedAvg weight of the heaviest user: {heavy / len(train):.4f} = "
            f"{heavy / typical:.1f} x the median user's\nuniform weight: {1 / n_users:.4f} "
            f"for everyone")


def private_round(setup: Setup, search, *, epsilon: float = 8.0) -> tuple[FederatedSimulator,
                                                                           DPFedAvg]:
    """One round of DP-FedAvg with the searched settings at ``epsilon`` (every user, T for
    ``epsilon``); the simulator keeps what the server received (``last_updates``)."""
    tuned, rounds = search.tuned, search.rounds_for[epsilon]
    model = FederatedMF(setup.train, n_users=setup.n_users, n_items=setup.n_items,
                        dim=tuned["dim"])
    sigma = noise_multiplier(epsilon, sample_rate=1.0, rounds=rounds, n_units=setup.n_users)
    dp = DPFedAvg(FedAvg(server_lr=tuned["server_lr"]), n_clients=setup.n_users,
                  sample_rate=1.0, clip_norm=tuned["clip_norm"], noise_multiplier=sigma)
    sim = FederatedSimulator(model, dp, keep_updates=True)
    sim.round()
    return sim, dp


def device_clipped(sim: FederatedSimulator, dp: DPFedAvg) -> ClientUpdates:
    """The last round's uploads as the devices would send them if they clipped first."""
    received = sim.last_updates
    return received.scaled(clip_factors(received.norms(), clip_norm=dp.clip_norm))


def upload_attacks(setup: Setup, sim: FederatedSimulator, dp: DPFedAvg) -> pd.DataFrame:
    """Chapter 4's attacks (:func:`~privrec.course.experiments.federated.attack_last_round`) on
    the uploads the server received and on device-clipped ones: item-set precision and recall,
    rating RMSE, mean per-user correlation with the truth."""
    truth = setup.train.rename(columns={"user": "client", "rating": "true"})
    rows = {}
    for label, upload in (("received", None), ("device-clipped", device_clipped(sim, dp))):
        found, guess = attack_last_round(setup, sim, upload)
        joined = guess.merge(truth, on=["client", "item"])
        corr = joined.groupby("client")[["rating", "true"]].corr().xs("rating", level=1)["true"]
        rows[label] = {"precision": found["precision"], "recall": found["recall"],
                       "rating RMSE": score_ratings(guess, setup.train)["rmse"],
                       "correlation": float(corr.mean())}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("upload")


def upload_text(setup: Setup, sim: FederatedSimulator, dp: DPFedAvg) -> str:
    """:func:`upload_attacks` as printed, with the round's median pre-clipping norm and σ."""
    return (upload_attacks(setup, sim, dp).to_string(float_format="{:.3f}".format)
            + f"\nmedian pre-clipping norm {float(dp.last_norms.median()):.2f} (C = "
              f"{dp.clip_norm:g}); noise multiplier {dp.noise_multiplier:.2f}")


def dense_uploads(upload: ClientUpdates, shapes: dict[str, torch.Size]) -> torch.Tensor:
    """``[m, size]``: each client's change of every shared coordinate (zero where untouched)."""
    parts = []
    for name, shape in shapes.items():
        if name in upload.rows:
            part, table = upload.rows[name], torch.zeros(len(upload), *shape)
            table[part.client_pos, part.row] = part.values
            parts.append(table.reshape(len(upload), -1))
        else:
            parts.append(upload.dense[name].reshape(len(upload), -1))
    return torch.cat(parts, 1)


def flagged_items(vector: torch.Tensor, *, n_items: int, dim: int) -> set[int]:
    """Chapter 4's item-set attack on one dense vector (item factors, then item biases): the
    items whose rows are non-zero."""
    rows = torch.cat([vector[:n_items * dim].view(n_items, dim),
                      vector[n_items * dim:n_items * (dim + 1)].view(n_items, 1)], 1)
    return set(np.flatnonzero(rows.abs().sum(1).numpy() > 0).tolist())


def _cohort(sim: FederatedSimulator, dp: DPFedAvg, cohort: int) -> tuple[torch.Tensor, list[int]]:
    shapes = {name: value.shape for name, value in sim.shared.items()}
    dense = dense_uploads(device_clipped(sim, dp), shapes)[:int_in("cohort", cohort, 2)]
    return dense, sim.last_updates.clients[:cohort].tolist()


def secure_aggregation(setup: Setup, sim: FederatedSimulator, dp: DPFedAvg, *,
                       cohort: int = 20, dropouts: int = 3) -> str:
    """The item-set attack on the first client's plain and masked upload; the error of the
    masked sum, also when ``dropouts`` clients drop out after the masks were fixed."""
    dense, clients = _cohort(sim, dp, cohort)
    dim = sim.model.dim
    secure = SecureAggregationRound(client_ids=tuple(clients), size=dense.shape[1], round_seed=1)
    masked = {c: secure.masked_upload(c, dense[k]) for k, c in enumerate(clients)}
    rated = set(setup.train.loc[setup.train["user"] == clients[0], "item"].tolist())
    lines = [f"client {clients[0]} rated {len(rated)} training movies"]
    for label, vector in (("plain upload", dense[0]), ("masked upload", masked[clients[0]])):
        hits = flagged_items(vector.double(), n_items=setup.n_items, dim=dim)
        lines.append(f"  {label}: {len(hits):4d} rows flagged, precision "
                     f"{len(hits & rated) / max(len(hits), 1):.3f}")
    error = (secure.aggregate(masked) - dense.sum(0).double()).abs().max()
    survivors = {c: u for c, u in masked.items() if c not in clients[:dropouts]}
    lost = (secure.aggregate(survivors) - dense[dropouts:].sum(0).double()).abs().max()
    return "\n".join(lines + [
        f"max |masked sum - true sum| = {error:.1e} (fixed-point step 2^-16 = {2**-16:.1e})",
        f"{dropouts} clients drop out: max error of the recovered sum = {lost:.1e}"])


def sybil_cohort(setup: Setup, sim: FederatedSimulator, dp: DPFedAvg, *,
                 cohort: int = 20) -> str:
    """A server that fills a cohort of ``cohort`` with one real client and Sybil clients it runs
    itself (uploading zeros): the masked sum is the real client's update, and the item-set
    attack reads it as if there were no masking."""
    dense, clients = _cohort(sim, dp, 2)
    victim, sybils = clients[0], tuple(range(setup.n_users, setup.n_users + cohort - 1))
    secure = SecureAggregationRound(client_ids=(victim, *sybils), size=dense.shape[1],
                                    round_seed=2)
    uploads = {victim: secure.masked_upload(victim, dense[0])} | {
        s: secure.masked_upload(s, torch.zeros(dense.shape[1])) for s in sybils}
    total = secure.aggregate(uploads)
    hits = flagged_items(total, n_items=setup.n_items, dim=sim.model.dim)
    rated = set(setup.train.loc[setup.train["user"] == victim, "item"].tolist())
    return (f"cohort of {cohort}: client {victim} and {cohort - 1} Sybils; the masked sum "
            f"flags {len(hits)} rows,\n  precision {len(hits & rated) / max(len(hits), 1):.3f}"
            f", recall {len(hits & rated) / len(rated):.3f} for the real client's items")


def distributed_noise(sim: FederatedSimulator, dp: DPFedAvg, *, cohort: int = 20) -> str:
    """Each of ``cohort`` clients adds N(0, σ²C²/cohort) before masking: the noise in the sum."""
    dense, clients = _cohort(sim, dp, cohort)
    sigma_c = dp.noise_multiplier * dp.clip_norm
    shares = distributed_gaussian_noise(cohort, dense.shape[1], total_std=sigma_c,
                                        generator=torch.Generator().manual_seed(0))
    secure = SecureAggregationRound(client_ids=tuple(clients), size=dense.shape[1], round_seed=1)
    noisy = {c: secure.masked_upload(c, dense[k] + shares[k].float())
             for k, c in enumerate(clients)}
    in_sum = secure.aggregate(noisy) - dense.sum(0).double()
    return (f"each client's share: std {shares.std():.3f}; noise in the sum: std "
            f"{in_sum.std():.3f}\n(target sigma*C = {sigma_c:.3f})")


def shortfall(*, n_users: int, rounds: int, epsilon: float = 8.0,
              clients: int = 100) -> tuple[float, pd.DataFrame]:
    """Distributed DP planned for ``clients`` expected clients a round: the planned σ, and for a
    small realised cohort, 10% dropouts and half the cohort colluding, the noise multiplier that
    is really left and the user-level ε if every round carried only that."""
    q = clients / n_users
    planned = noise_multiplier(epsilon, sample_rate=q, rounds=rounds, n_units=n_users)
    low = int(binom.ppf(0.05, n_users, q))
    rows = {}
    for label, left in ((f"as planned: |S| = m = {clients}", 1.0),
                        (f"|S| = {low} (P = {binom.cdf(low, n_users, q):.3f})", low / clients),
                        ("10% drop out after sampling", 0.9),
                        ("half the cohort colludes", 0.5)):
        book = PrivacyLedger(unit="user", n_units=n_users)
        sigma = planned * math.sqrt(left)
        book.extend(round_events(sigma, sample_rate=q, rounds=rounds))
        rows[label] = {"noise multiplier": sigma, "user-level ε": book.epsilon()}
    return planned, pd.DataFrame.from_dict(rows, orient="index").rename_axis("scenario")


def shortfall_text(*, n_users: int, rounds: int, epsilon: float = 8.0, clients: int = 100) -> str:
    """:func:`shortfall` as printed: the plan, then the noise left and its ε per scenario."""
    planned, table = shortfall(n_users=n_users, rounds=rounds, epsilon=epsilon, clients=clients)
    return (f"distributed DP, m = {clients} of N = {n_users}, T = {rounds} rounds, planned sigma "
            f"= {planned:.3f};\nuser-level epsilon if every round carried only the noise that is "
            "left:\n" + table.to_string(float_format="{:.3f}".format))
