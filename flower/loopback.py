"""A federation on 127.0.0.1: one SuperLink and K SuperNodes as processes, secure by default.

:class:`Loopback` starts, in this order, with ports chosen free at run time:

1. a certificate authority, certificates and SuperNode keys for this run only
   (:class:`pki.LoopbackPKI`);
2. the SuperLink with its TLS certificate (Fleet, Control and Runtime APIs over HTTPS) and
   ``--enable-supernode-auth``: only SuperNodes whose public keys were registered may connect;
3. the registration of each SuperNode's public key through Flower's CLI
   (``flwr supernode register``), which trusts the CA through ``$FLWR_HOME/config.toml``;
4. K SuperNodes, each with its private key and the CA as ``--root-certificates``; with
   ``fast=True`` in Flower's ``process`` isolation mode, each with a warm ClientApp executor
   (``warm_clientapp.py``) and a 0.1 s idle poll (``supernode_launcher.py``); ``preload=("lora",)``
   has the executors load chapter 7's LoRA model's libraries and MiniLM before the first task.

Plain HTTP (``secure=False``) exists only for measuring what TLS costs; it prints a warning and
cannot be combined with node authentication (Flower refuses that too). Every process and every
key is removed on exit, also on failure or Ctrl-C. The SuperNodes reach the SuperLink through
:class:`relay.ByteCounter`, which counts the bytes of the Fleet API on the wire.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pki import LoopbackPKI
from procs import Quiet, cpu_seconds, descendants, free_port, wait_port
from relay import ByteCounter

APP_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
INSECURE_WARNING = ("WARNING: plain HTTP (--insecure): the SuperLink, the SuperNodes and the CLI "
                    "talk without TLS and any process may join as a SuperNode. For measurement "
                    "on 127.0.0.1 only.")


class Loopback:
    """SuperLink + ``k`` SuperNodes on 127.0.0.1 (see the module docstring).

    Use as a context manager: every process is stopped and every key deleted on exit.
    """

    def __init__(self, k: int = 3, *, work: Path, secure: bool = True, auth: bool = True,
                 fast: bool = True, simulation: bool = False, idle_poll: float = 0.1,
                 say=print, start_timeout: float = 90.0, preload: tuple[str, ...] = ()) -> None:
        if auth and not secure:
            raise ValueError("SuperNode authentication needs TLS (secure=True)")
        self.k, self.work, self.say, self.start_timeout = k, Path(work), say, start_timeout
        self.secure, self.auth, self.fast, self.simulation = secure, auth, fast, simulation
        self.idle_poll, self.preload = idle_poll, tuple(preload)
        self.silo_files: list[Path] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.home = self.work / "flwr-home"
        self.pki: LoopbackPKI | None = None
        self.relay: ByteCounter | None = None
        self.port = 0
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1",
                    "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
                    "PYTHONPATH": os.pathsep.join([str(APP_DIR), os.environ.get("PYTHONPATH", "")])}
        if fast:       # Flower's documented knob: how often a SuperExec looks for new tasks
            self.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "0.2"

    # -- processes -----------------------------------------------------------------------------

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start ``args`` as process ``name`` in its own session, logging to ``<name>.log``."""
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.work, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _tls(self, *, server: tuple[Path, Path] | None = None) -> list:
        if not self.secure:
            return ["--insecure"]
        if server is None:
            return ["--root-certificates", self.pki.ca]
        return ["--ssl-certfile", server[0], "--ssl-keyfile", server[1],
                "--ssl-ca-certfile", self.pki.ca]

    def _superlink(self) -> None:
        self.port = free_port()
        link = self.start("superlink", [
            BIN / "flower-superlink", "--host", "127.0.0.1", "--port", self.port,
            "--disable-runtime-dependency-installation",
            *self._tls(server=self.pki.superlink if self.secure else None),
            *(["--enable-supernode-auth"] if self.auth else []),
            *(["--simulation"] if self.simulation else [])])
        wait_port(self.port, timeout=self.start_timeout, proc=link, name="SuperLink")
        connection = (f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                      f'address = "127.0.0.1:{self.port}"\n'
                      + (f'root-certificates = "{self.pki.ca}"\n' if self.secure
                         else "insecure = true\n")
                      + (f"options.num-supernodes = {self.k}\n" if self.simulation else ""))
        (self.home / "config.toml").write_text(connection)

    def cli(self, *args, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this SuperLink (it trusts the CA of this run)."""
        return subprocess.run([str(BIN / "flwr"), *map(str, args)], env=self.env, cwd=self.work,
                              capture_output=True, text=True, timeout=timeout)

    def register(self, public_keys: list[Path]) -> list[int]:
        """Register SuperNode public keys with ``flwr supernode register`` (in parallel)."""
        calls = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", str(key),
                                   "loopback", "--format", "json"], env=self.env, cwd=self.work,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for key in public_keys]
        ids = []
        for key, call in zip(public_keys, calls, strict=True):
            out, err = call.communicate(timeout=120)
            text = out[out.find("{"):] if "{" in out else ""
            if call.returncode != 0 or not text or not json.loads(text).get("success"):
                raise RuntimeError(f"registering {key.name} failed: {out}\n{err}")
            ids.append(int(json.loads(text)["node-id"]))
        return ids

    def node_args(self, i: int, *, key: Path | None, ca: Path | None = None,
                  runtime: tuple[Path, Path] | None = None, isolation: str = "process") -> list:
        """The ``flower-supernode`` arguments of node ``i`` (``ca`` overrides the trusted CA)."""
        tls = (["--root-certificates", ca or self.pki.ca] if self.secure else ["--insecure"])
        args = [*tls, *(["--auth-supernode-private-key", key] if key else []),
                "--superlink", f"127.0.0.1:{self.relay.port}", "--host", "127.0.0.1",
                "--port", free_port(), "--node-config", self._node_config(i),
                "--max-wait-time", self.start_timeout]
        if self.secure and runtime is not None:       # the Runtime API that ClientApps call
            args += ["--ssl-certfile", runtime[0], "--ssl-keyfile", runtime[1],
                     "--ssl-ca-certfile", self.pki.ca]
        return [*args, "--isolation", isolation]

    def _node_config(self, i: int) -> str:
        data = f' data-file="{self.silo_files[i]}"' if i < len(self.silo_files) else ""
        return f"partition-id={i} num-partitions={self.k}{data}"

    def _supernodes(self) -> None:
        from privrec_flower.task import RunConfig, write_silo_files

        self.silo_files = write_silo_files(RunConfig.of({"num-partitions": self.k}),
                                           self.work / "silos")
        for i in range(self.k):
            key = self.pki.nodes[i][0] if self.auth else None
            runtime = self.pki.runtime[i] if self.secure else None
            args = self.node_args(i, key=key, runtime=runtime,
                                  isolation="process" if self.fast else "subprocess")
            node = self.start(f"supernode-{i}", [
                sys.executable, APP_DIR / "supernode_launcher.py", "--idle-poll", self.idle_poll,
                "--", *args] if self.fast else [BIN / "flower-supernode", *args])
            if self.fast:
                self.start(f"executor-{i}", [
                    sys.executable, APP_DIR / "warm_clientapp.py", "--runtime-api-address",
                    f"127.0.0.1:{args[args.index('--port') + 1]}", *self._tls(),
                    "--parent-pid", node.pid, "--poll", "0.1",
                    *(a for p in self.preload for a in ("--preload", p))])

    def __enter__(self) -> Loopback:
        self.work.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        if not self.secure:
            self.say(INSECURE_WARNING)
        try:
            if self.secure:
                self.pki = LoopbackPKI.create(self.work / "pki", self.k)
            self._superlink()
            if not self.simulation:
                self.relay = ByteCounter(self.port)
                if self.auth:
                    self.register([pub for _, pub in self.pki.nodes])
                self._supernodes()
        except BaseException:
            self.stop()
            raise
        self.say(f"SuperLink on 127.0.0.1:{self.port} ({self.describe()})")
        return self

    def describe(self) -> str:
        """The security and speed settings in words."""
        if self.simulation:
            return f"Simulation Engine, {self.k} virtual SuperNodes" + (", TLS" if self.secure
                                                                         else ", plain HTTP")
        return ", ".join([f"{self.k} SuperNodes", "TLS" if self.secure else "plain HTTP",
                          "registered nodes only" if self.auth else "any node may join",
                          "warm ClientApp executors" if self.fast else "a process per message"])

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------

    def node_family(self, i: int) -> list[int]:
        """The pids of SuperNode ``i``, its executor and their children."""
        pids = [p.pid for n, p in self.procs.items() if n in (f"supernode-{i}", f"executor-{i}")]
        return [*pids, *(c for p in pids for c in descendants(p))]

    def signal_node(self, i: int, sig: int) -> None:
        """Send ``sig`` to SuperNode ``i``'s whole family (SIGKILL: a crash; SIGSTOP: offline)."""
        for pid in self.node_family(i):
            with Quiet():
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self.procs[f"supernode-{i}"].wait(timeout=10)
        self.say(f"SuperNode {i}: {signal.Signals(sig).name}")

    # -- teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process this object started and their descendants (Flower detaches its
        SuperExec into a new session, so process groups are not enough): SIGCONT (a paused node),
        SIGTERM, 10 s grace, then SIGKILL by pid; close the relay; delete the keys."""
        family = {pid for proc in self.procs.values() for pid in descendants(proc.pid)}
        everyone = family | {p.pid for p in self.procs.values() if p.poll() is None}
        for sig in (signal.SIGCONT, signal.SIGTERM):
            for pid in everyone:
                with Quiet():
                    os.kill(pid, sig)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with Quiet():
                os.killpg(proc.pid, signal.SIGKILL)
            with Quiet():
                proc.wait(timeout=5)
        for pid in family:
            with Quiet():
                os.kill(pid, signal.SIGKILL)
        if self.relay is not None:
            self.relay.close()
        if self.pki is not None:
            shutil.rmtree(self.pki.folder, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by every process of the federation (and reaped children)."""
        pids = {p.pid for p in self.procs.values()}
        return cpu_seconds(pids | {d for p in pids for d in descendants(p)})

    def alive(self) -> list[str]:
        """Names of started processes still running."""
        return [n for n, p in self.procs.items() if p.poll() is None]
