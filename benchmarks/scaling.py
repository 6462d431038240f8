"""How cost grows: one FedAvg round, one DP-FedAvg round and one DP-SGD epoch on growing data.

    .venv/bin/python benchmarks/scaling.py                    # every point (the last takes long)
    .venv/bin/python benchmarks/scaling.py --max-users 100000 # the small points only
    .venv/bin/python benchmarks/scaling.py --only-users 1000000 --workloads fedavg

Data: :mod:`synthetic` long-tailed ratings (ML-100K-shaped per-user counts, Zipf items), 50
ratings per user on average, users 10^3 .. 10^6, items ``clip(users / 10, 10^3, 10^5)``, so
ratings run 5*10^4 .. 5*10^7. Model: biased MF, dim 32.

Workloads (each point in a fresh process that loads the cached arrays, so its peak memory is its
own; the parent kills a process whose resident memory passes ``--memory-cap-mib``):

- ``fedavg``: :class:`privrec.federated.engine.FederatedSimulator` with :class:`FederatedMF`
  (cross-device: every user a client), plain FedAvg, all clients in the round, with ``--workers``
  parallel client groups (default 2, the machine's two cores: each chunk's clients train in two
  groups on parallel threads, the same numbers as one; ``cpu_s`` is the process CPU time, all
  threads); torch itself on one thread; the time of the
  last of ``--rounds`` rounds (default 2 below 10^7 ratings: the first pays one-off allocations;
  both are recorded; 1 from 10^7 ratings, where that is negligible) and the set-up time;
- ``dpfedavg``: the same round under :class:`privrec.federated.dpfedavg.DPFedAvg` wrapping FedAvg
  (Poisson sample rate 1, so the cohort is the same as FedAvg's: the difference is the cost of
  per-client clipping and noise), clip norm 1, noise multiplier 1;
- ``dpsgd``: :class:`privrec.central.dpsgd.DPSGD` at sample rate 1/64, so one epoch is 64 steps with an
  expected batch of ratings/64; ``--dpsgd-steps`` steps are timed after one warm-up step and the
  median step time is multiplied by 64.

The growth exponent ``k`` of ``time ~ ratings^k`` is a least-squares fit of log time on log
ratings, over all points and over the points with at least 10^6 ratings (below that, fixed
per-call overheads flatten the curve). The machine is shared: timings carry that caveat, recorded
with the load average in the results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
from _common import RESULTS, current_rss_mib, load_results, peak_rss_mib, run_measured, save_section

USERS = (1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
WORKLOADS = ("fedavg", "dpfedavg", "dpsgd")
RATINGS_PER_USER, DIM, DPSGD_RATE = 50, 32, 1 / 64


def config(n_users: int) -> tuple[int, int, int]:
    n_items = int(min(max(n_users // 10, 1_000), 100_000))
    return n_users, n_items, RATINGS_PER_USER * n_users


def _federated(users, items, ratings, n_users, n_items, *, private: bool, rounds: int,
               workers: int) -> dict:
    from privrec.federated.engine import FederatedMF, FederatedSimulator
    from privrec.federated.strategies import FedAvg

    start = time.perf_counter()
    model = FederatedMF.from_arrays(users, items, ratings, n_users=n_users, n_items=n_items, dim=DIM,
                                    workers=workers)
    strategy = FedAvg()
    if private:
        from privrec.federated.dpfedavg import DPFedAvg
        strategy = DPFedAvg(strategy, n_clients=model.n_clients, sample_rate=1.0, clip_norm=1.0,
                            noise_multiplier=1.0)
    sim = FederatedSimulator(model, strategy)
    setup = time.perf_counter() - start
    times, cpu = [], 0.0
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        sim.round()
        times.append(time.perf_counter() - start)
        cpu = time.process_time() - start_cpu
    return {"setup_s": setup, "first_round_s": times[0], "seconds": times[-1], "rounds_timed": rounds,
            "cpu_s": cpu}


def _dpsgd(users, items, ratings, n_users, n_items, *, steps: int) -> dict:
    import pandas as pd

    from privrec.central.dpsgd import DPSGD
    from privrec.recsys.models import BiasedMF

    start = time.perf_counter()
    train = pd.DataFrame({"user": users, "item": items, "rating": ratings}, copy=False)
    trainer = DPSGD(BiasedMF(n_users, n_items, DIM, global_mean=3.0), train, clip_norm=1.0,
                    noise_multiplier=1.0, sample_rate=DPSGD_RATE, lr=0.01, seed=0)
    setup = time.perf_counter() - start
    trainer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    return {"setup_s": setup, "step_s": per_step, "steps_timed": steps, "cpu_s": None,
            "steps_per_epoch": round(1 / DPSGD_RATE), "seconds": per_step * round(1 / DPSGD_RATE)}


def child(workload: str, n_users: int, args) -> None:
    """Measure one point in this (fresh) process and print it as one JSON line."""
    import torch
    from synthetic import cached

    import privrec.central.dpsgd  # noqa: F401 - imports before the baseline
    import privrec.federated.engine  # noqa: F401

    torch.set_num_threads(1)
    n_users, n_items, n_ratings = config(n_users)
    users, items, ratings = cached(n_users, n_items, n_ratings)
    base = current_rss_mib()
    if workload == "dpsgd":
        out = _dpsgd(users, items, ratings, n_users, n_items, steps=args.dpsgd_steps)
    else:
        out = _federated(users, items, ratings, n_users, n_items, private=workload == "dpfedavg",
                         rounds=args.rounds or (2 if n_ratings < 10**7 else 1),
                         workers=args.workers)
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    print(json.dumps({**out, "data_rss_mib": round(base, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def fit_exponent(points: list[dict], min_ratings: int = 0, key: str = "seconds") -> float | None:
    pts = [p for p in points if p.get("ok") and p["ratings"] >= min_ratings]
    if len(pts) < 2 or any(p.get(key) is None for p in pts):
        return None
    x = np.log([p["ratings"] for p in pts])
    y = np.log([p[key] for p in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def summarise(points: list[dict]) -> dict:
    """Exponents of wall time (all points; from 10^6 ratings) and of the CPU time of the process
    (where every point recorded it: on a shared machine it is the steadier measure)."""
    out = {}
    for w in WORKLOADS:
        mine = [p for p in points if p["workload"] == w]
        out[w] = {"k_all": fit_exponent(mine), "k_from_1e6_ratings": fit_exponent(mine, 10**6),
                  "k_cpu_all": fit_exponent(mine, key="cpu_s")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-users", type=int, default=max(USERS))
    parser.add_argument("--only-users", type=int, nargs="*")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--dpsgd-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=0,
                        help="federated rounds per point, the last one reported (default: 2 below "
                             "10^7 ratings, 1 from there)")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel client groups of a federated round (FederatedMF workers)")
    parser.add_argument("--memory-cap-mib", type=float, default=12_000)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--resummarise", action="store_true",
                        help="only refit the exponents of the saved points")
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args)
    if args.resummarise:  # keeps the machine stamp of the measurements
        results = load_results()
        results["scaling"]["exponents"] = summarise(results["scaling"]["points"])
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        return None

    from synthetic import cached, describe

    old = load_results().get("scaling", {})
    points = {(p["workload"], p["users"]): p for p in old.get("points", [])}
    tails = old.get("data", {})
    for n_users in (args.only_users or [u for u in USERS if u <= args.max_users]):
        n_users, n_items, n_ratings = config(n_users)
        start = time.perf_counter()
        users = cached(n_users, n_items, n_ratings)[0]
        tails[str(n_users)] = {"items": n_items, **describe(users, n_users),
                               "generate_or_load_s": round(time.perf_counter() - start, 1)}
        del users
        for workload in args.workloads:
            record = run_measured([sys.executable, __file__, "--child", workload, str(n_users),
                                   "--dpsgd-steps", str(args.dpsgd_steps), "--rounds", str(args.rounds),
                                   "--workers", str(args.workers)],
                                  timeout_s=args.timeout_s, memory_cap_mib=args.memory_cap_mib,
                                  env={"OMP_NUM_THREADS": "1"})
            record.update(workload=workload, users=n_users, items=n_items,
                          ratings=tails[str(n_users)]["ratings"],
                          load_average_1min=round(os.getloadavg()[0], 2))
            points[(workload, n_users)] = record
            secs = record.get("seconds", math.nan)
            print(f"{workload:<9} users {n_users:>9,} items {n_items:>7,} ratings "
                  f"{record['ratings']:>11,}: "
                  + (f"{secs:9.2f} s, peak {record['peak_rss_mib']:8.0f} MiB "
                     f"(data {record['data_rss_mib']:.0f} MiB)" if record["ok"]
                     else f"FAILED: {record['error']}"), flush=True)
            if not args.no_save:
                ordered = sorted(points.values(), key=lambda p: (WORKLOADS.index(p["workload"]),
                                                                 p["users"]))
                save_section("scaling", {
                    "config": {"ratings_per_user": RATINGS_PER_USER, "dim": DIM,
                               "items": "clip(users / 10, 1e3, 1e5)", "dpsgd_sample_rate": DPSGD_RATE,
                               "dpsgd_steps_timed": args.dpsgd_steps,
                               "federated_workers": args.workers, "torch_threads": 1,
                               "memory_cap_mib": args.memory_cap_mib},
                    "data": tails, "points": ordered, "exponents": summarise(ordered),
                    "bar": {"fedavg_1e6_clients_peak_gb_at_most": 8, "k_at_most": 1.1}})
    final = load_results().get("scaling", {}).get("exponents") if not args.no_save else None
    if final:
        print("growth exponents k (time ~ ratings^k):", json.dumps(final))


if __name__ == "__main__":
    main()
