"""The worker processes as the core sees them: started, ready, idle, busy, stopped, killed, gone
(no I/O here: see ``_core``)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from corral._exceptions import (
    JobCancelledError,
    JobError,
    JobTimeoutError,
    MemoryLimitError,
    WorkerDiedError,
)
from corral._pool import _messages as msg
from corral._pool._actions import Action, Log, Measure, Outcome, Signal, Write
from corral._pool._settings import PoolSettings
from corral._pool._starts import Starts
from corral._pool._state import Counters, Job, Worker
from corral._pool._stats import WorkerState
from corral._pool._timers import Timers

_STOP_GRACE = 5.0  # seconds an idle worker may take to exit when asked, at least

_KIND_OF_ERROR: dict[type[BaseException], str] = {
    JobTimeoutError: "timed_out",
    WorkerDiedError: "crashed",
    MemoryLimitError: "memory_exceeded",
    JobCancelledError: "cancelled",
}


class Fleet:
    """Worker processes: how many run, and what becomes of each.

    A worker is *starting* from the end of its process start until it says it is ready; *idle*
    or *busy* (it has a head) while it serves; *stopping* once asked to exit (idle at shutdown,
    or recycled after ``max_jobs_per_worker``); *killing* once its process group was signalled
    (a timeout, a memory limit, a cancel, a protocol error, shutdown). Whatever the state, it is
    gone only when its exit is reported (``exited``): the head's outcome waits for that, so "timed
    out" means "no longer running". Every worker that stops serving is replaced at once (within
    the start back-off), until shutdown.

    The idle list is shared: a submitter may take a worker from it (``Jobs.submit``) while
    another thread runs the core. It is changed only under ``idle_lock``, and a worker taken from
    it belongs to whoever took it.
    """

    def __init__(
        self,
        settings: PoolSettings,
        name: str,
        clock: Callable[[], float],
        timers: Timers[Callable[[], None]],
        actions: list[Action],
        counters: Counters,
        idle_lock: contextlib.AbstractContextManager[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.idle_lock = threading.Lock() if idle_lock is None else idle_lock
        self.name = name
        self.clock = clock
        self.timers = timers
        self.actions = actions
        self.counters = counters
        self.workers: dict[int, Worker] = {}  # by pid
        self.idle: list[Worker] = []  # workers with nothing to do
        self.closing = False
        self.grace: set[int] = set()  # process groups sent SIGTERM, their SIGKILL not yet sent
        self.memory_watch = False
        self.before_kill: Callable[[Worker], None] = lambda worker: None  # the jobs' part
        self.starts = Starts(settings, name, clock, timers, actions, counters, self.top_up)

    @property
    def finished(self) -> bool:
        """Shut down, and every worker gone."""
        return self.closing and not self.workers and not self.starts.launches

    def has_ready_worker(self) -> bool:
        return any(w.state in ("idle", "busy") for w in self.workers.values())

    # -- starts ---------------------------------------------------------------------------------

    def top_up(self) -> None:
        """Start workers until ``workers`` of them serve or are starting."""
        if self.closing:
            return
        live = len(self.starts.launches) + sum(
            1 for w in self.workers.values() if w.state in ("starting", "idle", "busy")
        )
        self.starts.start(self.settings.workers - live)

    def launched(self, token: int, pid: int) -> Worker | None:
        """Start ``token`` gave process ``pid``; ``None``: it is not wanted (the shell kills
        it)."""
        began = self.starts.launched(token)
        if began is None:
            return None
        worker = Worker(pid)
        self.workers[pid] = worker
        if self.closing:  # started while the pool closes: it goes at once, and is reaped first
            self.kill(worker, None, graceful=False)
            return worker
        self.timers.arm(began + self.settings.start_timeout, lambda: self._not_ready(worker))
        return worker

    def launch_failed(self, token: int, cause: str) -> None:
        # (While the pool closes no start follows: the failure is not counted, nor logged.)
        if self.starts.launch_failed(token, cause, count=not self.closing):
            self.top_up()

    def _not_ready(self, worker: Worker) -> None:
        if worker.state == "starting" and self.workers.get(worker.pid) is worker:
            worker.start_error = (
                f"it was not ready within start_timeout={self.settings.start_timeout}s"
            )
            self.actions.append(Signal(worker.pid, signal.SIGKILL))

    def ready(self, worker: Worker) -> None:
        if worker.state != "starting":
            return
        self.starts.ready()
        if self.closing:
            self.stop(worker)
        else:
            self.make_idle(worker)

    def init_failed(self, worker: Worker, text: str) -> None:
        worker.start_error = f"its initializer raised:\n{text}"

    # -- serving --------------------------------------------------------------------------------

    def make_idle(self, worker: Worker) -> None:
        with self.idle_lock:
            worker.state = "idle"
            if not worker.exit_seen:  # (a dead worker's exit, being handled, replaces it)
                self.idle.append(worker)

    def take_idle(self, worker: Worker) -> bool:
        """Take ``worker`` out of the idle list, if it is there (``False``: it is not idle, or a
        submitter took it first)."""
        with self.idle_lock:
            if worker in self.idle:
                self.idle.remove(worker)
                worker.state = "stopping"
                return True
        return False

    def withdraw(self, worker: Worker) -> None:
        """Take ``worker`` off the idle list (if it is there), leaving its state as it is."""
        with self.idle_lock:
            if worker in self.idle:
                self.idle.remove(worker)

    def head_done(self, worker: Worker) -> None:
        """``worker`` finished its last job: idle, or stopped (shutdown, or recycled)."""
        max_jobs = self.settings.max_jobs_per_worker
        if self.closing:
            self.stop(worker)
        elif max_jobs is not None and worker.jobs_done >= max_jobs:
            self.counters.recycled += 1
            self.stop(worker)
            self.top_up()
        else:
            self.make_idle(worker)

    def _leave(self, worker: Worker, state: WorkerState) -> None:
        self.withdraw(worker)
        worker.state = state

    def stop(self, worker: Worker) -> None:
        """Ask ``worker`` to exit (it has nothing to do); kill it if it does not."""
        self._leave(worker, "stopping")
        self.actions.append(Write(worker, msg.frame(msg.STOP)))
        grace = max(self.settings.kill_grace, _STOP_GRACE)
        self.timers.arm(self.clock() + grace, lambda: self._stop_timed_out(worker))

    def _stop_timed_out(self, worker: Worker) -> None:
        if self.workers.get(worker.pid) is worker:
            self.actions.append(Signal(worker.pid, signal.SIGKILL))

    def kill(self, worker: Worker, error: JobError | None, *, graceful: bool) -> None:
        """Kill ``worker``'s process group; its exit resolves its head with ``error``."""
        if worker.state == "killing":
            return
        self.before_kill(worker)
        self._leave(worker, "killing")
        worker.kill_error = error
        grace = self.settings.kill_grace
        if graceful and grace > 0:
            self.actions.append(Signal(worker.pid, signal.SIGTERM))
            self.grace.add(worker.pid)
            self.timers.arm(self.clock() + grace, lambda: self._kill_group(worker.pid))
        else:
            self.actions.append(Signal(worker.pid, signal.SIGKILL))
        self.top_up()

    def _kill_group(self, pid: int) -> None:
        if pid in self.grace:
            self.grace.discard(pid)
            self.actions.append(Signal(pid, signal.SIGKILL))

    def watch_memory(self, now: float) -> None:
        """A job started: check busy workers' memory every ``memory_check_interval``."""
        if self.settings.max_memory is not None and not self.memory_watch:
            self.memory_watch = True
            self.timers.arm(now + self.settings.memory_check_interval, self._check_memory)

    def _check_memory(self) -> None:
        busy = tuple(w for w in self.workers.values() if w.job is not None and w.state == "busy")
        self.memory_watch = bool(busy)
        if busy:
            interval = self.settings.memory_check_interval
            self.timers.arm(self.clock() + interval, self._check_memory)
            self.actions.append(Measure(busy))

    def measured(self, worker: Worker, rss: int | None) -> None:
        """The memory ``worker``'s job holds (``None``: unknown)."""
        limit = self.settings.max_memory
        job = worker.job
        if rss is None or job is None or worker.state != "busy" or not isinstance(limit, int):
            return
        if rss > limit:
            error = MemoryLimitError(
                f"worker {worker.pid} used {rss} bytes of memory while running job {job.id} "
                f"({job.reference}), over max_memory={limit}; it was killed and "
                f"replaced; raise max_memory or make the job use less",
                job_id=job.id,
                pid=worker.pid,
                rss=rss,
                limit=limit,
            )
            self.kill(worker, error, graceful=False)

    # -- exits ----------------------------------------------------------------------------------

    def gone(self, worker: Worker, exitcode: int | None, head: Job | None) -> Outcome | None:
        """``worker``'s process has exited with ``exitcode`` (``None``: unknown) while running
        ``head``: forget it, replace it, and say what its head's outcome is."""
        del self.workers[worker.pid]
        self.withdraw(worker)
        outcome = None
        if worker.state == "starting" and not self.closing:
            cause = worker.start_error or (
                f"it ended before it was ready: {describe_exit(exitcode)}"
            )
            self.starts.failed(f"worker {worker.pid} failed to start: {cause}")
        elif head is not None:
            error = worker.kill_error
            if error is None or error.job_id != head.id:  # not killed for this job
                why = "" if error is None else f" (it was being killed: {error})"
                error = WorkerDiedError(
                    f"worker {worker.pid} died while running job {head.id} ({head.reference}): "
                    f"{describe_exit(exitcode, in_job=error is None)}{why}",
                    job_id=head.id,
                    pid=worker.pid,
                    exitcode=exitcode,
                )
            outcome = Outcome.raised(error, _KIND_OF_ERROR[type(error)])
        elif worker.state in ("idle", "busy") and not self.closing:
            self.actions.append(
                Log(
                    logging.WARNING,
                    "pool %r: idle worker %d died (%s); starting a replacement",
                    self.name,
                    worker.pid,
                    describe_exit(exitcode),
                )
            )
        worker.state = "killing"
        self.top_up()
        return outcome


def describe_exit(exitcode: int | None, *, in_job: bool = False) -> str:
    if exitcode is None:
        return (
            "how it ended is unknown: the process that starts workers and watches this one (its "
            "keeper) died before it could say"
        )
    if exitcode >= 0:
        return f"exit code {exitcode}" + (
            " (os._exit or a native exit in the job)" if in_job else ""
        )
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hints = {
        "SIGKILL": "killed by another process, or by the kernel's out-of-memory killer",
        "SIGSEGV": "a segmentation fault in native code",
        "SIGABRT": "an abort in native code",
        "SIGTERM": "terminated by another process",
        "SIGBUS": "a bus error in native code",
    }
    hint = hints.get(name)
    return f"killed by {name}" + (f" ({hint})" if hint else "")
