"""Tasks for the replica tests, run by several ``corral run`` processes sharing a database.

``CORRAL_TEST_TASKS`` chooses which are enabled (``tick,hold``); each appends a line to
``CORRAL_TEST_OUT``. ``hold`` and ``backlog`` run until the file ``CORRAL_TEST_RELEASE`` exists.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from corral import scheduler

ENABLED = os.environ.get("CORRAL_TEST_TASKS", "tick").split(",")
RERUN = os.environ.get("CORRAL_TEST_RERUN") == "1"


def _record(what: str) -> None:
    with open(os.environ["CORRAL_TEST_OUT"], "a") as out:
        out.write(f"{what} {os.getpid()} {time.time():.6f}\n")


# A generous grace time, no coalescing of run times that fell due together, and room for runs
# that a busy machine makes overlap: these tests prove exactly-once, not punctuality under load.
@scheduler(
    name="tick",
    trigger="interval",
    seconds=1,
    mistrigger_grace_time=30,
    coalesce=False,
    max_instances=10,
    is_enabled="tick" in ENABLED,
)
def tick() -> None:
    _record("tick")


@scheduler(
    name="hold",
    trigger="interval",
    seconds=1,
    max_instances=1,
    mistrigger_grace_time=3600,
    rerun_lost=RERUN,
    is_enabled="hold" in ENABLED,
)
def hold() -> None:
    _record("hold")
    _wait_for_release()


@scheduler(
    name="backlog",
    trigger="interval",
    seconds=1,
    max_instances=10,
    coalesce=False,
    mistrigger_grace_time=3600,
    rerun_lost=RERUN,
    is_enabled="backlog" in ENABLED,
)
def backlog() -> str:
    """Held like ``hold``, but fires pile up behind it (``max_instances=10``); says which
    process ran it and when it started."""
    started = time.time()
    _record("backlog")
    _wait_for_release()
    return f"{os.getpid()}@{started:.6f}"


def _wait_for_release() -> None:
    release = Path(os.environ["CORRAL_TEST_RELEASE"])
    pause = threading.Event()
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        pause.wait(0.05)
