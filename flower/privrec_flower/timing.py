"""Where a deployed round's seconds go: timestamps on both sides and the round's breakdown.

Every process involved runs on one machine, so wall-clock timestamps (``time.time()``) taken in
the ServerApp and in the ClientApp processes are comparable. A ClientApp reply carries:

* ``t-process``: when its process started (Linux ``/proc``; for a forked ClientApp the fork);
* ``t-import``/``t-imported``: when the app module began and finished importing (torch,
  pandas, privrec -- near zero when the process inherited them);
* ``t-in``, ``t-data``, ``t-decoded``, ``t-trained``, ``t-out``: handler entry, silo data ready,
  broadcast decoded, local training done, reply encoded.

The ServerApp adds when it pushed the message and when it pulled the reply. :func:`breakdown`
splits a round along its critical path, the reply that arrived last.
"""

from __future__ import annotations

import os
import time

#: The phases of :func:`breakdown`, in order; they add up to the round's seconds.
PHASES = ("server: encode and push", "delivery: SuperNode and executor polling",
          "ClientApp process start and Flower runtime", "imports (torch, pandas, privrec)",
          "silo data", "deserialise", "training", "serialise",
          "reply: push and polling", "server: aggregate and step")

STAMPS = ("t-process", "t-import", "t-imported", "t-in", "t-data", "t-decoded", "t-trained",
          "t-out")


def process_started() -> float:
    """Wall-clock time this process started: ``/proc/self/stat`` field 22 against
    ``/proc/uptime`` (both 10 ms resolution; ``btime`` would round to whole seconds)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as up:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            age = float(up.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return time.time()


def breakdown(*, started: float, pushed: float, stamps: dict, got: float,
              ended: float) -> dict[str, float]:
    """Seconds of each of :data:`PHASES` for one round, along the reply that arrived last.

    ``started``/``ended``: the round's start and end on the server; ``pushed``: when the
    messages were pushed; ``stamps``: the last reply's ``t-*`` values; ``got``: when it was pulled.
    """
    s = {k: float(stamps[k]) for k in STAMPS}
    runtime = (s["t-import"] - s["t-process"]) + (s["t-in"] - s["t-imported"])
    return dict(zip(PHASES, (
        pushed - started, s["t-process"] - pushed, runtime, s["t-imported"] - s["t-import"],
        s["t-data"] - s["t-in"], s["t-decoded"] - s["t-data"], s["t-trained"] - s["t-decoded"],
        s["t-out"] - s["t-trained"], got - s["t-out"], ended - got), strict=True))
