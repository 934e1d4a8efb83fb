"""What the supervisor's core asks its shell to do (actions), and how a job ended (outcomes).

The core (``_core``) decides; it appends actions to its ``actions`` list, and the shell
(``_supervisor``) carries them out in order: it writes to sockets, signals processes, starts
them and resolves futures. A simulation (``tests/test_supervisor_simulation.py``) carries them out
on simulated workers instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral._pool._state import Job, Worker


class Outcome:
    """How a job ended: a value or an error, and the counter it adds to (``kind``: completed,
    failed, timed_out, crashed, memory_exceeded, missed or cancelled)."""

    __slots__ = ("error", "kind", "value")

    def __init__(self, kind: str, value: Any = None, error: BaseException | None = None) -> None:
        self.kind = kind
        self.value = value
        self.error = error

    @classmethod
    def returned(cls, value: Any) -> Outcome:
        return cls("completed", value)

    @classmethod
    def raised(cls, error: BaseException, kind: str = "failed") -> Outcome:
        return cls(kind, error=error)

    def __repr__(self) -> str:
        return f"Outcome({self.kind}, {self.error!r})" if self.error else f"Outcome({self.kind})"


class Write:
    """Write ``data`` to ``worker`` (never waiting: what its socket cannot take waits in its
    outbox). ``jobs``: those whose frames it holds. ``recall``: it asks for jobs back; once it is
    written, the shell reads what the worker sent and calls ``Core.steal``."""

    __slots__ = ("data", "jobs", "recall", "worker")

    def __init__(
        self, worker: Worker, data: bytes, jobs: tuple[Job, ...] = (), recall: bool = False
    ) -> None:
        self.worker = worker
        self.data = data
        self.jobs = jobs
        self.recall = recall


class Signal:
    """Send ``signal`` to the process group that worker ``pid`` leads."""

    __slots__ = ("pid", "signal")

    def __init__(self, pid: int, signal: int) -> None:
        self.pid = pid
        self.signal = signal


class Started:
    """``job`` became ``worker``'s head (the one it runs): its future learns so."""

    __slots__ = ("job", "wait", "worker")

    def __init__(self, job: Job, worker: Worker, wait: float) -> None:
        self.job = job
        self.worker = worker
        self.wait = wait  # seconds from submit until now


class Resolve:
    """``job`` is over: its future gets ``outcome``."""

    __slots__ = ("job", "outcome")

    def __init__(self, job: Job, outcome: Outcome) -> None:
        self.job = job
        self.outcome = outcome


class Launch:
    """Start a worker process; report with ``Core.launched`` or ``Core.launch_failed`` and
    ``token``."""

    __slots__ = ("token",)

    def __init__(self, token: int) -> None:
        self.token = token


class Abandon:
    """Forget starts ``tokens`` (a process one of them starts after all is killed); with
    ``restart``, they took too long: restart the process that starts workers, which is stuck."""

    __slots__ = ("restart", "tokens")

    def __init__(self, tokens: tuple[int, ...], restart: bool) -> None:
        self.tokens = tokens
        self.restart = restart


class Drain:
    """Read what ``worker`` has sent (handling it); then, if every recall is written, nothing
    read was a reply to its head, no frame is left half read and no caller reads its socket, call
    ``Core.steal``: it cannot have started the jobs recalled from it, and never will."""

    __slots__ = ("worker",)

    def __init__(self, worker: Worker) -> None:
        self.worker = worker


class Measure:
    """Read the memory of ``workers``' jobs; report each with ``Core.measured``."""

    __slots__ = ("workers",)

    def __init__(self, workers: tuple[Worker, ...]) -> None:
        self.workers = workers


class Output:
    """Text a job wrote to ``stream`` (``"stdout"`` or ``"stderr"``), for the app's stream,
    with the label of the job the worker ran then and the worker's pid."""

    __slots__ = ("label", "pid", "stream", "text")

    def __init__(self, stream: str, text: str, label: str | None, pid: int | None) -> None:
        self.stream = stream
        self.text = text
        self.label = label
        self.pid = pid


class Record:
    """A log record a job emitted (its fields), for the app's logger of the same name; with the
    job and worker it came from."""

    __slots__ = ("fields", "job_id", "label", "pid")

    def __init__(
        self, fields: dict[str, Any], job_id: int | None, label: str | None, pid: int
    ) -> None:
        self.fields = fields
        self.job_id = job_id
        self.label = label
        self.pid = pid


class Log:
    """A record for the pool's logger (handed on off the supervisor's thread)."""

    __slots__ = ("args", "level", "message")

    def __init__(self, level: int, message: str, *args: object) -> None:
        self.level = level
        self.message = message
        self.args = args


Action = (
    Write | Drain | Signal | Started | Resolve | Launch | Abandon | Measure | Output | Record | Log
)
