"""``Ledger``: claims, leases and the run history, over one SQLAlchemy engine.

Every method is one short transaction and blocks its caller: the scheduler calls them from its
coordinator thread (never from the app's event loop); ``corral runs`` and ``corral status``
call them directly.

The claim protocol:

1. A fire is (task id, scheduled time); a run is a fire and an attempt (0, then 1 for a rerun
   of a lost run). ``corral_runs`` has a unique key on the three.
2. ``claim`` counts the task's runs in progress everywhere and inserts one row per fire with
   ``ON CONFLICT DO NOTHING``, in one transaction serialised per task (SQLite: ``BEGIN
   IMMEDIATE``; PostgreSQL: an advisory lock on the task's name). The replica whose insert
   succeeds runs the fire; the others see a conflict and skip it.
3. Runs handed over together (one ``send_task``) share a batch and count as one instance, as
   in asyncz; past ``max_instances`` batches in progress, the fire is recorded ``skipped``
   (a rerun records nothing then: its claimer tries again later).
4. Each replica renews its lease; a replica whose lease expired is deleted by exactly one
   survivor (the delete is the decision), which marks its runs in progress ``lost`` in the
   same transaction and reports them.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Row, and_, bindparam, delete, func, select, update

from corral._clock import lease_clock
from corral._ledger._lease import HeldLease
from corral._ledger._records import (
    Claim,
    ClaimRequest,
    ClaimResult,
    LostRun,
    Outcome,
    ReplicaRecord,
    RunRecord,
    RunStatus,
    bounded,
    from_micros,
    from_seconds,
    micros,
)
from corral._ledger._schema import (
    create_tables,
    insert_ignoring_conflicts,
    make_engine,
    replicas,
    runs,
    safe_url,
    transaction,
)

DEFAULT_LEASE = 10.0

# Built once: statements with bound parameters are compiled once and cached by SQLAlchemy.
_RENEW = (
    update(replicas)
    .where(replicas.c.id == bindparam("replica"))
    .values(renewed_at=bindparam("now"), lease_until=bindparam("until"))
)
_IN_PROGRESS = select(func.count(func.distinct(runs.c.batch))).where(
    and_(runs.c.task == bindparam("task"), runs.c.status == "claimed")
)

_STATUS = select(runs.c.status).where(runs.c.id == bindparam("run"))
_RUN_EXISTS = select(runs.c.id).where(
    and_(
        runs.c.task == bindparam("task"),
        runs.c.scheduled_us == bindparam("scheduled_us"),
        runs.c.attempt == bindparam("attempt"),
    )
)


class Ledger:
    """The run ledger in a database shared by every replica.

    Args:
        url: ``sqlite:///path/to/corral.db`` or ``postgresql://user:password@host/dbname``.
        lease: Seconds a replica stays alive in the others' eyes without renewing its lease.
        clock: Wall-clock seconds since the epoch (replaceable in tests).
        monotonic: ``lease_clock`` (replaceable in tests): what ``held`` is measured on.
    """

    def __init__(
        self,
        url: str,
        *,
        lease: float = DEFAULT_LEASE,
        clock: Any = time.time,
        monotonic: Any = lease_clock,
    ) -> None:
        self.url = url
        self.lease = lease
        self._clock = clock
        self._monotonic = monotonic
        self.held = HeldLease(lease, clock=monotonic)
        """This replica's lease as it knows it locally: its term, and until when it surely holds."""
        self.engine: Engine = make_engine(url)
        self.replica = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.queries = 0  # transactions run, for the idle-cost figures
        self._tables_ready = False

    def __repr__(self) -> str:
        return f"Ledger({safe_url(self.url)!r})"

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    # -- this replica ---------------------------------------------------------------------------

    def join(self) -> None:
        """Create the tables if needed and register this replica with a fresh lease (renew it,
        in the same term, if a claim made while it could not join registered it already)."""
        self._ensure_tables()
        sent_at, now = self._monotonic(), self._clock()
        with self._transaction() as connection:
            renewed = self._touch(connection, now)
        self.held.renewed(sent_at, fresh=not renewed)

    def renew(self) -> bool:
        """Extend this replica's lease; ``False`` if it had expired and others removed it
        (it is then registered again, in a new term: its runs in progress were already reported
        lost)."""
        sent_at = self._monotonic()
        with self._transaction() as connection:
            renewed = self._touch(connection, self._clock())
        self.held.renewed(sent_at, fresh=not renewed)
        return renewed

    def _touch(self, connection: Any, now: float) -> bool:
        """Renew the lease in ``connection``'s transaction (``held`` is told once it commits)."""
        renewed = connection.execute(
            _RENEW, {"replica": self.replica, "now": now, "until": now + self.lease}
        ).rowcount
        if not renewed:
            self._register(connection, now)
        return bool(renewed)

    def _register(self, connection: Any, now: float) -> None:
        connection.execute(
            replicas.insert().values(
                id=self.replica,
                host=self.host,
                pid=self.pid,
                started_at=now,
                renewed_at=now,
                lease_until=now + self.lease,
            )
        )

    def leave(self) -> list[RunRecord]:
        """Deregister; runs still in progress here are recorded ``cancelled`` and returned."""
        self.held.ended()
        now = self._clock()
        with self._transaction() as connection:
            open_runs = self._open_runs(connection, self.replica)
            connection.execute(
                update(runs)
                .where(and_(runs.c.replica == self.replica, runs.c.status == "claimed"))
                .values(
                    status="cancelled",
                    finished_at=now,
                    error="the replica shut down before the run finished",
                )
            )
            connection.execute(delete(replicas).where(replicas.c.id == self.replica))
        return open_runs

    # -- claims ---------------------------------------------------------------------------------

    def claim(
        self,
        task: str,
        scheduled: Sequence[datetime],
        max_instances: int,
        *,
        attempt: int = 0,
    ) -> list[ClaimResult]:
        """Claim the fires of ``task`` at ``scheduled`` (handed over together: one instance)."""
        return self.claim_many([ClaimRequest(task, list(scheduled), max_instances, attempt)])[0]

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[list[ClaimResult]]:
        """Several claims in one transaction (each as :meth:`claim` would make it)."""
        if not any(request.scheduled for request in requests):
            return [[] for _ in requests]
        sent_at, now = self._monotonic(), self._clock()
        locks = {f"corral:task:{request.task}" for request in requests}
        with self._transaction(lock=locks) as connection:
            # A replica claims only while registered: a run is never left without a lease.
            renewed = self._touch(connection, now)
            term = self.held.term + (0 if renewed else 1)  # the term these runs are claimed in
            results = [self._claim(connection, request, now, term) for request in requests]
        self.held.renewed(sent_at, fresh=not renewed)
        return results

    def _claim(
        self, connection: Any, request: ClaimRequest, now: float, term: int
    ) -> list[ClaimResult]:
        task, max_instances, attempt = request.task, request.max_instances, request.attempt
        batch = uuid.uuid4().hex
        results: list[ClaimResult] = []
        in_progress = connection.execute(_IN_PROGRESS, {"task": task}).scalar_one()
        full = in_progress >= max_instances
        for moment in request.scheduled:
            if full and attempt > 0:  # a rerun waits for an instance: nothing recorded yet
                taken = connection.execute(
                    _RUN_EXISTS, {"task": task, "scheduled_us": micros(moment), "attempt": attempt}
                ).first()
                results.append(ClaimResult(moment, Claim.TAKEN if taken else Claim.FULL))
                continue
            values = {
                "task": task,
                "scheduled_us": micros(moment),
                "attempt": attempt,
                "batch": batch,
                "status": "skipped" if full else "claimed",
                "replica": self.replica,
                "host": self.host,
                "pid": self.pid,
                "claimed_at": now,
                "finished_at": now if full else None,
                "error": (
                    f"max_instances={max_instances} runs of {task!r} were in progress "
                    f"across replicas"
                    if full
                    else None
                ),
            }
            run_id = insert_ignoring_conflicts(connection, runs, values)
            if run_id is None:
                results.append(ClaimResult(moment, Claim.TAKEN))
                continue
            results.append(ClaimResult(moment, Claim.FULL if full else Claim.WON, run_id, term))
        return results

    def start(
        self, run_id: int, worker_pid: int | None = None, started_at: float | None = None
    ) -> None:
        """Record that a claimed run started (in a worker, when ``worker_pid`` is known)."""
        started_at = self._clock() if started_at is None else started_at
        with self._transaction() as connection:
            connection.execute(
                update(runs)
                .where(and_(runs.c.id == run_id, runs.c.status == "claimed"))
                .values(started_at=started_at, worker_pid=worker_pid)
            )

    def finish_many(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Several outcomes in one transaction (each as :meth:`finish` records it)."""
        if not outcomes:
            return []
        with self._transaction() as connection:
            return [self._finish(connection, outcome) for outcome in outcomes]

    def finish(
        self,
        run_id: int,
        status: RunStatus,
        *,
        error: str | None = None,
        worker_pid: int | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> bool:
        """Record a run's outcome; ``False`` if it was no longer in progress (reported lost, or
        finished with another outcome). The same outcome recorded again is ``True``: a retry of
        a write whose answer was lost."""
        finished_at = self._clock() if finished_at is None else finished_at
        outcome = Outcome(run_id, status, error, worker_pid, started_at, finished_at)
        return self.finish_many([outcome])[0]

    def _finish(self, connection: Any, outcome: Outcome) -> bool:
        values: dict[str, Any] = {
            "status": outcome.status,
            "finished_at": outcome.finished_at,
            "error": bounded(outcome.error),
        }
        if outcome.worker_pid is not None:
            values["worker_pid"] = outcome.worker_pid
        if outcome.started_at is not None:
            values["started_at"] = outcome.started_at
            values["duration"] = max(0.0, outcome.finished_at - outcome.started_at)
        statement = (
            update(runs)
            .where(and_(runs.c.id == outcome.run_id, runs.c.status == "claimed"))
            .values(**values)
        )
        if connection.execute(statement).rowcount:
            return True
        # Not in progress: reported lost, or finished already. The same outcome again is a
        # retry of a write that committed but whose answer was lost with the connection.
        status = connection.execute(_STATUS, {"run": outcome.run_id}).scalar_one_or_none()
        return bool(status == outcome.status)

    # -- recovery -------------------------------------------------------------------------------

    def reap(self) -> list[LostRun]:
        """Mark the runs in progress of every replica whose lease expired ``lost``; return them.

        Each expired replica is reaped by exactly one caller: the one whose delete of its row
        succeeds, in the same transaction as the update of its runs.
        """
        now = self._clock()
        lost: list[LostRun] = []
        with self._transaction(lock="corral:reap") as connection:
            expired = connection.execute(select(replicas).where(replicas.c.lease_until < now)).all()
            for replica in expired:
                gone = connection.execute(
                    delete(replicas).where(
                        and_(replicas.c.id == replica.id, replicas.c.lease_until < now)
                    )
                ).rowcount
                if not gone:
                    continue
                lost += self._mark_lost(connection, replica.id, replica.host, replica.pid, now)
            # Runs of replicas with no row at all (removed by hand, say) are lost too.
            orphans = connection.execute(
                select(runs.c.replica, runs.c.host, runs.c.pid)
                .where(
                    and_(
                        runs.c.status == "claimed",
                        runs.c.replica.not_in(select(replicas.c.id)),
                    )
                )
                .distinct()
            ).all()
            for orphan in orphans:
                lost += self._mark_lost(connection, orphan.replica, orphan.host, orphan.pid, now)
        return lost

    def _mark_lost(
        self, connection: Any, replica: str, host: str, pid: int, now: float
    ) -> list[LostRun]:
        open_runs = self._open_runs(connection, replica)
        if open_runs:
            connection.execute(
                update(runs)
                .where(and_(runs.c.replica == replica, runs.c.status == "claimed"))
                .values(
                    status="lost",
                    finished_at=now,
                    error=(
                        f"replica {host} pid {pid} stopped renewing its lease (killed, "
                        f"stopped, or cut off from the database) before the run finished"
                    ),
                )
            )
        return [
            LostRun(run.id, run.task, run.scheduled, run.attempt, run.host, run.pid)
            for run in open_runs
        ]

    def prune(self, older_than: timedelta) -> int:
        """Delete finished runs that ended more than ``older_than`` ago; return how many."""
        cutoff = self._clock() - older_than.total_seconds()
        with self._transaction() as connection:
            return int(
                connection.execute(
                    delete(runs).where(
                        and_(runs.c.status != "claimed", runs.c.finished_at < cutoff)
                    )
                ).rowcount
            )

    # -- reading --------------------------------------------------------------------------------

    def runs(
        self,
        *,
        task: str | None = None,
        status: RunStatus | None = None,
        since: datetime | None = None,
        limit: int | None = 100,
    ) -> list[RunRecord]:
        """Recorded runs, the most recently scheduled first."""
        query = select(runs).order_by(runs.c.scheduled_us.desc(), runs.c.attempt.desc())
        if task is not None:
            query = query.where(runs.c.task == task)
        if status is not None:
            query = query.where(runs.c.status == status)
        if since is not None:
            query = query.where(runs.c.scheduled_us >= micros(since))
        if limit is not None:
            query = query.limit(limit)
        self._ensure_tables()
        with self.engine.connect() as connection:
            self.queries += 1
            return [_run_record(row) for row in connection.execute(query)]

    def replicas(self) -> list[ReplicaRecord]:
        """The replicas whose lease is current, each with its runs in progress."""
        self._ensure_tables()
        now = self._clock()
        with self.engine.connect() as connection:
            self.queries += 1
            live = connection.execute(
                select(replicas)
                .where(replicas.c.lease_until >= now)
                .order_by(replicas.c.host, replicas.c.pid)
            ).all()
            return [
                ReplicaRecord(
                    id=row.id,
                    host=row.host,
                    pid=row.pid,
                    started_at=from_seconds(row.started_at),  # type: ignore[arg-type]
                    renewed_at=from_seconds(row.renewed_at),  # type: ignore[arg-type]
                    lease_until=from_seconds(row.lease_until),  # type: ignore[arg-type]
                    running=tuple(self._open_runs(connection, row.id)),
                )
                for row in live
            ]

    def in_progress(self, task: str) -> int:
        """How many instances (batches) of ``task`` are in progress across replicas."""
        with self.engine.connect() as connection:
            self.queries += 1
            return int(connection.execute(_IN_PROGRESS, {"task": task}).scalar_one())

    # -- helpers --------------------------------------------------------------------------------

    def _ensure_tables(self) -> None:
        if not self._tables_ready:
            create_tables(self.engine)
            self._tables_ready = True

    def _transaction(self, lock: str | Iterable[str] | None = None) -> Any:
        self.queries += 1
        return transaction(self.engine, lock)

    @staticmethod
    def _open_runs(connection: Any, replica: str) -> list[RunRecord]:
        rows = connection.execute(
            select(runs)
            .where(and_(runs.c.replica == replica, runs.c.status == "claimed"))
            .order_by(runs.c.scheduled_us)
        ).all()
        return [_run_record(row) for row in rows]


def _run_record(row: Row[Any]) -> RunRecord:
    return RunRecord(
        id=row.id,
        task=row.task,
        scheduled=from_micros(row.scheduled_us),
        attempt=row.attempt,
        status=row.status,
        host=row.host,
        pid=row.pid,
        replica=row.replica,
        claimed_at=from_seconds(row.claimed_at),  # type: ignore[arg-type]
        started_at=from_seconds(row.started_at),
        finished_at=from_seconds(row.finished_at),
        worker_pid=row.worker_pid,
        duration=row.duration,
        error=row.error,
    )
