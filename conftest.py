"""pytest hooks for the whole repository: how long each notebook took under nbval.

nbval executes every chapter cell by cell (one test per cell); CI's log should say where the time
goes per chapter (issue 12), so the terminal summary lists each notebook's wall time, from its
first cell's setup (which starts the kernel) to its last cell's teardown.
"""

from __future__ import annotations

import time

_spans: dict[str, list[float]] = {}


def _notebook(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return path if path.endswith(".ipynb") else None


def pytest_runtest_logstart(nodeid, location):
    if (notebook := _notebook(nodeid)) is not None:
        _spans.setdefault(notebook, [time.perf_counter(), time.perf_counter()])


def pytest_runtest_logfinish(nodeid, location):
    if (notebook := _notebook(nodeid)) is not None:
        _spans[notebook][1] = time.perf_counter()


def pytest_terminal_summary(terminalreporter):
    if not _spans:
        return
    terminalreporter.section("notebook execution time (nbval)")
    for notebook, (start, end) in _spans.items():
        terminalreporter.write_line(f"{notebook}: {end - start:.1f} s")
    total = sum(end - start for start, end in _spans.values())
    terminalreporter.write_line(f"all {len(_spans)} notebooks: {total:.1f} s")
