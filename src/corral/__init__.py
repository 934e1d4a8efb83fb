"""corral: run scheduled jobs in a supervised pool of worker processes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corral._exceptions import (
    ConfigurationError,
    CorralError,
    JobCancelledError,
    JobError,
    JobMissedError,
    JobTimeoutError,
    MemoryLimitError,
    NotImportableError,
    PoolNotRunningError,
    QueueFullError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerDiedError,
    WorkerStartError,
)

if TYPE_CHECKING:
    __version__: str
    from corral._pool._pool import DEFAULT, Pool
    from corral._pool._settings import PoolSettings
    from corral._pool._stats import PoolStatistics, WorkerStatistics
    from corral._pool._supervisor import JobFuture

__all__ = [
    "DEFAULT",
    "ConfigurationError",
    "CorralError",
    "JobCancelledError",
    "JobError",
    "JobFuture",
    "JobMissedError",
    "JobTimeoutError",
    "MemoryLimitError",
    "NotImportableError",
    "Pool",
    "PoolNotRunningError",
    "PoolSettings",
    "PoolStatistics",
    "QueueFullError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerDiedError",
    "WorkerStartError",
    "WorkerStatistics",
    "__version__",
]

# Imported on first use, so that worker processes (which import this package) stay light.
_LAZY = {
    "DEFAULT": "corral._pool._pool",
    "Pool": "corral._pool._pool",
    "PoolSettings": "corral._pool._settings",
    "PoolStatistics": "corral._pool._stats",
    "WorkerStatistics": "corral._pool._stats",
    "JobFuture": "corral._pool._supervisor",
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
