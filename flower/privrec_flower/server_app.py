"""The ServerApp: privrec's round function driving Flower's Grid (article steps 2, 4, 5, 6).

Each round is :func:`privrec.federated.engine.federated_round` -- the function the simulator's
``FederatedSimulator.round`` calls -- with the strategy the simulator uses. Only step 3, training
the sampled clients (``train_cohort``), is Flower's: the broadcast goes to those silos'
SuperNodes as ``train`` messages and the replies that arrive before ``round-timeout`` come back
decoded in silo order. A silo whose node is gone or silent is absent from the round (the realised
cohort is recorded). With ``secagg=true`` (DP-FedAvg only) the replies are masked: Flower's
SecAgg+ workflow returns only their sum, which the round receives as equal shares
(:mod:`privrec_flower.secure`). For DP-FedAvg the noise on the sum, the fixed denominator
:math:`qN` and the ledger entry do not depend on who answered, so the ledger stays valid for any
realised cohort (a smaller cohort only loses signal). With ``model = "lora"`` the clients are
users (chapter 7's LoRA two-tower, :mod:`privrec_flower.lora`): the strategy samples users, each
SuperNode is sent its sampled users, and each silo's reply is a chunk of per-user updates.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from privrec.federated.engine import federated_round
from privrec.federated.updates import ClientUpdates
from privrec_flower.backoff import set_pull_backoff
from privrec_flower.lora import cohort_record, decode_cohort
from privrec_flower.secure import as_equal_shares, secure_sum
from privrec_flower.task import (
    RunConfig,
    decode_update,
    encode_state,
    initial_shared,
    make_strategy,
    partition_of,
    population,
    record_bytes,
)
from privrec_flower.timing import STAMPS, breakdown
from privrec_flower.transport import exchange


def discover(grid: Grid, cfg: RunConfig) -> dict[int, int]:
    """``{silo: node_id}`` of the connected SuperNodes (asks each its ``partition-id``)."""
    k, deadline = int(cfg["num-partitions"]), time.monotonic() + float(cfg["nodes-timeout"])
    while len(nodes := sorted(grid.get_node_ids())) < k:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of num-partitions={k} SuperNodes connected "
                               f"within nodes-timeout={cfg['nodes-timeout']} s")
        time.sleep(0.2)
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies, _, _ = exchange(grid, asks, timeout=float(cfg["nodes-timeout"]),
                             poll=float(cfg["poll-interval"]))
    silos = {int(m.content["node"]["partition-id"]): m.metadata.src_node_id
             for m in replies if m.has_content()}
    if sorted(silos) != list(range(k)):
        raise RuntimeError(f"expected SuperNodes with partition-id 0..{k - 1}, got {sorted(silos)}")
    return silos


def gate(cfg: RunConfig, tag: str) -> None:
    """Test hook: with ``gate-dir`` set, announce ``at-<tag>`` and wait for ``go-<tag>``."""
    if not cfg["gate-dir"]:
        return
    folder = Path(str(cfg["gate-dir"]))
    (folder / f"at-{tag}").touch()
    deadline = time.monotonic() + float(cfg["nodes-timeout"])
    while not (folder / f"go-{tag}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-{tag} in gate-dir {folder}")
        time.sleep(0.02)


def _plain_cohort(grid, cfg, broadcast, nodes, silo_of, server_round, info, cohorts=None):
    """Step 3 in the clear: ``train`` messages out, decoded sparse updates back (silo order).
    With ``cohorts`` (``{node: sampled users}``, the LoRA model) each message names the node's
    users and each silo's reply is one chunk of per-user updates."""
    extra = (lambda n: {"cohort": cohort_record(cohorts[n])}) if cohorts else (lambda n: {})
    messages = [Message(RecordDict({"shared": encode_state(broadcast),
                                    "config": ConfigRecord({"server-round": server_round}),
                                    **extra(n)}),
                        dst_node_id=n, message_type="train", group_id=str(server_round),
                        ttl=max(float(cfg["round-timeout"]), 10.0)) for n in nodes]
    info["bytes_down"] = sum(record_bytes(m.content) for m in messages)
    info["pushed"] = time.time()
    replies, info["silent"], got_at = exchange(grid, messages, timeout=float(cfg["round-timeout"]),
                                               poll=float(cfg["poll-interval"]))
    good = sorted((silo_of[m.metadata.src_node_id], m) for m in replies if m.has_content())
    info["errors"] = sum(m.has_error() for m in replies)
    info["bytes_up"] = sum(record_bytes(m.content) for _, m in good)
    info["updates_seen"] = (sum(len(cohorts[m.metadata.src_node_id]) for _, m in good)
                            if cohorts else len(good))  # individual updates decoded
    if good:
        last = max((m for _, m in good), key=lambda m: got_at[m.metadata.reply_to_message_id])
        info["last"] = ({k: float(last.content["metrics"][k]) for k in STAMPS},
                        got_at[last.metadata.reply_to_message_id])
        if cohorts:
            info["uploaded"] = sorted(good[0][1].content["update"])   # the names on the wire
            yield from (decode_cohort(m.content) for _, m in good)
        else:
            yield ClientUpdates.concat([decode_update(m.content, silo) for silo, m in good])


def _secure_cohort(grid, context, cfg, broadcast, nodes, silo_of, server_round, info):
    """Step 3 under SecAgg+: the ServerApp receives only the sum of the clipped uploads."""
    info["updates_seen"] = 0                    # only the masked sum reaches the ServerApp
    if len(nodes) < 2:                     # SecAgg+ cannot hide one upload: aggregate none
        info.update(errors=0, silent=0, bytes_down=0, bytes_up=0, stages=[])
        return
    total, realised, stages = secure_sum(
        grid, context, cfg, broadcast, nodes, server_round,
        after_stage=lambda i: gate(cfg, f"keys-{server_round}") if i == 1 else None)
    info.update(stages=stages, errors=0, silent=stages[2]["silent"],
                bytes_down=sum(s["bytes_down"] for s in stages),
                bytes_up=sum(s["bytes_up"] for s in stages))
    yield as_equal_shares(total, sorted(silo_of[n] for n in realised))


def deployed_round(grid: Grid, context: Context, cfg: RunConfig, strategy,
                   shared: dict[str, torch.Tensor], silos: dict[int, int],
                   server_round: int) -> dict:
    """One round through :func:`~privrec.federated.engine.federated_round`; its record."""
    started, info = time.time(), {}
    silo_of = {node: silo for silo, node in silos.items()}

    def train_cohort(broadcast, clients):
        live = set(grid.get_node_ids())
        if cfg.lora:
            cohorts = _users_by_node(cfg, clients, silos, live)
            return _plain_cohort(grid, cfg, broadcast, list(cohorts), silo_of, server_round,
                                 info, cohorts)
        nodes = [silos[int(c)] for c in clients if silos[int(c)] in live]
        if cfg["secagg"]:
            return _secure_cohort(grid, context, cfg, broadcast, nodes, silo_of, server_round,
                                  info)
        return _plain_cohort(grid, cfg, broadcast, nodes, silo_of, server_round, info)

    n_clients, _ = population(cfg, len(silos))
    record = federated_round(shared, strategy, n_clients=n_clients, train_cohort=train_cohort,
                             upload="dense" if cfg["secagg"] else "sparse",
                             round_number=server_round)
    return _round_record(record, info, strategy, server_round, started, time.time())


def _users_by_node(cfg: RunConfig, users, silos: dict[int, int], live: set) -> dict[int, list]:
    """``{node: its sampled users}`` for the live nodes whose silo holds a sampled user."""
    owner, out = partition_of(cfg).client_of_user, {}
    for user in users.tolist():
        node = silos[int(owner[user])]
        if node in live:
            out.setdefault(node, []).append(user)
    return out


def _round_record(record, info: dict, strategy, server_round: int, started: float,
                  ended: float) -> dict:
    """What the deployment adds to privrec's ``RoundRecord``: realised cohort, Flower's bytes,
    seconds, ε so far, and where the seconds went."""
    ledger = getattr(strategy, "ledger", None)
    out = {"round": server_round, "sampled": record.clients.tolist(),
           "realised": sorted(record.realised.tolist()), "errors": info.get("errors", 0),
           "silent": info.get("silent", 0), "bytes_down": info.get("bytes_down", 0),
           "bytes_up": info.get("bytes_up", 0), "privrec_bytes_up": record.bytes_up,
           "updates_seen": info.get("updates_seen", 0), "seconds": ended - started,
           "epsilon": ledger.epsilon() if ledger is not None else math.inf}
    if "last" in info:
        out["breakdown"] = breakdown(started=started, pushed=info["pushed"], stamps=info["last"][0],
                                     got=info["last"][1], ended=ended)
    for key in ("stages", "uploaded"):
        if key in info:
            out[key] = info[key]
    return out


def federated_rmse(grid: Grid, cfg: RunConfig, shared: dict[str, torch.Tensor],
                   silos: dict[int, int]) -> float:
    """Test RMSE of the released model, from each live silo's sum of squared errors."""
    live = set(grid.get_node_ids())
    messages = [Message(RecordDict({"shared": encode_state(shared)}), dst_node_id=n,
                        message_type="evaluate") for n in silos.values() if n in live]
    replies, _, _ = exchange(grid, messages, timeout=float(cfg["round-timeout"]),
                             poll=float(cfg["poll-interval"]))
    metrics = [m.content["metrics"] for m in replies if m.has_content()]
    n = sum(int(m["n"]) for m in metrics)
    return math.sqrt(sum(float(m["sse"]) for m in metrics) / n) if n else math.nan


def run_rounds(grid: Grid, context: Context, cfg: RunConfig, *,
               say=print) -> tuple[dict, dict[str, torch.Tensor]]:
    """The whole run: discover silos, ``num-server-rounds`` rounds, optional evaluation."""
    if cfg["secagg"] and not cfg["dp"]:
        raise ValueError("secagg=true needs dp=true: SecAgg+ carries DP-FedAvg's uniform sum of "
                         "clipped updates (FedAvg's per-row weights would have to be revealed)")
    if cfg["secagg"] and cfg.lora:
        raise ValueError("secagg=true is for model='mf': the LoRA model's clients are users, "
                         "whose updates a silo's SuperNode would have to mask one by one")
    silos = discover(grid, cfg)
    n_clients, unit = population(cfg, len(silos))
    strategy = make_strategy(cfg, n_clients=n_clients, unit=unit)
    shared = initial_shared(cfg)
    rounds, start = [], time.perf_counter()
    for r in range(1, int(cfg["num-server-rounds"]) + 1):
        gate(cfg, f"round-{r}")
        rounds.append(deployed_round(grid, context, cfg, strategy, shared, silos, r))
        say("[round {round}] sampled={sampled} realised={realised} errors={errors} "
            "silent={silent} up={bytes_up} B (privrec count {privrec_bytes_up} B) "
            "down={bytes_down} B {seconds:.3f} s epsilon={epsilon:.3g}".format(**rounds[-1]))
    gate(cfg, f"round-{int(cfg['num-server-rounds']) + 1}")
    ledger = getattr(strategy, "ledger", None)
    result = {"status": "ok", "config": cfg.values, "strategy": repr(strategy), "rounds": rounds,
              "seconds": time.perf_counter() - start,
              "epsilon": ledger.epsilon() if ledger is not None else math.inf,
              "delta": ledger.delta if ledger is not None else None,
              "ledger": ledger.summary() if ledger is not None else "no privacy (epsilon = inf)",
              "test_rmse": (federated_rmse(grid, cfg, shared, silos)
                            if cfg["evaluate"] and not cfg.lora else None)}
    say(result["ledger"])
    return result, shared


def write_result(out_dir: str, result: dict, shared: dict[str, torch.Tensor] | None) -> None:
    """``result.json`` (+ ``shared.npz``, the final model) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shared is not None:
        np.savez(out / "shared.npz", **{k: v.numpy() for k, v in shared.items()})
    text = json.dumps(result, indent=1, default=str, allow_nan=True)
    (out / "result.json.tmp").write_text(text)
    (out / "result.json.tmp").replace(out / "result.json")


def main(grid: Grid, context: Context, overrides: dict) -> None:
    """Flower's entry point: run, then write the result (also a failure) to ``out-dir``."""
    cfg = RunConfig.of(context.run_config, **overrides)
    torch.set_num_threads(1)
    set_pull_backoff(float(cfg["pull-backoff"]))
    try:
        result, shared = run_rounds(grid, context, cfg)
    except Exception as err:
        if cfg["out-dir"]:
            write_result(str(cfg["out-dir"]), {"status": "failed",
                                               "error": f"{type(err).__name__}: {err}"}, None)
        raise
    if cfg["out-dir"]:
        write_result(str(cfg["out-dir"]), result, shared)


def make_server_app(**overrides) -> ServerApp:
    """A ServerApp; ``overrides`` replace run-config values (Simulation Engine entry point)."""
    server = ServerApp()
    server.main()(lambda grid, context: main(grid, context, overrides))
    return server


app = make_server_app()
