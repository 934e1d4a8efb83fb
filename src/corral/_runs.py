"""What corral's own asyncz executors share: runs of due run times, claims, delivery, drain.

A *run* is one ``send_task``: a task and its due run times, run one after another, each as one
job (in the local pool, or on a Dask cluster). The task's instance is taken before the first job
and released after the last outcome, whatever it was; each outcome becomes exactly one asyncz
event, handed to the scheduler's event loop (outcomes that arrive together in one wake-up of it).
With a database, the run times are claimed first and only the fires won run here.

``mistrigger_grace_time`` measures how late the scheduler hands a run over (as in asyncz), not
how long its claim then takes or how long it waits for a worker: a run handed over in time waits
for them as long as it takes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_ERROR, TASK_MISSED
from asyncz.exceptions import MaximumInstancesError
from asyncz.executors.base import BaseExecutor

from corral._constants import DEFAULT
from corral._decorator import task_options
from corral._delivery import Delivery
from corral._drain import Drain
from corral._exceptions import JobCancelledError, PoolNotRunningError, RemoteTraceback
from corral._pool._settings import PoolSettings

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

    from corral._claims import Claims


@dataclass(eq=False, slots=True)
class Run:
    """One ``send_task`` call: a task and its due run times, run one after another.

    Its job's callbacks are its own bound methods: a run queued behind thousands of others holds
    few objects for the garbage collector to visit (no closures)."""

    executor: RunExecutor
    task: TaskType
    task_id: str
    store: str
    run_times: list[datetime]
    handed_at: datetime
    """When the scheduler handed the run over: lateness is measured here, not at start."""
    grace: float | None
    drain: Drain
    """The shutdown of the executor's pool it was handed to (which waits for it)."""
    term: int | None = None
    """The term of this replica's lease its fires were claimed under (with a database)."""
    index: int = 0
    """The current run time's index in ``run_times``."""
    submitted_at: float = 0.0
    """When the job of the current run time was submitted (``time.monotonic()``)."""

    def job_started(self, future: Any) -> None:
        """The job of one of its run times started (on whichever thread saw it first: maybe
        after its outcome, so the run time is the one the future was submitted for)."""
        self.executor._on_start(self, future.corral_run_time, future)

    def job_done(self, future: Any) -> None:
        """The current run time's job is over: its outcome goes to the event loop."""
        self.executor._deliver(self.executor._on_outcome, self, future)


class RunExecutor(BaseExecutor):
    """The base of :class:`ProcessExecutor` and :class:`DaskExecutor`.

    A subclass says how a job is submitted (:meth:`_submit_job`), what its outcome means
    (:meth:`_on_outcome`), and how it starts and stops; the rest is here.
    """

    stopped: str = "the executor had stopped its pool"
    """How a run refused at shutdown is explained (``PoolNotRunningError``)."""

    def __init__(
        self,
        settings: PoolSettings | None,
        *,
        shutdown_timeout: float | None,
        task_timeouts: dict[str, float | None] | None,
        options: dict[str, Any],
    ) -> None:
        super().__init__()
        if settings is None:
            settings = PoolSettings(**options)
        elif options:
            settings = PoolSettings(**{**settings.model_dump(exclude_unset=True), **options})
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.task_timeouts: dict[str, float | None] = dict(task_timeouts or {})
        for task_id, timeout in self.task_timeouts.items():
            if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
                raise ValueError(
                    f"task_timeouts[{task_id!r}]={timeout!r}: expected a positive number of "
                    f"seconds, or None for no timeout"
                )
        self.claims: Claims | None = None
        """Set (before start) when fires are claimed in a database shared by replicas."""
        self._log = logging.getLogger("corral.executor")
        self._delivery = Delivery(None)
        self._drain = Drain()
        self._unwatch_lease: Callable[[], None] = nothing

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._log = self.logger or self._log
        self._delivery = Delivery.of(getattr(scheduler, "event_loop", None))
        if self._drain.started:  # started again after a shutdown: a drain of its own
            self._drain = Drain()

    def _watch_lease(self, hold: Callable[[int, float], None]) -> None:
        """With a database, tell ``hold`` (a pool's or a cluster's ``hold_lease``) of each
        change of the claims' lease: runs of claimed fires start only while it holds."""
        self._unwatch_lease()
        self._unwatch_lease = nothing if self.claims is None else self.claims.lease.watch(hold)

    # -- what a subclass says -------------------------------------------------------------------

    def _submit_job(self, run: Run, run_time: datetime) -> Any:
        """Submit the job of ``run_time``; a future with ``add_done_callback``, ``on_start`` and
        ``worker_pid``. Raises ``CorralError`` when it cannot (that run time's outcome)."""
        raise NotImplementedError

    def _on_outcome(self, run: Run, future: Any) -> None:
        """The job of the run's current run time is over: make its event, then
        :meth:`_finish_one` (on the event loop)."""
        raise NotImplementedError

    def _claim_delay(self) -> float:
        """Seconds to wait before claiming a fire (a busy executor lets idle replicas win)."""
        return 0.0

    def _started(self, run: Run, run_time: datetime, future: Any) -> None:
        """A job started (on any thread, once): by default, recorded in the ledger."""
        if self.claims is not None and run.term is not None:
            self.claims.started(run.task_id, run_time, future.worker_pid, time.time(), run.term)

    # -- runs -----------------------------------------------------------------------------------

    def send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        """Run ``task`` once per run time, one after another (with a database, only the fires
        this replica claims)."""
        assert task.id is not None, "a task in decorator mode cannot run"
        if not run_times:
            return
        if self.claims is not None:
            # The claim counts runs in progress on every replica; the instance is taken when
            # the fires come back won.
            self.claims.claim(self, task, run_times, delay=self._claim_delay())
            return
        self._start_run(task, list(run_times), task.mistrigger_grace_time, datetime.now(UTC))

    def do_send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        self.send_task(task, run_times)

    def claim_sent(self) -> Callable[[], None]:
        """A claim is in flight: a shutdown waits for it as for a run (its fires were handed
        over before the shutdown). Returns what to call once it is settled (the same drain's,
        even if the executor was started again meanwhile)."""
        drain = self._drain
        drain.claim_sent()
        return drain.claim_settled

    def run_claimed(
        self,
        task: TaskType,
        run_times: list[datetime],
        *,
        rerun: bool,
        handed_at: datetime,
        term: int,
    ) -> None:
        """Run fires this replica claimed under ``term`` of its lease, handed over at
        ``handed_at`` (the claim's time is not lateness; a rerun of a lost run ignores the grace
        time)."""
        grace = None if rerun else task.mistrigger_grace_time
        self._start_run(task, run_times, grace, handed_at, term)

    def _start_run(
        self,
        task: TaskType,
        run_times: list[datetime],
        grace: float | None,
        handed_at: datetime,
        term: int | None = None,
    ) -> None:
        # The instance is taken before the first job is submitted, so an outcome that arrives at
        # once releases an instance that is really held.
        task_id = str(task.id)
        with self.lock:
            instances = self.instances
            if self.claims is None and instances[task_id] >= task.max_instances:
                raise MaximumInstancesError(task_id, task.max_instances)
            instances[task_id] += 1
            drain = self._drain
            drain.run_started()
        run = Run(
            self, task, task_id, str(task.store_alias), run_times, handed_at, grace, drain, term
        )
        try:
            self._submit_next(run)
        except BaseException:
            self._release(run)
            raise

    def _submit_next(self, run: Run) -> None:
        """Submit the job of ``run``'s current run time, or report it missed."""
        run_time = run.run_times[run.index]
        if run.grace is not None and (run.handed_at - run_time).total_seconds() > run.grace:
            # Reported after asyncz's TASK_SUBMITTED for this run, as asyncz does.
            self._deliver(self._finish_one, run, missed_event(run, run_time))
            return
        run.submitted_at = time.monotonic()
        try:
            future = self._submit_job(run, run_time)
        except Exception as exc:  # a full queue, a shutdown, a bad timeout: its outcome
            self._deliver(self._finish_one, run, self._error_event(run, run_time, exc))
            return
        future.corral_run_time = run_time
        future.on_start = run.job_started
        try:
            if future.worker_pid is not None:  # it started before on_start was set
                self._on_start(run, run_time, future)
        finally:
            future.add_done_callback(run.job_done)

    def _on_start(self, run: Run, run_time: datetime, future: Any) -> None:
        if future.__dict__.setdefault("corral_start_seen", run) is run:  # once, whoever first
            self._started(run, run_time, future)

    def _error_event(
        self, run: Run, run_time: datetime, error: BaseException
    ) -> TaskExecutionEvent:
        if isinstance(error, PoolNotRunningError):  # stopped before this run time's turn
            error = cancelled_at_shutdown(
                run.task_id,
                run_time,
                f"{self.stopped} (shutdown_timeout passed, or kill_running()); allow a longer "
                f"shutdown_timeout to let it run",
            )
        return error_event(run.task, run_time, error)

    def _finish_one(self, run: Run, event: TaskExecutionEvent) -> None:
        """Report one run time's outcome and go on to the next (or end the run), whatever the
        app's logging and listeners do.

        The run goes on before its event is dispatched, as asyncz frees a task's instance before
        it dispatches the run's events: a listener that waits for the runs (a shutdown called
        there) does not wait for the very run that called it. With a database, the event waits
        for its outcome to be recorded (``Claims.dispatch``), and the run's end with it: a
        shutdown waits for both."""
        run.index += 1
        last = run.index >= len(run.run_times)
        claims, term = self.claims, run.term
        try:
            self._log_outcome(run, event)  # (a logging filter may raise)
        finally:
            try:
                if not last:
                    self._submit_next(run)
                elif claims is None or term is None:
                    self._release(run)
            finally:
                if claims is not None and term is not None:
                    ended = functools.partial(self._release, run) if last else None
                    claims.dispatch(event, term, ended=ended)  # (it knows which run of the fire)
                else:
                    self.scheduler.dispatch_event(event)

    def _log_outcome(self, run: Run, event: TaskExecutionEvent) -> None:
        if event.code == TASK_MISSED:
            self._log.warning(
                "Run time %s of task %r was missed", event.scheduled_run_time, run.task_id
            )
        elif event.code == TASK_ERROR:
            self._log.error(
                "Task %r (run at %s) failed: %s: %s%s",
                run.task_id,
                event.scheduled_run_time,
                type(event.exception).__name__,
                event.exception,
                f"\n{event.traceback}" if event.traceback else "",
            )

    def _release(self, run: Run) -> None:
        task_id = run.task_id
        with self.lock:
            instances = self.instances
            instances[task_id] -= 1
            if instances[task_id] <= 0:
                del instances[task_id]
        run.drain.run_ended()

    def _timeout_of(self, task: TaskType) -> float | None:
        if task.id in self.task_timeouts:
            return self.task_timeouts[task.id]
        options = task_options(task.fn)
        if options is not None and options.timeout is not DEFAULT:
            return options.timeout  # type: ignore[no-any-return]
        return self.settings.timeout

    # -- delivery to the event loop -------------------------------------------------------------

    def _at_drain_tick(self, late: bool) -> None:
        """While a shutdown waits for runs (its thread, every tick; ``late``: past its
        deadline): hand over what waits for a loop that no longer runs, and stop waiting for
        outcomes the ledger may not record in time (``HeldOutcomes.stop_waiting``)."""
        if self.claims is not None:
            self.claims.outcomes.stop_waiting(late)
        self._delivery.run_if_stranded()

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the scheduler's event loop (``Delivery``): never on the thread
        that found the outcome."""
        self._delivery.call(callback, *args)

    def _wait_drained(self) -> None:
        """Wait for the drain to finish; on the loop's own thread, delivering as it would."""
        delivery = self._delivery
        if delivery.on_loop_thread():
            self._drain.when_finished(delivery.wake)
            delivery.serve(self._drain.finished)
        else:
            self._drain.finished.wait()


def nothing() -> None:
    pass


def cancelled_at_shutdown(task_id: str, run_time: datetime, why: str) -> JobCancelledError:
    """The outcome of a run time that a shutdown kept from starting, and ``why``."""
    return JobCancelledError(
        f"run time {run_time} of task {task_id!r} was cancelled at shutdown before it started: "
        f"{why}",
        job_id=None,
        started=False,
    )


def missed_event(run: Run, run_time: datetime) -> TaskExecutionEvent:
    return TaskExecutionEvent(
        code=TASK_MISSED, task_id=run.task_id, store=run.store, scheduled_run_time=run_time
    )


def error_event(task: TaskType, run_time: datetime, error: BaseException) -> TaskExecutionEvent:
    cause = error.__cause__
    text = cause.text if isinstance(cause, RemoteTraceback) else ""
    return TaskExecutionEvent(
        code=TASK_ERROR,
        task_id=str(task.id),
        store=str(task.store_alias),
        scheduled_run_time=run_time,
        exception=error if isinstance(error, Exception) else RuntimeError(repr(error)),
        traceback=text,
    )
