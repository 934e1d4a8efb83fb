"""``Scheduler``: builds the asyncz scheduler from a config and the declared tasks, and runs it.

It is what ``SchedulerConfig.start()``/``shutdown()`` drive inside Ravyn, what ``lifespan``
wraps around any ASGI app, and what ``run()`` runs on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from asyncz.executors.types import ExecutorType
from asyncz.schedulers.asyncio import NativeAsyncIOScheduler
from asyncz.tasks.types import TaskType
from asyncz.triggers.types import TriggerType

from corral._config import SchedulerConfig
from corral._constants import DEFAULT, ExecutorKind
from corral._decorator import TaskSpec, make_spec, registered_tasks
from corral._exceptions import ConfigurationError, NotImportableError
from corral._executor import AsyncIOExecutor, ProcessExecutor, ThreadExecutor
from corral._hints import warn_about_tasks, warn_disabled
from corral._pool._refs import reference_of
from corral._pool._stats import PoolStatistics
from corral._replicas import anchored, multi_worker_server
from corral._signals import signals_call

if TYPE_CHECKING:
    from corral._claims import Claims
    from corral._dask import DaskExecutor
    from corral._dask_stats import ClusterStatistics
    from corral._ledger import LedgerStatistics, LostRun

logger = logging.getLogger("corral.scheduler")


class Scheduler:
    """corral's scheduler: asyncz's, with tasks run in a supervised pool of worker processes.

    Args:
        config: The settings; without one, ``SchedulerConfig(enabled=True, **options)``
            (``CORRAL_*`` environment variables apply either way).
        tasks: The tasks to run; default: every ``@scheduler`` task declared in this process
            (after importing ``config.modules``), plus those given to :meth:`add_task`.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        tasks: Iterable[TaskSpec] | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            if "CORRAL_ENABLED" not in os.environ:
                options.setdefault("enabled", True)
            config = SchedulerConfig(**options)
        elif options:
            raise TypeError("pass settings either as a SchedulerConfig or as keywords, not both")
        self.config = config
        self._tasks = None if tasks is None else list(tasks)
        self._added: list[TaskSpec] = []
        self.asyncz: NativeAsyncIOScheduler | None = None
        self._process_executor: ProcessExecutor | None = None
        self._dask_executor: DaskExecutor | None = None
        self._thread_executor: ThreadExecutor | None = None
        self._killed = threading.Event()  # kill_running(): wait for no run any more
        self._claims: Claims | None = None
        self._rerun_lost: dict[str, bool] = {}
        self.replica_id: str | None = None
        self._final_ledger_statistics: LedgerStatistics | None = None
        """This process's id in the ledger (with a database, once started)."""

    # -- declaring tasks ------------------------------------------------------------------------

    def add_task(
        self,
        fn: Callable[..., Any],
        *,
        trigger: str | TriggerType,
        name: str | None = None,
        **options: Any,
    ) -> str:
        """Add a task, with the same arguments as ``@scheduler``; returns its id.

        Works before and after :meth:`start`. A method of a module-level instance is sent to
        workers as a reference to that instance (``module:instance.method``).

        Raises:
            ConfigurationError: an invalid declaration, or (for the process executor) a
                function that a worker process cannot find by reference.
        """
        spec = make_spec(fn, trigger=trigger, name=name, **options)
        if self._kind(spec) in _BY_REFERENCE:
            _check_specs([spec])  # what a worker cannot find is refused here, not at each run
        self._rerun_lost[spec.id] = spec.rerun_lost
        if self.asyncz is not None:
            self._schedule(spec)
        else:
            self._added.append(spec)
        return str(spec.id)

    # -- running --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.asyncz is not None

    async def start(self) -> None:
        """Start scheduling; with ``enabled=False``, do nothing (no process is started)."""
        if not self.config.enabled:
            warn_disabled(self.config)
            return
        if self.asyncz is not None:
            return
        self._killed.clear()
        for module in self.config.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigurationError(
                    f"modules: cannot import {module!r}: {exc}; check the module name and sys.path"
                ) from exc
        specs = self._specs()
        warn_about_tasks(specs)
        _check_specs([spec for spec in specs if self._kind(spec) in _BY_REFERENCE])
        kinds = {self._kind(spec) for spec in specs} | {self.config.executor}
        executors = {self._alias(kind): self._make_executor(kind, specs) for kind in kinds}
        cfg = self.config
        self.asyncz = _AsynczScheduler(
            timezone=cfg.timezone,
            executors=executors,
        )
        _warn_about_capacity(specs, cfg, self._kind)
        if cfg.database is not None:
            await self._join_ledger(specs)
        else:
            _warn_without_database()
        for spec in specs:
            self._schedule(spec)
        await self.asyncz.start()
        if self._claims is not None:
            self._claims.ready()
        logger.info(
            "corral scheduler started: %d task(s), default executor %r, %d worker(s)",
            len(specs),
            cfg.executor,
            cfg.workers if "process" in kinds else 0,
        )

    async def shutdown(self, wait: bool = True, timeout: float | None = DEFAULT) -> None:
        """Stop scheduling; the runs already started finish first, as asyncz promises.

        Runs still waiting for a worker run too, and so do the further run times of a run.
        Past ``timeout`` what is left is stopped (SIGTERM, ``kill_grace``, SIGKILL) and reported
        as ``JobCancelledError``; the thread executor's runs cannot be stopped, and go on
        unwaited. :meth:`kill_running` stops them at once.

        Args:
            wait: Return once they are over; ``False``: return at once while they finish (and
                report) in the background.
            timeout: Seconds they may take; default: the config's ``shutdown_timeout``;
                ``None``: as long as they take.
        """
        if timeout is DEFAULT:
            timeout = self.config.shutdown_timeout
        scheduler_, self.asyncz = self.asyncz, None
        if scheduler_ is None:
            return
        scheduler_.pause()
        drained = [e for e in (self._process_executor, self._dask_executor) if e is not None]
        if wait:  # (side by side: each within the same timeout)
            await asyncio.gather(*(e.aclose(timeout) for e in drained), self._threads_done(timeout))
        else:
            for executor in drained:
                executor.shutdown(wait=False, timeout=timeout)
        await scheduler_.shutdown(wait=False)
        await asyncio.sleep(0)  # let events queued from the pool's thread reach listeners
        if wait:
            await self._leave_ledger()
        else:
            self._leave_ledger_when_drained(timeout)
        logger.info("corral scheduler stopped")

    async def _threads_done(self, timeout: float | None) -> None:
        """The thread executor's runs handed over finish first, as asyncz's
        ``shutdown(wait=True)`` promises, within ``timeout``: a thread cannot be stopped, so
        past it they go on, unwaited."""
        if self._thread_executor is not None:
            threads, killed = self._thread_executor, self._killed
            await anyio.to_thread.run_sync(_join_threads, threads, timeout, killed)

    def kill_running(self) -> None:
        """Stop running jobs now (a second Ctrl-C); a shutdown in progress then completes.

        Running jobs are killed (SIGKILL), and every run time not run to its end is reported as
        ``JobCancelledError``; the worker pool shuts down, so later runs are cancelled too.
        """
        self._killed.set()
        if self._process_executor is not None:
            self._process_executor.kill_running()
        if self._dask_executor is not None:
            self._dask_executor.kill_running()

    async def _shutdown_for_server(self) -> None:
        """:meth:`shutdown`, during which SIGINT or SIGTERM (a server's second: the first
        started the shutdown) calls :meth:`kill_running`."""
        with signals_call(self.kill_running) as watching:
            stats = self.statistics() if self.running else None
            busy = 0 if stats is None else stats.running + stats.queued
            if watching and busy:
                limit = self.config.shutdown_timeout
                logger.warning(
                    "corral: letting %d task run(s) finish (%s); "
                    "send SIGINT (Ctrl-C) or SIGTERM again to stop them now",
                    busy,
                    "no time limit" if limit is None else f"shutdown_timeout={limit:g} s",
                )
            await self.shutdown()

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def run(self, *, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, or until SIGINT/SIGTERM; then shut down gracefully (a
        further SIGINT or SIGTERM stops the running jobs at once)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []

        def on_signal() -> None:  # the first stops scheduling; another stops running jobs too
            if stop.is_set():
                self.kill_running()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
                handled.append(sig)
        try:
            async with self:
                await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    @property
    def lifespan(self) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
        """An ASGI lifespan: the scheduler runs while the app does.

        ``lifespan=scheduler.lifespan`` for Starlette, FastAPI, Lilya or Ravyn;
        ``lifespan=[scheduler.lifespan]`` for Litestar, which takes a list. (A plain function,
        not a method: some frameworks call methods to build their lifespan.) At
        shutdown, running tasks finish first; while they do, SIGINT or SIGTERM (the server's
        second signal) stops them at once.
        """

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self._shutdown_for_server()

        return lifespan

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker of the pool has started; ``True`` if they did in time."""
        dask = self._dask_executor
        if dask is not None and not await anyio.to_thread.run_sync(dask.wait_ready, timeout):
            return False
        executor = self._process_executor
        if executor is None or executor.pool is None:
            return self.running
        pool = executor.pool
        return await anyio.to_thread.run_sync(pool.wait_ready, timeout)

    def statistics(self) -> PoolStatistics | None:
        """The worker pool's statistics (after shutdown: its final counters, no workers), or
        ``None`` if no pool was started."""
        if self._process_executor is None:
            return None
        return self._process_executor.statistics()

    def cluster_statistics(self) -> ClusterStatistics | None:
        """The Dask cluster's workers and the runs sent to it, or ``None`` without one."""
        return None if self._dask_executor is None else self._dask_executor.statistics()

    def tasks(self) -> list[TaskType]:
        """The scheduled asyncz tasks (with their next run times)."""
        return [] if self.asyncz is None else list(self.asyncz.get_tasks())

    # -- the ledger, with a database -------------------------------------------------------------

    async def _join_ledger(self, specs: list[TaskSpec]) -> None:
        from corral._claims import Claims
        from corral._ledger import Coordinator, Ledger

        cfg = self.config
        assert self.asyncz is not None and cfg.database is not None
        self._rerun_lost.update({spec.id: spec.rerun_lost for spec in specs})
        ledger = Ledger(cfg.database, lease=cfg.replica_lease)
        coordinator = Coordinator(ledger, on_lost=_no_lost_runs, retention=cfg.ledger_retention)
        claims = Claims(
            coordinator,
            self.asyncz,
            asyncio.get_running_loop(),
            lambda task_id: self._rerun_lost.get(task_id, False),
        )
        await anyio.to_thread.run_sync(coordinator.start)
        self._claims = claims
        self.asyncz.claims = claims  # type: ignore[attr-defined]
        self.replica_id = ledger.replica
        for executor in self.asyncz.executors.values():
            executor.claims = claims  # type: ignore[attr-defined]

    async def _leave_ledger(self) -> None:
        claims, self._claims = self._claims, None
        if claims is not None:
            claims.stop()
            await anyio.to_thread.run_sync(claims.coordinator.stop)
            await claims.outcomes.left()  # (after the answers the stop delivered)
            self._final_ledger_statistics = claims.coordinator.statistics()

    def _leave_ledger_when_drained(self, timeout: float | None) -> None:
        """After ``shutdown(wait=False)``: record the runs still finishing, then leave."""
        claims, self._claims = self._claims, None
        if claims is None:
            return
        claims.stop()
        drains = [
            executor._drain.finished
            for executor in (self._process_executor, self._dask_executor)
            if executor is not None
        ]
        threads, killed = self._thread_executor, self._killed

        def leave() -> None:
            for finished in drains:
                finished.wait()
            if threads is not None:
                _join_threads(threads, timeout, killed)
            claims.coordinator.stop()
            claims.outcomes.unconfirmed_later()
            self._final_ledger_statistics = claims.coordinator.statistics()

        threading.Thread(target=leave, name="corral-ledger-leave").start()

    def ledger_statistics(self) -> LedgerStatistics | None:
        """What the ledger did for this process (claims won, taken by other replicas, ...);
        after shutdown its final counters; ``None`` without a database."""
        if self._claims is None:
            return self._final_ledger_statistics
        return self._claims.coordinator.statistics()

    # -- building -------------------------------------------------------------------------------

    def _specs(self) -> list[TaskSpec]:
        specs = registered_tasks() if self._tasks is None else list(self._tasks)
        seen = {spec.id for spec in specs}
        specs += [spec for spec in self._added if spec.id not in seen]
        return [spec for spec in specs if spec.is_enabled]

    def _kind(self, spec: TaskSpec) -> ExecutorKind:
        return self.config.executor if spec.executor is DEFAULT else spec.executor

    def _alias(self, kind: ExecutorKind) -> str:
        return "default" if kind == self.config.executor else kind

    def _make_executor(self, kind: ExecutorKind, specs: list[TaskSpec]) -> ExecutorType:
        if kind == "process":
            # Workers import the tasks' modules as they start, not on their first run.
            modules = {spec.fn.__module__ for spec in specs if self._kind(spec) == kind}
            preload = tuple(sorted(set(self.config.preload) | modules))
            settings = self.config.pool_settings().model_copy(update={"preload": preload})
            self._process_executor = ProcessExecutor(settings)
            self._process_executor.claims = self._claims
            return self._process_executor
        if kind == "dask":
            from corral._dask import DaskExecutor

            self._dask_executor = DaskExecutor.from_config(self.config)
            self._dask_executor.claims = self._claims
            return self._dask_executor
        executor: ThreadExecutor | AsyncIOExecutor
        if kind == "thread":
            executor = self._thread_executor = ThreadExecutor(max_workers=self.config.workers)
        else:
            executor = AsyncIOExecutor()
        executor.claims = self._claims
        return executor

    def _schedule(self, spec: TaskSpec) -> None:
        assert self.asyncz is not None
        kind = self._kind(spec)
        if self._alias(kind) not in self.asyncz.executors:
            self.asyncz.add_executor(self._make_executor(kind, [spec]), self._alias(kind))
        if kind == "process":
            assert self._process_executor is not None
            timeout = self.config.timeout if spec.timeout is DEFAULT else spec.timeout
            self._process_executor.task_timeouts[spec.id] = timeout
        if kind == "dask":
            assert self._dask_executor is not None
            timeout = self.config.timeout if spec.timeout is DEFAULT else spec.timeout
            self._dask_executor.task_timeouts[spec.id] = timeout
        # Explicit per task: asyncz drops None-valued defaults (a grace time of None, "no limit").
        options = {
            key: getattr(self.config, key) if getattr(spec, key) is DEFAULT else getattr(spec, key)
            for key in ("max_instances", "coalesce", "mistrigger_grace_time")
        }
        trigger = spec.build_trigger(self.config.timezone)
        if self.config.database is not None:
            trigger = anchored(trigger, spec.id, explicit_start=_has_start(spec))
        self.asyncz.add_task(
            spec.fn,
            trigger=trigger,
            args=spec.args,
            kwargs=dict(spec.kwargs),
            id=spec.id,
            name=spec.name,
            executor=self._alias(kind),
            replace_existing=True,
            **options,
        )


class _AsynczScheduler(NativeAsyncIOScheduler):
    """asyncz's scheduler; with a database, a fire's TASK_SUBMITTED is dispatched only by the
    replica that wins its claim (the others skip the fire silently)."""

    claims: Claims | None = None

    def dispatch_event(self, event: Any) -> None:
        claims = self.claims
        if claims is not None and claims.hold(event):
            return
        super().dispatch_event(event)


_BY_REFERENCE = ("process", "dask")  # executors whose functions travel by reference


def _join_threads(executor: ThreadExecutor, timeout: float | None, killed: threading.Event) -> None:
    """Wait until the runs ``executor`` was handed are over, for ``timeout`` seconds at most,
    and no longer once ``killed`` is set."""
    joining = threading.Thread(target=executor.shutdown, args=(True,), daemon=True)
    joining.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    while joining.is_alive() and not killed.is_set():
        left = _TICK if deadline is None else min(_TICK, deadline - time.monotonic())
        if left <= 0:
            return
        joining.join(left)


_TICK = 0.1  # seconds between two looks at a kill_running() while thread runs are waited for


def _no_lost_runs(lost: list[LostRun]) -> None:  # replaced by Claims
    pass


def _has_start(spec: TaskSpec) -> bool:
    return isinstance(spec.trigger, str) and bool(
        {"start_at", "start_date"} & set(spec.trigger_args)
    )


def _warn_about_capacity(
    specs: list[TaskSpec], config: SchedulerConfig, kind: Callable[[TaskSpec], ExecutorKind]
) -> None:
    for spec in specs:
        limit = config.max_instances if spec.max_instances is DEFAULT else spec.max_instances
        if kind(spec) == "process" and limit > config.workers:
            logger.warning(
                "Task %r: max_instances=%d exceeds workers=%d: at most %d of its runs can run at "
                "once, the others wait for a worker; raise workers or lower max_instances",
                spec.id,
                limit,
                config.workers,
                config.workers,
            )


def _warn_without_database() -> None:
    server = multi_worker_server()
    if server is not None:
        logger.warning(
            "corral runs under %s without a database: every worker process runs every task, "
            "so each fire runs once per process. Fix: SchedulerConfig(database="
            "'sqlite:///path/to/corral.db') (or CORRAL_DATABASE=...), shared by all of them",
            server,
        )


def _check_specs(specs: list[TaskSpec]) -> None:
    """Every process task's function must be importable by reference, now that modules loaded."""
    problems = []
    for spec in specs:
        try:
            reference_of(spec.fn)
        except NotImportableError as exc:
            problems.append(f"task {spec.id!r}: {exc} (or choose executor='thread' or 'asyncio')")
    if problems:
        raise ConfigurationError("; ".join(problems))
