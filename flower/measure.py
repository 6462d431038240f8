"""The measurements of ``deploy.py``, one function per question; each returns JSON-ready dicts.

All runs use the app's seeds, so the simulator (:func:`privrec_flower.engines.simulate`) gives
the reference model of each, and the comparison is a number, not a judgement.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
from pathlib import Path
from statistics import median

from loopback import Loopback
from privrec_flower.engines import load_shared, max_abs_gap, simulate
from privrec_flower.secure import Quantisation
from privrec_flower.task import RunConfig, initial_shared
from privrec_flower.timing import PHASES
from runs import idle_rates, online_nodes, probe, submit

KEEP = ("round", "sampled", "realised", "errors", "silent", "updates_seen", "bytes_up",
        "privrec_bytes_up", "bytes_down", "wire_up", "wire_down", "cpu_seconds", "seconds",
        "epsilon", "breakdown", "stages", "uploaded")


def summary(result: dict, idle: dict | None = None) -> dict:
    """What the report keeps of a run; ``idle``: its federation's :func:`runs.idle_rates`."""
    return {"rounds": [{k: r[k] for k in KEEP if k in r} for r in result["rounds"]],
            **{k: result.get(k) for k in ("strategy", "epsilon", "delta", "ledger", "test_rmse",
                                           "wall_seconds")}, "idle": idle}


def net_costs(run: dict) -> dict[str, float]:
    """Median per round (rounds 2..) of seconds, and of CPU seconds and wire bytes beyond what
    the federation spends idling for as long (its polls)."""
    idle, rounds = run["idle"], run["rounds"][1:] or run["rounds"]
    cpu = [r["cpu_seconds"] - idle["cpu_per_s"] * r["seconds"] for r in rounds]
    wire = [r["wire_up"] + r["wire_down"] - idle["wire_bytes_per_s"] * r["seconds"]
            for r in rounds]
    return {"seconds": float(median(r["seconds"] for r in rounds)),
            "cpu_seconds": float(median(cpu)), "wire_bytes": float(median(wire)),
            "payload_bytes": float(median(r["bytes_up"] + r["bytes_down"] for r in rounds))}


def later(rounds: list[dict], key: str = "seconds") -> float:
    """Median of ``key`` over rounds 2.. (round 1 also pays for start-up)."""
    values = [r[key] for r in rounds[1:] if key in r] or [r[key] for r in rounds if key in r]
    return float(median(values)) if values else float("nan")


def admission(link: Loopback, k: int) -> dict:
    """Two SuperNodes that must be refused, started together; the SuperLink's node list."""
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda kind=kind: results.update({kind: probe(link, kind)}))
               for kind in ("unregistered", "untrusted-ca")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = online_nodes(link)
    return {"probes": [results["unregistered"], results["untrusted-ca"]],
            "online": sum(s == "online" for s in statuses.values()),
            "registered_never_online": sum(s == "registered" for s in statuses.values()),
            "expected_online": k}


def _gap(cfg: RunConfig, result_dir: Path, *, realised=None) -> tuple[float, dict]:
    reference, shared = simulate(cfg, realised=realised)
    return max_abs_gap(shared, load_shared(result_dir / "shared.npz")), reference


def deployment(link: Loopback, base: dict, say=print) -> dict:
    """FedAvgM and DP-FedAvg (server-side clipping) deployed; gaps to the simulator."""
    section: dict = {"runs": {}, "gaps": {}, "simulator": {}}
    results = {name: submit(link, name, **base, **extra)
               for name, extra in (("fedavgm", {}), ("dp-fedavg", {"dp": True}))}
    section["idle"] = idle_rates(link)            # measured warm, after the runs
    for name, extra in (("fedavgm", {}), ("dp-fedavg", {"dp": True})):
        result = results[name]
        section["runs"][f"{name}/deployment"] = summary(result, section["idle"])
        gap, reference = _gap(RunConfig.of(base, **extra), link.work / name)
        section["gaps"][f"{name}: deployment vs simulator"] = gap
        section["simulator"][name] = reference
        say(f"{name}: deployed rounds {[round(r['seconds'], 2) for r in result['rounds']]} s, "
            f"gap to the simulator {gap:.1e}")
    return section


def killed(link: Loopback, base: dict, section: dict, say=print) -> None:
    """DP-FedAvg with the SuperNode of a silo sampled in the last round killed before it."""
    cfg = RunConfig.of(base, dp=True)
    last = int(cfg["num-server-rounds"])
    victim = section["simulator"]["dp-fedavg"]["rounds"][last - 1]["sampled"][-1]
    kill = {f"round-{last}": lambda: link.signal_node(victim, signal.SIGKILL)}
    result = submit(link, "dp-fedavg-killed", **base, dp=True, evaluate=False,
                    **{"round-timeout": 15.0}, actions=kill)
    section["runs"]["dp-fedavg-killed/deployment"] = summary(result)
    gap, reference = _gap(cfg, link.work / "dp-fedavg-killed",
                          realised=[r["realised"] for r in result["rounds"]])
    section["runs"]["dp-fedavg-killed/simulator-realised-cohort"] = reference
    section["gaps"]["dp-fedavg-killed: deployment vs simulator (realised cohort)"] = gap
    section["killed_silo"] = victim
    say(f"killed silo {victim} before round {last}: gap to the realised-cohort simulator {gap:.1e}")


def simulation_engine(work: Path, base: dict, section: dict, say=print) -> None:
    """The same app on Flower's Simulation Engine (a SuperLink with ``--simulation``, TLS)."""
    with Loopback(int(base["num-partitions"]), work=work / "simulation-engine", auth=False,
                  simulation=True, say=say) as link:
        for name, extra in (("fedavgm", {}), ("dp-fedavg", {"dp": True})):
            result = submit(link, name, **base, **extra)
            section["runs"][f"{name}/simulation-engine"] = summary(result)
            section["gaps"][f"{name}: simulation-engine vs simulator"] = _gap(
                RunConfig.of(base, **extra), link.work / name)[0]


def _pause(link: Loopback, silos: list[int], paused: list[int]):
    def act():
        for s in silos:
            link.signal_node(s, signal.SIGSTOP)
            paused.append(s)
    return act


def _resume(link: Loopback, paused: list[int]) -> None:
    while paused:
        link.signal_node(paused.pop(), signal.SIGCONT)


def quantisation(cfg: RunConfig, cohort: int) -> dict:
    """SecAgg+'s grid for this run and how it compares with the clip bound and the DP noise."""
    n = sum(v.numel() for v in initial_shared(cfg).values())
    q = Quantisation.of(cfg, n)
    noise = float(cfg["noise-multiplier"]) * q.clip_norm
    return {"bits": q.bits, "levels": q.levels, "coordinate_range": q.clip_norm,
            "step": q.step, "coordinates": n, "margin": q.margin, "client_clip": q.client_clip,
            "sum_error_bound_per_coordinate": cohort * q.step, "noise_std_on_sum": noise,
            "noise_std_on_mean": noise / (float(cfg["sample-rate"]) * int(cfg["num-partitions"])),
            "noise_over_quantisation": noise / (cohort * q.step)}


def secagg_runs(link: Loopback, base: dict, reference: dict, idle: dict,
                say=print) -> dict:
    """DP-FedAvg under SecAgg+: plain, with one SuperNode dropping out after sharing its keys,
    and with two (below the reconstruction threshold)."""
    cfg = RunConfig.of(base, dp=True, secagg=True)
    k = int(cfg["num-partitions"])
    full = [r["round"] for r in reference["rounds"] if len(r["sampled"]) == k]
    section: dict = {"quantisation": quantisation(cfg, k), "runs": {}, "gaps": {},
                     "threshold": int(cfg["secagg-threshold"]), "shares": int(cfg["secagg-shares"])}
    result = submit(link, "dp-secagg", **base, dp=True, secagg=True, evaluate=False)
    section["runs"]["dp-secagg"] = summary(result, idle)
    section["gaps"]["dp-secagg: deployment vs simulator"] = _gap(cfg, link.work / "dp-secagg")[0]
    drop_round, paused = full[-1] if len(full) > 1 else full[0], []
    victim = reference["rounds"][drop_round - 1]["sampled"][-1]
    try:
        result = submit(link, "dp-secagg-dropout", **base, dp=True, secagg=True, evaluate=False,
                        **{"round-timeout": 8.0},
                        actions={f"keys-{drop_round}": _pause(link, [victim], paused),
                                 f"round-{drop_round + 1}": lambda: _resume(link, paused)})
    finally:
        _resume(link, paused)
    section["runs"]["dp-secagg-dropout"] = summary(result)
    section["dropout"] = {"round": drop_round, "silo": victim}
    section["gaps"]["dp-secagg-dropout: deployment vs simulator (realised cohort)"] = _gap(
        cfg, link.work / "dp-secagg-dropout",
        realised=[r["realised"] for r in result["rounds"]])[0]
    section["below_threshold"] = _below_threshold(link, base, reference, full[0])
    say(f"SecAgg+: gaps {section['gaps']}; below threshold: {section['below_threshold']}")
    return section


def _below_threshold(link: Loopback, base: dict, reference: dict, round_: int) -> dict:
    """Two of three SuperNodes pause after sharing keys: the round must fail, and fast."""
    import time

    victims, paused = reference["rounds"][round_ - 1]["sampled"][1:], []
    start = time.perf_counter()
    try:
        submit(link, "dp-secagg-below", **base, dp=True, secagg=True, evaluate=False,
               **{"round-timeout": 8.0}, actions={f"keys-{round_}": _pause(link, victims, paused)})
        error = None
    except RuntimeError as err:
        error = str(err)
    finally:
        _resume(link, paused)
    stage = re.search(r"at stage '([^']+)'", error or "")
    return {"round": round_, "paused_silos": victims, "error": error,
            "stage": stage.group(1) if stage else None, "deadline": 8.0,
            "seconds_to_error": time.perf_counter() - start}


def breakdown_medians(rounds: list[dict]) -> dict[str, float]:
    """Median seconds of each phase over rounds 2.. ."""
    later_rounds = ([r for r in rounds[1:] if "breakdown" in r]
                    or [r for r in rounds if "breakdown" in r])
    return {p: float(median(r["breakdown"][p] for r in later_rounds)) if later_rounds
            else math.nan for p in PHASES}


def speed(work: Path, base: dict, engines_section: dict, say=print) -> dict:
    """FedAvgM with Flower's defaults (a process per message, 3 s idle poll, 1 s object retry)
    against this deployment's settings; both with TLS and registered nodes."""
    load = os.getloadavg()[0]
    with Loopback(int(base["num-partitions"]), work=work / "flower-defaults", fast=False,
                  say=say) as link:
        before = summary(submit(link, "fedavgm", timeout=600.0, **base,
                                **{"pull-backoff": 1.0, "round-timeout": 120.0}))
    after = engines_section["runs"]["fedavgm/deployment"]
    out = {"load_average_1min": [load, os.getloadavg()[0]], "before": before, "after": after,
           "seconds_before": later(before["rounds"]),
           "seconds_after": later(after["rounds"]),
           "breakdown_before": breakdown_medians(before["rounds"]),
           "breakdown_after": breakdown_medians(after["rounds"])}
    say(f"seconds per round: Flower defaults {out['seconds_before']:.2f}, "
        f"this deployment {out['seconds_after']:.2f}")
    return out


def overheads(work: Path, base: dict, report: dict, say=print) -> dict:
    """DP-FedAvg's seconds and bytes per round under plain HTTP, TLS, TLS + registered nodes,
    and TLS + registered nodes + SecAgg+ (same seeds and rounds)."""
    k = int(base["num-partitions"])
    runs = {}
    for name, kwargs in (("plain HTTP", {"secure": False, "auth": False}),
                         ("TLS", {"auth": False})):
        with Loopback(k, work=work / name.replace(" ", "-"), say=say, **kwargs) as link:
            result = submit(link, "dp-fedavg", **base, dp=True)
            runs[name] = summary(result, idle_rates(link))    # measured warm, after the run
    runs["TLS + registered nodes"] = report["engines"]["runs"]["dp-fedavg/deployment"]
    runs["TLS + registered nodes + SecAgg+"] = report["secagg"]["runs"]["dp-secagg"]
    rows = [{"setting": name, **net_costs(run)} for name, run in runs.items()]
    return {"rows": rows, "runs": {k: v for k, v in runs.items() if k in ("plain HTTP", "TLS")}}


#: Chapter 7's FFA-LoRA two-tower: one user-level DP-FedAvg round, about 19 of 943 users.
LORA_RUN = {"model": "lora", "dp": True, "num-server-rounds": 1, "sample-rate": 0.02,
            "evaluate": False, "round-timeout": 300.0, "nodes-timeout": 300.0}


def lora_round(work: Path, base: dict, say=print) -> dict:
    """Chapter 7's LoRA two-tower for one round on its own secure federation (executors that
    preload MiniLM): the gap to the simulator, what one user uploads, where the seconds went."""
    config = {**base, **LORA_RUN}
    with Loopback(int(base["num-partitions"]), work=work / "lora", preload=("lora",),
                  say=say) as link:
        result = submit(link, "lora", timeout=600.0, **config)
    cfg = RunConfig.of(config)
    gap, reference = _gap(cfg, work / "lora" / "lora")
    r = result["rounds"][0]
    users = max(len(r["realised"]), 1)
    shapes = {k: tuple(v.shape) for k, v in initial_shared(cfg).items()}
    out = {"config": config, "run": summary(result), "gap": gap, "n_users": int(cfg["n-users"]),
           "users": len(r["realised"]), "shapes": shapes, "uploaded": r["uploaded"],
           "bytes_up_per_user": r["bytes_up"] / users,
           "privrec_bytes_up_per_user": r["privrec_bytes_up"] / users,
           "bytes_down_per_user": r["bytes_down"] / users,
           "simulator_round_seconds": reference["rounds"][0]["seconds"],
           "load_average_1min": os.getloadavg()[0]}
    say(f"LoRA round: {len(r['realised'])} users, {r['seconds']:.2f} s, "
        f"{out['bytes_up_per_user']:.0f} B up per user, gap to the simulator {gap:.1e}")
    return out
