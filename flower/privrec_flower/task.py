"""What the ClientApp and the ServerApp share: the run configuration, the data of one silo, the
server's strategy, and the codecs between privrec's tensors and Flower's records.

Nothing here re-implements training or aggregation: a client calls
:meth:`privrec.federated.engine.FederatedMF.local_training`, the server calls the
:mod:`privrec.federated.strategies` / :class:`privrec.federated.dpfedavg.DPFedAvg` objects
the simulator calls, and both start from :func:`privrec.federated.mf.initial_shared_state`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from privrec.federated.dpfedavg import DPFedAvg
from privrec.federated.engine import FederatedMF
from privrec.federated.mf import initial_shared_state
from privrec.federated.partitions import Partition, iid_partition
from privrec.federated.strategies import FedAvg, FedAvgM
from privrec.federated.updates import ClientUpdates, RowUpdates
from privrec.recsys.data import load_movielens100k, random_split

#: The app's defaults (the same keys as ``[tool.flwr.app.config]`` in ``flower/pyproject.toml``;
#: ``tests/test_flower_deploy.py`` checks that both agree).
DEFAULTS: dict[str, object] = {
    "num-server-rounds": 3, "num-partitions": 3, "n-users": 943, "n-items": 1682,
    "strategy": "fedavgm", "server-lr": 1.0, "server-momentum": 0.5,
    "dp": False, "sample-rate": 0.8, "clip-norm": 0.5, "noise-multiplier": 1.0,
    "dim": 8, "local-epochs": 1, "local-lr": 0.5, "seed": 0, "test-fraction": 0.2,
    "evaluate": True, "round-timeout": 30.0, "poll-interval": 0.05, "nodes-timeout": 120.0,
    "pull-backoff": 0.05, "secagg": False, "secagg-shares": 3, "secagg-threshold": 2,
    "secagg-bits": 22, "model": "mf", "lora-variant": "ffa",
    "out-dir": "", "gate-dir": "",
}

#: ``model``: the book's MF (silo clients) or chapter 7's LoRA two-tower (user clients).
MODELS = ("mf", "lora")


#: The run-config values a silo's data file depends on.
SILO_FILE_KEYS = ("n-users", "n-items", "num-partitions", "seed", "test-fraction")


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
        if values["model"] not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {values['model']!r}")
        return cls(values)

    @property
    def lora(self) -> bool:
        """Whether the run trains chapter 7's LoRA two-tower (every user a client)."""
        return self["model"] == "lora"

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


def silo_split(cfg: RunConfig, silo: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Silo ``silo``'s own train and test ratings (its users' rows of the split)."""
    train, test = load_split(cfg)
    mine = partition_of(cfg).client_of_user == silo
    return (train[mine[train["user"].to_numpy()]].reset_index(drop=True),
            test[mine[test["user"].to_numpy()]].reset_index(drop=True))


def _file_key(cfg: RunConfig) -> str:
    return json.dumps({k: cfg[k] for k in SILO_FILE_KEYS}, sort_keys=True)


def write_silo_files(cfg: RunConfig, folder: Path) -> list[Path]:
    """One ``silo-<k>.npz`` per silo with only that silo's ratings: what each SuperNode's disk
    holds (its path goes into the node's ``--node-config data-file=...``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for silo in range(int(cfg["num-partitions"])):
        parts = dict(zip(("train", "test"), silo_split(cfg, silo), strict=True))
        arrays = {f"{part}/{col}": frame[col].to_numpy() for part, frame in parts.items()
                  for col in frame.columns}
        paths.append(folder / f"silo-{silo}.npz")
        np.savez(paths[-1], key=np.array(_file_key(cfg)), **arrays)
    return paths


def _read_silo_file(cfg: RunConfig, path: str) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The silo's ratings from its file, or ``None`` if the file was made for another config."""
    with np.load(path) as data:
        if str(data["key"]) != _file_key(cfg):
            return None
        frames = {}
        for name in data.files:
            part, _, col = name.partition("/")
            if col:
                frames.setdefault(part, {})[col] = data[name]
    return pd.DataFrame(frames["train"]), pd.DataFrame(frames["test"])


def silo_frames(cfg: RunConfig, silo: int, data_file: str | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Silo ``silo``'s train and test ratings, from ``data_file`` (:func:`write_silo_files`) when
    given and made for this run's seed, split and partition; otherwise cut from ML-100K, the
    other silos' ratings dropped before any model is built, so they never exist in the process."""
    frames = _read_silo_file(cfg, data_file) if data_file else None
    return frames if frames is not None else silo_split(cfg, silo)


def silo_data(cfg: RunConfig, silo: int, data_file: str | None = None
              ) -> tuple[FederatedMF, pd.DataFrame]:
    """What SuperNode ``silo`` holds: a FederatedMF over its own users' ratings, its test ratings
    (:func:`silo_frames`)."""
    train, test = silo_frames(cfg, silo, data_file)
    model = FederatedMF(train, n_users=int(cfg["n-users"]), n_items=int(cfg["n-items"]),
                        partition=partition_of(cfg), **cfg.model_kwargs())
    return model, test


def full_model(cfg: RunConfig) -> tuple[object, pd.DataFrame]:
    """The simulator's model: every silo's ratings in one :class:`FederatedMF` (way (a)); for the
    LoRA model the silos' user clients, :class:`privrec_flower.lora.SiloCohorts`."""
    train, test = load_split(cfg)
    if cfg.lora:
        from privrec_flower.lora import reference

        return reference(cfg, train, partition_of(cfg).client_of_user), test
    return FederatedMF(train, n_users=int(cfg["n-users"]), n_items=int(cfg["n-items"]),
                       partition=partition_of(cfg), **cfg.model_kwargs()), test


def initial_shared(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The server's initial model: :func:`privrec.federated.mf.initial_shared_state` of the run's
    public configuration (the simulator's :class:`FederatedMF` starts from the same function); for
    the LoRA model its seeded initialisation (:func:`privrec_flower.lora.initial_shared`)."""
    if cfg.lora:
        from privrec_flower.lora import initial_shared as lora_initial

        return lora_initial(cfg)
    return initial_shared_state(n_users=int(cfg["n-users"]), n_items=int(cfg["n-items"]),
                                dim=int(cfg["dim"]), seed=int(cfg["seed"]))


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


def population(cfg: RunConfig, n_silos: int) -> tuple[int, str]:
    """``(number of clients, privacy unit)``: the silos for MF, every user for the LoRA model."""
    return (int(cfg["n-users"]), "user") if cfg.lora else (int(n_silos), "silo")


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
    """Payload bytes of a message: every object Flower serialises for it (arrays, records, the
    byte strings of SecAgg+ keys and masked vectors), without HTTP/TLS framing."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
