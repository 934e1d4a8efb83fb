"""Running as one of several processes: shared run times, and telling when a database is needed.

Every replica computes the same run times, so that a fire (task id, scheduled time) has one
identity everywhere: cron and date triggers already agree; interval triggers are anchored to
their ``start_at`` or, without one, to the Unix epoch, never to when a process started.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from asyncz.triggers import IntervalTrigger
from asyncz.triggers.types import TriggerType

from corral._exceptions import ConfigurationError
from corral._ledger._records import EPOCH

SERVERS = ("gunicorn", "uvicorn", "hypercorn", "granian")


def anchored(trigger: TriggerType, label: str, explicit_start: bool) -> TriggerType:
    """``trigger`` with run times every replica agrees on (interval triggers are re-anchored)."""
    if getattr(trigger, "jitter", None):
        raise ConfigurationError(
            f"task {label!r}: jitter={trigger.jitter!r} gives each replica its own run times, "
            f"so a fire could run on several; remove jitter when a database is set"
        )
    if not isinstance(trigger, IntervalTrigger) or explicit_start:
        return trigger
    start = trigger.start_at
    now = datetime.now(start.tzinfo)
    if start > now + trigger.interval + timedelta(seconds=1):
        return trigger  # a start in the future was chosen: every replica has the same one
    # The grid k * interval from the epoch, in the trigger's own time zone.
    trigger.start_at = EPOCH.astimezone(start.tzinfo)
    return trigger


def multi_worker_server() -> str | None:
    """What tells that this process is one of several workers of a server, if anything does."""
    concurrency = os.environ.get("WEB_CONCURRENCY", "")
    if concurrency.isdigit() and int(concurrency) > 1:
        return f"WEB_CONCURRENCY={concurrency}"
    return _parent_server()


def _parent_server() -> str | None:
    try:
        import psutil

        parent = psutil.Process().parent()
        command = parent.cmdline() if parent is not None else []
    except Exception:  # no parent, or not ours to read
        return None
    line = " ".join(os.path.basename(part) for part in command[:3])
    server = next((name for name in SERVERS if name in line), None)
    if server is None:
        return None
    if server == "gunicorn":
        return _workers_flag(command, ("-w", "--workers"), server=server)
    return _workers_flag(command, ("--workers",), server=server)


def _workers_flag(command: list[str], flags: tuple[str, ...], server: str) -> str | None:
    count = 1
    for index, part in enumerate(command):
        for flag in flags:
            value: Any = None
            if part == flag and index + 1 < len(command):
                value = command[index + 1]
            elif part.startswith(flag + "="):
                value = part.split("=", 1)[1]
            if value is not None and str(value).isdigit():
                count = int(value)
    return f"{server} with {count} workers" if count > 1 else None
