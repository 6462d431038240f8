"""The same FedAvg round in Flower's simulation engine (benchmark-only; needs ``flwr[simulation]``).

Each of the 943 users is a Flower ``NumPyClient`` that receives the shared model
``[Q, b_I, mu]``, solves its user row in closed form, takes ``local_epochs`` steps on the rows it
rated (the arithmetic of :class:`privrec.federated.FederatedMF`) and returns its full model with
its example count. Flower's ``FedAvg`` averages the full models weighted by example counts, which
equals ``FederatedMF(strategy=FedAvg(weighting="per_client"))``; the benchmark checks that.
Run it from ``.venv-bench`` (see ``requirements.txt`` here); the book's environment never imports
it.
"""

from __future__ import annotations

import logging
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

from privrec.federated import FedAvg, FederatedMF, solve_user_ridge


class _CapturingFedAvg(FlowerFedAvg):
    """Flower's FedAvg that keeps the last aggregated model, to compare with privrec's."""

    last: list[np.ndarray] | None = None

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.last = parameters_to_ndarrays(parameters)
        return parameters, metrics


def _run(train: pd.DataFrame, *, n_users: int, n_items: int, dim: int, local_epochs: int,
         rounds: int) -> tuple[float, list[np.ndarray], FederatedMF]:
    reference = FederatedMF(train, n_users=n_users, n_items=n_items, dim=dim,
                            local_epochs=local_epochs, strategy=FedAvg(weighting="per_client"))
    lr, reg, bias_reg = reference.local_lr, reference.reg, reference.bias_reg
    initial = [reference.server[k].numpy().copy()
               for k in ("item_factors", "item_bias", "global_bias")]
    grouped = {u: (torch.as_tensor(g["item"].to_numpy()), torch.as_tensor(g["rating"].to_numpy()))
               for u, g in train.groupby("user")}

    class MFClient(NumPyClient):
        def __init__(self, user: int) -> None:
            self.items, self.ratings = grouped[user]

        def fit(self, parameters, config):
            q, b, mu = (torch.as_tensor(p) for p in parameters)
            items, ratings = self.items, self.ratings
            w = solve_user_ridge(torch.zeros(len(items), dtype=torch.long), items, ratings,
                                 n_rows=1, item_factors=q, item_bias=b, global_bias=mu,
                                 reg=reg, bias_reg=bias_reg)[0]
            p, bu = w[:-1], w[-1]
            q_rows, b_rows, m = q[items].clone(), b[items].clone(), mu.clone()
            for _ in range(local_epochs):
                err = ratings - (m + bu + b_rows + q_rows @ p)
                q_rows = q_rows - lr * (-2.0 * err[:, None] * p + 2.0 * reg * q_rows)
                b_rows = b_rows - lr * (-2.0 * err + 2.0 * bias_reg * b_rows)
                m = m - lr * (-2.0 * err.mean())
            q_new, b_new = q.clone(), b.clone()
            q_new[items], b_new[items] = q_rows, b_rows
            return [q_new.numpy(), b_new.numpy(), m.numpy()], len(items), {}

    def client_fn(context: Context):
        return MFClient(int(context.node_config["partition-id"])).to_client()

    strategy = _CapturingFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n_users,
                                min_available_clients=n_users, min_evaluate_clients=0,
                                initial_parameters=ndarrays_to_parameters(initial))
    start = time.perf_counter()
    start_simulation(client_fn=client_fn, num_clients=n_users,
                     config=ServerConfig(num_rounds=rounds), strategy=strategy,
                     client_resources={"num_cpus": 1, "num_gpus": 0.0},
                     ray_init_args={"include_dashboard": False, "log_to_driver": False,
                                    "logging_level": logging.ERROR})
    seconds = time.perf_counter() - start
    return seconds, strategy.last, reference


def time_flower_round(train: pd.DataFrame, *, n_users: int, n_items: int, dim: int,
                      local_epochs: int) -> float:
    """Seconds per FedAvg round in Flower's simulation: (time for 2 rounds) - (time for 1).

    Also checks that Flower's model after one round equals privrec's per-client-weighted FedAvg.
    """
    warnings.filterwarnings("ignore")
    logging.getLogger("flwr").setLevel(logging.ERROR)
    t1, model, reference = _run(train, n_users=n_users, n_items=n_items, dim=dim,
                                local_epochs=local_epochs, rounds=1)
    reference.round()
    gap = max(float(np.abs(a - reference.server[k].numpy()).max())
              for a, k in zip(model, ("item_factors", "item_bias", "global_bias"), strict=True))
    t2, _, _ = _run(train, n_users=n_users, n_items=n_items, dim=dim, local_epochs=local_epochs,
                    rounds=2)
    print(f"  Flower: 1 round incl. start-up {t1:.1f} s, 2 rounds {t2:.1f} s; model after one round "
          f"matches privrec (weighting='per_client') to {gap:.1e}")
    return max(t2 - t1, 1e-9)
