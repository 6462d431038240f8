"""Messages with deadlines: push, poll for replies, record when each arrived and its bytes.

Flower's ``Grid.send_and_receive`` sleeps 3 s between two pulls of the replies; a round whose
replies come back in 0.3 s would still take 3 s. :func:`exchange` polls every ``poll`` seconds
instead, until every reply came or ``timeout`` passed (never longer: no hang on a silent node).
:class:`RecordingGrid` hands the same exchange to Flower's SecAgg+ workflow, which only calls
``send_and_receive``, and records each of its stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Message
from flwr.serverapp import Grid

from privrec_flower.task import record_bytes


def exchange(grid: Grid, messages: list[Message], *, timeout: float,
             poll: float) -> tuple[list[Message], int, dict[str, float]]:
    """Push ``messages``, pull replies every ``poll`` s until all came or ``timeout`` s passed.

    Returns the replies (content or error), the number of messages left unanswered and, for
    each reply (by the id of the message it answers), the wall-clock time it was pulled.
    """
    waiting = set(grid.push_messages(messages))
    replies, got_at, deadline = [], {}, time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        now = time.time()
        for m in got:
            got_at[m.metadata.reply_to_message_id] = now
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(poll)
    return replies, len(waiting), got_at


class RecordingGrid:
    """The ``send_and_receive`` of a Grid through :func:`exchange`, one record per call.

    Flower's SecAgg+ workflow calls ``send_and_receive`` once per stage (setup, share keys,
    collect masked vectors, unmask); ``after_stage(i)`` runs after call ``i`` returns (a test hook:
    e.g. pause a SuperNode after it shared its keys).
    """

    STAGES = ("setup", "share keys", "collect masked vectors", "unmask")

    def __init__(self, grid: Grid, *, poll: float, timeout: float,
                 after_stage: Callable[[int], None] | None = None) -> None:
        self.grid, self.poll, self.timeout, self.after_stage = grid, poll, timeout, after_stage
        self.stages: list[dict] = []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        start = time.perf_counter()
        down = sum(record_bytes(m.content) for m in messages)
        replies, silent, _ = exchange(self.grid, messages, poll=self.poll,
                                      timeout=self.timeout if timeout is None else timeout)
        index = len(self.stages)
        self.stages.append({
            "stage": self.STAGES[index] if index < len(self.STAGES) else f"call {index}",
            "sent": len(messages), "answered": sum(m.has_content() for m in replies),
            "silent": silent, "bytes_down": down,
            "bytes_up": sum(record_bytes(m.content) for m in replies if m.has_content()),
            "seconds": time.perf_counter() - start})
        if self.after_stage is not None:
            self.after_stage(index)
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
