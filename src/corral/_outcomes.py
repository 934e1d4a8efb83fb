"""Outcome events of claimed runs, each held until the ledger has its outcome (see ``Claims``).

An event is dispatched only once its run's outcome is written in the ledger: a run whose outcome
is not there may be reported lost by another replica (this one was stopped, or cut off from the
database, for longer than its lease), and that report is then its one outcome. So the event
waits for ``Ledger.finish``'s answer: recorded, it is dispatched; the run had been reported
lost, it is dropped. The run's end for its executor (its instance released) comes with it, so
a shutdown waits for the event too, and stops waiting where the answer may not come in time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from corral._ledger import Coordinator, RunStatus
from corral._ledger._lease import HeldLease

logger = logging.getLogger("corral.ledger")


class HeldOutcome:
    """An outcome event waiting for the ledger's answer, and the end of its run for the
    executor (called once)."""

    __slots__ = ("ended", "event", "term")

    def __init__(self, event: Any, ended: Callable[[], None] | None = None) -> None:
        self.event = event
        self.ended = ended
        self.term: int | None = None  # the lease term its run was claimed in

    def end(self) -> None:
        ended, self.ended = self.ended, None
        if ended is not None:
            ended()


class HeldOutcomes:
    """The outcome events waiting for the ledger, by run id (recorded from the thread that
    reports the outcome, answered on the scheduler's loop).

    Args:
        coordinator: Records the outcomes.
        lease: This replica's lease: a shutdown waits for an answer only while the term of its
            run holds.
        call_soon: Runs a call on the scheduler's loop (from the coordinator's thread).
        dispatch: Dispatches an event decided here.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        lease: HeldLease,
        call_soon: Callable[..., None],
        dispatch: Callable[[Any], None],
    ) -> None:
        self.coordinator = coordinator
        self.lease = lease
        self._call_soon = call_soon
        self._dispatch = dispatch
        self._waiting: dict[int, HeldOutcome] = {}
        # Given up at shutdown (the database did not answer): dispatched if it still records
        # them, as the replica leaves.
        self._given_up: dict[int, HeldOutcome] = {}

    def record(
        self,
        held: HeldOutcome,
        run_id: int,
        term: int,
        status: RunStatus,
        *,
        error: str | None,
        worker_pid: int | None,
        started_at: float | None,
    ) -> None:
        """Record the outcome of run ``run_id`` (claimed in ``term``); its event waits."""
        held.term = term
        self._waiting[run_id] = held

        def recorded(was_recorded: bool | None) -> None:
            self._call_soon(self._answered, run_id, was_recorded)

        self.coordinator.finish(
            run_id,
            status,
            error=error,
            worker_pid=worker_pid,
            started_at=started_at,
            recorded=recorded,
        )

    def _answered(self, run_id: int, was_recorded: bool | None) -> None:
        """The ledger's answer: recorded (``True``), or not written at all (``None``: the
        coordinator stopped, or gave it up): dispatched; the run had been reported lost
        (``False``): dropped."""
        held = self._waiting.pop(run_id, None)
        if held is None:  # given up: logged as not reported, and reported only if recorded
            held = self._given_up.pop(run_id, None)
            if held is None or not was_recorded:
                return
        held.end()
        event = held.event
        if was_recorded is False:
            logger.warning(
                "The outcome of task %r (run time %s) is not reported by this replica: its "
                "lease expired before the outcome was recorded, and another replica reported "
                "the run lost (ReplicaLostError)",
                event.task_id,
                event.scheduled_run_time,
            )
            return
        self._dispatch(event)

    def stop_waiting(self, late: bool) -> None:
        """A shutdown stops waiting for the answers that may not come in time (any thread): all
        of them once past its deadline (``late``); else those whose run's lease may have lapsed
        (the database does not answer, and is waited for no longer than the lease). Their runs
        end for their executors; their events still wait for the answer (up to
        :meth:`unconfirmed`)."""
        if self._waiting:
            self._call_soon(self._stop_waiting, late)

    def _stop_waiting(self, late: bool) -> None:
        for held in list(self._waiting.values()):
            if late or held.term is None or not self.lease.holds(held.term):
                held.end()

    def unconfirmed(self) -> None:
        """After the coordinator stopped: log the outcomes still held. The database could not
        be reached to record them: their runs stay in progress in the ledger until a replica
        finds this one's lease expired and reports them lost, which is then their outcome. If
        the database still records one (it answers as the replica leaves), its event follows."""
        while self._waiting:  # (one at a time: a thread executor's outcome may come now)
            run_id, held = self._waiting.popitem()
            held.end()
            self._given_up[run_id] = held
            logger.warning(
                "The outcome of task %r (run time %s) is not reported by this replica: the "
                "database could not be reached at shutdown to record it; the replica that "
                "finds this replica's lease expired (another one, or this one started again) "
                "reports the run lost (ReplicaLostError); if the database still records it, "
                "its event follows",
                held.event.task_id,
                held.event.scheduled_run_time,
            )

    def unconfirmed_later(self) -> None:
        """:meth:`unconfirmed`, from another thread (on the loop, if it still runs), after the
        answers the coordinator's stop handed over."""
        self._call_soon(self.unconfirmed)

    async def left(self) -> None:
        """:meth:`unconfirmed_later`, awaited on the loop."""
        logged = asyncio.Event()

        def log() -> None:
            try:
                self.unconfirmed()
            finally:
                logged.set()

        self._call_soon(log)
        await logged.wait()
