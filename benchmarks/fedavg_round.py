"""One FedAvg round of federated MF with all 943 MovieLens-100K clients: engines side by side.

    make bench-fedavg       # .venv-bench when it exists (then Flower runs too), else .venv
    .venv-bench/bin/python benchmarks/fedavg_round.py --rounds 10

Times one round (broadcast, closed-form user solve, local training, aggregation, server step) of
:class:`privrec.federated.engine.FederatedSimulator` with :class:`FederatedMF` ``engine="vectorised"``
and with the plain Python loop over clients (``engine="loop"``), checks that both give the same
model, and prints the ratio. Flower's Simulation Engine (``flwr[simulation]``, see
:mod:`flower_round`) runs the same local training per client when it is importable: it is a
benchmark-only dependency that lives in ``.venv-bench`` (see ``benchmarks/requirements.txt``),
never in the book's environment. Peak memory of the privrec engines: each runs again alone in a
fresh process (its ``VmHWM`` minus its resident memory before the first round); Flower's: the
largest total resident memory of the driver and its Ray processes, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    current_rss_mib,
    interleaved_medians,
    load_results,
    peak_rss_mib,
    run_measured,
    save_section,
)

from privrec.federated.engine import FederatedMF, FederatedSimulator
from privrec.federated.strategies import FedAvg
from privrec.recsys.data import load_movielens100k, random_split


def simulator(train, n_users: int, n_items: int, *, engine: str, dim: int, local_epochs: int):
    model = FederatedMF(train, n_users=n_users, n_items=n_items, dim=dim,
                        local_epochs=local_epochs, engine=engine)
    return FederatedSimulator(model, FedAvg())


def tree_rss_mib(root: int) -> float:
    """Total resident memory of ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            pid, ppid = int(fields["Pid"]), int(fields["PPid"])
            rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
            children.setdefault(ppid, []).append(pid)
        except (OSError, KeyError, ValueError):
            continue
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


def memory_child(engine: str, args) -> None:
    ml = load_movielens100k()
    train, _ = random_split(ml.ratings, seed=0)
    base = current_rss_mib()
    sim = simulator(train, ml.n_users, ml.n_items, engine=engine, dim=args.dim,
                    local_epochs=args.local_epochs)
    sim.round()
    print(json.dumps({"base_rss_mib": round(base, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def flower(train, ml, args) -> dict:
    try:
        import flwr  # noqa: F401
        from flower_round import time_flower_round
    except ImportError:
        return {"error": "flwr is not installed in this environment; it is a benchmark-only "
                         "dependency: see benchmarks/requirements.txt for the .venv-bench recipe"}
    import os
    peak = {"mib": 0.0, "run": True}

    def watch() -> None:
        while peak["run"]:
            peak["mib"] = max(peak["mib"], tree_rss_mib(os.getpid()))
            time.sleep(0.2)
    watcher = threading.Thread(target=watch, daemon=True)
    base = current_rss_mib()
    watcher.start()
    try:
        out = time_flower_round(train, n_users=ml.n_users, n_items=ml.n_items, dim=args.dim,
                                local_epochs=args.local_epochs, num_cpus=args.flower_cpus)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    peak["run"] = False
    watcher.join()
    out["peak_mib"] = round(peak["mib"] - base, 1)
    return out


def carried_flower(reason: dict) -> dict:
    """The last saved Flower measurement, marked as carried over, when Flower did not run now
    (its Ray round is not privrec's engine: a faster privrec round does not change it)."""
    old = load_results().get("fedavg", {})
    saved = old.get("flower", {})
    if "seconds" not in saved:
        return reason
    when = saved.get("measured_utc") or old.get("machine", {}).get("utc")
    return {**saved, "measured_utc": when,
            "carried_over": f"not re-run ({reason.get('error', 'unavailable')}); measured {when}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--flower-cpus", type=float, default=1.0,
                        help="Flower client_resources num_cpus (1: one Ray actor per core)")
    parser.add_argument("--no-flower", action="store_true", help="skip Flower even if installed")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args)

    ml = load_movielens100k()
    train, _ = random_split(ml.ratings, seed=0)
    sims = {engine: simulator(train, ml.n_users, ml.n_items, engine=engine, dim=args.dim,
                              local_epochs=args.local_epochs) for engine in ("vectorised", "loop")}
    for sim in sims.values():
        sim.round()
    gap = max(float((sims["vectorised"].shared[k] - sims["loop"].shared[k]).abs().max())
              for k in sims["vectorised"].shared)
    timing = interleaved_medians({f"privrec {e}": s.round for e, s in sims.items()}, warmup=0,
                                 rounds=args.rounds, per_round={"privrec vectorised": 5})
    fast = timing["privrec vectorised"]["median_s"]
    rows = []
    for engine in sims:
        mem = run_measured([sys.executable, __file__, "--memory-child", engine, "--dim", str(args.dim),
                            "--local-epochs", str(args.local_epochs)], timeout_s=900,
                           memory_cap_mib=8000)
        t = timing[f"privrec {engine}"]
        rows.append({"engine": f"privrec {engine}", "ms": round(1e3 * t["median_s"], 2),
                     "rounds": t["calls"], "x_vectorised": round(t["median_s"] / fast, 1),
                     "peak_mib": round(mem["peak_rss_mib"] - mem["base_rss_mib"], 1) if mem["ok"] else None})
    flower_out = {"error": "skipped (--no-flower)"} if args.no_flower else flower(train, ml, args)
    flower_out = flower_out if "seconds" in flower_out else carried_flower(flower_out)
    if "seconds" in flower_out:
        flower_out["seconds"] = round(flower_out["seconds"], 3)
        rows.append({"engine": "Flower simulation (Ray)", "ms": round(1e3 * flower_out["seconds"], 1),
                     "rounds": 1, "x_vectorised": round(flower_out["seconds"] / fast, 1),
                     "peak_mib": flower_out["peak_mib"]})

    print(f"FedAvg round, cross-device, {ml.n_users} clients, dim={args.dim}, "
          f"local_epochs={args.local_epochs}, torch threads={args.threads}")
    print(f"  engines agree after one round: max |difference| = {gap:.1e}")
    print(f"{'engine':<28}{'ms/round':>10}{'x vectorised':>14}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['engine']:<28}{r['ms']:>10.1f}{r['x_vectorised']:>14.1f}{r['peak_mib'] or np.nan:>10.1f}")
    print("  Flower:", json.dumps(flower_out))
    if not args.no_save:
        save_section("fedavg", {
            "config": {"clients": ml.n_users, "items": ml.n_items, "train_ratings": len(train),
                       "dim": args.dim, "local_epochs": args.local_epochs, "threads": args.threads,
                       "rounds": args.rounds, "flower_client_num_cpus": args.flower_cpus},
            "engines_agree_max_abs_difference": gap, "rows": rows, "flower": flower_out})


if __name__ == "__main__":
    main()
