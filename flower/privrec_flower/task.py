"""What the ClientApp and the ServerApp share: the run configuration, the data of one silo, the
server's strategy, and the codecs between privrec's tensors and Flower's records.

Nothing here re-implements training or aggregation: a client calls
:meth:`privrec.federated.engine.FederatedMF.local_training`, the server calls the
:mod:`privrec.federated.strategies` / :class:`privrec.federated.dpfedavg.DPFedAvg` objects
the simulator calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import PUBLIC_GLOBAL_MEAN, FederatedMF
from privrec.federated.partitions import Partition, iid_partition
from privrec.federated.strategies import FedAvg, FedAvgM
from privrec.federated.updates import ClientUpdates, RowUpdates
from privrec.recsys.data import load_movielens100k, random_split
from privrec.recsys.models import BiasedMF

#: The app's defaults (the same keys as ``[tool.flwr.app.config]`` in ``flower/pyproject.toml``;
#: ``tests/test_flower_deploy.py`` checks that both agree).
DEFAULTS: dict[str, object] = {
    "num-server-rounds": 3, "num-partitions": 3, "n-users": 943, "n-items": 1682,
    "strategy": "fedavgm", "server-lr": 1.0, "server-momentum": 0.5,
    "dp": False, "sample-rate": 0.8, "clip-norm": 0.5, "noise-multiplier": 1.0,
    "dim": 8, "local-epochs": 1, "local-lr": 0.5, "seed": 0, "test-fraction": 0.2,
    "evaluate": True, "round-timeout": 30.0, "poll-interval": 0.05, "nodes-timeout": 120.0,
    "out-dir": "", "gate-dir": "",
}


@dataclass(frozen=True)
class RunConfig:
    """The run configuration (Flower's ``context.run_config``) as typed fields."""

    values: dict

    def __getitem__(self, key: str):
        return self.values[key]

    @classmethod
    def of(cls, run_config=None, **overrides) -> RunConfig:
        """Defaults, then Flower's run config, then keyword overrides (``under_scores`` ok)."""
        values = dict(DEFAULTS)
        values.update(dict(run_config or {}))
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        unknown = sorted(set(values) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown run-config keys {unknown}; allowed: {sorted(DEFAULTS)}")
        return cls(values)

    def model_kwargs(self) -> dict:
        """The :class:`~privrec.federated.engine.FederatedMF` hyperparameters of this run."""
        return {"dim": int(self["dim"]), "local_epochs": int(self["local-epochs"]),
                "local_lr": float(self["local-lr"]), "seed": int(self["seed"])}


def load_split(cfg: RunConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ML-100K (from the recbole wheel, offline), split by :func:`privrec.recsys.data.random_split`."""
    ml = load_movielens100k()
    if (ml.n_users, ml.n_items) != (int(cfg["n-users"]), int(cfg["n-items"])):
        raise ValueError(f"the data has {ml.n_users} users and {ml.n_items} items, the run config "
                         f"says n-users={cfg['n-users']}, n-items={cfg['n-items']}")
    return random_split(ml.ratings, test_fraction=float(cfg["test-fraction"]),
                        seed=int(cfg["seed"]))


def partition_of(cfg: RunConfig) -> Partition:
    """The seeded IID partition of the users into ``num-partitions`` silos."""
    return iid_partition(int(cfg["n-users"]), int(cfg["num-partitions"]), seed=int(cfg["seed"]))


def silo_data(cfg: RunConfig, silo: int) -> tuple[FederatedMF, pd.DataFrame]:
    """What SuperNode ``silo`` holds: a FederatedMF over its own users' ratings, its test ratings.

    The other silos' ratings are dropped before the model is built, so they never exist in this
    process.
    """
    train, test = load_split(cfg)
    part = partition_of(cfg)
    mine = part.client_of_user == silo
    train = train[mine[train["user"].to_numpy()]].reset_index(drop=True)
    test = test[mine[test["user"].to_numpy()]].reset_index(drop=True)
    model = FederatedMF(train, n_users=int(cfg["n-users"]), n_items=int(cfg["n-items"]),
                        partition=part, **cfg.model_kwargs())
    return model, test


def full_model(cfg: RunConfig) -> tuple[FederatedMF, pd.DataFrame]:
    """The simulator's model: every silo's ratings in one :class:`FederatedMF` (way (a))."""
    train, test = load_split(cfg)
    return FederatedMF(train, n_users=int(cfg["n-users"]), n_items=int(cfg["n-items"]),
                       partition=partition_of(cfg), **cfg.model_kwargs()), test


def initial_shared(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The server's initial model: seeded noise and the public global mean (no data), built as
    :class:`~privrec.federated.engine.FederatedMF` builds it."""
    init = BiasedMF(int(cfg["n-users"]), int(cfg["n-items"]), int(cfg["dim"]),
                    global_mean=PUBLIC_GLOBAL_MEAN, init_std=0.1, seed=int(cfg["seed"]))
    return {name: getattr(init, name).detach().clone() for name in BiasedMF.shared_parameter_names}


def make_strategy(cfg: RunConfig, *, n_clients: int, unit: str = "silo"):
    """The server strategy of the run: privrec's FedAvg/FedAvgM, wrapped in DPFedAvg if ``dp``."""
    name = str(cfg["strategy"])
    if name == "fedavg":
        inner = FedAvg(server_lr=float(cfg["server-lr"]), seed=int(cfg["seed"]))
    elif name == "fedavgm":
        inner = FedAvgM(server_lr=float(cfg["server-lr"]),
                        server_momentum=float(cfg["server-momentum"]), seed=int(cfg["seed"]))
    else:
        raise ValueError(f"strategy must be 'fedavg' or 'fedavgm', got {name!r}")
    if not bool(cfg["dp"]):
        return inner
    return DPFedAvg(inner, n_clients=n_clients, sample_rate=float(cfg["sample-rate"]),
                    clip_norm=float(cfg["clip-norm"]),
                    noise_multiplier=float(cfg["noise-multiplier"]), unit=unit,
                    seed=int(cfg["seed"]))


# -- codecs -----------------------------------------------------------------------------------

def encode_state(shared: dict[str, torch.Tensor]) -> ArrayRecord:
    """The broadcast: every shared tensor as a Flower ``Array``."""
    return ArrayRecord({k: Array(v.detach().numpy()) for k, v in shared.items()})


def decode_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_state`."""
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def encode_update(up: ClientUpdates) -> RecordDict:
    """One client's sparse upload: changed rows, their int32 indices (one index array per group
    of tables that share it, as privrec's byte count assumes), per-row example counts, dense
    parts and the client's example count."""
    if len(up) != 1:
        raise ValueError(f"a ClientApp uploads exactly one client's update, got {len(up)}")
    arrays, layout, index_of = {}, {}, {}
    for name, part in up.rows.items():
        if id(part.row) not in index_of:
            key = f"index{len(index_of)}"
            index_of[id(part.row)] = key
            arrays[key] = Array(part.row.numpy().astype(np.int32))
            arrays[key + "/examples"] = Array(part.examples.numpy().astype(np.float32))
        layout[name] = index_of[id(part.row)]
        arrays["rows/" + name] = Array(part.values.numpy())
    for name, value in up.dense.items():
        arrays["dense/" + name] = Array(value.numpy())
    arrays["examples"] = Array(up.examples.numpy().astype(np.float32))
    return RecordDict({"update": ArrayRecord(arrays), "layout": ConfigRecord(layout)})


def decode_update(content: RecordDict, client: int) -> ClientUpdates:
    """Inverse of :func:`encode_update` for client ``client`` (row tables keep sharing indices)."""
    arrays = {k: torch.from_numpy(np.array(a.numpy())) for k, a in content["update"].items()}
    index = {}
    rows = {}
    for name, key in content["layout"].items():
        if key not in index:
            row = arrays[key].long()
            index[key] = (torch.zeros(len(row), dtype=torch.long), row,
                          arrays[key + "/examples"])
        pos, row, examples = index[key]
        rows[name] = RowUpdates(pos, row, arrays["rows/" + name], examples)
    dense = {k[len("dense/"):]: v for k, v in arrays.items() if k.startswith("dense/")}
    return ClientUpdates(torch.tensor([client]), arrays["examples"], rows, dense)


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's arrays (Flower's ``ArrayRecord.count_bytes``)."""
    return sum(r.count_bytes() for r in content.values() if isinstance(r, ArrayRecord))
