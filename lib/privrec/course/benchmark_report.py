"""Chapter 10's tables, read from ``benchmarks/results.json`` (the page times nothing itself).

The benchmark scripts in ``benchmarks/`` write one section each, with the machine it ran on. Every
function here turns a section into a compact table (fits the text column) or a few lines of text.
A section missing from the file is reported as missing, never invented.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd

__all__ = ["load_results", "machines_table", "step_table", "step_summary", "accountant_table",
           "fedavg_table", "scaling_tables", "scaling_verdict", "exercise_answers"]


def load_results(start: Path | None = None) -> dict:
    """The results file of the repository that contains ``start`` (default: the working directory)."""
    start = Path.cwd() if start is None else Path(start)
    for base in (start, *start.parents):
        path = base / "benchmarks" / "results.json"
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError("benchmarks/results.json not found: run `make bench`")


def machines_table(results: dict) -> pd.DataFrame:
    """Where and when each section ran: cores, memory, torch, load average, time (UTC)."""
    return pd.DataFrame([{"section": name, "cores": s["machine"]["cores"],
                          "GiB": s["machine"]["memory_gib"],
                          "torch": s["machine"]["libraries"].get("torch") or "-",
                          "load": s["machine"]["load_average_1min"],
                          "measured (UTC)": s["machine"]["utc"]}
                         for name, s in results.items() if "machine" in s]).set_index("section")


def step_table(section: dict) -> pd.DataFrame:
    """One DP step against each peer mode: median ms, the ratio to privrec, peak memory if measured."""
    rows = pd.DataFrame(section["rows"]).set_index("step")
    ratio = section.get("ratio_vs_privrec", {})
    out = pd.DataFrame({"ms / step": rows["ms"],
                        "× privrec": [ratio.get(s, 1.0 if s == "privrec" else math.nan)
                                      if ms == ms else math.nan
                                      for s, ms in zip(rows.index, rows["ms"], strict=True)]})
    if "peak_mib" in rows:
        out["peak MiB"] = rows["peak_mib"]
    return out


def step_summary(section: dict) -> list[str]:
    """The configuration line, any mode that could not run (and why), and the headline ratio
    against the peer's fastest mode that ran."""
    lines = textwrap.wrap(", ".join(f"{k} {v}" for k, v in section["config"].items()), width=80)
    for row in section["rows"]:
        if isinstance(row.get("error"), str):
            lines.append(textwrap.shorten(f"{row['step']}: not run ({row['error']})", width=80))
    ratio = {k: v for k, v in section.get("ratio_vs_privrec", {}).items()
             if k not in ("no privacy", "privrec")}
    fastest = section.get("fastest_opacus") or (min(ratio, key=ratio.get) if ratio else None)
    if fastest is not None:
        lines.append(f"fastest peer mode: {fastest}, {ratio[fastest]:.2f}x privrec's time "
                     f"({'privrec faster' if ratio[fastest] > 1 else 'privrec not faster'})")
    else:
        lines.append("no peer mode could run this model: no ratio to report")
    return lines


def accountant_table(section: dict) -> pd.DataFrame:
    """Calls per second, ms per call and the ε each accountant reports for the same composition."""
    rows = pd.DataFrame(section["rows"]).set_index("accountant")
    rows.index = [name.replace("privrec get_epsilon, ", "privrec, ").replace("RDPAccountant", "RDP")
                  .replace("DEFAULT_ORDERS", "default").replace("OPACUS_ORDERS", "Opacus orders")
                  for name in rows.index]
    return rows[["calls_per_s", "ms_per_call", "epsilon"]].rename(
        columns={"calls_per_s": "calls / s", "ms_per_call": "ms / call", "epsilon": "ε"})


def fedavg_table(section: dict) -> pd.DataFrame:
    """One FedAvg round per engine: ms, the ratio to the vectorised engine, peak memory."""
    rows = pd.DataFrame(section["rows"]).set_index("engine")
    return rows[["ms", "x_vectorised", "peak_mib"]].rename(
        columns={"ms": "ms / round", "x_vectorised": "× vectorised", "peak_mib": "peak MiB"})


def scaling_tables(section: dict) -> dict[str, pd.DataFrame]:
    """The synthetic data's per-user tails, and seconds and peak GB per workload and size."""
    tails = pd.DataFrame(section["data"]).T
    tails.index = tails.index.astype(int).rename("users")
    tails = tails.sort_index()[["items", "ratings", "min", "median", "mean", "max"]]
    points = pd.DataFrame(section["points"])
    ok = points[points["ok"]]
    seconds = ok.pivot_table(index="ratings", columns="workload", values="seconds")
    memory = ok.pivot_table(index="ratings", columns="workload", values="peak_rss_mib") * 2**20 / 1e9
    return {"tails": tails.astype({c: int for c in ("items", "ratings", "min", "max")}),
            "seconds": seconds, "memory_gb": memory, "failed": points[~points["ok"]]}


def scaling_verdict(section: dict) -> list[str]:
    """The growth exponents against the bar, and the FedAvg round at 10^6 clients."""
    bar, exps = section["bar"], section["exponents"]
    lines = []
    for workload in ("fedavg", "dpfedavg", "dpsgd"):
        k = exps[workload]["k_from_1e6_ratings"]
        if k is not None:
            verdict = "met" if k <= bar["k_at_most"] else "NOT met"
            lines.append(f"{workload}: k = {k:.3f} from 1e6 ratings (all points "
                         f"{exps[workload]['k_all']:.3f}); bar k <= {bar['k_at_most']}: {verdict}")
    points = pd.DataFrame(section["points"])
    big = points[(points["workload"] == "fedavg") & (points["users"] == 10**6) & points["ok"]]
    if len(big):
        b = big.iloc[0]
        gb = b["peak_rss_mib"] * 2**20 / 1e9
        limit = bar.get("fedavg_1e6_clients_seconds_at_most")
        lines.append(f"FedAvg at {b['users']:,} clients, {b['ratings']:,} ratings:")
        lines.append(f"  {b['seconds']:.1f} s per round, peak {gb:.2f} GB "
                     f"(bar {bar['fedavg_1e6_clients_peak_gb_at_most']} GB"
                     + (f", {limit} s" if limit else "") + ")")
    else:
        lines.append("the 10^6-client FedAvg point is not in the results file")
    return lines


def exercise_answers(results: dict) -> list[str]:
    """The chapter's three exercises, answered from the results file."""
    sc = results["scaling"]
    points = pd.DataFrame(sc["points"])
    fed = points[(points["workload"] == "fedavg") & points["ok"]].sort_values("ratings", kind="stable")
    k = sc["exponents"]["fedavg"]["k_from_1e6_ratings"] or sc["exponents"]["fedavg"]["k_all"]
    last = fed.iloc[-1]
    dp = results["dpsgd"]
    ms = {r["step"]: r["ms"] for r in dp["rows"]}
    acc = {r["accountant"]: r["ms_per_call"] for r in results["accountant"]["rows"]}
    default = next(n for n in acc if n.startswith("privrec get_epsilon, DEFAULT"))  # raw names
    pld = next(n for n in acc if "PLD" in n)
    fastest = dp["fastest_opacus"]
    return [f"1. {last['seconds']:.1f} s x (1e8 / {last['ratings']:.3g})^{k:.2f} = "
            f"{last['seconds'] * (1e8 / last['ratings']) ** k:.0f} s per round",
            f"2. {ms[fastest]:.2f} ms / {ms['privrec']:.2f} ms = {ms[fastest] / ms['privrec']:.0f} "
            f"privrec steps per {fastest} step",
            f"3. 60 calls: privrec default orders {60 * acc[default] / 1e3:.1f} s; "
            f"PLD {60 * acc[pld] / 1e3:.0f} s"]
