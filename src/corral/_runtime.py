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
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

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
from corral._pool._refs import reference_of
from corral._pool._stats import PoolStatistics

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

        Works before and after :meth:`start`.
        """
        spec = make_spec(fn, trigger=trigger, name=name, **options)
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
            logger.info("corral scheduler is disabled (enabled=False); not starting")
            return
        if self.asyncz is not None:
            return
        for module in self.config.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigurationError(
                    f"modules: cannot import {module!r}: {exc}; check the module name and sys.path"
                ) from exc
        specs = self._specs()
        _check_specs([spec for spec in specs if self._kind(spec) == "process"])
        kinds = {self._kind(spec) for spec in specs} | {self.config.executor}
        executors = {self._alias(kind): self._make_executor(kind, specs) for kind in kinds}
        cfg = self.config
        self.asyncz = NativeAsyncIOScheduler(
            timezone=cfg.timezone,
            executors=executors,
        )
        for spec in specs:
            self._schedule(spec)
        await self.asyncz.start()
        logger.info(
            "corral scheduler started: %d task(s), default executor %r, %d worker(s)",
            len(specs),
            cfg.executor,
            cfg.workers if "process" in kinds else 0,
        )

    async def shutdown(self, wait: bool = True, timeout: float | None = DEFAULT) -> None:
        """Stop scheduling; let running jobs finish, or kill them now (``wait=False``).

        Args:
            wait: Let running jobs finish, up to ``timeout``.
            timeout: Seconds to wait; default: the config's ``shutdown_timeout``.
        """
        if timeout is DEFAULT:
            timeout = self.config.shutdown_timeout
        scheduler_, self.asyncz = self.asyncz, None
        if scheduler_ is None:
            return
        scheduler_.pause()
        if self._process_executor is not None:
            if wait:
                await self._process_executor.aclose(timeout)
            else:
                self._process_executor.shutdown(wait=False)
        await scheduler_.shutdown(wait=False)
        await asyncio.sleep(0)  # let events queued from the pool's thread reach listeners
        logger.info("corral scheduler stopped")

    def kill_running(self) -> None:
        """Stop running jobs now (a second Ctrl-C); a shutdown in progress then completes."""
        if self._process_executor is not None:
            self._process_executor.shutdown(wait=False)

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
        """Run until ``stop`` is set, or until SIGINT/SIGTERM; then shut down gracefully."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
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

        ``lifespan=scheduler.lifespan`` for Starlette, FastAPI, Lilya or Ravyn. (A plain
        function, not a method: some frameworks call methods to build their lifespan.)
        """

        @contextlib.asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.shutdown()

        return lifespan

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every worker of the pool has started; ``True`` if they did in time."""
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

    def tasks(self) -> list[TaskType]:
        """The scheduled asyncz tasks (with their next run times)."""
        return [] if self.asyncz is None else list(self.asyncz.get_tasks())

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
            return self._process_executor
        if kind == "thread":
            return ThreadExecutor(max_workers=self.config.workers)
        return AsyncIOExecutor()

    def _schedule(self, spec: TaskSpec) -> None:
        assert self.asyncz is not None
        kind = self._kind(spec)
        if self._alias(kind) not in self.asyncz.executors:
            self.asyncz.add_executor(self._make_executor(kind, [spec]), self._alias(kind))
        if kind == "process":
            assert self._process_executor is not None
            timeout = self.config.timeout if spec.timeout is DEFAULT else spec.timeout
            self._process_executor.task_timeouts[spec.id] = timeout
        # Explicit per task: asyncz drops None-valued defaults (a grace time of None, "no limit").
        options = {
            key: getattr(self.config, key) if getattr(spec, key) is DEFAULT else getattr(spec, key)
            for key in ("max_instances", "coalesce", "mistrigger_grace_time")
        }
        self.asyncz.add_task(
            spec.fn,
            trigger=spec.build_trigger(self.config.timezone),
            args=spec.args,
            kwargs=dict(spec.kwargs),
            id=spec.id,
            name=spec.name,
            executor=self._alias(kind),
            replace_existing=True,
            **options,
        )


def _check_specs(specs: list[TaskSpec]) -> None:
    """Every process task's function must be importable by reference, now that modules loaded."""
    problems = []
    for spec in specs:
        try:
            reference_of(spec.fn)
        except NotImportableError as exc:
            problems.append(f"task {spec.id!r}: {exc}")
    if problems:
        raise ConfigurationError("; ".join(problems))
