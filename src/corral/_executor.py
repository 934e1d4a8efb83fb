"""asyncz executors: runs over corral's supervised pool, and fixed thread/asyncio executors.

``ProcessExecutor`` is a drop-in for asyncz's ``ProcessPoolExecutor``: the scheduler stays in the
parent, each run of a task becomes one job per due run time, and every job outcome becomes exactly
one asyncz event. The task's running-instance count is released once the run's last outcome is in,
whatever that outcome was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MISSED
from asyncz.exceptions import MaximumInstancesError
from asyncz.executors.asyncio import AsyncIOExecutor as _AsynczAsyncIOExecutor
from asyncz.executors.base import BaseExecutor, run_coroutine_task
from asyncz.executors.pool import ThreadPoolExecutor as _AsynczThreadPoolExecutor

from corral._asyncz_names import pool_options
from corral._constants import DEFAULT
from corral._decorator import task_options
from corral._drain import Drain
from corral._exceptions import (
    CorralError,
    JobCancelledError,
    JobMissedError,
    PoolNotRunningError,
    RemoteTraceback,
)
from corral._pool._pool import Pool
from corral._pool._settings import PoolSettings
from corral._pool._stats import PoolStatistics
from corral._pool._supervisor import WAIT_WARNING, JobFuture

_WAIT_WARNING_EVERY = 60.0  # seconds between two warnings of one task waiting for a worker
BUSY_CLAIM_DELAY = 0.25
"""Seconds a replica with no free worker waits before it claims a fire (with a database)."""

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

    from corral._claims import Claims


@dataclass(eq=False)
class _Run:
    """One ``send_task`` call: a task and its due run times, run one after another."""

    task: TaskType
    task_id: str
    store: str
    run_times: list[datetime]
    handed_at: datetime
    """When the scheduler handed the run over: lateness is measured here, not at start."""
    grace: float | None
    index: int = 0
    outcomes: list[TaskExecutionEvent] = field(default_factory=list)
    submitted_at: float = 0.0
    """When the job of the current run time was submitted (``time.monotonic()``)."""


class ProcessExecutor(BaseExecutor):
    """Runs asyncz tasks in corral's supervised pool of worker processes.

    Args:
        settings: Pool settings; keyword ``options`` (any :class:`PoolSettings` field, such as
            ``workers=4`` or ``timeout=60``) override its fields.
        shutdown_timeout: Seconds the runs already handed over may take to finish at shutdown;
            past it they are stopped and reported cancelled. ``None``: as long as they take.
        task_timeouts: Per-task timeouts by task id (the ``@scheduler(timeout=...)`` of a task
            and the pool's ``timeout`` apply otherwise).

    asyncz's ``ProcessPoolExecutor`` arguments are accepted too: ``max_workers`` (``workers``),
    ``pool_kwargs`` (``mp_context``, ``initializer``, ``initargs``, ``max_tasks_per_child``:
    ``start_method``, ``initializer``, ``initargs``, ``max_jobs_per_worker``),
    ``overwrite_wait`` (replaces ``shutdown``'s ``wait``) and ``cancel_futures`` (``True``: runs
    still waiting for a worker are cancelled at shutdown instead of run).
    """

    cancel_futures = False

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        shutdown_timeout: float | None = 30.0,
        task_timeouts: dict[str, float | None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        options, self.overwrite_wait, self.cancel_futures = pool_options(options)
        if settings is None:
            settings = PoolSettings(**options)
        elif options:
            settings = PoolSettings(**{**settings.model_dump(exclude_unset=True), **options})
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.task_timeouts: dict[str, float | None] = dict(task_timeouts or {})
        self.pool: Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = logging.getLogger("corral.executor")
        self._inbox: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        self._drain = Drain()
        self.claims: Claims | None = None
        """Set (before start) when fires are claimed in a database shared by replicas."""
        self._wait_warned: dict[str, float] = {}
        self.run_observers: list[Callable[[str, JobFuture[Any], float | None], None]] = []
        """Called at each job's outcome, on the event loop: (task id, the job's future, the
        seconds it ran or ``None`` if it never started); ``future.queue_wait`` is how long it
        waited for a worker. What ``corral.metrics`` measures runs with."""

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._log = self.logger or self._log
        self._loop = getattr(scheduler, "event_loop", None)
        self.pool = Pool(self.settings, name=f"corral-{alias}")
        self.pool.start()

    def shutdown(self, wait: bool = True, *, timeout: float | None = DEFAULT) -> None:
        """Stop the pool once the runs already handed over are over, as asyncz promises.

        Runs still waiting for a worker run, and a run goes on to its next run times. Past
        ``timeout`` (default: ``shutdown_timeout``; ``None``: no limit) what is left is stopped
        (SIGTERM, ``kill_grace``, SIGKILL) and each run time not run is reported as a
        ``JobCancelledError``. The first shutdown sets that deadline; :meth:`kill_running`
        stops everything at once.

        Args:
            wait: Return once they are over; ``False``: return at once while they finish.
            timeout: Seconds they may take.
        """
        if self.overwrite_wait is not None:
            wait = self.overwrite_wait
        if self.pool is None:
            return
        self._begin_drain(timeout)
        if wait and self.pool.may_wait():  # (from a job's done-callback, it goes on unwaited)
            self._stop_delivering_to_this_thread()
            self._drain.finished.wait()

    async def aclose(self, timeout: float | None = DEFAULT) -> None:
        """``shutdown(wait=True)`` without blocking the event loop. Cancelled while it waits
        (a server that stops waiting for its app), it stops what is left at once."""
        if self.pool is None:
            return
        self._begin_drain(timeout)
        try:
            await self._drain.wait()
        except asyncio.CancelledError:
            self.kill_running()
            raise

    def kill_running(self) -> None:
        """Stop every run now: running jobs are killed (SIGKILL) and the pool shuts down; each
        run time not run to its end is reported as a ``JobCancelledError``. Returns at once."""
        if self.pool is not None:
            self.pool.shutdown(wait=False)

    def _begin_drain(self, timeout: float | None) -> None:
        assert self.pool is not None
        self._drain.begin(
            self.pool,
            self.shutdown_timeout if timeout is DEFAULT else timeout,
            cancel_queued=self.cancel_futures,
            hand_over=self._hand_over_stranded,
        )

    def _stop_delivering_to_this_thread(self) -> None:
        """Called on the event loop's own thread, a blocking shutdown keeps that loop from
        running: outcomes are then handled on the thread that reads them, as without a loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            self._loop = None
            self._drain_inbox()  # what was handed to the loop already (``Drain`` looks again)

    def _hand_over_stranded(self) -> None:
        """Handle outcomes that wait for an event loop that no longer runs."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._drain_inbox()

    def statistics(self) -> PoolStatistics | None:
        return None if self.pool is None else self.pool.statistics()

    def send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        """Run ``task`` once per run time, one after another, in the pool.

        A run waits for a free worker as long as it takes: ``mistrigger_grace_time`` applies to
        how late the scheduler hands it over, as in asyncz. With a database, each run time is
        first claimed there, and only the fires this replica wins run here.
        """
        task_id = task.id
        assert task_id is not None, "a task in decorator mode cannot run"
        if not run_times:
            return
        if self.claims is not None:
            # The claim counts runs in progress on every replica; the instance is taken here
            # when the fires come back won. A replica with no free worker claims a little
            # later, so that a replica with one wins the fire and runs it at once.
            pool = self.pool
            busy = pool is not None and not pool.has_idle_worker()
            self.claims.claim(self, task, run_times, delay=BUSY_CLAIM_DELAY if busy else 0.0)
            return
        self._start_run(task, list(run_times), grace=task.mistrigger_grace_time)

    def do_send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        self.send_task(task, run_times)

    def run_claimed(self, task: TaskType, run_times: list[datetime], *, rerun: bool) -> None:
        """Run fires this replica claimed (a rerun of a lost run ignores the grace time)."""
        self._start_run(task, run_times, grace=None if rerun else task.mistrigger_grace_time)

    def _start_run(self, task: TaskType, run_times: list[datetime], grace: float | None) -> None:
        # The instance is taken before the first job is submitted, so an outcome that arrives at
        # once releases an instance that is really held.
        task_id = str(task.id)
        with self.lock:
            if self.claims is None and self.instances[task_id] >= task.max_instances:
                raise MaximumInstancesError(task_id, task.max_instances)
            self.instances[task_id] += 1
            self._drain.run_started()
        run = _Run(task, task_id, str(task.store_alias), run_times, _now(), grace)
        try:
            self._submit_next(run)
        except BaseException:
            self._release(task_id)
            raise

    # -- one run time after another -------------------------------------------------------------

    def _submit_next(self, run: _Run) -> None:
        """Submit the job for ``run``'s current run time, or report it missed."""
        pool = self.pool
        assert pool is not None, "the executor has not been started"
        task = run.task
        run_time = run.run_times[run.index]
        if run.grace is not None and (run.handed_at - run_time).total_seconds() > run.grace:
            # Reported after asyncz's TASK_SUBMITTED for this run, as asyncz does.
            self._deliver(self._finish_one, run, _missed_event(run, run_time))
            return
        run.submitted_at = time.monotonic()
        try:
            future = pool.submit(
                task.fn,  # type: ignore[arg-type]
                *task.args,
                kwargs=task.kwargs,
                timeout=self._timeout_of(task),
                label=run.task_id,
            )
        except CorralError as exc:  # a full queue, a pool shutting down: this run's outcome
            self._deliver(self._finish_one, run, _error_event(run, run_time, exc))
            return
        future.on_start = functools.partial(self._on_start, run, run_time)
        if future.worker_pid is not None:  # it started before on_start was set
            self._on_start(run, run_time, future)
        future.add_done_callback(lambda done: self._deliver(self._on_outcome, run, done))

    def _on_start(self, run: _Run, run_time: datetime, future: JobFuture[Any]) -> None:
        """A worker started the run (called on any thread; once, whoever sees it first)."""
        if future.__dict__.setdefault("corral_start_seen", run) is not run:
            return
        if self.claims is not None:
            self.claims.started(run.task_id, run_time, future.worker_pid, time.time())
        self._deliver(log_running, self._log, run.task, run_time, future)

    def _on_outcome(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
        run_time = run.run_times[run.index]
        if self.run_observers:
            self._observe(run, future)
        self._note_start(run, run_time, future)
        error = future.exception()
        if error is None:
            event = TaskExecutionEvent(
                code=TASK_EXECUTED,
                task_id=run.task_id,
                store=run.store,
                scheduled_run_time=run_time,
                return_value=future.result(),
            )
            log_executed(self._log, run.task, run_time, future)
        elif isinstance(error, JobMissedError):
            event = _missed_event(run, run_time)
        else:
            event = _error_event(run, run_time, error)
        self._finish_one(run, event)

    def _observe(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
        wait = getattr(future, "queue_wait", None)
        ran = None if wait is None else max(0.0, time.monotonic() - run.submitted_at - wait)
        for observer in list(self.run_observers):
            try:
                observer(run.task_id, future, ran)  # type: ignore[arg-type]
            except Exception:
                self._log.exception("corral: a run observer failed")

    def _note_start(
        self, run: _Run, run_time: datetime, future: concurrent.futures.Future[Any]
    ) -> None:
        """Where and when the run started; a WARNING (once a minute per task) if it waited."""
        wait = getattr(future, "queue_wait", None)
        if wait is None or wait <= WAIT_WARNING:
            return
        now = time.monotonic()
        if now - self._wait_warned.get(run.task_id, -_WAIT_WARNING_EVERY) < _WAIT_WARNING_EVERY:
            return
        self._wait_warned[run.task_id] = now
        self._log.warning(
            "Task %r waited %.1f s for a free worker (all %d were busy or starting); "
            "raise workers= or spread the tasks' schedules (warned at most once a minute "
            "per task; pool statistics count every wait: 'waited')",
            run.task_id,
            wait,
            self.settings.workers,
        )

    def _finish_one(self, run: _Run, event: TaskExecutionEvent) -> None:
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
        run.outcomes.append(event)
        self.scheduler.dispatch_event(event)
        run.index += 1
        if run.index < len(run.run_times):
            self._submit_next(run)
        else:
            self._release(run.task_id)

    def _release(self, task_id: str) -> None:
        with self.lock:
            self.instances[task_id] -= 1
            if self.instances[task_id] <= 0:
                del self.instances[task_id]
        self._drain.run_ended()

    def _deliver(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the scheduler's event loop, or here if it has none running.

        Outcomes that arrive together are handed over in one batch: one wake-up of the loop,
        not one per job.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            callback(*args)
            return
        with self._inbox_lock:
            self._inbox.append((callback, args))
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain_inbox)
        except RuntimeError:  # the loop closed in between
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        with self._inbox_lock:
            batch, self._inbox = self._inbox, []
            self._inbox_scheduled = False
        for callback, args in batch:
            callback(*args)

    def _timeout_of(self, task: TaskType) -> float | None:
        if task.id in self.task_timeouts:
            return self.task_timeouts[task.id]
        options = task_options(task.fn)
        if options is not None and options.timeout is not DEFAULT:
            return options.timeout  # type: ignore[no-any-return]
        return self.settings.timeout


class _ClaimsFirst:
    """For asyncz's own executors: with a database, claim each fire before running it."""

    claims: Claims | None = None

    def send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        if not run_times:
            return
        if self.claims is None:
            super().send_task(task, run_times)  # type: ignore[misc]
            return
        self.claims.claim(self, task, list(run_times))

    def run_claimed(self, task: TaskType, run_times: list[datetime], *, rerun: bool) -> None:
        if rerun:
            task = copy.copy(task)
            task.mistrigger_grace_time = None
        try:
            super().send_task(task, run_times)  # type: ignore[misc]
        except MaximumInstancesError as exc:
            assert self.claims is not None
            self.claims.skip(task, run_times, exc)


class ThreadExecutor(_ClaimsFirst, _AsynczThreadPoolExecutor):
    """asyncz's thread pool executor, with ``async def`` tasks awaited in the worker thread.

    (asyncz's own reports an ``async def`` task as executed without running its body.)
    """

    def do_send_task(self, task: TaskType, run_times: list[datetime]) -> Any:
        if not inspect.iscoroutinefunction(task.fn):
            return super().do_send_task(task, run_times)
        task_id = task.id
        assert task_id is not None

        def done(future: concurrent.futures.Future[list[TaskExecutionEvent]]) -> None:
            if future.exception() is not None:
                self.run_task_error(task_id)
            else:
                self.run_task_success(task_id, future.result())

        future = self.pool.submit(
            _run_coroutine_task_in_thread, task, str(task.store_alias), run_times, self.logger
        )
        future.add_done_callback(done)


def _run_coroutine_task_in_thread(
    task: TaskType, store: str, run_times: list[datetime], logger: logging.Logger
) -> list[TaskExecutionEvent]:
    return asyncio.run(run_coroutine_task(task, store, run_times, logger))


class AsyncIOExecutor(_ClaimsFirst, _AsynczAsyncIOExecutor):
    """asyncz's asyncio executor: ``async def`` tasks run on the app's event loop."""


def _now() -> datetime:
    return datetime.now(UTC)


def log_running(
    logger: logging.Logger,
    task: TaskType,
    run_time: datetime,
    future: concurrent.futures.Future[Any],
) -> None:
    """asyncz's "Running task" line, at INFO, once a worker started the run, with its pid."""
    pid = getattr(future, "worker_pid", None)
    logger.info(
        'Running task "%s" (scheduled at %s) in worker %s',
        task,
        run_time,
        pid,
        extra={"corral_worker_pid": pid, "corral_job_label": task.id},
    )


def log_executed(
    logger: logging.Logger,
    task: TaskType,
    run_time: datetime,
    future: concurrent.futures.Future[Any],
) -> None:
    """asyncz's "executed successfully" line, at INFO, with the pid of the worker that ran it."""
    pid = getattr(future, "worker_pid", None)
    logger.info(
        "Task '%s' (scheduled at %s) executed successfully in worker %s",
        task,
        run_time,
        pid,
        extra={"corral_worker_pid": pid, "corral_job_label": task.id},
    )


def _missed_event(run: _Run, run_time: datetime) -> TaskExecutionEvent:
    return TaskExecutionEvent(
        code=TASK_MISSED, task_id=run.task_id, store=run.store, scheduled_run_time=run_time
    )


def _error_event(run: _Run, run_time: datetime, error: BaseException) -> TaskExecutionEvent:
    if isinstance(error, PoolNotRunningError):  # the executor stopped its pool before this one
        error = JobCancelledError(
            f"run time {run_time} of task {run.task_id!r} was cancelled at shutdown before it "
            f"started: the executor had stopped its pool (shutdown_timeout passed, or "
            f"kill_running()); allow a longer shutdown_timeout to let it run",
            job_id=None,
            started=False,
        )
    return _error_event_for(run.task, run_time, error)


def _error_event_for(
    task: TaskType, run_time: datetime, error: BaseException
) -> TaskExecutionEvent:
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
