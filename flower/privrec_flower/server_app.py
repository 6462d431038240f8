"""The ServerApp: privrec's strategy driving Flower's Grid (article steps 2, 4, 5, 6).

Each round: the privrec strategy samples silos (its seeded generator; DP-FedAvg: Poisson), the
broadcast goes to those silos' SuperNodes as ``train`` messages, the replies that arrive before
``round-timeout`` are decoded in silo order and fed to the same ``start``/``accumulate``/
``finish``/``step`` calls :class:`privrec.federated.engine.FederatedSimulator` makes. A silo whose node is
gone or silent is dropped from the round (the realised cohort is recorded). For DP-FedAvg the
noise on the sum, the fixed denominator :math:`qN` and the ledger entry do not depend on who
answered, so the ledger stays valid for any realised cohort (a smaller cohort only loses signal).
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

from privrec.federated.engine import wire_bytes
from privrec.federated.updates import ClientUpdates
from privrec_flower.task import (
    RunConfig,
    decode_update,
    encode_state,
    initial_shared,
    make_strategy,
    record_bytes,
)


def exchange(grid: Grid, messages: list[Message], *, timeout: float,
             poll: float) -> tuple[list[Message], int]:
    """Push ``messages``, pull replies every ``poll`` s until all came or ``timeout`` s passed.

    Returns the replies (content or error) and the number of messages left unanswered.
    """
    waiting = set(grid.push_messages(messages))
    replies, deadline = [], time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(poll)
    return replies, len(waiting)


def discover(grid: Grid, cfg: RunConfig) -> dict[int, int]:
    """``{silo: node_id}`` of the connected SuperNodes (asks each its ``partition-id``)."""
    k, deadline = int(cfg["num-partitions"]), time.monotonic() + float(cfg["nodes-timeout"])
    while len(nodes := sorted(grid.get_node_ids())) < k:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of num-partitions={k} SuperNodes connected "
                               f"within nodes-timeout={cfg['nodes-timeout']} s")
        time.sleep(0.2)
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies, _ = exchange(grid, asks, timeout=float(cfg["nodes-timeout"]),
                          poll=float(cfg["poll-interval"]))
    silos = {int(m.content["node"]["partition-id"]): m.metadata.src_node_id
             for m in replies if m.has_content()}
    if sorted(silos) != list(range(k)):
        raise RuntimeError(f"expected SuperNodes with partition-id 0..{k - 1}, got {sorted(silos)}")
    return silos


def _gate(cfg: RunConfig, server_round: int) -> None:
    """Test hook: with ``gate-dir`` set, announce each finished round and wait for ``go-<r>``."""
    if not cfg["gate-dir"]:
        return
    gate = Path(str(cfg["gate-dir"]))
    (gate / f"done-{server_round - 1}").touch()
    deadline = time.monotonic() + float(cfg["nodes-timeout"])
    while not (gate / f"go-{server_round}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go-{server_round} in gate-dir {gate}")
        time.sleep(0.05)


def train_round(grid: Grid, cfg: RunConfig, strategy, shared: dict[str, torch.Tensor],
                silos: dict[int, int], server_round: int) -> dict:
    """One round (steps 2-5); returns its record: cohort, realised cohort, bytes, seconds."""
    start = time.perf_counter()
    sampled = [int(c) for c in strategy.sample(len(silos))]
    live = set(grid.get_node_ids())
    silo_of = {node: silo for silo, node in silos.items()}
    messages = [Message(RecordDict({"shared": encode_state(shared),
                                    "config": ConfigRecord({"server-round": server_round})}),
                        dst_node_id=silos[s], message_type="train", group_id=str(server_round),
                        ttl=max(float(cfg["round-timeout"]), 10.0))
                for s in sampled if silos[s] in live]
    replies, silent = exchange(grid, messages, timeout=float(cfg["round-timeout"]),
                               poll=float(cfg["poll-interval"]))
    good = sorted((silo_of[m.metadata.src_node_id], m) for m in replies if m.has_content())
    updates = [decode_update(m.content, silo) for silo, m in good]
    total = strategy.start(shared)
    if updates:
        strategy.accumulate(total, ClientUpdates.concat(updates))
    strategy.step(shared, strategy.finish(total))
    if not all(bool(torch.isfinite(v).all()) for v in shared.values()):
        raise RuntimeError(f"training diverged in round {server_round}")
    shapes = {k: v.shape for k, v in shared.items()}
    down = record_bytes(RecordDict({"shared": encode_state(shared)})) * len(messages)
    ledger = getattr(strategy, "ledger", None)
    return {"round": server_round, "sampled": sampled, "realised": [s for s, _ in good],
            "errors": sum(m.has_error() for m in replies), "silent": silent,
            "bytes_down": down, "bytes_up": sum(record_bytes(m.content) for _, m in good),
            "privrec_bytes_up": wire_bytes(ClientUpdates.concat(updates), shapes)[0]
            if updates else 0,
            "seconds": time.perf_counter() - start,
            "epsilon": ledger.epsilon() if ledger is not None else math.inf}


def federated_rmse(grid: Grid, cfg: RunConfig, shared: dict[str, torch.Tensor],
                   silos: dict[int, int]) -> float:
    """Test RMSE of the released model, from each live silo's sum of squared errors."""
    live = set(grid.get_node_ids())
    messages = [Message(RecordDict({"shared": encode_state(shared)}), dst_node_id=n,
                        message_type="evaluate") for n in silos.values() if n in live]
    replies, _ = exchange(grid, messages, timeout=float(cfg["round-timeout"]),
                          poll=float(cfg["poll-interval"]))
    metrics = [m.content["metrics"] for m in replies if m.has_content()]
    n = sum(int(m["n"]) for m in metrics)
    return math.sqrt(sum(float(m["sse"]) for m in metrics) / n) if n else math.nan


def run_rounds(grid: Grid, cfg: RunConfig, *, say=print) -> tuple[dict, dict[str, torch.Tensor]]:
    """The whole run: discover silos, ``num-server-rounds`` rounds, optional evaluation."""
    silos = discover(grid, cfg)
    strategy = make_strategy(cfg, n_clients=len(silos), unit="silo")
    shared = initial_shared(cfg)
    rounds, start = [], time.perf_counter()
    for r in range(1, int(cfg["num-server-rounds"]) + 1):
        _gate(cfg, r)
        rounds.append(train_round(grid, cfg, strategy, shared, silos, r))
        say("[round {round}] sampled={sampled} realised={realised} errors={errors} "
            "silent={silent} up={bytes_up} B (privrec count {privrec_bytes_up} B) "
            "down={bytes_down} B {seconds:.3f} s epsilon={epsilon:.3g}".format(**rounds[-1]))
    _gate(cfg, int(cfg["num-server-rounds"]) + 1)
    ledger = getattr(strategy, "ledger", None)
    result = {"status": "ok", "config": cfg.values, "strategy": repr(strategy), "rounds": rounds,
              "seconds": time.perf_counter() - start,
              "epsilon": ledger.epsilon() if ledger is not None else math.inf,
              "delta": ledger.delta if ledger is not None else None,
              "ledger": ledger.summary() if ledger is not None else "no privacy (epsilon = inf)",
              "test_rmse": federated_rmse(grid, cfg, shared, silos) if cfg["evaluate"] else None}
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
    try:
        result, shared = run_rounds(grid, cfg)
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
