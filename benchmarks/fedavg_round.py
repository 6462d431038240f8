"""One FedAvg round of federated MF with all 943 MovieLens-100K clients: engines side by side.

    make bench-fedavg                      # or: .venv/bin/python benchmarks/fedavg_round.py
    .venv/bin/python benchmarks/fedavg_round.py --threads 1 --repeats 20

Times one round (broadcast, closed-form user solve, local training, aggregation, server step) of
:class:`privrec.federated.FederatedMF` with ``engine="vectorised"`` and with the plain Python loop
over clients (``engine="loop"``), checks that both give the same model, and prints the ratio.
Flower's simulation (``flwr[simulation]``) is compared only when it is importable: it is a
benchmark-only dependency that lives in ``.venv-bench`` (see ``benchmarks/requirements.txt``),
never in the book's environment.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from privrec.data import load_movielens100k, random_split
from privrec.federated import FederatedMF


def time_rounds(sim: FederatedMF, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sim.round()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads during a round (the simulator's default is 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed vectorised rounds")
    parser.add_argument("--loop-repeats", type=int, default=2, help="timed loop rounds")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--no-flower", action="store_true",
                        help="skip Flower even if installed (it takes minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ml = load_movielens100k()
    train, _ = random_split(ml.ratings, seed=0)
    config = dict(n_users=ml.n_users, n_items=ml.n_items, dim=args.dim,
                  local_epochs=args.local_epochs, num_threads=args.threads)
    fast = FederatedMF(train, engine="vectorised", **config)
    slow = FederatedMF(train, engine="loop", **config)
    # Warm-up round on both (first-call allocations), then check they agree.
    fast.round(), slow.round()
    gap = max(float((fast.server[k] - slow.server[k]).abs().max()) for k in fast.server)
    t_fast = time_rounds(fast, args.repeats)
    t_slow = time_rounds(slow, args.loop_repeats)
    m_fast, m_slow = statistics.median(t_fast), statistics.median(t_slow)
    record = fast.round()
    print(f"FedAvg round, cross-device, {ml.n_users} clients, dim={args.dim}, "
          f"local_epochs={args.local_epochs}, torch threads={args.threads}")
    print(f"  engines agree after one round: max |difference| = {gap:.1e}")
    print(f"  bytes per round: down {record.bytes_down / 1e6:.1f} MB, "
          f"up {record.bytes_up / 1e6:.2f} MB")
    print(f"  vectorised: median {m_fast * 1e3:8.1f} ms  (min {min(t_fast) * 1e3:.1f} ms, "
          f"{args.repeats} rounds)")
    print(f"  python loop: median {m_slow * 1e3:7.1f} ms  ({args.loop_repeats} rounds)")
    print(f"  loop / vectorised = {m_slow / m_fast:.1f}x")

    if args.no_flower:
        print("  Flower: skipped (--no-flower)")
        return
    try:
        import flwr  # noqa: F401
        from flower_round import time_flower_round
    except ImportError:
        print("  Flower: skipped (flwr is not installed in this environment; it is a benchmark-only "
              "dependency: see benchmarks/requirements.txt for the .venv-bench recipe, then "
              "`make bench-fedavg` uses it)")
        return
    t_flower = time_flower_round(train, n_users=ml.n_users, n_items=ml.n_items, dim=args.dim,
                                 local_epochs=args.local_epochs)
    print(f"  Flower simulation: {t_flower * 1e3:.1f} ms per round; "
          f"Flower / vectorised = {t_flower / m_fast:.0f}x")


if __name__ == "__main__":
    main()
