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
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_EXECUTED
from asyncz.exceptions import MaximumInstancesError
from asyncz.executors.asyncio import AsyncIOExecutor as _AsynczAsyncIOExecutor
from asyncz.executors.base import run_coroutine_task
from asyncz.executors.pool import ThreadPoolExecutor as _AsynczThreadPoolExecutor

from corral._asyncz_names import pool_options
from corral._constants import DEFAULT
from corral._exceptions import JobCancelledError, JobMissedError
from corral._pool._pool import Pool
from corral._pool._settings import PoolSettings
from corral._pool._stats import PoolStatistics
from corral._pool._supervisor import WAIT_WARNING, JobFuture
from corral._runs import (
    Run,
    RunExecutor,
    cancelled_at_shutdown,
    error_event,
    missed_event,
    nothing,
)

_WAIT_WARNING_EVERY = 60.0  # seconds between two warnings of one task waiting for a worker
_WAIT_WARNINGS_AT_MOST = 5  # tasks warned about in one such interval (then a count)
BUSY_CLAIM_DELAY = 0.25
"""Seconds a replica with no free worker waits before it claims a fire (with a database)."""

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

    from corral._claims import Claims
    from corral._ledger._lease import HeldLease


class ProcessExecutor(RunExecutor):
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
        options, self.overwrite_wait, self.cancel_futures = pool_options(options)
        super().__init__(
            settings,
            shutdown_timeout=shutdown_timeout,
            task_timeouts=task_timeouts,
            options=options,
        )
        self.pool: Pool | None = None
        self._wait_warned: dict[str, float] = {}  # task id -> when last warned (the last minute)
        self._wait_window = -_WAIT_WARNING_EVERY  # when the interval began
        self._wait_tasks = 0  # tasks warned about in it
        self._wait_unwarned = 0  # runs that waited without a warning of their own in it
        self.run_observers: list[Callable[[str, JobFuture[Any], float | None], None]] = []
        """Called at each job's outcome, on the event loop: (task id, the job's future, the
        seconds it ran or ``None`` if it never started); ``future.queue_wait`` is how long it
        waited for a worker. What ``corral.metrics`` measures runs with."""

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self.pool = Pool(self.settings, name=f"corral-{alias}")
        self._watch_lease(self.pool.hold_lease)
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
            self._wait_drained()

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
        self._drain.hurry()
        if self.pool is not None:
            self.pool.shutdown(wait=False)

    def _begin_drain(self, timeout: float | None) -> None:
        assert self.pool is not None
        self._drain.begin(
            self.pool,
            self.shutdown_timeout if timeout is DEFAULT else timeout,
            cancel_queued=self.cancel_futures,
            hand_over=self._at_drain_tick,
        )

    def statistics(self) -> PoolStatistics | None:
        return None if self.pool is None else self.pool.statistics()

    # -- runs (see ``corral/_runs.py``) ---------------------------------------------------------

    def _claim_delay(self) -> float:
        # A replica with no free worker claims a little later, so that a replica with one wins
        # the fire and runs it at once.
        pool = self.pool
        return BUSY_CLAIM_DELAY if pool is not None and not pool.has_idle_worker() else 0.0

    def _submit_job(self, run: Run, run_time: datetime) -> JobFuture[Any]:
        pool = self.pool
        assert pool is not None, "the executor has not been started"
        task = run.task
        return pool.submit(
            task.fn,  # type: ignore[arg-type]
            *task.args,
            kwargs=task.kwargs,
            timeout=self._timeout_of(task),
            label=run.task_id,
            lease=run.term,
        )

    def _started(self, run: Run, run_time: datetime, future: Any) -> None:
        super()._started(run, run_time, future)
        if self._log.isEnabledFor(logging.INFO):  # else nothing for the loop to do
            self._deliver(log_running, self._log, run.task, run_time, future)

    def _on_outcome(self, run: Run, future: concurrent.futures.Future[Any]) -> None:
        run_time = run.run_times[run.index]
        error = future.exception()
        if error is None:
            event = TaskExecutionEvent(
                code=TASK_EXECUTED,
                task_id=run.task_id,
                store=run.store,
                scheduled_run_time=run_time,
                return_value=future.result(),
            )
        elif isinstance(error, JobMissedError):
            event = missed_event(run, run_time)
        else:
            event = self._error_event(run, run_time, error)
        try:  # the app's observers and logging filters may raise: the outcome is reported
            if self.run_observers:
                self._observe(run, future)
            self._note_start(run, run_time, future)
            if error is None and self._log.isEnabledFor(logging.INFO):
                log_executed(self._log, run.task, run_time, future)
        finally:
            self._finish_one(run, event)

    def _observe(self, run: Run, future: concurrent.futures.Future[Any]) -> None:
        wait = getattr(future, "queue_wait", None)
        ran = None if wait is None else max(0.0, time.monotonic() - run.submitted_at - wait)
        for observer in list(self.run_observers):
            try:
                observer(run.task_id, future, ran)  # type: ignore[arg-type]
            except Exception:
                self._log.exception("corral: a run observer failed")

    def _note_start(
        self, run: Run, run_time: datetime, future: concurrent.futures.Future[Any]
    ) -> None:
        """A WARNING if the run waited for a worker: at most once a minute per task, and for at
        most five tasks a minute (a burst of many tasks gives a count, not a line for each)."""
        wait = getattr(future, "queue_wait", None)
        if wait is None or wait <= WAIT_WARNING:
            return
        now = time.monotonic()
        if now - self._wait_window >= _WAIT_WARNING_EVERY:  # a new interval
            self._wait_window, self._wait_tasks = now, 0
            self._wait_warned = {
                task: at for task, at in self._wait_warned.items() if now - at < _WAIT_WARNING_EVERY
            }
        warned = (
            now - self._wait_warned.get(run.task_id, -_WAIT_WARNING_EVERY) < _WAIT_WARNING_EVERY
        )
        if warned or self._wait_tasks >= _WAIT_WARNINGS_AT_MOST:
            self._wait_unwarned += 1
            return
        self._wait_warned[run.task_id] = now
        self._wait_tasks += 1
        others, self._wait_unwarned = self._wait_unwarned, 0
        self._log.warning(
            "Task %r waited %.1f s for a free worker (all %d were busy or starting); "
            "raise workers= or spread the tasks' schedules (warned at most once a minute "
            "per task, for five tasks a minute; pool statistics count every wait: "
            "'waited')%s",
            run.task_id,
            wait,
            self.settings.workers,
            f"; {others} more run(s) waited since the last warning" if others else "",
        )


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

    def claim_sent(self) -> Callable[[], None]:
        """asyncz's own executors do not wait for claims in flight at shutdown."""
        return nothing

    def run_claimed(
        self,
        task: TaskType,
        run_times: list[datetime],
        *,
        rerun: bool,
        handed_at: datetime,
        term: int,
    ) -> None:
        # (asyncz's own executors measure lateness when the run starts, as asyncz does.)
        assert self.claims is not None
        task = copy.copy(task)
        assert task.fn is not None
        task.fn = leased(task.fn, self.claims.lease, term)
        if rerun:
            task.mistrigger_grace_time = None
        try:
            super().send_task(task, run_times)  # type: ignore[misc]
        except MaximumInstancesError as exc:
            assert self.claims is not None
            self.claims.skip(task, run_times, exc, term)
        except RuntimeError:  # its pool shut down while the claim was in flight
            why = "the executor had shut down while its fire was being claimed"
            for run_time in run_times:
                cancelled = cancelled_at_shutdown(str(task.id), run_time, why)
                self.claims.dispatch(error_event(task, run_time, cancelled), term)


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


def leased(fn: Callable[..., Any], lease: HeldLease, term: int) -> Callable[..., Any]:
    """``fn``, which starts only while ``term`` of ``lease`` holds (a run claimed under it): a
    run that waited for a thread while the process was stopped, or could not renew its lease,
    may be another replica's by then. Past it, the run is not started and raises
    ``JobCancelledError`` (its outcome: see ``Claims.hold``)."""

    def refuse() -> JobCancelledError:
        return JobCancelledError(
            f"{getattr(fn, '__qualname__', fn)} was not started: the lease its fire was claimed "
            f"under (term {term}) no longer held when its turn came (the process was stopped, or "
            f"could not renew its lease, for longer than replica_lease); another replica may "
            f"have reported it lost",
            job_id=None,
            started=False,
        )

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            if not lease.holds(term):
                raise refuse()
            return await fn(*args, **kwargs)

        return run_async

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not lease.holds(term):
            raise refuse()
        return fn(*args, **kwargs)

    return run


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
