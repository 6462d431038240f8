"""Flower's engines on loopback: one SuperLink and K SuperNodes as separate processes.

``python flower/deploy.py`` (from ``.venv-flower``; ``make flower-demo``) starts a SuperLink and
K SuperNodes on 127.0.0.1 with ports chosen free at run time and submits runs with ``flwr run``
(FedAvgM, DP-FedAvg, and DP-FedAvg with a SuperNode killed before the last round): Flower's
Deployment Engine. It then starts a SuperLink with ``--simulation`` (Flower's Simulation Engine,
the same app through the same ``flwr run``) and runs privrec's simulator. It prints per-round
metrics and bytes, the largest parameter gap between the engines and the seconds per round,
writes everything to ``--out`` and stops every process it started -- also on failure or Ctrl-C.
Every wait has a timeout. Transport: plain HTTP on loopback (``--insecure``; a warning is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP_DIR))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, *, timeout: float, proc: subprocess.Popen, name: str) -> None:
    """Wait until something listens on ``port``; fail clearly if ``proc`` died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout} s")


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def format_config(values: dict) -> str:
    """A run config as ``flwr run --run-config`` reads it (TOML values)."""
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


class Loopback:
    """SuperLink + ``k`` SuperNodes on 127.0.0.1, each in its own process group.

    Use as a context manager: every process is stopped on exit (SIGTERM, then SIGKILL).
    """

    def __init__(self, k: int = 3, *, work: Path, say=print, start_timeout: float = 90.0,
                 simulation: bool = False) -> None:
        self.k, self.work, self.say, self.start_timeout = k, Path(work), say, start_timeout
        self.simulation = simulation    # Flower's Simulation Engine behind the same SuperLink
        self.procs: dict[str, subprocess.Popen] = {}
        self.home = self.work / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1",
                    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
                    "PYTHONPATH": os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")])}
        self.port = 0

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.work, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def __enter__(self) -> Loopback:
        self.work.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.say("WARNING: SuperLink and SuperNodes talk plain HTTP (--insecure): acceptable on "
                 "127.0.0.1 only; use TLS certificates anywhere else.")
        try:
            self.port = free_port()
            link = self._start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                             "--host", "127.0.0.1", "--port", str(self.port),
                                             "--disable-runtime-dependency-installation",
                                             *(["--simulation"] if self.simulation else [])])
            wait_port(self.port, timeout=self.start_timeout, proc=link, name="SuperLink")
            for i in range(0 if self.simulation else self.k):
                self._start(f"supernode-{i}", [
                    str(BIN / "flower-supernode"), "--insecure",
                    "--superlink", f"127.0.0.1:{self.port}",
                    "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions={self.k}",
                    "--max-wait-time", str(self.start_timeout)])
            (self.home / "config.toml").write_text(
                '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
                + (f"options.num-supernodes = {self.k}\n" if self.simulation else ""))
        except BaseException:
            self.stop()
            raise
        nodes = [p.pid for n, p in self.procs.items() if n != "superlink"]
        self.say(f"SuperLink on 127.0.0.1:{self.port}; " + (
            f"Simulation Engine with {self.k} virtual SuperNodes" if self.simulation
            else f"{self.k} SuperNodes started (pids {nodes})"))
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and its ClientApp processes (a crash, not a clean exit)."""
        proc = self.procs[f"supernode-{i}"]
        for pid in [proc.pid, *descendants(proc.pid)]:
            with _Quiet():
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.say(f"killed SuperNode {i} (pid {proc.pid})")

    def stop(self) -> None:
        """Stop every process this object started and their descendants (Flower detaches its
        SuperExec into a new session, so process groups are not enough): SIGTERM, 10 s grace,
        then SIGKILL by pid."""
        family = {pid for proc in self.procs.values() for pid in descendants(proc.pid)}
        for pid in family:
            with _Quiet():
                os.kill(pid, signal.SIGTERM)
        for proc in self.procs.values():
            with _Quiet():
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with _Quiet():
                os.killpg(proc.pid, signal.SIGKILL)   # children (SuperExec, apps) too
            with _Quiet():
                proc.wait(timeout=5)
        for pid in family:
            with _Quiet():
                os.kill(pid, signal.SIGKILL)

    def alive(self) -> list[str]:
        """Names of started processes still running."""
        return [n for n, p in self.procs.items() if p.poll() is None]

    def run(self, name: str, *, timeout: float = 240.0, kill_after_round: int | None = None,
            kill_node: int | None = None, **config) -> dict:
        """Submit the app with ``flwr run`` and wait for its ``result.json`` (or fail clearly).

        With ``kill_after_round``, SuperNode ``kill_node`` is killed right after that round.
        """
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        config = {**config, "out-dir": str(out)}
        if kill_after_round is not None:
            config["gate-dir"] = str(out)
        start = time.perf_counter()
        submit = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "loopback",
                                 "--run-config", format_config(config)],
                                env=self.env, cwd=self.work, capture_output=True, text=True,
                                timeout=120)
        if submit.returncode != 0:
            raise RuntimeError(f"flwr run failed ({submit.returncode}): {submit.stdout}\n"
                               f"{submit.stderr}")
        self.say(submit.stdout.strip().splitlines()[-1] if submit.stdout.strip() else "submitted")
        deadline, killed = time.monotonic() + timeout, kill_after_round is None
        rounds = int(config.get("num-server-rounds", 3))
        while not (out / "result.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {name!r} gave no result within {timeout} s; logs in "
                                   f"{self.work} (alive: {self.alive()})")
            if "superlink" not in self.alive():
                raise RuntimeError(f"the SuperLink died during run {name!r}; see {self.work}")
            for r in range(1, rounds + 2):   # the gate: release round r once r-1 is done
                if (out / f"done-{r - 1}").exists() and not (out / f"go-{r}").exists():
                    if not killed and r - 1 == kill_after_round:
                        self.kill_node(kill_node)
                        killed = True
                    (out / f"go-{r}").touch()
            time.sleep(0.05)
        result = json.loads((out / "result.json").read_text())
        if result.get("status") != "ok":
            raise RuntimeError(f"run {name!r} failed in the ServerApp: {result.get('error')}")
        result["wall_seconds"] = time.perf_counter() - start
        for r in result["rounds"]:
            self.say(f"  [{name} round {r['round']}] sampled={r['sampled']} "
                     f"realised={r['realised']} up={r['bytes_up']:,} B "
                     f"down={r['bytes_down']:,} B {r['seconds']:.2f} s epsilon={r['epsilon']:.3g}")
        return result


class _Quiet:
    """Ignore a process that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, ProcessLookupError | ChildProcessError
                                               | subprocess.TimeoutExpired)


def _summary(result: dict) -> dict:
    keep = ("round", "sampled", "realised", "errors", "silent", "bytes_up", "privrec_bytes_up",
            "bytes_down", "seconds", "epsilon")
    return {"rounds": [{k: r[k] for k in keep if k in r} for r in result["rounds"]],
            **{k: result.get(k) for k in ("strategy", "epsilon", "ledger", "test_rmse",
                                           "wall_seconds")}}


def demo(work: Path, *, nodes: int = 3, rounds: int = 3, simulation_engine: bool = True,
         say=print) -> dict:
    """All three engines on FedAvgM, DP-FedAvg and DP-FedAvg with a SuperNode killed."""
    from privrec_flower.engines import load_shared, max_abs_gap, median_round_seconds, simulate
    from privrec_flower.task import RunConfig

    base = {"num-partitions": nodes, "num-server-rounds": rounds}
    configs = {"fedavgm": RunConfig.of(base), "dp-fedavg": RunConfig.of(base, dp=True)}
    report: dict = {"nodes": nodes, "rounds": rounds, "cpus": os.cpu_count(),
                    "load_average_1min_before": os.getloadavg()[0], "runs": {},
                    "max_abs_gap": {}, "seconds_per_round": {}}
    engines = {"deployment": False, **({"simulation-engine": True} if simulation_engine else {})}
    for engine, simulation in engines.items():
        with Loopback(nodes, work=work / engine, say=say, simulation=simulation) as link:
            for name, cfg in configs.items():
                report["runs"][f"{name}/{engine}"] = _summary(link.run(name, **base, dp=cfg["dp"]))
            if not simulation:
                killed = link.run("dp-fedavg-killed", kill_after_round=rounds - 1,
                                  kill_node=nodes - 1, **base, dp=True)
                report["runs"]["dp-fedavg-killed/deployment"] = _summary(killed)
    report["load_average_1min_after"] = os.getloadavg()[0]
    for name, cfg in configs.items():
        simulated, shared = simulate(cfg)
        report["runs"][f"{name}/simulator"] = simulated
        report["seconds_per_round"][name] = {"simulator": median_round_seconds(simulated["rounds"])}
        for engine in engines:
            report["max_abs_gap"][f"{name}: {engine} vs simulator"] = max_abs_gap(
                shared, load_shared(work / engine / name / "shared.npz"))
            report["seconds_per_round"][name][engine] = median_round_seconds(
                report["runs"][f"{name}/{engine}"]["rounds"])
    reference, shared = simulate(configs["dp-fedavg"],
                                 realised=[r["realised"] for r in killed["rounds"]])
    report["runs"]["dp-fedavg-killed/simulator-realised-cohort"] = reference
    report["max_abs_gap"]["dp-fedavg-killed: deployment vs simulator (realised cohort)"] = \
        max_abs_gap(shared, load_shared(work / "deployment" / "dp-fedavg-killed" / "shared.npz"))
    for name, gap in report["max_abs_gap"].items():
        say(f"max |gap| {name}: {gap:.2e}")
    for name, secs in report["seconds_per_round"].items():
        secs["deployment/simulator"] = secs["deployment"] / secs["simulator"]
        say(f"{name}: seconds per round " + ", ".join(f"{k} {v:.3g}" for k, v in secs.items()))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="K SuperNodes (>= 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=APP_DIR / "results" / "deployment.json")
    parser.add_argument("--no-simulation-engine", action="store_true",
                        help="skip Flower's Simulation Engine (a SuperLink with --simulation, Ray)")
    args = parser.parse_args(argv)
    if args.nodes < 3:
        parser.error("--nodes must be >= 3")
    with tempfile.TemporaryDirectory(prefix="privrec-flower-") as tmp:
        report = demo(Path(tmp), nodes=args.nodes, rounds=args.rounds,
                      simulation_engine=not args.no_simulation_engine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=True, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(math.isfinite(v) for v in report["max_abs_gap"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
