"""corral: run scheduled jobs in a supervised pool of worker processes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corral._asyncz_names import register_alias
from corral._exceptions import (
    ClusterUnavailableError,
    ConfigurationError,
    CorralError,
    DatabaseUnavailableError,
    JobCancelledError,
    JobError,
    JobExitError,
    JobMissedError,
    JobTimeoutError,
    MemoryLimitError,
    NotImportableError,
    PoolNotRunningError,
    QueueFullError,
    RemoteError,
    RemoteTraceback,
    ReplicaLostError,
    SerializationError,
    WorkerDiedError,
    WorkerStartError,
)

if TYPE_CHECKING:
    __version__: str
    from corral._config import SchedulerConfig
    from corral._constants import DEFAULT
    from corral._dask import DaskExecutor
    from corral._decorator import TaskSpec, registered_tasks, scheduler
    from corral._executor import AsyncIOExecutor, ProcessExecutor, ThreadExecutor
    from corral._ledger import Ledger, LedgerStatistics, ReplicaRecord, RunRecord
    from corral._pool._pool import Pool
    from corral._pool._pool_executor import PoolExecutor
    from corral._pool._settings import PoolSettings
    from corral._pool._stats import PoolStatistics, WorkerStatistics
    from corral._pool._supervisor import JobFuture
    from corral._runtime import Scheduler

__all__ = [
    "DEFAULT",
    "AsyncIOExecutor",
    "ClusterUnavailableError",
    "ConfigurationError",
    "CorralError",
    "DaskExecutor",
    "DatabaseUnavailableError",
    "JobCancelledError",
    "JobError",
    "JobExitError",
    "JobFuture",
    "JobMissedError",
    "JobTimeoutError",
    "Ledger",
    "LedgerStatistics",
    "MemoryLimitError",
    "NotImportableError",
    "Pool",
    "PoolExecutor",
    "PoolNotRunningError",
    "PoolSettings",
    "PoolStatistics",
    "ProcessExecutor",
    "QueueFullError",
    "RemoteError",
    "RemoteTraceback",
    "ReplicaLostError",
    "ReplicaRecord",
    "RunRecord",
    "Scheduler",
    "SchedulerConfig",
    "SerializationError",
    "TaskSpec",
    "ThreadExecutor",
    "WorkerDiedError",
    "WorkerStartError",
    "WorkerStatistics",
    "__version__",
    "registered_tasks",
    "scheduler",
]

# {"type": "corral"} in asyncz executor configs, without importing asyncz here.
register_alias()

# Imported on first use, so that worker processes (which import this package) stay light.
_LAZY = {
    "DEFAULT": "corral._constants",
    "Pool": "corral._pool._pool",
    "PoolExecutor": "corral._pool._pool_executor",
    "PoolSettings": "corral._pool._settings",
    "PoolStatistics": "corral._pool._stats",
    "WorkerStatistics": "corral._pool._stats",
    "JobFuture": "corral._pool._supervisor",
    "SchedulerConfig": "corral._config",
    "TaskSpec": "corral._decorator",
    "registered_tasks": "corral._decorator",
    "scheduler": "corral._decorator",
    "ProcessExecutor": "corral._executor",
    "ThreadExecutor": "corral._executor",
    "AsyncIOExecutor": "corral._executor",
    "DaskExecutor": "corral._dask",
    "Scheduler": "corral._runtime",
    "Ledger": "corral._ledger",
    "LedgerStatistics": "corral._ledger",
    "ReplicaRecord": "corral._ledger",
    "RunRecord": "corral._ledger",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("corral")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
