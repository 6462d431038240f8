"""Shared plumbing for the benchmark scripts: the machine description, timing, peak memory, results.

Every script writes one section of ``benchmarks/results.json`` (the file the book's performance
page renders) with :func:`save_section`, so each can be re-run on its own; each section records
the machine and library versions it ran with.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
LIBRARIES = ("privrec", "torch", "numpy", "pandas", "opacus", "dp-accounting", "flwr", "ray")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover - not Linux
        pass
    return float("nan")


def machine(note: str = "") -> dict:
    """CPU model, cores, memory, Python and library versions, the load, the time (UTC)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = _md.version(name)
        except _md.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "libraries": versions, "load_average_1min": round(os.getloadavg()[0], 2),
        "utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"), "note": note,
    }


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size so far.

    Linux's ``VmHWM`` (the high-water mark of this program's own memory) where available: on Linux
    ``getrusage``'s ``ru_maxrss`` survives ``execve``, so a child started from a 1 GB parent would
    report at least 1 GB. Elsewhere ``ru_maxrss``.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1024 if sys.platform != "darwin" else 1  # pragma: no cover - not Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mib() -> float:
    rss = _proc_status_mib("VmRSS")
    return float("nan") if rss is None else rss


def interleaved_medians(steps: dict[str, Callable[[], None]], *, warmup: int, rounds: int,
                        per_round: dict[str, int] | None = None) -> dict[str, dict]:
    """Median seconds per call of each function, timed in interleaved rounds.

    The machine is shared, so the functions take turns (round 1: a, b, c; round 2: a, b, c; ...):
    a burst of load from another process then hits every contestant alike rather than one.
    """
    per_round = per_round or {}
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(per_round.get(name, 1)):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "calls": len(t)}
            for name, t in times.items()}


def load_results(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_section(name: str, section: dict, path: Path = RESULTS) -> None:
    """Replace one section of the results file (others are kept), stamped with the machine."""
    results = load_results(path)
    results[name] = {"machine": machine(), **section}
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    print(f"wrote section {name!r} of {path}")


def run_measured(argv: Sequence[str], *, timeout_s: float, memory_cap_mib: float,
                 env: dict | None = None) -> dict:
    """Run ``argv`` in a fresh process; return its last stdout line as JSON plus how it ended.

    The child measures its own peak memory (``ru_maxrss``) and prints a JSON line. The parent
    watches the child's resident memory every 0.2 s and kills it above ``memory_cap_mib`` (so a
    configuration that would exhaust the shared machine is recorded as such instead of run), and
    kills it after ``timeout_s``.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    state = {"killed": None, "max_seen_mib": 0.0}

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) / 1024
                        state["max_seen_mib"] = max(state["max_seen_mib"], rss)
                        if rss > memory_cap_mib:
                            state["killed"] = f"resident memory passed the {memory_cap_mib:.0f} MiB cap"
                            proc.kill()
            except (OSError, ValueError):
                pass
            if time.perf_counter() - start > timeout_s and proc.poll() is None:
                state["killed"] = f"timed out after {timeout_s:.0f} s"
                proc.kill()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    record: dict = {"wall_s": round(time.perf_counter() - start, 2), "returncode": proc.returncode,
                    "max_rss_seen_mib": round(state["max_seen_mib"], 1)}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if state["killed"] is None and proc.returncode == 0 and lines:
        record.update(json.loads(lines[-1]))
        record["ok"] = True
    else:
        record["ok"] = False
        record["error"] = state["killed"] or (err.strip().splitlines() or ["no output"])[-1][:400]
    return record
