"""Flower's object-pull retries, shortened: one function, no import beyond Flower's own.

The ServerApp (:mod:`privrec_flower.server_app`), the SuperNode launcher
(``flower/supernode_launcher.py``) and the warm ClientApp (``flower/warm_clientapp.py``) all call
:func:`set_pull_backoff`; the last two run in processes that must not import torch or privrec,
hence a module of its own.
"""

from __future__ import annotations


def set_pull_backoff(seconds: float) -> None:
    """Retry an object that is not uploaded yet after ``seconds``, doubling up to four times that,
    in this process (``seconds=1`` keeps Flower's own defaults: 1 s doubling up to 10 s).

    Flower 1.42 pulls a message's objects with ``pull_objects`` (directly, or through
    ``pull_and_inflate_object_from_tree``), whose first retry waits 1 s (then 2, 4, ... up to
    10 s): a reply pulled while its sender is still uploading costs the round a whole second
    although the upload takes milliseconds on loopback. This sets both functions' default, in
    this process only; it fails loudly if a Flower upgrade renames them.
    """
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        if not {"initial_backoff", "backoff_cap"} <= set(defaults):
            raise RuntimeError(f"flwr's {function.__name__} has no initial_backoff: review "
                               "privrec_flower.backoff.set_pull_backoff")
        if float(seconds) == 1.0:
            continue
        defaults["initial_backoff"] = float(seconds)
        defaults["backoff_cap"] = 4 * float(seconds)        # Flower: 10 s
