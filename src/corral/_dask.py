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

import concurrent.futures
from datetime import datetime
from typing import TYPE_CHECKING, Any

from asyncz.events import TaskExecutionEvent
from asyncz.events.constants import TASK_EXECUTED

from corral._constants import DEFAULT
from corral._exceptions import (
    ConfigurationError,
)
from corral._pool._refs import reference_of
from corral._pool._settings import PoolSettings
from corral._runs import Run, RunExecutor

if TYPE_CHECKING:
    from asyncz.tasks.types import TaskType

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


class DaskExecutor(RunExecutor):
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

    stopped = "the Dask executor had stopped"

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
        super().__init__(
            settings,
            shutdown_timeout=shutdown_timeout,
            task_timeouts=task_timeouts,
            options=options,
        )
        self.address = address.strip() if address and address.strip() else None
        self.cluster: DaskCluster | None = None
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
        self._watch_lease(self.cluster.hold_lease)  # (published on the started link's loop)

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
            self._wait_drained()

    async def aclose(self, timeout: float | None = DEFAULT) -> None:
        """``shutdown(wait=True)`` without blocking the event loop."""
        if self.cluster is not None:
            self._begin_drain(timeout)
            await self._drain.wait()

    def kill_running(self) -> None:
        """Stop every run now (their workers are restarted, or an embedded cluster closed);
        each run time not run to its end is reported as a ``JobCancelledError``."""
        self._drain.hurry()
        if self.cluster is not None:
            self.cluster.shutdown(wait=False)

    def _begin_drain(self, timeout: float | None) -> None:
        assert self.cluster is not None
        self._drain.begin(
            self.cluster,
            self.shutdown_timeout if timeout is DEFAULT else timeout,
            cancel_queued=False,
            hand_over=self._at_drain_tick,
        )

    # -- runs -----------------------------------------------------------------------------------

    def _submit_job(self, run: Run, run_time: datetime) -> DaskFuture:
        cluster = self.cluster
        assert cluster is not None, "the executor has not been started"
        task = run.task
        future = cluster.submit(
            self._reference(task),
            tuple(task.args),
            dict(task.kwargs),
            timeout=self._timeout_of(task),
            label=run.task_id,
            lease=run.term,
        )
        self._log.info(
            'Running task "%s" (scheduled at %s) on the Dask cluster',
            task,
            run_time,
            extra={"corral_job_label": task.id},
        )
        return future

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

    def _reference(self, task: TaskType) -> str:
        """``module:qualname`` of the task's function (checked once per function)."""
        fn = task.fn
        reference = self._references.get(fn)
        if reference is None:
            reference = self._references[fn] = reference_of(fn)  # type: ignore[arg-type]
        return reference
