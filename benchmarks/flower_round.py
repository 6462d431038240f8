"""The same FedAvg round in Flower's Simulation Engine (benchmark-only; needs ``flwr[simulation]``).

Each user is a Flower ``NumPyClient`` whose ``fit`` runs privrec's own local training for that one
client (``FederatedMF.local_training``: closed-form user solve, ``local_epochs`` steps on its item
rows) and returns the full shared model ``[Q, b_I, mu]`` with its example count, as Flower's
FedAvg expects. Flower's FedAvg (weighted by example counts) then equals privrec's
``FedAvg(weighting="per_client")``; :func:`time_flower_round` checks that. So both sides do the
same arithmetic and the comparison measures orchestration only.

Configured for speed: the legacy ``start_simulation`` entry point (no SuperLink/SuperNode
processes), Ray backend with one actor per core (``client_resources={"num_cpus": 1}``; more
actors than cores only adds contention), no dashboard, no evaluation rounds, logging off, one torch
thread per actor. Seconds per round: the median of rounds 2 and 3, each timed from the server's
``configure_fit`` to the end of ``aggregate_fit`` (Ray's start-up and round 1's actor start-up
are excluded). Run it from ``.venv-bench`` (see ``requirements.txt``).
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch
from flwr.client import NumPyClient
from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.strategy import FedAvg as FlowerFedAvg
from flwr.simulation import start_simulation

from privrec.federated.engine import FederatedMF, FederatedSimulator
from privrec.federated.strategies import FedAvg

SHARED = ("item_factors", "item_bias", "global_bias")


class _TimedFedAvg(FlowerFedAvg):
    """Flower's FedAvg that timestamps each round (from configuring the clients' fit to the end of
    aggregation) and keeps the model after round 1, to compare with privrec's."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.first: list[np.ndarray] | None = None
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        self.started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.seconds[server_round] = time.perf_counter() - self.started[server_round]
        if server_round == 1 and parameters is not None:
            self.first = parameters_to_ndarrays(parameters)
        return parameters, metrics


class MFClient(NumPyClient):
    """One user's device: privrec's local training for client ``cid``, full model back."""

    def __init__(self, model: FederatedMF, cid: int) -> None:
        self.model, self.cid = model, cid

    def fit(self, parameters, config):
        torch.set_num_threads(1)
        shared = {k: torch.as_tensor(p) for k, p in zip(SHARED, parameters, strict=True)}
        up = self.model.local_training(shared, torch.tensor([self.cid]))
        new = {k: v.clone() for k, v in shared.items()}
        for name, part in up.rows.items():
            new[name].index_add_(0, part.row, part.values)
        for name, value in up.dense.items():
            new[name] += value[0]
        return [new[k].numpy() for k in SHARED], int(up.examples[0]), {}


def _run(model: FederatedMF, *, rounds: int, num_cpus: float) -> tuple[float, _TimedFedAvg]:
    initial = [v.numpy() for v in (model.shared_state()[k] for k in SHARED)]

    def client_fn(context: Context):
        return MFClient(model, int(context.node_config["partition-id"])).to_client()

    n = model.n_clients
    strategy = _TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                                min_available_clients=n, min_evaluate_clients=0,
                                initial_parameters=ndarrays_to_parameters(initial))
    start = time.perf_counter()
    start_simulation(client_fn=client_fn, num_clients=n, config=ServerConfig(num_rounds=rounds),
                     strategy=strategy, client_resources={"num_cpus": num_cpus, "num_gpus": 0.0},
                     ray_init_args={"include_dashboard": False, "log_to_driver": False,
                                    "logging_level": logging.ERROR,
                                    "num_cpus": os.cpu_count()})
    return time.perf_counter() - start, strategy


def time_flower_round(train: pd.DataFrame, *, n_users: int, n_items: int, dim: int,
                      local_epochs: int, num_cpus: float = 1.0, rounds: int = 3) -> dict:
    """Seconds per FedAvg round in Flower's simulation: the median of rounds 2.. (round 1 also
    pays for starting the actors), each timed from configure_fit to the end of aggregate_fit.

    Also checks that Flower's model after one round equals privrec's per-client-weighted FedAvg.
    """
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    model = FederatedMF(train, n_users=n_users, n_items=n_items, dim=dim, local_epochs=local_epochs)
    total, strategy = _run(model, rounds=rounds, num_cpus=num_cpus)
    reference = FederatedSimulator(model, FedAvg(weighting="per_client"))
    reference.round()
    gap = max(float(np.abs(a - reference.shared[k].numpy()).max())
              for a, k in zip(strategy.first, SHARED, strict=True))
    later = [strategy.seconds[r] for r in sorted(strategy.seconds) if r > 1]
    return {"rounds": rounds, "total_with_startup_s": round(total, 2),
            "round_s": [round(strategy.seconds[r], 2) for r in sorted(strategy.seconds)],
            "seconds": float(np.median(later)), "max_abs_gap_vs_privrec": gap,
            "client_resources_num_cpus": num_cpus}
