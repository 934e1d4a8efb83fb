"""Claims for asyncz executors: each fire runs on exactly one replica sharing the database.

```
send_task (app loop)  -> Claims.claim -> coordinator thread: Ledger.claim (one transaction)
   <- on the loop: won -> the executor runs it; taken -> skipped quietly; full -> skipped,
      TASK_MAX_INSTANCES; database away -> one TASK_ERROR per fire, not run
outcome event (TASK_EXECUTED / TASK_ERROR / TASK_MISSED) -> Claims.hold -> Ledger.finish;
   the event waits for the ledger's answer: recorded -> dispatched; the run had been reported
   lost by another replica -> dropped (that report was the run's outcome)
lease expired elsewhere -> Claims.on_lost -> one TASK_ERROR (ReplicaLostError) per lost run;
                           rerun_lost tasks are claimed again (attempt + 1) and run here;
                           while max_instances runs are in progress, a rerun waits (never
                           skipped)
```

Executors know one thing of it: they call :meth:`Claims.claim` instead of running at once, and
run what comes back won.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from asyncz.events import TaskExecutionEvent, TaskSubmissionEvent
from asyncz.events.constants import (
    TASK_ERROR,
    TASK_EXECUTED,
    TASK_MAX_INSTANCES,
    TASK_MISSED,
    TASK_SUBMITTED,
)

from corral._delivery import Delivery
from corral._exceptions import (
    DatabaseUnavailableError,
    JobCancelledError,
    JobMissedError,
    JobTimeoutError,
    MemoryLimitError,
    ReplicaLostError,
    WorkerDiedError,
)
from corral._ledger import Claim, ClaimResult, ClaimWithdrawn, Coordinator, LostRun, RunStatus
from corral._ledger._coordinator import away
from corral._ledger._records import from_micros, micros
from corral._ledger._schema import safe_url
from corral._outcomes import HeldOutcome, HeldOutcomes

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

logger = logging.getLogger("corral.ledger")

OUTCOME_EVENTS = TASK_EXECUTED | TASK_ERROR | TASK_MISSED
# Seconds between a rerun's claims while the task's instances are all in progress.
RERUN_RETRY = 1.0


class ClaimingExecutor(Protocol):
    """What :class:`Claims` needs of an executor: a way to run fires it won, and to know that a
    claim is in flight (a shutdown waits for it, as for a run handed over)."""

    def run_claimed(
        self,
        task: TaskType,
        run_times: list[datetime],
        *,
        rerun: bool,
        handed_at: datetime,
        term: int,
    ) -> None:
        """Run fires won under ``term`` of the lease (``Claims.lease``): none may start once
        that term does not hold."""
        ...

    def claim_sent(self) -> Callable[[], None]:
        """A claim is in flight; the function returned is called once it is settled."""
        ...


class Claims:
    """The bridge between asyncz executors and the ledger's coordinator.

    Args:
        coordinator: The started coordinator.
        scheduler: The asyncz scheduler (events are dispatched through it).
        loop: The scheduler's event loop: callbacks from the coordinator thread run there.
        rerun_lost: Whether a task (by id) is to run again when its run is lost.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        scheduler: Any,
        loop: asyncio.AbstractEventLoop,
        rerun_lost: Callable[[str], bool],
    ) -> None:
        self.coordinator = coordinator
        self.lease = coordinator.ledger.held
        """This replica's lease as it knows it: runs claimed under a term start and are reported
        only while that term holds."""
        self.scheduler = scheduler
        self.loop = loop
        self._delivery = Delivery.of(loop)  # (a shutdown that blocks the loop serves it)
        self.rerun_lost = rerun_lost
        self._open = _OpenRuns()
        # asyncz's TASK_SUBMITTED for fires being claimed, held until the claim is decided:
        # dispatched when this replica won, dropped when another did.
        self._held: dict[tuple[str, tuple[int, ...]], list[Any]] = {}
        # Lost runs found before the scheduler has its tasks wait for ``ready``: a rerun needs
        # its task, and the first reap can come while the scheduler starts.
        self._early: list[LostRun] | None = []
        # Reruns waiting for a free instance of their task, and the handle of their next claim.
        self._waiting: dict[tuple[str, tuple[int, ...]], asyncio.TimerHandle] = {}
        self._passing: Any = None  # an event decided here, being dispatched
        self.outcomes = HeldOutcomes(coordinator, self.lease, self._call_soon, self._pass)
        """Outcome events held until the ledger says whether their run was still this
        replica's."""
        coordinator.on_lost = self._on_lost_thread

    def ready(self) -> None:
        """The scheduler has started with its tasks: report the lost runs found before."""
        early, self._early = self._early, None
        if early:
            self._report_lost(early)

    # -- claiming -------------------------------------------------------------------------------

    def claim(
        self,
        executor: ClaimingExecutor,
        task: TaskType,
        run_times: list[datetime],
        *,
        attempt: int = 0,
        delay: float = 0.0,
    ) -> None:
        """Claim ``run_times`` of ``task`` (after ``delay`` seconds); run the fires won with
        ``executor.run_claimed`` (on the loop; the executor takes the task's instance then)."""
        task_id = str(task.id)
        run_times = list(run_times)
        handed_at = datetime.now(UTC)  # lateness is the scheduler's, not the claim's
        if attempt == 0:
            self._held[_key(task_id, run_times)] = []

        def settle(results: list[ClaimResult] | None, error: BaseException | None) -> None:
            try:
                self._settle(executor, task, run_times, results, error, attempt, handed_at)
            finally:
                settled()

        def done(results: list[ClaimResult] | None, error: BaseException | None) -> None:
            self._call_soon(settle, results, error)

        settled = executor.claim_sent()
        self.coordinator.claim(
            task_id, run_times, task.max_instances, done, attempt=attempt, delay=delay
        )

    def hold(self, event: Any) -> bool:
        """Whether to keep ``event`` back (the scheduler's ``dispatch_event`` asks): asyncz's
        TASK_SUBMITTED of a fire being claimed, until the claim is decided; the outcome of a
        claimed run, until the ledger has it (``_finish``).
        """
        if getattr(event, "task_id", None) is None:
            return False
        if event.code & OUTCOME_EVENTS:
            return self._finish(HeldOutcome(event))
        if event.code != TASK_SUBMITTED:
            return False
        held = self._held.get(_key(str(event.task_id), list(event.scheduled_run_times)))
        if held is None:
            return False
        held.append(event)
        return True

    def _settle(
        self,
        executor: ClaimingExecutor,
        task: TaskType,
        run_times: list[datetime],
        results: list[ClaimResult] | None,
        error: BaseException | None,
        attempt: int,
        handed_at: datetime,
    ) -> None:
        task_id = str(task.id)
        held = self._held.pop(_key(task_id, run_times), []) if attempt == 0 else []
        won = [r for r in (results or ()) if r.claim is Claim.WON]
        if results is None or won:
            for event in held:  # handed over here: asyncz's order, submitted before the outcome
                self.scheduler.dispatch_event(event)
        if results is None:
            self._report_unclaimed(task, run_times, error)
            return
        full = [r.scheduled for r in results if r.claim is Claim.FULL]
        if full and attempt > 0:
            # A rerun is not skipped like a new fire: it waits for an instance to be free.
            logger.info(
                "Rerun of task %r waits for one of its max_instances=%d runs in progress "
                "across replicas to finish; trying again in %.0f s",
                task_id,
                task.max_instances,
                RERUN_RETRY,
            )
            self._waiting[_key(task_id, full)] = self.loop.call_later(
                RERUN_RETRY, self._rerun, task_id, full, attempt
            )
        elif full:
            logger.warning(
                "Execution of task %r skipped: maximum number of running instances reached "
                "(%d) across replicas",
                task_id,
                task.max_instances,
            )
            self.scheduler.dispatch_event(
                TaskSubmissionEvent(
                    code=TASK_MAX_INSTANCES,
                    task_id=task_id,
                    store=str(task.store_alias),
                    scheduled_run_times=full,
                    source="scheduled",
                )
            )
        if not won:
            return
        for result in won:
            assert result.run_id is not None
            self._open.add(task_id, result.scheduled, _OpenRun(result.run_id, result.term))
        executor.run_claimed(
            task,
            [r.scheduled for r in won],
            rerun=attempt > 0,
            handed_at=handed_at,
            term=won[0].term,  # (one transaction: one term)
        )

    def _report_unclaimed(
        self, task: TaskType, run_times: list[datetime], error: BaseException | None
    ) -> None:
        url = safe_url(self.coordinator.ledger.url)
        for run_time in run_times:
            exc: BaseException
            if isinstance(error, ClaimWithdrawn):  # the scheduler stopped first
                exc = JobCancelledError(
                    f"task {task.id!r}, run time {run_time.isoformat()}: cancelled at shutdown "
                    f"before its fire was claimed (this replica had no free worker, and claims "
                    f"late then); another replica sharing {url} may run it",
                    job_id=None,
                    started=False,
                )
            else:
                exc = DatabaseUnavailableError(
                    f"task {task.id!r}, run time {run_time.isoformat()}: not run, because its "
                    f"fire could not be claimed in {url} ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                    + (
                        "check that the database is reachable"
                        if error is None or away(error)
                        else "the database refused the claim (check the task's name)"
                    ),
                    database=url,
                )
            logger.error("%s", exc)
            self.scheduler.dispatch_event(
                TaskExecutionEvent(
                    code=TASK_ERROR,
                    task_id=str(task.id),
                    store=str(task.store_alias),
                    scheduled_run_time=run_time,
                    exception=exc,
                )
            )

    # -- outcomes -------------------------------------------------------------------------------

    def skip(
        self, task: TaskType, run_times: list[datetime], error: BaseException, term: int
    ) -> None:
        """Fires won in ``term`` that this replica's executor refused (its own instance
        limit): recorded ``skipped``, reported as asyncz reports a run past ``max_instances``."""
        task_id = str(task.id)
        for run_time in run_times:
            run = self._open.take(task_id, run_time, term)
            if run is not None:
                self.coordinator.finish(run.run_id, "skipped", error=str(error))
        self.scheduler.dispatch_event(
            TaskSubmissionEvent(
                code=TASK_MAX_INSTANCES,
                task_id=task_id,
                store=str(task.store_alias),
                scheduled_run_times=run_times,
                source="scheduled",
            )
        )

    def started(
        self, task_id: str, run_time: datetime, worker_pid: int | None, at: float, term: int
    ) -> None:
        """Record where and when the run of a fire claimed in ``term`` started (once; any
        thread, never blocks)."""
        run = self._open.find(task_id, run_time, term)
        if run is not None and run.worker_pid is None:
            run.worker_pid, run.started_at = worker_pid, at
            self.coordinator.started(run.run_id, worker_pid, at)

    def dispatch(self, event: Any, term: int, *, ended: Callable[[], None] | None = None) -> None:
        """Dispatch the outcome event of a fire claimed in ``term`` (as ``hold`` does for an
        event it meets, but knowing which of the fire's runs it is about). ``ended`` (the run
        is over for its executor) is called once, right before the event is dispatched or
        dropped, or when a shutdown stops waiting for the ledger
        (:meth:`HeldOutcomes.stop_waiting`)."""
        held = HeldOutcome(event, ended)
        try:
            if self._finish(held, term):
                return
        except BaseException:
            held.end()
            raise
        held.end()
        self._pass(event)

    def _pass(self, event: Any) -> None:
        """Dispatch ``event`` past ``hold``: it was decided here."""
        self._passing = event
        try:
            self.scheduler.dispatch_event(event)
        finally:
            self._passing = None

    def _finish(self, held: HeldOutcome, term: int | None = None) -> bool:
        """Record the outcome of a claimed run in the ledger; ``True``: its event waits for the
        ledger's answer (``HeldOutcomes``).

        The event is dispatched only once the outcome is recorded: a run whose outcome is not
        in the ledger may be reported lost by another replica (this one stopped, or was cut
        off from the database, for longer than its lease), and that report is then its one
        outcome. Once the coordinator has stopped (a thread executor's run that outlived a
        shutdown), nothing can be recorded: the event goes on at once, with a WARNING."""
        event = held.event
        scheduled = getattr(event, "scheduled_run_time", None)
        if event is self._passing or not isinstance(scheduled, datetime):
            return False
        run = self._open.take(str(event.task_id), scheduled, term)
        if run is None:
            return False
        status, error = _status_of(event)
        if self.coordinator.stopped:
            logger.warning(
                "The outcome of task %r (run time %s) came after this replica left the ledger: "
                "it is reported here, and the ledger has the run as cancelled",
                event.task_id,
                event.scheduled_run_time,
            )
            return False
        self.outcomes.record(
            held,
            run.run_id,
            run.term,
            status,
            error=error,
            worker_pid=run.worker_pid,
            started_at=run.started_at,
        )
        return True

    def stop(self) -> None:
        """The scheduler is stopping (on the loop): reruns still waiting will not run."""
        for (task_id, scheduled), handle in self._waiting.items():
            handle.cancel()
            logger.warning(
                "Rerun of task %r (run time %s) not run: the scheduler stopped while it waited "
                "for a free instance; its run stays reported lost in the ledger",
                task_id,
                ", ".join(from_micros(at).isoformat() for at in scheduled),
            )
        self._waiting.clear()

    # -- lost runs ------------------------------------------------------------------------------

    def _on_lost_thread(self, lost: list[LostRun]) -> None:
        self._call_soon(self._report_lost, lost)

    def _report_lost(self, lost: list[LostRun]) -> None:
        if self._early is not None:
            self._early += lost
            return
        for run in lost:
            exc = ReplicaLostError(
                f"task {run.task!r}, run time {run.scheduled.isoformat()}: its replica (host "
                f"{run.host}, pid {run.pid}) stopped renewing its lease before the run "
                f"finished; whether it ran is unknown"
                + (
                    "; it runs again here (rerun_lost=True)"
                    if self.rerun_lost(run.task)
                    else "; set rerun_lost=True on the task to run it again"
                ),
                job_id=run.run_id,
                host=run.host,
                pid=run.pid,
            )
            logger.error("%s", exc)
            self._pass(  # (not the outcome of a run of this replica's)
                TaskExecutionEvent(
                    code=TASK_ERROR,
                    task_id=run.task,
                    store="default",
                    scheduled_run_time=run.scheduled,
                    exception=exc,
                )
            )
            if self.rerun_lost(run.task):
                self._rerun(run.task, [run.scheduled], run.attempt + 1)

    def _rerun(self, task_id: str, scheduled: list[datetime], attempt: int) -> None:
        self._waiting.pop(_key(task_id, scheduled), None)
        try:
            task = self.scheduler.get_task(task_id)
            executor = self.scheduler.lookup_executor(task.executor)
        except Exception:  # the task is not scheduled here (any more)
            logger.warning("Lost run of task %r not rerun: no such task here", task_id)
            return
        if task is None:
            return
        self.claim(executor, task, scheduled, attempt=attempt)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        self._delivery.call(callback, *args)


def _key(task_id: str, run_times: list[datetime]) -> tuple[str, tuple[int, ...]]:
    return task_id, tuple(micros(moment) for moment in run_times)


class _OpenRuns:
    """Runs claimed here and not over, by fire. A fire has more than one when this replica
    claimed a rerun of it while an older run of it, lost meanwhile, was still here: each is
    told apart by the term of the lease it was claimed in."""

    def __init__(self) -> None:
        self._by_fire: dict[tuple[str, int], list[_OpenRun]] = {}

    def add(self, task_id: str, scheduled: datetime, run: _OpenRun) -> None:
        self._by_fire.setdefault((task_id, micros(scheduled)), []).append(run)

    def find(self, task_id: str, scheduled: datetime, term: int | None) -> _OpenRun | None:
        """The run of this fire claimed in ``term``; ``None``: the oldest (asyncz's own
        executors' events do not say which). Safe from any thread."""
        runs = list(self._by_fire.get((task_id, micros(scheduled)), ()))
        if term is None:
            return runs[0] if runs else None
        return next((run for run in runs if run.term == term), None)

    def take(self, task_id: str, scheduled: datetime, term: int | None) -> _OpenRun | None:
        """:meth:`find`, and the run is over (on the loop)."""
        run = self.find(task_id, scheduled, term)
        if run is not None:
            key = (task_id, micros(scheduled))
            runs = self._by_fire[key]
            runs.remove(run)
            if not runs:
                del self._by_fire[key]
        return run


class _OpenRun:
    __slots__ = ("run_id", "started_at", "term", "worker_pid")

    def __init__(self, run_id: int, term: int) -> None:
        self.run_id = run_id
        self.term = term
        self.worker_pid: int | None = None
        self.started_at: float | None = time.time()


_STATUS_OF_ERROR: tuple[tuple[type[BaseException], RunStatus], ...] = (
    (JobTimeoutError, "timeout"),
    (WorkerDiedError, "crashed"),
    (MemoryLimitError, "memory"),
    (JobMissedError, "missed"),
    (JobCancelledError, "cancelled"),
)


def _status_of(event: TaskExecutionEvent) -> tuple[RunStatus, str | None]:
    if event.code == TASK_EXECUTED:
        return "executed", None
    if event.code == TASK_MISSED:
        return "missed", "handed over later than mistrigger_grace_time"
    error = event.exception
    text = f"{type(error).__name__}: {error}"
    if event.traceback:
        text = f"{text}\n{event.traceback}"
    for cls, status in _STATUS_OF_ERROR:
        if isinstance(error, cls):
            return status, text
    return "error", text
