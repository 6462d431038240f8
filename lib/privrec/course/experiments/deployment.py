"""Chapter 11's reading of the Flower deployment report (``flower/results/deployment.json``).

The deployment runs in its own environment (``make flower-demo``: a SuperLink and SuperNodes as
processes, Flower's pins); the chapter runs in the book's and only reads what that run measured.
Each function turns one section of the report into what the page prints: compact tables that fit
the text column (80 characters), the threat-model table with its measured overheads, and the
per-round breakdown figure of the chapter's Explore section.
"""

from __future__ import annotations

import ast
import json
import math
import textwrap
from pathlib import Path

import pandas as pd

from ...core.checks import instance

__all__ = ["find_report", "load_report", "show_function", "rounds_table", "gap_table",
           "admission_table", "secagg_lines", "overhead_table", "threat_model_markdown",
           "speed_table", "round_phases", "draw_round", "lora_lines", "RUN_LABELS"]

#: The runs of the Explore figure: label -> (section path in the report, kind of breakdown).
RUN_LABELS = {"Flower defaults": ("speed", "before"),
              "this deployment": ("speed", "after"),
              "SecAgg+ (DP-FedAvg)": ("secagg", "dp-secagg")}


def find_report(start: Path | None = None) -> Path:
    """``flower/results/deployment.json`` in ``start`` (default: the working directory) or above."""
    start = Path.cwd() if start is None else instance("start", start, Path)
    for base in (start, *start.parents):
        path = base / "flower" / "results" / "deployment.json"
        if path.is_file():
            return path
    raise FileNotFoundError(
        "flower/results/deployment.json not found: this chapter prints the measured runs of a "
        "Flower deployment, committed in the book's repository; open the chapter from a clone "
        "of it (Colab alone has only the library), or run `make flower-demo` to measure anew")


def load_report(path: Path | None = None) -> dict:
    """The report written by ``flower/deploy.py`` (``Infinity`` for an infinite ε)."""
    return json.loads((find_report() if path is None else instance("path", path, Path)).read_text())


def show_function(path: Path, name: str, *, docstring: bool = False):
    """The source of function ``name`` in ``path``, highlighted, without its docstring unless
    ``docstring`` (for files this kernel cannot import, such as the Flower app, which needs
    Flower's own environment, and for listings short enough for the page)."""
    from IPython.display import Code

    text = instance("path", path, Path).read_text()
    nodes = [n for n in ast.walk(ast.parse(text))
             if isinstance(n, ast.FunctionDef) and n.name == instance("name", name, str)]
    if not nodes:
        raise ValueError(f"name must be a function defined in {path.name}, got {name!r}")
    node, lines = nodes[0], text.splitlines()
    keep = range(node.lineno - 1, node.end_lineno)
    first = node.body[0]
    if not instance("docstring", docstring, bool) and isinstance(first, ast.Expr) and isinstance(
            getattr(first, "value", None), ast.Constant) and isinstance(first.value.value, str):
        keep = [i for i in keep if not first.lineno - 1 <= i < first.end_lineno]
    return Code("\n".join(lines[i] for i in keep), language="python")


def _kb(n: float) -> float:
    return round(float(n) / 1000, 1)


def _silos(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) or "-"


def rounds_table(run: dict) -> pd.DataFrame:
    """One row per round: silos sampled and realised, kB up and down (Flower's payload), seconds
    and the ledger's ε after the round."""
    rows = [{"round": r["round"], "sampled": _silos(r["sampled"]), "realised": _silos(r["realised"]),
             "kB up": _kb(r["bytes_up"]), "kB down": _kb(r["bytes_down"]),
             "seconds": round(r["seconds"], 2), "epsilon": round(r["epsilon"], 3)}
            for r in instance("run", run, dict)["rounds"]]
    return pd.DataFrame(rows).set_index("round")


def gap_table(report: dict) -> pd.DataFrame:
    """The largest parameter gap of every engine comparison (deployment, Simulation Engine,
    SecAgg+) against privrec's simulator."""
    gaps = {**report["engines"]["gaps"], **report["secagg"]["gaps"]}
    return pd.DataFrame({"comparison": list(gaps), "max |gap|": [f"{g:.1e}" for g in gaps.values()]}
                        ).set_index("comparison")


def admission_table(report: dict) -> pd.DataFrame:
    """The SuperNodes that had to be refused: how they ended and the reason Flower logged."""
    rows = [{"SuperNode": p["kind"], "exit code": p["exit_code"],
             "seconds": round(p["seconds"], 1), "reason": _reason(p["reason"])}
            for p in report["admission"]["probes"]]
    return pd.DataFrame(rows).set_index("SuperNode")


def _reason(text: str) -> str:
    for key in ("CERTIFICATE_VERIFY_FAILED", "Failed to activate SuperNode",
                "must be registered"):
        if key in text:
            return key
    return text[:40]


def secagg_lines(report: dict) -> list[str]:
    """SecAgg+'s fixed-point grid against the clip bound and the DP noise, and its dropout runs,
    as lines of at most 80 characters."""
    q, s = report["secagg"]["quantisation"], report["secagg"]
    below = s["below_threshold"]
    drop = s["runs"]["dp-secagg-dropout"]["rounds"][s["dropout"]["round"] - 1]
    return [
        f"grid: {q['bits']} bits on [-{q['coordinate_range']:g}, {q['coordinate_range']:g}], "
        f"step {q['step']:.2e} per coordinate",
        f"clip on the client: C - sqrt(d)*step = {q['client_clip']:.6f} "
        f"(d = {q['coordinates']:,} coordinates)",
        f"rounding error on a sum of 3 uploads: < {q['sum_error_bound_per_coordinate']:.1e} "
        "per coordinate",
        f"DP noise on that sum: std {q['noise_std_on_sum']:.2f} per coordinate "
        f"({q['noise_over_quantisation']:.1e} x the rounding bound)",
        f"dropout after the keys (round {s['dropout']['round']}, silo {s['dropout']['silo']}, "
        f"threshold {s['threshold']} of {s['shares']}): realised {_silos(drop['realised'])}",
        f"  that round took {drop['seconds']:.1f} s (it waited for the silent SuperNode)",
        f"two dropouts (round {below['round']}): stopped at '{below['stage']}'",
        f"  after its {below['deadline']:g} s deadline, with an error naming the stage",
        f"  (the failed run took {below['seconds_to_error']:.0f} s in all, start-up included)",
    ]


def overhead_table(report: dict) -> pd.DataFrame:
    """Per round of the same DP-FedAvg run under each setting (medians of rounds 2..): wall
    seconds, CPU seconds of all the federation's processes and kB on the Fleet API's wire, both
    beyond what the federation spends idling for as long; and the change from the row above."""
    rows = pd.DataFrame(report["overheads"]["rows"]).set_index("setting")
    out = pd.DataFrame({"s/round": rows["seconds"].round(2),
                        "CPU s": rows["cpu_seconds"].round(2),
                        "+CPU s": rows["cpu_seconds"].diff().round(2),
                        "wire kB": (rows["wire_bytes"] / 1000).round(1),
                        "+wire kB": (rows["wire_bytes"].diff() / 1000).round(1)})
    return out.fillna("-")


def _costs(report: dict) -> dict[str, str]:
    """Measured overhead of each mechanism, as short text, from :func:`overhead_table`."""
    if "overheads" not in report:
        return {}
    table = overhead_table(report)
    names = {"TLS": "TLS", "auth": "TLS + registered nodes",
             "secagg": "TLS + registered nodes + SecAgg+"}
    return {key: f"{table.loc[row, '+CPU s']:+.2f} CPU s, {table.loc[row, '+wire kB']:+.1f} kB"
            for key, row in names.items() if row in table.index}


def threat_model_markdown(report: dict) -> str:
    """The threat-model table (Markdown): who could learn or do what, the mechanism that answers
    it, and its measured cost per round; then what none of them answers."""
    cost = _costs(report)
    refused = report["admission"]["probes"]
    rmse = {name: report["engines"]["runs"][f"{name}/deployment"]["test_rmse"]
            for name in ("fedavgm", "dp-fedavg")}
    eps = report["engines"]["runs"]["dp-fedavg/deployment"]["epsilon"]
    rows = [
        ("the network between SuperNodes and SuperLink", "read or alter the broadcast and the "
         "updates", "TLS, a CA of this deployment", cost.get("TLS", "not measured")),
        ("a process that reaches the SuperLink's port", "join as a SuperNode, get the model and "
         "a share of the round", "SuperNode authentication (registered keys)",
         cost.get("auth", "not measured") + "; refused in "
         + " and ".join(f"{p['seconds']:.0f} s" for p in refused)),
        ("the SuperLink operator, the ServerApp", "read one silo's update (chapters 4-5)",
         "SecAgg+: only the masked sum arrives", cost.get("secagg", "not measured")),
        ("an analyst of the released model", "infer what a silo's data contained",
         f"DP noise and the ledger (eps = {eps:.2f} per silo)",
         f"test RMSE {rmse['dp-fedavg']:.3f} vs {rmse['fedavgm']:.3f}"),
        ("a server that adds Sybil clients", "isolate one silo's update in the sum",
         "none of these", "needs a minimum cohort, attested clients, client-side noise"),
        ("a compromised SuperNode", "poison the model; read its own silo",
         "clipping bounds its influence only", "needs robust aggregation, attestation"),
    ]
    head = "| who | could | answered by | measured cost per round |\n|---|---|---|---|\n"
    return head + "\n".join("| " + " | ".join(r) + " |" for r in rows)


def speed_table(report: dict) -> pd.DataFrame:
    """Median seconds of each phase of a round (rounds 2..): Flower's defaults against this
    deployment, and the round's median seconds."""
    s = report["speed"]
    table = pd.DataFrame({"Flower defaults": s["breakdown_before"],
                          "this deployment": s["breakdown_after"]}).round(2)
    table.loc["round (median)"] = [round(s["seconds_before"], 2), round(s["seconds_after"], 2)]
    table.index.name = "phase"
    return table


def _round_record(report: dict, label: str, round_number: int) -> dict:
    if label not in RUN_LABELS:
        raise ValueError(f"label must be one of {sorted(RUN_LABELS)}, got {label!r}")
    rounds = _runs_rounds(report, label)
    if not 1 <= round_number <= len(rounds):
        raise ValueError(f"round_number must be in 1..{len(rounds)}, got {round_number!r}")
    return rounds[round_number - 1]


def round_phases(report: dict, label: str, round_number: int) -> dict[str, float]:
    """Seconds of each phase (or SecAgg+ stage) of round ``round_number`` of run ``label``."""
    r = _round_record(report, label, round_number)
    if "breakdown" in r:
        return dict(r["breakdown"])
    return {f"SecAgg+ {s['stage']}": s["seconds"] for s in r.get("stages", [])}


def _longest_phase(report: dict) -> float:
    """The longest phase of any round of any run of :data:`RUN_LABELS` (one scale for all)."""
    return max(max(round_phases(report, label, r["round"]).values(), default=0.0)
               for label in RUN_LABELS for r in _runs_rounds(report, label))


def _runs_rounds(report: dict, label: str) -> list[dict]:
    section, name = RUN_LABELS[label]
    run = report[section][name] if section == "speed" else report[section]["runs"][name]
    return run["rounds"]


def draw_round(report: dict, label: str, round_number: int):
    """Horizontal bars: where round ``round_number`` of run ``label`` spent its seconds (one
    scale for every run and round, so that switching compares them)."""
    from ..figures import figure

    phases = round_phases(report, label, round_number)
    total = _round_record(report, label, round_number)["seconds"]
    fig, ax = figure(height=3.6)
    names = list(phases)[::-1]
    ax.barh(names, [max(phases[n], 0.0) for n in names], color="#4c72b0")
    ax.set_xlabel("seconds")
    ax.set_title(f"{label}, round {round_number}: {total:.2f} s")
    ax.set_xlim(0, max(1.0, math.ceil(_longest_phase(report) * 1.05)))
    return fig


def lora_lines(report: dict) -> list[str]:
    """Chapter 7's LoRA two-tower deployed for one user-level DP-FedAvg round (the report's
    ``lora`` section): who took part, what one user uploaded, where the round's seconds went, the
    gap to the simulator and the ledger, as lines of at most 80 characters."""
    if "lora" not in instance("report", report, dict):
        raise ValueError("report must have a 'lora' section: re-measure it with "
                         "`python flower/deploy.py --only-lora` (or `make flower-demo`)")
    s = report["lora"]
    r, rows, cols = s["run"]["rounds"][0], *s["shapes"]["lora_B"]
    phases = r["breakdown"]
    sent = sorted({k.split("/")[1] for k in s["uploaded"] if "/" in k})
    return [
        f"{s['users']} of {s['n_users']} users sampled (q = {s['config']['sample-rate']:g}), "
        f"{len(r['realised'])} answered, held by {s['config']['num-partitions']} SuperNodes",
        *textwrap.wrap("uploaded per user: " + ", ".join(sent), 80, subsequent_indent="  "),
        f"  of MiniLM only B: {rows} x {cols} = {rows * cols:,} floats; A and W2 stay put",
        f"  {s['bytes_up_per_user']:,.0f} B per user in Flower's records "
        f"({s['privrec_bytes_up_per_user']:,.0f} B by privrec's count)",
        f"round: {r['seconds']:.1f} s; of it building the model from the cached MiniLM",
        f"  inputs {phases['silo data']:.1f} s, training {phases['training']:.2f} s "
        f"(the simulator's round: {s['simulator_round_seconds']:.2f} s)",
        f"max |gap| to the simulator: {s['gap']:.1e}",
        s["run"]["ledger"].splitlines()[0],
    ]
