"""A warm ClientApp executor for a SuperNode in Flower's ``process`` isolation mode.

With ``flower-supernode --isolation subprocess`` (Flower's default) the SuperNode starts a
``flower-superexec``, which starts a fresh ``flwr-clientapp`` process for every message: Python,
Flower, torch, pandas and privrec are imported again each time (2-3 s of a round on two cores).
With ``--isolation process`` the SuperNode leaves that to a process the operator runs; this is one:

* it imports the heavy modules **once** (torch, pandas, privrec, Flower's ClientApp runtime; not
  the app itself, which is still loaded from the installed FAB); with ``--preload lora`` also
  what chapter 7's LoRA model needs (peft, transformers), MiniLM and the catalogue's frozen
  top-layer inputs (:mod:`warm_preload`): public data, read once and shared by every child;
* it asks the SuperNode's Runtime API for ClientApp tasks every ``--poll`` seconds (Flower's
  own ``AcquireTask`` call, as ``flower-superexec`` does);
* for each task it **forks** a child that runs Flower's own ``run_clientapp`` for that task's
  token, exactly as ``flwr-clientapp`` would, and exits: one process per message (Flower's
  isolation and ``context.state`` semantics unchanged), without the imports.

It talks to the Runtime API over TLS (``--root-certificates``, the run's CA) unless
``--insecure`` is given. It exits when the SuperNode (``--parent-pid``) is gone or on SIGTERM;
forked children die with it (same process group). Run from ``.venv-flower``:
``python flower/warm_clientapp.py --runtime-api-address 127.0.0.1:PORT --root-certificates ca.pem``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

#: What every ClientApp message imports; loaded before the first fork.
WARM_MODULES = ("torch", "numpy", "pandas", "privrec.federated.engine",
                "privrec.federated.dpfedavg", "privrec.recsys.data",
                "flwr.supernode.runtime.run_clientapp", "flwr.client.mod", "flwr.app")


#: ``--preload lora``: the LoRA model's libraries (the app's own modules stay the FAB's).
LORA_MODULES = ("peft", "sentence_transformers", "privrec.recsys.lora", "privrec.federated.lora",
                "privrec.course.experiments.large_models")


def _warm_up(preload: tuple[str, ...] = ()) -> None:
    import importlib

    for name in WARM_MODULES + (LORA_MODULES if "lora" in preload else ()):
        importlib.import_module(name)
    if "lora" in preload:
        from warm_preload import load_lora

        load_lora()
    import torch

    from privrec_flower.backoff import set_pull_backoff

    torch.set_num_threads(1)
    # The SuperNode may still be downloading the message when a ClientApp starts this early:
    # retry its objects after 0.05 s, not Flower's 1 s.
    set_pull_backoff(0.05)


def _client(address: str, certificates: bytes | None):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=certificates is None, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())


def _run_child(address: str, token: str, certificates: bytes | None) -> None:
    """In the forked child: Flower's ``flwr-clientapp`` body for one token, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(runtime_api_address=address, token=token, insecure=certificates is None,
                      certificates=certificates, parent_pid=os.getppid(),
                      runtime_dependency_install=False)
        code = 0
    except SystemExit as done:              # flwr_exit ends the task with sys.exit(code)
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(address: str, certificates: bytes | None, *, poll: float, parent_pid: int | None,
          preload: tuple[str, ...] = ()) -> int:
    """Acquire ClientApp tasks and fork one child per task until the SuperNode is gone."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    _warm_up(preload)
    client = _client(address, certificates)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while not stop:
        if parent_pid is not None and not _alive(parent_pid):
            break
        _reap()
        try:
            res = client.AcquireTask(request)
        except Exception as err:  # noqa: BLE001 - the SuperNode went away: stop
            print(f"warm ClientApp executor: Runtime API unreachable ({err}); exiting",
                  flush=True)
            break
        if res.HasField("task") and res.token:
            if os.fork() == 0:
                _run_child(address, res.token, certificates)
            continue                              # another task may be waiting
        time.sleep(poll)
    client.close()
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap() -> None:
    """Collect finished children (no zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", type=Path, help="CA of the Runtime API's certificate")
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between task polls")
    parser.add_argument("--preload", choices=("lora",), action="append", default=[],
                        help="also load what a model needs before the first task")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll <= 60:
        parser.error("--poll must be between 0.01 and 60 seconds")
    certificates = None if args.insecure else args.root_certificates.read_bytes()
    return serve(args.runtime_api_address, certificates, poll=args.poll,
                 parent_pid=args.parent_pid, preload=tuple(args.preload))


if __name__ == "__main__":
    sys.exit(main())
