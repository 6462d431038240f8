"""The book's federated recommender on Flower's engines, on loopback, measured (``make flower-demo``).

``python flower/deploy.py`` (from ``.venv-flower``) starts a secure federation on 127.0.0.1
(:class:`loopback.Loopback`: TLS with a CA made for this run, only registered SuperNodes, warm
ClientApp executors) and measures, writing everything to ``--out``:

* **equivalence**: FedAvgM and DP-FedAvg on Flower's Deployment Engine, on its Simulation Engine
  and in privrec's simulator give the same model; a killed SuperNode costs signal, not privacy;
* **admission**: a SuperNode with an unregistered key and one that does not trust the CA are
  refused;
* **SecAgg+**: DP-FedAvg whose ServerApp sees only the masked sum -- its gap to the simulator,
  its bytes and seconds, a SuperNode that drops out after sharing its keys (within the
  threshold) and two that do (below it);
* **speed**: a round with Flower's defaults (a process per message, 3 s idle poll) against this
  deployment, with the breakdown of where a round's seconds go.
* **LoRA**: chapter 7's FFA-LoRA MiniLM two-tower, one user-level DP-FedAvg round on the same
  secure deployment: its gap to the simulator and what one user uploads (``--only-lora``
  re-measures just this section).

``--compare-insecure`` adds the comparison runs the chapter's overhead table needs: the same
DP-FedAvg over plain HTTP (a warning is printed) and over TLS without node authentication.
Every process is stopped and every key deleted at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(APP_DIR))

from loopback import Loopback  # noqa: E402
from measure import (  # noqa: E402
    admission,
    deployment,
    killed,
    lora_round,
    overheads,
    secagg_runs,
    speed,
)
from measure import simulation_engine as simulation_engine_runs  # noqa: E402

BASE = {"num-partitions": 3, "num-server-rounds": 3}


def demo(work: Path, *, nodes: int = 3, rounds: int = 3, simulation_engine: bool = True,
         compare_insecure: bool = False, say=print) -> dict:
    """Every measurement of the module docstring; the report chapter 11 prints."""
    base = {**BASE, "num-partitions": nodes, "num-server-rounds": rounds}
    report: dict = {"nodes": nodes, "rounds": rounds, "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_1min_before": os.getloadavg()[0]}
    with Loopback(nodes, work=work / "secure", say=say) as link:
        report["admission"] = admission(link, nodes)
        report["engines"] = deployment(link, base, say=say)
        report["secagg"] = secagg_runs(link, base, report["engines"]["simulator"]["dp-fedavg"],
                                       report["engines"]["idle"], say=say)
        killed(link, base, report["engines"], say=say)       # last: the silo stays dead
    if simulation_engine:
        simulation_engine_runs(work, base, report["engines"], say=say)
    report["speed"] = speed(work, base, report["engines"], say=say)
    if compare_insecure:
        report["overheads"] = overheads(work, base, report, say=say)
    report["lora"] = lora_round(work, base, say=say)
    report["load_average_1min_after"] = os.getloadavg()[0]
    return report


def speed_only(work: Path, out: Path, *, nodes: int, rounds: int, say=print) -> dict:
    """The report in ``out`` with its speed section measured anew (both settings, same load)."""
    base = {**BASE, "num-partitions": nodes, "num-server-rounds": rounds}
    report = json.loads(out.read_text())
    with Loopback(nodes, work=work / "secure", say=say) as link:
        fresh = deployment(link, base, say=say)
    report["speed"] = speed(work, base, fresh, say=say)
    return report


def lora_only(work: Path, out: Path, *, nodes: int, say=print) -> dict:
    """The report in ``out`` with its LoRA section measured anew."""
    report = json.loads(out.read_text())
    report["lora"] = lora_round(work, {**BASE, "num-partitions": nodes}, say=say)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="K SuperNodes (>= 3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 3)")
    parser.add_argument("--out", type=Path, default=APP_DIR / "results" / "deployment.json")
    parser.add_argument("--no-simulation-engine", action="store_true",
                        help="skip Flower's Simulation Engine (a SuperLink with --simulation, Ray)")
    parser.add_argument("--only-speed", action="store_true",
                        help="re-measure only the speed section (FedAvgM with Flower's defaults and "
                             "with this deployment's settings) and update it in --out")
    parser.add_argument("--only-lora", action="store_true",
                        help="re-measure only the LoRA section (chapter 7's model, one round) "
                             "and update it in --out")
    parser.add_argument("--compare-insecure", action="store_true",
                        help="also measure plain HTTP and TLS without node authentication, for "
                             "the overhead table (prints a warning; never the default)")
    args = parser.parse_args(argv)
    if args.nodes < 3 or args.rounds < 3:
        parser.error("--nodes and --rounds must be >= 3")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # clean up on SIGTERM too
    with tempfile.TemporaryDirectory(prefix="privrec-flower-") as tmp:
        if args.only_speed:
            report = speed_only(Path(tmp), args.out, nodes=args.nodes, rounds=args.rounds)
        elif args.only_lora:
            report = lora_only(Path(tmp), args.out, nodes=args.nodes)
        else:
            report = demo(Path(tmp), nodes=args.nodes, rounds=args.rounds,
                          simulation_engine=not args.no_simulation_engine,
                          compare_insecure=args.compare_insecure)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=True, default=str) + "\n")
    print(f"wrote {args.out}")
    gaps = [g for section in ("engines", "secagg") for g in report[section]["gaps"].values()]
    gaps += [report["lora"]["gap"]] if "lora" in report else []
    return 0 if all(math.isfinite(g) for g in gaps) else 1


if __name__ == "__main__":
    sys.exit(main())
