"""``DaskExecutor``: asyncz tasks run on a Dask cluster, with the guarantees of the local pool.

The scheduler (and the ledger, with a database) stays in the app; each run time of a task becomes
one run on the cluster (see ``corral/_dask_cluster.py``), and every run's outcome becomes exactly
one asyncz event: the value, the exception with the worker's traceback, or a ``JobError``
(``JobTimeoutError``, ``WorkerDiedError``, ``ClusterUnavailableError``, ``JobCancelledError``,
``JobExitError``).
The task's running-instance count is released once the run's last outcome is in. Functions
travel by reference (``module:qualname``), as to corral's own workers.

Importing this module does not import Dask; starting the executor does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MISSED
from asyncz.exceptions import MaximumInstancesError
from asyncz.executors.base import BaseExecutor

from corral._constants import DEFAULT
from corral._decorator import task_options
from corral._drain import Drain
from corral._exceptions import (
    ConfigurationError,
    CorralError,
    JobCancelledError,
    PoolNotRunningError,
)
from corral._executor import _error_event_for, _missed_event, _now, _Run
from corral._pool._refs import reference_of
from corral._pool._settings import PoolSettings

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

    from corral._claims import Claims
    from corral._config import SchedulerConfig
    from corral._dask_cluster import DaskCluster, DaskFuture
    from corral._dask_stats import ClusterStatistics

EXTRA = "pip install 'corral[dask]'"


def require_distributed() -> None:
    """Refuse clearly when Dask distributed is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"executor='dask' needs Dask distributed, which cannot be imported here "
            f"({type(exc).__name__}: {exc}); install corral's dask extra: {EXTRA}"
        ) from None


class DaskExecutor(BaseExecutor):
    """Runs asyncz tasks on a Dask cluster: an external one, or an embedded ``LocalCluster``.

    Args:
        settings: Pool settings; keyword ``options`` (any :class:`PoolSettings` field) override
            its fields. ``workers`` sizes an embedded cluster (one thread per worker process),
            ``max_memory`` is its workers' memory limit, ``timeout`` the default run timeout,
            ``max_result_size`` the largest result.
        address: The Dask scheduler's address (``tcp://host:8786``); ``None``: corral starts a
            ``LocalCluster`` of worker processes and closes it at shutdown.
        shutdown_timeout: Seconds the runs already handed over may take to finish at shutdown;
            past it they are stopped and reported cancelled. ``None``: as long as they take.
        task_timeouts: Per-task timeouts by task id (a task's ``@scheduler(timeout=...)`` and
            ``timeout`` apply otherwise).
    """

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        address: str | None = None,
        shutdown_timeout: float | None = 30.0,
        task_timeouts: dict[str, float | None] | None = None,
        **options: Any,
    ) -> None:
        require_distributed()
        super().__init__()
        if settings is None:
            settings = PoolSettings(**options)
        elif options:
            settings = PoolSettings(**{**settings.model_dump(exclude_unset=True), **options})
        self.settings = settings
        self.address = address.strip() if address and address.strip() else None
        self.shutdown_timeout = shutdown_timeout
        self.task_timeouts: dict[str, float | None] = dict(task_timeouts or {})
        self.cluster: DaskCluster | None = None
        self.claims: Claims | None = None
        """Set (before start) when fires are claimed in a database shared by replicas."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = logging.getLogger("corral.executor")
        self._inbox: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        self._drain = Drain()
        self._references: dict[Any, str] = {}

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> DaskExecutor:
        """The executor a ``SchedulerConfig`` describes (``dask_address``, pool settings)."""
        return cls(
            config.pool_settings(),
            address=config.dask_address,
            shutdown_timeout=config.shutdown_timeout,
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, scheduler: Any, alias: str) -> None:
        from corral._dask_cluster import DaskCluster

        super().start(scheduler, alias)
        self._log = self.logger or self._log
        self._loop = getattr(scheduler, "event_loop", None)
        max_memory = self.settings.max_memory
        max_result = self.settings.max_result_size
        self.cluster = DaskCluster(
            self.address,
            workers=self.settings.workers,
            max_memory=max_memory if isinstance(max_memory, int) else None,
            max_result_size=max_result if isinstance(max_result, int) else None,
            name=f"corral-{alias}-dask",
        )
        self.cluster.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until connected to the cluster, with workers (an embedded cluster: all of
        them); ``True`` if in time. Blocks: from a loop, run it in a thread."""
        return self.cluster is not None and self.cluster.wait_ready(timeout)

    def statistics(self) -> ClusterStatistics | None:
        """The cluster's workers and the runs sent to it, or ``None`` before start."""
        return None if self.cluster is None else self.cluster.statistics()

    def shutdown(self, wait: bool = True, *, timeout: float | None = DEFAULT) -> None:
        """Stop once the runs already handed over are over, as asyncz promises; past
        ``timeout`` (default: ``shutdown_timeout``) what is left is stopped and each run time
        not run is reported as a ``JobCancelledError``. Then the client closes, and so does an
        embedded cluster.

        Args:
            wait: Return once it is all over; ``False``: return at once while runs finish.
            timeout: Seconds they may take.
        """
        if self.cluster is None:
            return
        self._begin_drain(timeout)
        if wait:
            self._stop_delivering_to_this_thread()
            self._drain.finished.wait()

    async def aclose(self, timeout: float | None = DEFAULT) -> None:
        """``shutdown(wait=True)`` without blocking the event loop."""
        if self.cluster is not None:
            self._begin_drain(timeout)
            await self._drain.wait()

    def kill_running(self) -> None:
        """Stop every run now (their workers are restarted, or an embedded cluster closed);
        each run time not run to its end is reported as a ``JobCancelledError``."""
        if self.cluster is not None:
            self.cluster.shutdown(wait=False)

    def _begin_drain(self, timeout: float | None) -> None:
        assert self.cluster is not None
        self._drain.begin(
            self.cluster,
            self.shutdown_timeout if timeout is DEFAULT else timeout,
            cancel_queued=False,
            hand_over=self._hand_over_stranded,
        )

    def _stop_delivering_to_this_thread(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._loop:
            self._loop = None
            self._drain_inbox()

    def _hand_over_stranded(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            self._drain_inbox()

    # -- runs -----------------------------------------------------------------------------------

    def send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        """Run ``task`` once per run time, one after another, on the cluster (with a database,
        only the fires this replica claims)."""
        assert task.id is not None, "a task in decorator mode cannot run"
        if not run_times:
            return
        if self.claims is not None:
            self.claims.claim(self, task, list(run_times))
            return
        self._start_run(task, list(run_times), grace=task.mistrigger_grace_time)

    def do_send_task(self, task: TaskType, run_times: list[datetime]) -> None:
        self.send_task(task, run_times)

    def run_claimed(self, task: TaskType, run_times: list[datetime], *, rerun: bool) -> None:
        """Run fires this replica claimed (a rerun of a lost run ignores the grace time)."""
        self._start_run(task, run_times, grace=None if rerun else task.mistrigger_grace_time)

    def _start_run(self, task: TaskType, run_times: list[datetime], grace: float | None) -> None:
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

    def _submit_next(self, run: _Run) -> None:
        cluster = self.cluster
        assert cluster is not None, "the executor has not been started"
        task = run.task
        run_time = run.run_times[run.index]
        if run.grace is not None and (run.handed_at - run_time).total_seconds() > run.grace:
            self._deliver(self._finish_one, run, _missed_event(run, run_time))
            return
        try:
            future = cluster.submit(
                self._reference(task),
                tuple(task.args),
                dict(task.kwargs),
                timeout=self._timeout_of(task),
                label=run.task_id,
            )
        except CorralError as exc:  # not importable by reference, or shut down
            self._deliver(self._finish_one, run, self._error_event(run, run_time, exc))
            return
        self._log.info(
            'Running task "%s" (scheduled at %s) on the Dask cluster',
            task,
            run_time,
            extra={"corral_job_label": task.id},
        )
        if self.claims is not None:
            future.on_start = functools.partial(self._on_start, self.claims, run, run_time)
            if future.worker_pid is not None:  # it started before on_start was set
                self._on_start(self.claims, run, run_time, future)
        future.add_done_callback(lambda done: self._deliver(self._on_outcome, run, done))

    @staticmethod
    def _on_start(claims: Claims, run: _Run, run_time: datetime, future: DaskFuture) -> None:
        claims.started(run.task_id, run_time, future.worker_pid, time.time())

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
            self._log.info(
                "Task '%s' (scheduled at %s) executed successfully on Dask worker %s (pid %s)",
                run.task,
                run_time,
                getattr(future, "worker_address", None),
                getattr(future, "worker_pid", None),
                extra={
                    "corral_worker_pid": getattr(future, "worker_pid", None),
                    "corral_job_label": run.task_id,
                },
            )
        else:
            event = self._error_event(run, run_time, error)
        self._finish_one(run, event)

    def _error_event(
        self, run: _Run, run_time: datetime, error: BaseException
    ) -> TaskExecutionEvent:
        if isinstance(error, PoolNotRunningError):  # the executor had stopped its link
            error = JobCancelledError(
                f"run time {run_time} of task {run.task_id!r} was cancelled at shutdown before "
                f"it started: the Dask executor had stopped (shutdown_timeout passed, or "
                f"kill_running()); allow a longer shutdown_timeout to let it run",
                job_id=None,
                started=False,
            )
        return _error_event_for(run.task, run_time, error)

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
        """Run ``callback`` on the scheduler's event loop (outcomes that arrive together in one
        wake-up of it), or here if it has none running."""
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

    def _reference(self, task: TaskType) -> str:
        """``module:qualname`` of the task's function (checked once per function)."""
        fn = task.fn
        reference = self._references.get(fn)
        if reference is None:
            reference = self._references[fn] = reference_of(fn)  # type: ignore[arg-type]
        return reference

    def _timeout_of(self, task: TaskType) -> float | None:
        if task.id in self.task_timeouts:
            return self.task_timeouts[task.id]
        options = task_options(task.fn)
        if options is not None and options.timeout is not DEFAULT:
            return options.timeout  # type: ignore[no-any-return]
        return self.settings.timeout
