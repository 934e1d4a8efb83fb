"""``SchedulerConfig``: the scheduler's settings, validated, with environment overrides."""

from __future__ import annotations

import json
import os
import zoneinfo
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from corral._constants import ExecutorKind
from corral._pool._settings import PoolSettings, comma_separated

if TYPE_CHECKING:
    from corral._pool._stats import PoolStatistics
    from corral._runtime import Scheduler

ENV_PREFIX = "CORRAL_"


class SchedulerConfig(PoolSettings):
    """How the scheduler runs: Ravyn's documented fields, the executor, and the pool settings.

    Every field can also come from an environment variable named ``CORRAL_`` plus the field
    name in capitals (``CORRAL_WORKERS=8``, ``CORRAL_ENABLED=true``, ``CORRAL_MODULES=a,b``).
    A value passed in code wins over the environment; the environment wins over the default.
    """

    enabled: bool = False
    """Whether the scheduler runs at all. ``False``: nothing starts, no process is spawned."""
    timezone: str = "UTC"
    """Time zone of cron and date triggers (an IANA name such as ``"Europe/Paris"``)."""
    max_instances: Annotated[int, Field(ge=1)] = 1
    """Default for every task: how many runs of it may be in progress at once."""
    coalesce: bool = False
    """Default for every task: run once, not once per missed run time, after a delay."""
    mistrigger_grace_time: Annotated[float, Field(gt=0)] | None = 1.0
    """Default for every task: seconds a run may start late; later, it is reported missed."""
    executor: ExecutorKind = "process"
    """Where tasks run by default: ``"process"`` (the supervised pool), ``"thread"``,
    ``"asyncio"`` (the app's event loop) or ``"dask"`` (a Dask cluster, see ``dask_address``).
    A task can choose its own."""
    modules: tuple[str, ...] = ()
    """Modules to import at start so that their ``@scheduler`` tasks are registered."""
    shutdown_timeout: Annotated[float, Field(ge=0)] | None = 30.0
    """Seconds the runs already started (running, or waiting for a worker) may take to finish at
    shutdown; then they are stopped (SIGTERM, ``kill_grace``, SIGKILL) and reported cancelled.
    ``None`` waits for them."""
    database: str | None = None
    """A database shared by every process that runs these tasks (server workers, replicas):
    ``"sqlite:///path/to/corral.db"`` on one host, ``"postgresql://user:password@host/db"``
    across hosts. Each fire then runs exactly once among them, and every run is recorded in
    its ledger. ``None``: this process runs every fire itself."""
    replica_lease: Annotated[float, Field(ge=1)] = 10.0
    """Seconds after which a replica that stopped renewing its lease (renewed every third of
    it) counts as dead: its unfinished runs are reported lost."""
    ledger_retention: timedelta = timedelta(days=7)
    """How long finished runs stay in the ledger (seconds, or ISO 8601 such as ``"P7D"``)."""
    dask_address: str | None = None
    """The Dask scheduler that ``executor="dask"`` sends runs to (``"tcp://scheduler:8786"``);
    ``None``: corral starts a ``LocalCluster`` of ``workers`` processes and closes it at
    shutdown. Needs ``pip install 'corral[dask]'``."""

    _scheduler: Any = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name in cls.model_fields:
            value = os.environ.get(ENV_PREFIX + name.upper())
            if value is not None and name not in merged:
                merged[name] = json.loads(value) if name == "initargs" else value
        return merged

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'UTC' or 'Europe/Paris'"
            ) from None
        return value

    @field_validator("database")
    @classmethod
    def _usable_database(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from corral._ledger._schema import check_url

        return check_url(value.strip())

    @field_validator("ledger_retention")
    @classmethod
    def _positive_retention(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= 0:
            raise ValueError(f"ledger_retention={value!r}; expected a positive duration like 'P7D'")
        return value

    @field_validator("modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> Any:
        return comma_separated(value)

    def pool_settings(self) -> PoolSettings:
        """The pool part of this configuration."""
        return PoolSettings(**{name: getattr(self, name) for name in PoolSettings.model_fields})

    # -- the interface Ravyn drives: ``await config.start()`` / ``await config.shutdown()`` --------

    @property
    def scheduler(self) -> Scheduler | None:
        """The running scheduler this config started, if any."""
        return self._scheduler  # type: ignore[no-any-return]

    async def start(self) -> None:
        """Start a scheduler with this configuration (nothing happens if ``enabled=False``)."""
        from corral._runtime import Scheduler

        if self._scheduler is None:
            self._scheduler = Scheduler(self)
        await self._scheduler.start()

    async def shutdown(self) -> None:
        """Stop the scheduler this config started: running jobs finish (SIGINT or SIGTERM
        meanwhile stops them at once: a server's second signal), then workers exit."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await scheduler._shutdown_for_server()

    def statistics(self) -> PoolStatistics | None:
        """The worker pool's statistics while the scheduler runs, else ``None``."""
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.statistics()
