"""``flower-supernode`` with shorter waits: the latency constants of Flower this repository changes.

Flower 1.42's SuperNode asks the SuperLink for messages and, when there is none, sleeps a fixed
3 s (``flwr.supernode.start_client_internal``, ``time.sleep(3)``; not configurable, unlike the
SuperExec's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``), and it checks for the ClientApp's reply every
0.5 s. And a message's objects that are not uploaded yet are retried after 1 s, then 2 s, ...
(``pull_objects``). A round's messages therefore wait seconds on loopback, where every transfer
takes milliseconds. This launcher gives that module a clock whose ``sleep`` waits at most
``--idle-poll`` seconds and starts the object-pull retries at 0.05 s
(``privrec_flower.backoff.set_pull_backoff``, a module that imports nothing heavy), then starts
Flower's own ``flower-supernode`` entry point with the remaining arguments. Nothing else changes;
:func:`check_patch_point` fails loudly if a Flower upgrade moves the waits.

Usage (from ``.venv-flower``): ``python flower/supernode_launcher.py --idle-poll 0.1 -- <the
flower-supernode arguments>``.
"""

from __future__ import annotations

import inspect
import sys
import time

#: The waits in Flower's SuperNode loop that ``--idle-poll`` shortens (seconds).
FLOWER_WAITS = (3, 0.5)


class ShortClock:
    """The ``time`` module, except that ``sleep(s)`` sleeps ``min(s, longest)``."""

    def __init__(self, longest: float) -> None:
        self.longest = float(longest)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(float(seconds), self.longest))

    def __getattr__(self, name: str):
        return getattr(time, name)


def check_patch_point(module) -> None:
    """Raise if ``module`` no longer has the waits this launcher shortens."""
    source = inspect.getsource(module)
    missing = [s for s in FLOWER_WAITS if f"time.sleep({s})" not in source]
    if missing or not hasattr(module, "time"):
        raise RuntimeError(f"flwr.supernode.start_client_internal no longer sleeps {missing}: "
                           "review flower/supernode_launcher.py for this Flower version")


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--idle-poll" or argv[2] != "--":
        raise SystemExit("usage: supernode_launcher.py --idle-poll SECONDS -- ARGS...")
    longest = float(argv[1])
    if not 0.01 <= longest <= 3:
        raise SystemExit("--idle-poll must be between 0.01 and 3 seconds")
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from privrec_flower.backoff import set_pull_backoff

    check_patch_point(loop)
    loop.time = ShortClock(longest)
    set_pull_backoff(0.05)
    sys.argv = ["flower-supernode", *argv[3:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
