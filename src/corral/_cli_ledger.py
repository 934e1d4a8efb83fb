"""``corral runs`` and ``corral status``: the ledger's history and live replicas, as a table or
JSON, read from the database given by ``--database`` or ``CORRAL_DATABASE``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from corral._exceptions import CorralError
from corral._ledger import RUN_STATUSES, Ledger, ReplicaRecord, RunRecord

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class LedgerUsageError(Exception):
    """A mistake on the command line of ``runs`` or ``status``."""


def add_commands(commands: Any) -> None:
    """Add ``runs`` and ``status`` to the ``corral`` command's subparsers."""
    runs = commands.add_parser("runs", help="print the ledger's runs (needs a database)")
    status = commands.add_parser("status", help="print live replicas and what each is running")
    for command in (runs, status):
        command.add_argument(
            "--database", help="the ledger's database URL (default: $CORRAL_DATABASE)"
        )
        command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.add_argument("--task", help="only this task id")
    runs.add_argument("--status", choices=RUN_STATUSES, help="only runs with this status")
    runs.add_argument(
        "--since",
        type=since,
        help="only runs scheduled since: a duration back from now (30m, 2h, 7d) or a time "
        "(2026-12-01T09:00:00+00:00)",
    )
    runs.add_argument("--limit", type=int, default=50, help="most runs to print (default 50)")


def since(text: str) -> datetime:
    """``--since``: ``2h`` back from now, or an ISO 8601 time (UTC when it has no offset)."""
    match = _DURATION.match(text.strip())
    if match:
        amount, unit = match.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 2h, 7d) nor a time (2026-12-01T09:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(args: argparse.Namespace) -> int:
    url = args.database or os.environ.get("CORRAL_DATABASE")
    if not url:
        raise LedgerUsageError(
            "no database: pass --database URL or set CORRAL_DATABASE "
            "(the URL the scheduler's SchedulerConfig(database=...) uses)"
        )
    try:
        from corral._config import SchedulerConfig

        url = SchedulerConfig(database=url).database or url
    except ValidationError as exc:
        raise LedgerUsageError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    ledger = Ledger(url)
    try:
        if args.command == "runs":
            if args.limit < 1:
                raise LedgerUsageError(f"--limit {args.limit}: expected a whole number >= 1")
            show: Callable[[Any], None] = print_runs
            records: Sequence[Any] = ledger.runs(
                task=args.task, status=args.status, since=args.since, limit=args.limit
            )
        else:
            records = ledger.replicas()
            show = print_replicas
    except CorralError as exc:
        raise LedgerUsageError(str(exc)) from None
    except Exception as exc:  # the database's own words: unreachable, wrong credentials...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LedgerUsageError(
            f"cannot read the ledger in {ledger!r}: {type(exc).__name__}: {first}"
        ) from None
    finally:
        ledger.close()
    if args.json:
        json.dump([_plain(record) for record in records], sys.stdout, indent=1)
        print()
    else:
        show(records)
    return 0


def print_runs(records: Sequence[RunRecord]) -> None:
    if not records:
        print("no runs recorded (yet) with these filters")
        return
    rows = [
        [
            r.task,
            _time(r.scheduled),
            r.status + (f" (attempt {r.attempt})" if r.attempt else ""),
            f"{r.host}:{r.pid}",
            "" if r.worker_pid is None else str(r.worker_pid),
            "" if r.duration is None else f"{r.duration:.3f}s",
            (r.error or "").splitlines()[0][:120] if r.error else "",
        ]
        for r in records
    ]
    _table(["task", "scheduled (UTC)", "status", "claimed by", "worker", "took", "error"], rows)


def print_replicas(records: Sequence[ReplicaRecord]) -> None:
    if not records:
        print("no live replica")
        return
    rows = [
        [
            f"{r.host}:{r.pid}",
            _time(r.started_at),
            _time(r.lease_until),
            ", ".join(f"{run.task}@{_time(run.scheduled)}" for run in r.running) or "-",
        ]
        for r in records
    ]
    _table(["replica", "started (UTC)", "lease until (UTC)", "running"], rows)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = zip(row, widths, strict=True)
        print("  ".join(cell.ljust(width) for cell, width in cells).rstrip())


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _plain(record: Any) -> Any:
    values = dataclasses.asdict(record)
    return {key: _jsonable(value) for key, value in values.items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value
