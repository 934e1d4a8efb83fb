"""What the supervisor's core keeps about jobs and workers."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral._exceptions import JobError
from corral._pool._stats import WorkerState
from corral._pool._timers import Timer


@dataclass(eq=False, slots=True, weakref_slot=True)
class Job:
    """A job, from ``submit`` to its outcome. After its outcome nothing of the pool's refers to
    it (``done``); its caller alone keeps it, through its future, as long as it wants."""

    id: int
    label: str | None
    reference: str
    frame: bytes  # the JOB message, framed
    timeout: float | None
    start_by: float | None
    future: Any  # a JobFuture: the core only claims it (``set_running_or_notify_cancel``)
    submitted_at: float
    running: bool = False  # the future is claimed (the job was sent to a worker at least once)
    done: bool = False
    worker: Worker | None = None  # the worker it was sent to, until its outcome or its return
    recalling: bool = False  # a recall was sent for it
    cancel_requested: bool = False
    sends: int = 0  # times it was sent to a worker (a recall's answer is about one of them)
    deadline: Timer[Job] | None = None  # its start deadline, while it has not ended
    lease: int = -1  # the term of the pool's lease it starts under (``_gate``); -1: none


@dataclass(eq=False)
class Worker:
    """A worker process, from the moment its start finished until its exit is handled."""

    pid: int
    io: Any = None  # the shell's handle on its socket and process
    state: WorkerState = "starting"
    job: Job | None = None  # its head: the job it runs, as far as the core knows
    waiting: dict[int, Job] = field(default_factory=dict)  # sent behind the head, in order
    waiting_bytes: int = 0
    job_started: float = 0.0  # when its head became its head
    jobs_done: int = 0
    kill_error: JobError | None = None  # the outcome its head gets when it dies, if killed
    start_error: str | None = None  # why it failed to start, if it did
    recalled: bool = False  # jobs were taken back from behind its head: send it no more
    writing: bool = False  # a submitter writes its head to it: nobody else writes to it
    broken: bool = False  # it sent bytes that are no message: what it did after is unknown
    exit_seen: bool = False  # its process has ended: never idle again (no submitter takes it)
    timeout: Timer[Callable[[], None]] | None = None  # its head's timeout
    recalls: deque[list[tuple[int, int]]] = field(default_factory=deque)  # unanswered: ids, sends


@dataclass
class Counters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    crashed: int = 0
    memory_exceeded: int = 0
    missed: int = 0
    cancelled: int = 0
    recycled: int = 0
    restarts: int = 0
    start_failures: int = 0
    waited: int = 0  # jobs that waited longer than WAIT_WARNING for a worker

    @property
    def finished(self) -> int:
        return (
            self.completed
            + self.failed
            + self.timed_out
            + self.crashed
            + self.memory_exceeded
            + self.missed
            + self.cancelled
        )
