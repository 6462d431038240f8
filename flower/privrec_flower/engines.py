"""One algorithm, three engines: (a) privrec's simulator (here), (b) Flower's Simulation Engine and
(c) Flower's Deployment Engine (both started by ``flower/deploy.py``); and the comparison of their
models.

(a) is the reference. The Flower runs use the same seeds, partition and strategy objects, and feed
the clients' updates to the strategy in silo order, so their models agree with (a) to float
rounding. When silos drop out (a killed SuperNode), the reference is (a) with each round's cohort
restricted to the silos that answered; the DP noise stream and the ledger are then the simulator's
own. Every engine runs the one round function :func:`privrec.federated.engine.federated_round`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from privrec.federated.engine import FederatedSimulator, federated_round
from privrec_flower.task import RunConfig, full_model, make_strategy


def _restricted(model, keep: list[int]):
    """``train_cohort`` of the simulator with the cohort cut to the silos in ``keep``."""
    def train_cohort(broadcast, clients):
        chosen = clients[torch.isin(clients, torch.as_tensor(keep, dtype=torch.long))]
        if len(chosen):
            yield model.local_training(broadcast, chosen)
    return train_cohort


def simulate(cfg: RunConfig, *, realised: list[list[int]] | None = None) -> tuple[dict, dict]:
    """Way (a): privrec's :class:`~privrec.federated.engine.FederatedSimulator`, round by round.

    With ``realised`` (the silos that answered in each round of a Flower run), round ``r`` is the
    same :func:`~privrec.federated.engine.federated_round` with the cohort cut to
    ``realised[r - 1]``: same sampling and noise draws, same ledger.
    """
    model, test = full_model(cfg)
    strategy = make_strategy(cfg, n_clients=model.n_clients, unit=model.privacy_unit)
    sim = FederatedSimulator(model, strategy)
    rounds = []
    for r in range(1, int(cfg["num-server-rounds"]) + 1):
        start = time.perf_counter()
        record = sim.round() if realised is None else federated_round(
            sim.shared, strategy, n_clients=model.n_clients, upload=model.upload,
            train_cohort=_restricted(model, realised[r - 1]), round_number=r)
        rounds.append({"round": r, "sampled": record.clients.tolist(), "bytes_up": record.bytes_up,
                       "bytes_down": record.bytes_down, "seconds": time.perf_counter() - start,
                       "epsilon": sim.ledger.epsilon() if sim.ledger is not None else math.inf})
    rmse = model.evaluate(sim.shared, test)["rmse"] if cfg["evaluate"] and not cfg.lora else None
    ledger = sim.ledger
    return ({"rounds": rounds, "test_rmse": rmse, "strategy": repr(strategy),
             "epsilon": ledger.epsilon() if ledger is not None else math.inf,
             "ledger": ledger.summary() if ledger is not None else "no privacy (epsilon = inf)"},
            {k: v.clone() for k, v in sim.shared.items()})


def load_shared(path) -> dict[str, torch.Tensor]:
    """The final model a ServerApp wrote (``shared.npz``)."""
    with np.load(path) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


def max_abs_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over every shared parameter (the same keys in both)."""
    if sorted(a) != sorted(b):
        raise ValueError(f"different parameters: {sorted(a)} vs {sorted(b)}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def median_round_seconds(rounds: list[dict]) -> float:
    """Median seconds of rounds 2.. (round 1 also pays for start-up)."""
    later = [r["seconds"] for r in rounds[1:]] or [r["seconds"] for r in rounds]
    return float(np.median(later))
