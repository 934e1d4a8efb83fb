"""corral's exceptions: one root, :class:`CorralError`, and its family.

Every exception here crosses process boundaries, so each one pickles by its constructor
arguments (``__reduce__``) and keeps its message and attributes on the way.
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """The root of every error corral raises."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        for name, value in details.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CorralError], message: str, details: dict[str, Any]) -> CorralError:
    return cls(message, **details)


class ConfigurationError(CorralError, ValueError):
    """A setting, a task option or a trigger argument is invalid."""


class NotImportableError(CorralError, ValueError):
    """A function cannot be sent to a worker by reference (``module:qualname``)."""


class SerializationError(CorralError):
    """Arguments, a result or an exception could not be pickled or unpickled.

    ``stage`` says which: ``"arguments"``, ``"result"`` or ``"exception"``.
    """

    stage: str


class PoolNotRunningError(CorralError, RuntimeError):
    """The pool is not started yet, or is shut down."""


class QueueFullError(CorralError):
    """The pool's queue is at its bound; the job was not accepted."""

    max_queued: int


class WorkerStartError(CorralError):
    """Workers keep failing to start (initializer raised, import failed, start timed out)."""

    cause: str


class JobError(CorralError):
    """A job ended without a value for a reason other than its own exception."""

    job_id: int


class JobTimeoutError(JobError, TimeoutError):
    """The job ran past its timeout; its worker was killed and replaced."""

    timeout: float
    pid: int


class WorkerDiedError(JobError):
    """The worker running the job died (crash, ``os._exit``, signal, OOM kill)."""

    pid: int
    exitcode: int | None


class MemoryLimitError(JobError):
    """The worker's memory passed the limit while running the job; it was killed."""

    pid: int
    rss: int
    limit: int


class JobMissedError(JobError):
    """The job waited in the queue past its start deadline and was not run."""

    waited: float


class JobCancelledError(JobError):
    """The pool shut down before the job could finish; the job did not complete."""

    started: bool


class JobExitError(JobError):
    """The job raised ``SystemExit`` (``sys.exit()``), ``KeyboardInterrupt`` or another
    exception that is not an ``Exception``; it ends that job, never the worker or the caller.

    ``type_name`` names what it raised; ``exit_code`` is the code it gave ``sys.exit()`` (an
    int, a string, or ``None``), ``None`` for anything else.
    """

    type_name: str
    exit_code: int | str | None


class RemoteError(CorralError):
    """A job raised an exception that could not be transported as itself.

    Keeps the original type name, message and the remote traceback text.
    """

    type_name: str
    traceback: str


class RemoteTraceback(Exception):
    """Carries a worker's traceback text; set as ``__cause__`` of a job's exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nTraceback in the worker process:\n{self.text}"


class ReplicaLostError(JobError):
    """The replica that claimed the run stopped renewing its lease before the run finished
    (killed, stopped, or cut off from the database); the run's outcome is unknown."""

    host: str
    pid: int


class DatabaseUnavailableError(CorralError):
    """The run's fire could not be claimed because the database could not be reached; it was
    not run (no replica could tell whether another ran it)."""

    database: str


class ClusterUnavailableError(JobError):
    """The Dask cluster could not be reached when the run was to be sent (it was not run), or
    the connection to it was lost while the run was in flight (whether it ran is unknown)."""

    address: str
    started: bool
