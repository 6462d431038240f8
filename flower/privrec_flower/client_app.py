"""The ClientApp: one silo of users. Its ratings and its users' rows never leave this process.

Message types (Flower's Message API):

* ``query``: answer with this SuperNode's ``partition-id`` (the server maps silos to nodes);
* ``train`` (article steps 2-4 on the client): receive the broadcast, run privrec's
  :meth:`~privrec.federated.engine.FederatedMF.local_training` for this silo, reply with the sparse
  change of the shared parameters only; in a SecAgg+ round (``secagg=true``) the reply is the
  update clipped on the client, dense, which Flower's ``secaggplus_mod`` quantises and masks
  (:mod:`privrec_flower.secure`);
* ``train`` with ``model = "lora"``: the message also names this silo's sampled users; they train
  chapter 7's LoRA two-tower (:mod:`privrec_flower.lora`) and the reply holds one change per user;
* ``evaluate``: test squared error of the personalised model on this silo's held-out ratings.

User rows persist between rounds in ``context.state`` (kept by the SuperNode, never sent). Every
reply carries the timestamps of :mod:`privrec_flower.timing` (no statistic of the data in a
SecAgg+ reply: its weight is 1, not the silo's example count).
"""

from __future__ import annotations

import time

_T_IMPORT = time.time()

import torch  # noqa: E402 - timed: the heavy imports of a ClientApp process
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402

from privrec_flower.secure import (  # noqa: E402
    Quantisation,
    broadcast_of,
    clipped_upload,
    is_secagg_train,
    secagg_when_asked,
)
from privrec_flower.task import (  # noqa: E402
    RunConfig,
    decode_state,
    encode_update,
    partition_of,
    silo_data,
    silo_frames,
)
from privrec_flower.timing import process_started  # noqa: E402

_T_IMPORTED = time.time()
_CACHE: dict[tuple, tuple] = {}


def _silo(context: Context, overrides: dict):
    """This node's silo id, its FederatedMF and test ratings (built once per process and run)."""
    torch.set_num_threads(1)
    cfg = RunConfig.of(context.run_config, **overrides)
    silo = int(context.node_config["partition-id"])
    key = (context.run_id, silo)
    if key not in _CACHE:
        _CACHE[key] = (silo, *silo_data(cfg, silo, context.node_config.get("data-file")))
    silo, model, test = _CACHE[key]
    if "user-rows" in context.state:                      # restore the devices' own state
        rows = context.state["user-rows"]
        model.user_factors.copy_(torch.from_numpy(rows["user_factors"].numpy()))
        model.user_bias.copy_(torch.from_numpy(rows["user_bias"].numpy()))
    return cfg, silo, model, test


def _keep_user_rows(context: Context, model) -> None:
    mine = torch.as_tensor(model.partition.client_of_user) == int(
        context.node_config["partition-id"])
    factors, bias = model.user_factors.clone(), model.user_bias.clone()
    factors[~mine], bias[~mine] = 0.0, 0.0                 # only this silo's users' rows
    context.state["user-rows"] = ArrayRecord({"user_factors": factors, "user_bias": bias})


def _stamps(**more: float) -> dict[str, float]:
    return {"t-process": process_started(), "t-import": _T_IMPORT, "t-imported": _T_IMPORTED,
            **more}


def query(msg: Message, context: Context) -> Message:
    """Tell the server which silo this SuperNode holds."""
    silo = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"partition-id": silo})}), reply_to=msg)


def _lora_silo(context: Context, cfg: RunConfig):
    """This node's silo id, its users, their ``FederatedLoRA`` clients (the devices' state
    restored from ``context.state``)."""
    from privrec_flower import lora

    silo = int(context.node_config["partition-id"])
    key = (context.run_id, silo, "lora")
    if key not in _CACHE:
        train, _ = silo_frames(cfg, silo, context.node_config.get("data-file"))
        users = torch.as_tensor((partition_of(cfg).client_of_user == silo).nonzero()[0])
        _CACHE[key] = (silo, users, lora.silo_clients(cfg, silo, lora.public_model(cfg), train))
    silo, users, clients = _CACHE[key]
    if "lora-device" in context.state:
        lora.restore_device(context.state["lora-device"], clients.model, users, clients.generator)
    return silo, users, clients


def _train_lora(msg: Message, context: Context, cfg: RunConfig, t_in: float) -> Message:
    """``train`` for the LoRA model: this silo's sampled users, one change each."""
    from privrec_flower import lora

    silo, users, clients = _lora_silo(context, cfg)
    t_data = time.time()
    shared, cohort = decode_state(msg.content["shared"]), lora.cohort_of(msg.content)
    if not bool(torch.isin(cohort, users).all()):
        raise ValueError(f"the server sent users that silo {silo} does not hold")
    t_decoded = time.time()
    up = clients.local_training(shared, cohort)
    context.state["lora-device"] = lora.device_state(clients.model, users, clients.generator)
    t_trained = time.time()
    content = lora.encode_cohort(up)
    content["metrics"] = MetricRecord({"partition-id": silo, **_stamps(**{
        "t-in": t_in, "t-data": t_data, "t-decoded": t_decoded, "t-trained": t_trained,
        "t-out": time.time()})})
    return Message(content, reply_to=msg)


def train(msg: Message, context: Context, overrides: dict) -> Message:
    """Local training from the broadcast; the reply is this silo's update (see module doc)."""
    t_in = time.time()
    if (cfg := RunConfig.of(context.run_config, **overrides)).lora:
        torch.set_num_threads(1)
        return _train_lora(msg, context, cfg, t_in)
    cfg, silo, model, _ = _silo(context, overrides)
    t_data = time.time()
    secure = is_secagg_train(msg.content)
    shared = broadcast_of(msg.content) if secure else decode_state(msg.content["shared"])
    t_decoded = time.time()
    up = model.local_training(shared, torch.tensor([silo]))
    _keep_user_rows(context, model)
    t_trained = time.time()
    if secure:
        q = Quantisation.of(cfg, sum(v.numel() for v in shared.values()))
        shapes = {k: v.shape for k, v in shared.items()}
        stamps = _stamps(**{"t-in": t_in, "t-data": t_data, "t-decoded": t_decoded,
                            "t-trained": t_trained, "t-out": time.time()})
        content = clipped_upload(up, shapes, q, {"partition-id": silo, **stamps})
        return Message(content, reply_to=msg)
    content = encode_update(up)
    content["metrics"] = MetricRecord({"partition-id": silo, **_stamps(**{
        "t-in": t_in, "t-data": t_data, "t-decoded": t_decoded, "t-trained": t_trained,
        "t-out": time.time()})})
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context, overrides: dict) -> Message:
    """Sum of squared test errors of the released model on this silo (users personalised here)."""
    _, silo, model, test = _silo(context, overrides)
    shared = decode_state(msg.content["shared"])
    rmse = model.evaluate(shared, test)["rmse"] if len(test) else 0.0
    _keep_user_rows(context, model)
    return Message(RecordDict({"metrics": MetricRecord(
        {"partition-id": silo, "sse": float(rmse) ** 2 * len(test), "n": len(test)})}),
        reply_to=msg)


def make_client_app(**overrides) -> ClientApp:
    """A ClientApp; ``overrides`` replace run-config values (for the Simulation Engine, whose
    Python entry point passes no run config)."""
    client = ClientApp(mods=[secagg_when_asked])
    client.query()(query)
    client.train()(lambda msg, context: train(msg, context, overrides))
    client.evaluate()(lambda msg, context: evaluate(msg, context, overrides))
    return client


app = make_client_app()
