"""What the ledger stores and returns: runs, replicas, claim results. Plain values, no I/O."""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

RunStatus = Literal[
    "claimed",
    "executed",
    "error",
    "timeout",
    "crashed",
    "memory",
    "missed",
    "cancelled",
    "lost",
    "skipped",
]
"""``claimed``: in progress (waiting for a worker or running). Every other status is final:
``executed`` (returned), ``error`` (raised), ``timeout``, ``crashed`` (the worker died),
``memory`` (memory limit), ``missed`` (handed over too late), ``cancelled`` (shutdown),
``lost`` (its replica died before reporting), ``skipped`` (``max_instances`` reached across
every replica)."""

RUN_STATUSES: tuple[RunStatus, ...] = typing.get_args(RunStatus)
FINAL_STATUSES = RUN_STATUSES[1:]
ERROR_TEXT_LIMIT = 2000
"""Characters of error text kept per run (the rest is cut, with a marker)."""


class Claim(enum.Enum):
    """The result of claiming one fire."""

    WON = "won"
    """This replica runs it."""
    TAKEN = "taken"
    """Another replica claimed (or skipped) it first; nothing to do here."""
    FULL = "full"
    """``max_instances`` runs of the task are in progress across replicas; recorded ``skipped``."""


@dataclass(frozen=True)
class ClaimResult:
    """One fire's claim: its result and, when recorded by this replica, the run's id."""

    scheduled: datetime
    claim: Claim
    run_id: int | None = None
    term: int = 0
    """The term of this replica's lease the run was claimed in (``HeldLease``)."""


@dataclass(frozen=True)
class ClaimRequest:
    """Fires of one task handed over together (one instance), to claim."""

    task: str
    scheduled: list[datetime]
    max_instances: int
    attempt: int = 0


@dataclass(frozen=True)
class Outcome:
    """A run's outcome, to record."""

    run_id: int
    status: RunStatus
    error: str | None
    worker_pid: int | None
    started_at: float | None
    finished_at: float


@dataclass(frozen=True)
class RunRecord:
    """One run as the ledger records it."""

    id: int
    task: str
    scheduled: datetime
    attempt: int
    status: RunStatus
    host: str
    pid: int
    replica: str
    claimed_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_pid: int | None
    duration: float | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status != "claimed"


@dataclass(frozen=True)
class ReplicaRecord:
    """A live replica: a process running the scheduler against the database."""

    id: str
    host: str
    pid: int
    started_at: datetime
    renewed_at: datetime
    lease_until: datetime
    running: tuple[RunRecord, ...] = field(default=())


@dataclass(frozen=True)
class LostRun:
    """A run whose replica stopped renewing its lease before the run finished."""

    run_id: int
    task: str
    scheduled: datetime
    attempt: int
    host: str
    pid: int


def micros(moment: datetime) -> int:
    """A scheduled time as whole microseconds since the Unix epoch (its identity in the key)."""
    if moment.tzinfo is None:
        raise ValueError(f"scheduled time {moment!r} has no time zone; expected an aware datetime")
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def from_seconds(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def bounded(text: str | None) -> str | None:
    """``text`` as every database stores it (no NUL, no lone surrogate: written escaped), cut
    to :data:`ERROR_TEXT_LIMIT` characters."""
    if text is None:
        return None
    text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= ERROR_TEXT_LIMIT:
        return text
    return text[: ERROR_TEXT_LIMIT - 20] + " ... [cut]"


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
