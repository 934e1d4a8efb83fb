"""asyncz executors: runs over corral's supervised pool, and fixed thread/asyncio executors.

``ProcessExecutor`` is a drop-in for asyncz's ``ProcessPoolExecutor``: the scheduler stays in the
parent, each run of a task becomes one job per due run time, and every job outcome becomes exactly
one asyncz event. The task's running-instance count is released once the run's last outcome is in,
whatever that outcome was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
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

from corral._constants import DEFAULT
from corral._decorator import task_options
from corral._exceptions import CorralError, JobMissedError, RemoteTraceback
from corral._pool._pool import Pool
from corral._pool._settings import PoolSettings
from corral._pool._stats import PoolStatistics

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType


@dataclass(eq=False)
class _Run:
    """One ``send_task`` call: a task and its due run times, run one after another."""

    task: TaskType
    task_id: str
    store: str
    run_times: list[datetime]
    index: int = 0
    outcomes: list[TaskExecutionEvent] = field(default_factory=list)


class ProcessExecutor(BaseExecutor):
    """Runs asyncz tasks in corral's supervised pool of worker processes.

    Args:
        settings: Pool settings; keyword ``options`` (any :class:`PoolSettings` field, such as
            ``workers=4`` or ``timeout=60``) override its fields.
        shutdown_timeout: Seconds running jobs may take to finish when the scheduler shuts down
            with ``wait=True``; past it they are stopped. ``None`` waits for them.
        task_timeouts: Per-task timeouts by task id (the ``@scheduler(timeout=...)`` of a task
            and the pool's ``timeout`` apply otherwise).
    """

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        shutdown_timeout: float | None = 30.0,
        task_timeouts: dict[str, float | None] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
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

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._log = self.logger or self._log
        self._loop = getattr(scheduler, "event_loop", None)
        self.pool = Pool(self.settings, name=f"corral-{alias}")
        self.pool.start()

    def shutdown(self, wait: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, timeout=self.shutdown_timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain and stop the pool without blocking the event loop."""
        if self.pool is not None:
            await self.pool.aclose(timeout=timeout)

    def statistics(self) -> PoolStatistics | None:
        return None if self.pool is None else self.pool.statistics()

    def send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        # The instance is taken before the first job is submitted, so an outcome that arrives at
        # once (a run already too late to start) releases an instance that is really held.
        task_id = task.id
        assert task_id is not None, "a task in decorator mode cannot run"
        with self.lock:
            if self.instances[task_id] >= task.max_instances:
                raise MaximumInstancesError(task_id, task.max_instances)
            self.instances[task_id] += 1
            try:
                self.do_send_task(task, run_times)
            except BaseException:
                self._release(task_id)
                raise

    def do_send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        assert task.id is not None, "a task in decorator mode cannot run"
        self._submit_next(_Run(task, task.id, str(task.store_alias), list(run_times)))

    # -- one run time after another -------------------------------------------------------------

    def _submit_next(self, run: _Run) -> None:
        """Submit the job for ``run``'s current run time, or report it missed."""
        pool = self.pool
        assert pool is not None, "the executor has not been started"
        task = run.task
        run_time = run.run_times[run.index]
        start_within = _start_within(task.mistrigger_grace_time, run_time)
        if start_within is not None and start_within <= 0:
            self._finish_one(run, _missed_event(run, run_time))
            return
        try:
            future = pool.submit(
                task.fn,  # type: ignore[arg-type]
                *task.args,
                kwargs=task.kwargs,
                timeout=self._timeout_of(task),
                start_within=start_within,
                label=run.task_id,
            )
        except CorralError as exc:  # a full queue, a pool shutting down: this run's outcome
            self._finish_one(run, _error_event(run, run_time, exc))
            return
        future.add_done_callback(lambda done: self._deliver(self._on_outcome, run, done))

    def _on_outcome(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
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
            self._log.debug("Task %r (run at %s) executed in a worker", run.task_id, run_time)
        elif isinstance(error, JobMissedError):
            event = _missed_event(run, run_time)
        else:
            event = _error_event(run, run_time, error)
        self._finish_one(run, event)

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


class ThreadExecutor(_AsynczThreadPoolExecutor):
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


class AsyncIOExecutor(_AsynczAsyncIOExecutor):
    """asyncz's asyncio executor: ``async def`` tasks run on the app's event loop."""


def _start_within(grace: float | None, run_time: datetime) -> float | None:
    if grace is None:
        return None
    late = (datetime.now(UTC) - run_time).total_seconds()
    return grace - late


def _missed_event(run: _Run, run_time: datetime) -> TaskExecutionEvent:
    return TaskExecutionEvent(
        code=TASK_MISSED, task_id=run.task_id, store=run.store, scheduled_run_time=run_time
    )


def _error_event(run: _Run, run_time: datetime, error: BaseException) -> TaskExecutionEvent:
    cause = error.__cause__
    text = cause.text if isinstance(cause, RemoteTraceback) else ""
    return TaskExecutionEvent(
        code=TASK_ERROR,
        task_id=run.task_id,
        store=run.store,
        scheduled_run_time=run_time,
        exception=error if isinstance(error, Exception) else RuntimeError(repr(error)),
        traceback=text,
    )
