"""The pool's settings, validated once when a pool is made."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, TypeAdapter, field_validator

from corral._pool._refs import reference_of

StartMethod = Literal["forkserver", "spawn"]
_BYTES = TypeAdapter(ByteSize)


def default_workers() -> int:
    """One worker per CPU the process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class PoolSettings(BaseModel):
    """How the supervised pool runs its workers.

    Every field can also be set on :class:`corral.SchedulerConfig`, which inherits them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    workers: Annotated[int, Field(ge=1, le=1024)] = Field(default_factory=default_workers)
    """Number of worker processes."""
    start_method: StartMethod = "forkserver"
    """How workers start: ``"forkserver"`` (fast, the default) or ``"spawn"``."""
    timeout: Annotated[float, Field(gt=0)] | None = None
    """Default seconds a job may run before its worker is killed; ``None`` for no limit."""
    kill_grace: Annotated[float, Field(ge=0)] = 2.0
    """Seconds between SIGTERM and SIGKILL when a job is stopped."""
    max_jobs_per_worker: Annotated[int, Field(ge=1)] | None = None
    """Replace a worker after this many jobs; ``None`` keeps it."""
    max_memory: int | str | None = None
    """RSS limit per worker (bytes, or text such as ``"512MiB"``, read as bytes); ``None`` for
    no limit."""
    max_result_size: int | str | None = Field(default="256MiB", validate_default=True)
    """Largest pickled result a job may return (bytes, or text such as ``"64MiB"``); a larger
    one fails that job with a ``SerializationError`` in the worker; ``None`` for no limit."""
    memory_check_interval: Annotated[float, Field(gt=0)] = 0.2
    """Seconds between RSS readings of busy workers."""
    queue_size: Annotated[int, Field(ge=1)] = 100_000
    """Most jobs that may wait for a worker; beyond it, submitting fails."""
    initializer: str | Callable[..., Any] | None = None
    """``"module:function"`` (or the function) run once in each worker before its first job;
    stored as its reference."""
    preload: tuple[str, ...] = ()
    """Modules each worker imports when it starts, before its first job (``"__main__"``: the
    app's main module). Workers otherwise import a job's module on its first use."""
    initargs: tuple[Any, ...] = ()
    """Arguments for the initializer."""
    start_timeout: Annotated[float, Field(gt=0)] = 60.0
    """Seconds a new worker may take to be ready (including its initializer)."""

    @field_validator("initializer", mode="before")
    @classmethod
    def _initializer_reference(cls, value: Any) -> Any:
        return None if value is None else reference_of(value)

    @field_validator("max_memory", "max_result_size")
    @classmethod
    def _size_in_bytes(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        size = int(_BYTES.validate_python(value))
        if size <= 0:
            raise ValueError("must be a positive size such as 536870912 or '512MiB'")
        return size

    @property
    def initializer_reference(self) -> str | None:
        """The initializer as ``"module:function"`` (the validator stores it that way)."""
        return None if self.initializer is None else reference_of(self.initializer)

    @field_validator("preload", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        return comma_separated(value)


def comma_separated(value: Any) -> Any:
    """``"a, b"`` (as an environment variable gives it) -> ``("a", "b")``; anything else as is."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value
