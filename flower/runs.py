"""Submitting runs to a :class:`loopback.Loopback` and probing who it lets in.

:func:`submit` starts the app with ``flwr run`` and waits for its ``result.json`` (every wait has a
deadline). The ServerApp stops at gates (``at-<tag>`` files: ``round-<r>`` before round ``r``,
``keys-<r>`` after SecAgg+'s share-keys stage); :func:`submit` runs the caller's action for a tag
(pause or kill a SuperNode), reads the relay's byte counters and lets the ServerApp go on.

:func:`probe` starts a SuperNode that must be refused: one with its own, unregistered key that
trusts the CA, or one whose key is registered but which trusts another CA.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from loopback import APP_DIR, BIN, Loopback
from pki import Authority, node_keys


def format_config(values: dict) -> str:
    """A run config as ``flwr run --run-config`` reads it (TOML values)."""
    def toml(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)
    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


def _release_gates(link: Loopback, out: Path, marks: dict, actions: dict) -> None:
    for at in sorted(out.glob("at-*")):
        tag = at.name[3:]
        if not (out / f"go-{tag}").exists():
            up, down = link.relay.snapshot() if link.relay is not None else (0, 0)
            marks[tag] = (up, down, link.cpu_seconds())
            if tag in actions:
                actions[tag]()
            (out / f"go-{tag}").touch()


def submit(link: Loopback, name: str, *, timeout: float = 240.0,
           actions: dict[str, Callable[[], None]] | None = None, **config) -> dict:
    """Run the app with ``config``; the ServerApp's result plus the Fleet API bytes per round.

    Raises ``RuntimeError`` with the ServerApp's error if the run failed, ``TimeoutError`` if no
    result came within ``timeout`` seconds.
    """
    out = link.work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = {**config, "out-dir": str(out), "gate-dir": str(out)}
    start, marks = time.perf_counter(), {}
    submitted = link.cli("run", APP_DIR, "loopback", "--run-config", format_config(config))
    if submitted.returncode != 0:
        raise RuntimeError(f"flwr run failed ({submitted.returncode}): {submitted.stdout}\n"
                           f"{submitted.stderr}")
    deadline = time.monotonic() + timeout
    while not (out / "result.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {name!r} gave no result within {timeout} s; logs in "
                               f"{link.work} (alive: {link.alive()})")
        if "superlink" not in link.alive():
            raise RuntimeError(f"the SuperLink died during run {name!r}; see {link.work}")
        _release_gates(link, out, marks, actions or {})
        time.sleep(0.02)
    result = json.loads((out / "result.json").read_text())
    if result.get("status") != "ok":
        raise RuntimeError(f"run {name!r} failed in the ServerApp: {result.get('error')}")
    result["wall_seconds"] = time.perf_counter() - start
    for r in result["rounds"]:
        before, after = marks.get(f"round-{r['round']}"), marks.get(f"round-{r['round'] + 1}")
        if before and after:
            r["wire_up"], r["wire_down"] = after[0] - before[0], after[1] - before[1]
            r["cpu_seconds"] = after[2] - before[2]
    return result


def probe(link: Loopback, kind: str, *, timeout: float = 90.0) -> dict:
    """Start a SuperNode that must be refused and report how it ended.

    ``kind``: ``"unregistered"`` (its own key, never registered; trusts the CA) or
    ``"untrusted-ca"`` (a registered key, but it trusts another CA than the SuperLink's).
    """
    folder = link.pki.folder
    if kind == "unregistered":
        key, _ = node_keys(folder, "intruder")
        ca = link.pki.ca
    elif kind == "untrusted-ca":
        key, pub = node_keys(folder, "misconfigured")
        link.register([pub])
        ca = Authority.create(folder, "other-ca").cert_path
    else:
        raise ValueError(f"kind must be 'unregistered' or 'untrusted-ca', got {kind!r}")
    args = link.node_args(0, key=key, ca=ca)
    args[args.index("--max-wait-time") + 1] = 20
    start = time.perf_counter()
    proc = link.start(f"probe-{kind}", [BIN / "flower-supernode", *args])
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    log = (link.work / f"probe-{kind}.log").read_text(errors="replace").splitlines()
    reason = next((line.strip() for line in log if "[code:" in line or "CERTIFICATE" in line),
                  "no reason logged")
    return {"kind": kind, "exit_code": code, "seconds": time.perf_counter() - start,
            "reason": reason}


def idle_rates(link: Loopback, seconds: float = 4.0) -> dict[str, float]:
    """Bytes and CPU seconds per second of the federation while no run is going on: the cost
    of its polls, which a round pays for as long as it lasts."""
    (up, down), cpu = link.relay.snapshot(), link.cpu_seconds()
    time.sleep(seconds)
    (up2, down2), cpu2 = link.relay.snapshot(), link.cpu_seconds()
    return {"wire_bytes_per_s": (up2 - up + down2 - down) / seconds,
            "cpu_per_s": (cpu2 - cpu) / seconds}


def online_nodes(link: Loopback) -> dict[str, str]:
    """``{node_id: status}`` as ``flwr supernode list`` reports it."""
    listed = link.cli("supernode", "list", "loopback", "--format", "json")
    text = listed.stdout[listed.stdout.find("{"):]
    return {n["node-id"]: n["status"] for n in json.loads(text)["nodes"]}
