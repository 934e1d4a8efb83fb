"""The supervisor: owns one pool's workers, on a thread of its own.

::

    submit() --> incoming --+    (or straight to an idle worker, if none are queued)
                            |                          +--> worker process (its jobs in order,
      (any thread)          |   supervisor thread      |      one at a time; one reply each)
                            v                          |
                wake-up pipe --> selector.select() --> dispatch: a job to each idle worker;
                (only if the     ^   ^   ^               while jobs wait, batches to busy ones
                 thread sleeps)  |   |   |               (taken back when another goes idle)
            worker sockets ------+   |   +------ timers: timeouts, kill grace, memory, back-off,
            process sentinels -------+                   start deadlines
                                  |
                                  v
              exactly one outcome per job --> JobFuture (value, exception, or a JobError)

A worker's *head* is the job it runs (as far as the supervisor knows: the first job it sent that
has no reply yet); its timeout counts from when it became the head. Jobs sent behind the head
*wait* in the worker; the worker skips one whose start deadline has passed, and gives back those
the supervisor recalls (another worker went idle, a deadline passed, a cancel, shutdown) if it
has not started them. A worker that dies takes only its head with it: the jobs waiting in it
never started, and go back to the front of the queue.

A caller waiting on a job that ``submit`` wrote to an idle worker reads that worker's socket
itself (``pick_up``): the reply reaches the caller without waking the supervisor thread.

Two locks. ``state_lock`` guards the supervisor's own state (workers, queue, timers, selector):
the supervisor thread holds it except while it waits in select(), and a caller reading a reply
holds it while it handles what it read, with the same methods. ``lock`` guards what any thread
may touch: ``incoming``, ``commands`` and the idle list (``submit`` may take an idle worker and
write a job to it, ``_send_now``); whoever holds both took ``state_lock`` first. ``snapshot``
reads plain attributes without either.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import psutil

from corral._exceptions import (
    CorralError,
    JobCancelledError,
    JobError,
    JobMissedError,
    JobTimeoutError,
    MemoryLimitError,
    PoolNotRunningError,
    QueueFullError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerDiedError,
    WorkerStartError,
)
from corral._pool import _launch
from corral._pool import _messages as msg
from corral._pool._outlet import Outlet
from corral._pool._settings import PoolSettings
from corral._pool._stats import PoolStatistics, WorkerState, WorkerStatistics
from corral._pool._timers import Timer, Timers
from corral._pool._worker import worker_main

logger = logging.getLogger("corral.pool")

_FAILURES_BEFORE_GIVING_UP = 3  # start failures in a row before queued jobs fail
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 10.0
_WATCH_INTERVAL = 0.1  # how often a worker checks its parent, and reads while a job runs
_BATCH_JOBS = 64  # at most this many jobs wait in one worker
_BATCH_BYTES = 1 << 16  # nor more than this many bytes of them
_BATCH_FRAME = 1 << 14  # a bigger job only goes to an idle worker
WAIT_WARNING = 1.0  # seconds a job may wait for a worker before it counts as waiting long
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO
_FRAME_SLACK = 1 << 20  # room in a reply frame beyond max_result_size (header, traceback)
_LAUNCH_DEADLINE = 10.0  # seconds a process start may take (at most start_timeout) until abandoned


_T = TypeVar("_T")
_K = TypeVar("_K")


class JobFuture(Future[_T]):
    """A :class:`concurrent.futures.Future` that knows its job.

    Waiting on it with :meth:`result` or :meth:`exception` may read the job's reply on the
    waiting thread itself (see ``Supervisor.pick_up``), so that the outcome does not wait for
    the supervisor thread to wake up.
    """

    def __init__(self, job_id: int, label: str | None) -> None:
        super().__init__()
        self.job_id = job_id
        self.label = label
        self.worker_pid: int | None = None  # the worker that started it, once one did
        self.queue_wait: float | None = None  # seconds from submit until a worker started it
        # Called once a worker starts the job, on whichever thread starts it: must not block.
        self.on_start: Callable[[JobFuture[Any]], None] | None = None
        self._pickup: tuple[Supervisor, Job] | None = None  # set when submit wrote the job itself
        self._output: tuple[Outlet, int] | None = None  # output to hand on before its outcome

    def result(self, timeout: float | None = None) -> _T:
        began = None if timeout is None else time.monotonic()
        try:
            return super().result(self._pick_up(timeout))
        finally:
            if self._output is not None:
                self._await_output(began, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        began = None if timeout is None else time.monotonic()
        try:
            return super().exception(self._pick_up(timeout))
        finally:
            if self._output is not None:
                self._await_output(began, timeout)

    def _await_output(self, began: float | None, timeout: float | None) -> None:
        """The job's output and log records, queued before its outcome, reach the app first
        (within ``timeout``, and unless the app's streams are stuck: see ``Outlet.wait``)."""
        output = self._output
        if output is not None and self.done():
            deadline = None if began is None or timeout is None else began + timeout
            output[0].wait(output[1], deadline)

    def _pick_up(self, timeout: float | None) -> float | None:
        """Read the reply on this thread if it may; return what is left of ``timeout``."""
        pickup, self._pickup = self._pickup, None
        if pickup is None or self.done():
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        pickup[0].pick_up(pickup[1], deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(eq=False, slots=True)
class Job:
    """A job as the supervisor keeps it, from ``submit`` to its outcome."""

    id: int
    label: str | None
    reference: str
    frame: bytes  # the JOB message, framed
    timeout: float | None
    start_by: float | None
    future: JobFuture[Any]
    submitted_at: float
    running: bool = False  # the future is claimed (the job was sent to a worker at least once)
    done: bool = False
    worker: _Worker | None = None  # the worker it was sent to, until its outcome or its return
    recalling: bool = False  # a recall was sent for it
    deadline: Timer[Job] | None = None  # its start deadline's timer, while it has not ended
    cancel_requested: bool = False


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    sock: socket.socket  # blocking: the supervisor reads and writes it with MSG_DONTWAIT
    pid: int
    ps: psutil.Process | None
    state: WorkerState = "starting"
    job: Job | None = None  # the head
    waiting: dict[int, Job] = field(default_factory=dict)  # sent behind the head, in order
    waiting_bytes: int = 0
    on_channel: Callable[[int], None] = lambda mask: None  # the selector's handler for its socket
    writing: bool = False  # a submitting thread is writing a job to it (``_send_now``)
    outbox: bytearray = field(default_factory=bytearray)  # written when its socket has room
    job_started: float = 0.0
    recalled: bool = False  # jobs were taken back from behind its head: send it no more
    timeout: Timer[Callable[[], None]] | None = None  # its head's timeout
    jobs_done: int = 0
    kill_error: JobError | None = None
    start_error: str | None = None
    reading: bool = True  # its socket has not reached its end
    watched: bool = True  # its socket is registered with the selector
    picker: bool = False  # a caller reads its socket (``pick_up``); not watched meanwhile
    exited: bool = False  # its process has ended (its sentinel fired)
    inbox: bytearray = field(default_factory=bytearray)  # bytes read, not yet a whole frame
    fd: int = field(init=False)  # its socket's
    receive_timeout: float | None = None  # its socket's SO_RCVTIMEO (``_receive``)
    poller: select.poll = field(init=False)  # to check its socket without reading it

    def __post_init__(self) -> None:
        self.fd = self.sock.fileno()
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)


@dataclass(eq=False)
class _Launch:
    """A worker process being started on a starter thread."""

    token: int
    began: float
    abandoned: bool = False  # no longer wanted: its thread disposes of what it starts
    timer: Timer[Callable[[], None]] | None = None  # its deadline


@dataclass
class _Counters:
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
    queued: int = 0
    waited: int = 0  # jobs that waited longer than WAIT_WARNING for a worker


_KIND_OF_ERROR: dict[type[BaseException], str] = {
    JobTimeoutError: "timed_out",
    WorkerDiedError: "crashed",
    MemoryLimitError: "memory_exceeded",
    JobMissedError: "missed",
    JobCancelledError: "cancelled",
}


class Supervisor:
    """Runs the workers of one pool: dispatch, deadlines, deaths, replacement, shutdown."""

    def __init__(
        self, settings: PoolSettings, context: _launch.Context, name: str
    ) -> None:
        self.settings = settings
        self.context = context
        self.name = name
        self.counters = _Counters()
        self.lock = threading.Lock()
        # The supervisor's own state (workers, queue, timers, selector) is changed only by the
        # thread that holds ``state_lock``: the supervisor thread, which lets go of it only while
        # it waits in select(), or a caller reading its own reply (``pick_up``).
        self.state_lock = threading.Lock()
        self._owner: int | None = None  # the thread that holds state_lock
        self.incoming: deque[Job] = deque()
        self.commands: deque[Callable[[], None]] = deque()
        self.accepting = True
        self.finished = threading.Event()
        self._wake_pending = False
        self._sleeping = False  # the supervisor waits in select() with nothing taken in
        self._sleep_until = math.inf  # when it wakes up by itself, if it sleeps
        self._stopped = False  # its selector is closed
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._queue: deque[Job] = deque()
        self._waiting = 0  # jobs sent to workers behind their heads, not started
        self._workers: dict[int, _Worker] = {}
        self._idle: list[_Worker] = []
        self._timers: Timers[Callable[[], None]] = Timers()  # what to do when, jobs not kept
        self._deadlines: Timers[Job] = Timers()  # start deadlines, cancelled when a job ends
        self._closing = False
        self._first_starts_left = settings.workers
        self._launches: dict[int, _Launch] = {}  # starts under way, on starter threads
        self._launch_ids = itertools.count(1)
        self._memory_watch_armed = False
        self._failures_in_row = 0
        self._next_start_at = 0.0
        self._top_up_armed = False
        self._start_error: WorkerStartError | None = None
        self._groups_to_kill: set[int] = set()
        self.outlet = Outlet(name)  # hands jobs' output and log records to the app
        # The longest frame a worker may send: a result of max_result_size and what goes with it.
        limit = settings.max_result_size
        self._frame_limit = msg.NO_LIMIT if limit is None else int(limit) + _FRAME_SLACK
        self._options = msg.WorkerOptions(
            initializer=settings.initializer_reference,
            initargs_bytes=pickle.dumps(settings.initargs),
            log_level=logging.getLogger().getEffectiveLevel(),
            parent_pid=os.getpid(),
            watch_interval=_WATCH_INTERVAL,
            main=_launch.parent_main(),
            max_result_size=settings.max_result_size,  # type: ignore[arg-type]
            preload=settings.preload,
        )
        self._thread = threading.Thread(target=self._run, name=f"{name}-supervisor", daemon=True)

    # -- called from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Send ``job`` to an idle worker, or queue it; never blocks beyond a lock and a write."""
        with self.lock:
            if not self.accepting:
                raise PoolNotRunningError(
                    f"pool {self.name!r} is shut down; it takes no new jobs; make a new pool"
                )
            queued = len(self.incoming) + self.counters.queued + self._waiting
            if queued >= self.settings.queue_size:
                raise QueueFullError(
                    f"pool {self.name!r} has {queued} jobs waiting, its queue_size; "
                    f"wait for jobs to finish, add workers, or raise queue_size",
                    max_queued=self.settings.queue_size,
                )
            self.counters.submitted += 1
            if self._idle and not self.incoming and not self._queue and self._send_now(job):
                return
            self.incoming.append(job)
            self._wake()

    def has_idle_worker(self) -> bool:
        """A worker is idle and nothing is queued (read without the lock: a hint)."""
        return bool(self._idle) and not self.incoming and not self._queue

    def _send_now(self, job: Job) -> bool:
        """Write ``job`` to an idle worker from the submitting thread (lock held): the job starts
        without waiting for the supervisor thread. ``False``: it could not; queue it."""
        if len(job.frame) > _BATCH_FRAME or self._idle[-1].outbox:
            return False
        worker = self._idle.pop()
        job.future.set_running_or_notify_cancel()  # new: nobody can have cancelled it yet
        job.running = True
        # Its head before the write: the reply can come (and be read) before os.write returns.
        job.worker = worker
        now = self._mark_head(worker, job)
        worker.writing = True
        try:
            sent = worker.sock.send(job.frame, socket.MSG_DONTWAIT)
            if sent < len(job.frame):  # the rest when its socket has room, never waiting here
                worker.outbox += job.frame[sent:]
                self.commands.append(functools.partial(self._watch, worker))
                self._wake()
            else:
                job.future._pickup = (self, job)
        except OSError as exc:
            job.worker = worker.job = None
            if isinstance(exc, BlockingIOError):  # its socket is full: the supervisor sends it
                worker.state = "idle"
                self._idle.append(worker)
            else:  # it died; its sentinel will say how
                worker.state = "killing"
            return False
        finally:
            worker.writing = False
        if job.timeout is not None or self.settings.max_memory is not None:
            self.commands.append(functools.partial(self._arm, worker, job, now))
            self._wake()
        return True

    def request(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the supervisor thread."""
        with self.lock:
            if self.finished.is_set():
                return
            self.commands.append(command)
            self._wake()

    def _wake(self) -> None:
        """Wake the supervisor thread if it sleeps (call with the lock held).

        An awake supervisor takes ``incoming`` in before it next waits; a sleeping one gets at
        most one byte.
        """
        if self._sleeping and not self._wake_pending:
            self._wake_pending = True
            os.write(self._wake_w, b"\0")

    def close(self, wait: bool, timeout: float | None) -> None:
        """Stop taking jobs and wind down (see ``Pool.shutdown``)."""
        with self.lock:
            self.accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        self.request(lambda: self._begin_close(wait, deadline))

    def join(self, timeout: float | None) -> bool:
        """Wait for the supervisor thread to end (if this thread may)."""
        if self._thread.is_alive() and self.may_wait_here():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def may_wait_here(self) -> bool:
        """Whether this thread may wait for jobs to end: not one the supervisor would wait for
        (itself, or one that holds the state lock: a done-callback, or a signal handler, run
        while that thread handles a reply)."""
        me = threading.current_thread()
        return me is not self._thread and self._owner != me.ident

    def snapshot(self) -> PoolStatistics:
        workers = []
        for worker in list(self._workers.values()):
            job = worker.job
            workers.append(
                WorkerStatistics(
                    pid=worker.pid,
                    state=worker.state,
                    job_id=None if job is None else job.id,
                    job_label=None if job is None else job.label,
                    running_for=None if job is None else time.monotonic() - worker.job_started,
                    rss=_rss(worker.ps),
                    jobs_done=worker.jobs_done,
                    waiting=len(worker.waiting),
                )
            )
        c = self.counters
        return PoolStatistics(
            workers=tuple(workers),
            submitted=c.submitted,
            completed=c.completed,
            failed=c.failed,
            timed_out=c.timed_out,
            crashed=c.crashed,
            memory_exceeded=c.memory_exceeded,
            missed=c.missed,
            cancelled=c.cancelled,
            recycled=c.recycled,
            restarts=c.restarts,
            start_failures=c.start_failures,
            waited=c.waited,
            output_dropped=self.outlet.output_dropped,
            logs_dropped=self.outlet.logs_dropped,
            queued=c.queued + len(self.incoming) + self._waiting,
            running=sum(1 for w in workers if w.job_id is not None),
        )

    def kill_job(self, job_id: int) -> None:
        """Kill the worker running job ``job_id``; take the job back if it waits in a worker."""

        def command() -> None:
            for worker in list(self._workers.values()):
                job = worker.job
                if job is not None and job.id == job_id:
                    self._cancel_head(worker)
                    return
                job = worker.waiting.get(job_id)
                if job is not None:
                    job.cancel_requested = True
                    self._recall(worker, [job])
                    return

        self.request(command)

    def pick_up(self, job: Job, deadline: float | None) -> None:
        """Wait for ``job``'s reply on the calling thread, reading its worker's socket here.

        ``submit`` wrote the job to an idle worker itself; a caller now waiting for its outcome
        takes that worker's socket from the selector, reads it (waiting without the lock), and
        handles what it read under ``state_lock``, exactly as the supervisor thread would (the
        reply, and any log records or output before it). The supervisor thread sleeps on: one
        thread hand-off less per job. Its timers still run: a timeout or a memory kill ends the
        worker, and so the wait (``_on_exit`` leaves the rest of the death to this caller).
        Returns when the job is over, at ``deadline`` (``time.monotonic()``), or at once if the
        job is not its worker's head any more or another thread reads.
        """
        if self._owner == threading.get_ident():
            return  # a done-callback run while this thread handles replies: it cannot wait here
        if not self._hold(deadline):
            return  # the state is busy past the caller's deadline (it never is for long)
        try:
            worker = job.worker
            if (
                job.done
                or worker is None
                or worker.job is not job
                or worker.picker
                or not worker.reading
                or worker.outbox
                or self._stopped
            ):
                return
            worker.picker = True
            self._unwatch(worker)
            try:
                # As the supervisor's own loop: the lock is let go only while waiting.
                while not job.done and worker.reading:
                    if deadline is not None and (wait := deadline - time.monotonic()) <= 0:
                        break
                    self._let_go()
                    try:
                        data = _receive(worker, None if deadline is None else wait)
                    finally:
                        self._hold()
                    if data is not None:
                        try:
                            self._on_data(worker, data)
                        except Exception as exc:  # a bug: the supervisor thread fails with it
                            with self.lock:
                                self.commands.append(functools.partial(_reraise, exc))
                            break
            finally:
                self._stop_picking(worker)
        finally:
            self._let_go()

    def _stop_picking(self, worker: _Worker) -> None:
        """The caller stops reading ``worker`` (state lock held): back to the supervisor."""
        worker.picker = False
        if worker.exited:
            self._on_exit(worker)  # what the supervisor left to the caller
        else:
            self._watch(worker)
        # _sleeping cannot change while the state lock is held; a command queued meanwhile
        # by another thread comes with its own wake-up.
        if self._sleeping and not self._stopped and self._has_work_for_the_loop():
            with self.lock:
                self._wake()

    def _has_work_for_the_loop(self) -> bool:
        return bool(
            self.commands
            or self._queue
            or self._waiting  # a worker may be idle now: dispatch or recall
            or self._next_timer() < self._sleep_until  # a timer it must keep
            or (self._closing and not self._workers)  # the last worker is gone: it ends
        )

    # -- the supervisor thread ----------------------------------------------------------------

    def _hold(self, deadline: float | None = None) -> bool:
        """Take ``state_lock``, waiting no later than ``deadline`` (``time.monotonic()``)."""
        if deadline is None:
            self.state_lock.acquire()
        elif not self.state_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        self._owner = threading.get_ident()
        return True

    def _let_go(self) -> None:
        self._owner = None
        self.state_lock.release()

    def _run(self) -> None:
        self._hold()
        try:
            self._top_up()
            while True:
                delay = self._fire_timers()  # may reap the last worker: check before waiting
                if self._closing and not self._workers:
                    break
                with self.lock:
                    taking_in = bool(self.incoming or self.commands)
                    self._sleeping = not taking_in
                    self._sleep_until = self._next_timer()
                if taking_in:
                    self._take_in()
                    delay = 0
                self._let_go()
                try:
                    events = self._selector.select(delay)
                finally:
                    self._hold()
                for key, mask in events:
                    key.data(mask)
                self._sleeping = False
                self._dispatch()
        except BaseException:
            logger.critical(
                "pool %r: supervisor failed; killing its workers", self.name, exc_info=True
            )
            self._abandon()
        finally:
            for pgid in self._groups_to_kill:
                _killpg(pgid, signal.SIGKILL)
            with self.lock:
                self.accepting = False
                self._stopped = True
                self._selector.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self.finished.set()
            self.outlet.close()
            self._let_go()

    def _on_wake(self, mask: int = 0) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._take_in()

    def _take_in(self) -> None:
        """Queue what was submitted and run what was requested since the last time."""
        with self.lock:
            self._wake_pending = False
            jobs = list(self.incoming)
            self.incoming.clear()
            commands = list(self.commands)
            self.commands.clear()
            self.counters.queued += len(jobs)
        for job in jobs:
            if job.start_by is not None:
                job.deadline = self._deadlines.arm(job.start_by, job)
        self._queue.extend(jobs)
        for command in commands:
            command()

    def _take_queued(self) -> Job | None:
        """The next waiting job; jobs already ended (missed, cancelled) are dropped here."""
        while self._queue:
            job = self._queue.popleft()
            if not job.done:
                self.counters.queued -= 1
                return job
        return None

    def _dispatch(self) -> None:
        if self._start_error is not None and not self._has_ready_worker():
            while (job := self._take_queued()) is not None:
                self._resolve(job, self._start_error, "failed")
            return
        if self._idle and self._waiting and not self._queue:
            # Nothing queued and a worker idles: take back the jobs waiting behind others.
            for worker in list(self._workers.values()):
                waiting = [job for job in worker.waiting.values() if not job.recalling]
                if waiting:
                    self._recall(worker, waiting)
                elif worker.waiting:
                    self._steal(worker)
        while self._idle and self._queue:
            with self.lock:  # submitters take idle workers too
                if not self._idle:
                    break
                worker = self._idle.pop()
            self._send(worker, 1)
            if worker.state == "idle":  # nothing was left to send: every queued job was over
                self._make_idle(worker)
                break
        if self._queue:
            busy = [w for w in self._workers.values() if w.state == "busy"]
            if busy:
                # Jobs are waiting and no worker is idle: give each busy worker a batch, so
                # that it goes from one job to the next without waiting for the supervisor.
                share = self.counters.queued + sum(len(w.waiting) for w in busy)
                depth = min(_BATCH_JOBS, -(-share // len(busy)))
                for worker in busy:
                    if self._queue and not worker.recalled:
                        self._send(worker, depth - len(worker.waiting))

    def _send(self, worker: _Worker, count: int) -> None:
        """Send ``worker`` up to ``count`` queued jobs in one write (first the head, if idle)."""
        if worker.writing:
            return  # a submitter is writing its head to it: no two writers on one socket
        max_jobs = self.settings.max_jobs_per_worker
        if max_jobs is not None:
            assigned = worker.jobs_done + len(worker.waiting) + (worker.job is not None)
            count = min(count, max_jobs - assigned)
        batch: list[Job] = []
        size = worker.waiting_bytes
        while len(batch) < count and self._queue:
            job = self._queue[0]
            if job.done:
                self._queue.popleft()
                continue
            behind = worker.job is not None or bool(batch)
            if behind and (len(job.frame) > _BATCH_FRAME or size + len(job.frame) > _BATCH_BYTES):
                break
            self._take_queued()
            if not job.running and not job.future.set_running_or_notify_cancel():
                self._finish(job)
                self.counters.cancelled += 1
                continue
            job.running = True
            batch.append(job)
            if behind:
                size += len(job.frame)
        if not batch:
            return
        try:
            self._write(worker, b"".join(job.frame for job in batch))
        except OSError:
            # The worker died; its sentinel will say how. These jobs never started.
            self._queue.extendleft(reversed(batch))
            self.counters.queued += len(batch)
            worker.state = "killing"
            return
        for job in batch:
            job.worker = worker
            if worker.job is None:
                self._start_head(worker, job)
            else:
                worker.waiting[job.id] = job
                worker.waiting_bytes += len(job.frame)
                self._waiting += 1

    def _start_head(self, worker: _Worker, job: Job) -> None:
        """``job`` is the one ``worker`` runs now: its timeout and the memory watch start."""
        now = self._mark_head(worker, job)
        if job.cancel_requested:
            self._cancel_head(worker)
        else:
            self._arm(worker, job, now)

    def _mark_head(self, worker: _Worker, job: Job) -> float:
        worker.recalled = False
        worker.job_started = now = time.monotonic()
        worker.state = "busy"
        worker.job = job
        future = job.future
        future.worker_pid = worker.pid
        future.queue_wait = wait = now - job.submitted_at
        if wait > WAIT_WARNING:
            self.counters.waited += 1
        if future.on_start is not None:
            try:
                future.on_start(future)
            except Exception:
                logger.exception("on_start callback of job %d failed", job.id)
        return now

    def _arm(self, worker: _Worker, job: Job, started: float) -> None:
        """Start ``job``'s timeout and the memory watch (the job became a head at ``started``)."""
        if worker.job is not job or worker.job_started != started:
            return  # over already
        if job.timeout is not None:
            when = started + job.timeout
            # The timer keeps the worker, not the job: a job over before it fires is not kept.
            worker.timeout = self._at(when, functools.partial(self._on_timeout, worker, started))
        if self.settings.max_memory is not None and not self._memory_watch_armed:
            self._memory_watch_armed = True
            self._at(started + self.settings.memory_check_interval, self._check_memory)

    def _next_head(self, worker: _Worker) -> None:
        """``worker``'s head is finished: the next waiting job is its head, or it is idle."""
        worker.job = None
        self._timers.cancel(worker.timeout)
        worker.timeout = None
        if worker.state != "busy":
            return  # being killed or stopped: its death or exit finishes it
        if worker.waiting:
            job = self._unwait(worker, next(iter(worker.waiting)))
            assert job is not None
            self._start_head(worker, job)
            return
        max_jobs = self.settings.max_jobs_per_worker
        if self._closing:
            self._stop(worker)
        elif max_jobs is not None and worker.jobs_done >= max_jobs:
            self.counters.recycled += 1
            self._stop(worker)
            self._top_up()
        else:
            self._make_idle(worker)

    def _unwait(self, worker: _Worker, job_id: int) -> Job | None:
        """Take job ``job_id`` off ``worker``'s waiting jobs (``None``: it is not one of them)."""
        job = worker.waiting.pop(job_id, None)
        if job is not None:
            worker.waiting_bytes -= len(job.frame)
            self._waiting -= 1
        return job

    def _make_idle(self, worker: _Worker) -> None:
        if worker.exited:
            return  # a reply read as its exit is handled: no submitter may take it meanwhile
        with self.lock:  # submitters take idle workers (``_send_now``)
            worker.state = "idle"
            self._idle.append(worker)

    def _take_from_idle(self, worker: _Worker, state: WorkerState | None = None) -> bool:
        """Take ``worker`` out of the idle list (if it is there) and set its state, atomically
        against submitters; return whether it was idle."""
        with self.lock:
            idle = worker in self._idle
            if idle:
                self._idle.remove(worker)
            if state is not None:
                worker.state = state
        return idle

    def _recall(self, worker: _Worker, jobs: list[Job]) -> None:
        """Ask ``worker`` to give back these waiting jobs if it has not started them."""
        for job in jobs:
            job.recalling = True
        worker.recalled = True
        message = msg.frame(msg.RECALL + pickle.dumps([job.id for job in jobs]))
        try:
            self._write(worker, message)
        except OSError:
            return  # it died: its death returns them
        self._steal(worker)

    def _steal(self, worker: _Worker) -> None:
        """Take back the recalled jobs waiting in ``worker`` now, without its answer, if it
        cannot have started them: it will not, once its recall has reached it.

        A worker reports its head before it starts the next job, and reads what came to its
        socket (the recall) before it starts a job that waits in it. So once every recall is
        written and what the worker sent is read with no reply to its head among it (nor part
        of a frame that may be one), it has not started the jobs behind its head and never will.
        Its answer, when it comes, finds them gone. The answer is not needed, which matters
        when the head holds the GIL: the worker's watch thread, which answers recalls while a
        job runs, cannot run then.
        """
        if worker.outbox or worker.picker or not worker.reading or worker.state != "busy":
            return  # the recall is not all written, or another thread reads its socket
        head = worker.job
        while worker.reading and worker.poller.poll(0):
            self._on_readable(worker)
        if worker.job is not head or worker.inbox or not worker.reading:
            return  # it may have moved on: its answer says which jobs it gave back
        taken = []
        for job in list(worker.waiting.values()):
            if job.recalling:
                self._unwait(worker, job.id)
                taken.append(job)
        self._return_unstarted(taken)

    def _on_recalled(self, worker: _Worker, job_ids: list[int]) -> None:
        returned = []
        for job_id in job_ids:
            job = self._unwait(worker, job_id)
            if job is not None:
                returned.append(job)
            elif worker.job is not None and worker.job.id == job_id:
                returned.append(worker.job)  # the supervisor took it for started; it was not
                self._next_head(worker)
        self._return_unstarted(returned)

    def _return_unstarted(self, jobs: list[Job]) -> None:
        """Jobs a worker never started: back to the front of the queue, unless they are over."""
        now = time.monotonic()
        requeue = []
        for job in jobs:
            job.worker = None
            job.recalling = False
            if job.cancel_requested or self._closing:
                when = (
                    "before it started" if job.cancel_requested else "at shutdown before it started"
                )
                error = JobCancelledError(
                    f"job {job.id} ({job.reference}) was cancelled {when}",
                    job_id=job.id,
                    started=False,
                )
                self._resolve(job, error, "cancelled")
            elif job.start_by is not None and now > job.start_by:
                self._resolve(job, self._missed_error(job), "missed")
            else:
                requeue.append(job)
        self._queue.extendleft(reversed(requeue))
        self.counters.queued += len(requeue)

    def _write(self, worker: _Worker, data: bytes) -> None:
        """Write ``data`` to ``worker`` without ever waiting: what its socket cannot take now
        waits in its outbox, written as room appears (a worker that stops reading, even one
        stopped by SIGSTOP, cannot stall supervision). Raises OSError if it is dead."""
        if worker.outbox:
            worker.outbox += data
            return
        try:
            sent = worker.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            worker.outbox += data[sent:]
            self._watch(worker)

    def _watch(self, worker: _Worker) -> None:
        """Register ``worker``'s socket with the selector for reading, and for writing while its
        outbox holds anything; not while a caller reads it, nor after its end."""
        if worker.picker or not worker.reading or self._stopped:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if worker.outbox else 0)
        if worker.watched:
            self._selector.modify(worker.fd, events, worker.on_channel)
        else:
            self._selector.register(worker.fd, events, worker.on_channel)
            worker.watched = True

    def _unwatch(self, worker: _Worker) -> None:
        if worker.watched:
            self._selector.unregister(worker.fd)
            worker.watched = False

    def _on_channel(self, worker: _Worker, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and worker.outbox:
            try:
                sent = worker.sock.send(worker.outbox, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:  # it died: its sentinel says how
                sent = len(worker.outbox)
            del worker.outbox[:sent]
            if not worker.outbox:
                self._watch(worker)
        if mask & selectors.EVENT_READ and not worker.picker:  # else that caller reads it
            self._on_readable(worker)

    def _on_readable(self, worker: _Worker) -> None:
        """Read what the worker's socket holds (one read, never waiting), then each whole frame.

        A frame a worker has only half written stays in ``worker.inbox``: a worker stopped in the
        middle of a write can never stall supervision.
        """
        if not worker.reading:
            return  # its end was read earlier in the same batch of events
        try:
            data = worker.sock.recv(msg.READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._on_data(worker, data)

    def _on_data(self, worker: _Worker, data: bytes) -> None:
        """Handle what was read from ``worker``'s socket: whole frames, or its end (``b""``)."""
        if not worker.reading:
            return  # it broke the protocol: nothing more from it counts
        if not data:
            worker.reading = False
            self._unwatch(worker)
            return
        try:
            for frame in msg.frames(worker.inbox, data, self._frame_limit):
                self._on_message(worker, frame)
        except msg.ProtocolError as exc:
            self._broken(worker, str(exc))

    def _broken(self, worker: _Worker, what: str) -> None:
        """``worker`` sent bytes that are not a message: kill it (its job fails with a
        ``WorkerDiedError`` that says so) and read nothing more from it."""
        worker.reading = False
        worker.inbox.clear()
        self._unwatch(worker)
        job = worker.job
        doing = "while idle" if job is None else f"while running job {job.id} ({job.reference})"
        text = f"worker {worker.pid} sent a malformed message ({what}) {doing}; it was killed"
        logger.error("pool %r: %s", self.name, text)
        error = None
        if job is not None:
            error = WorkerDiedError(text, job_id=job.id, pid=worker.pid, exitcode=None)
        self._kill(worker, error, graceful=False)

    def _on_message(self, worker: _Worker, frame: bytes) -> None:
        tag = frame[:1]
        if tag in (msg.RETURNED, msg.RAISED, msg.MISSED):
            self._on_reply(worker, tag, frame)
        elif tag == msg.LOG:
            self._emit_log(worker, _decode(frame, dict))
        elif tag == msg.OUTPUT:
            name, text = _decode(frame, tuple)
            if not isinstance(text, str):
                raise msg.ProtocolError("an OUTPUT message without text")
            self.outlet.output(name, text)
        elif tag == msg.RECALLED:
            self._on_recalled(worker, _decode(frame, list))
        elif tag == msg.READY:
            self._on_ready(worker)
        elif tag == msg.INIT_FAILED:
            worker.start_error = f"its initializer raised:\n{frame[1:].decode(errors='replace')}"
        else:
            raise msg.ProtocolError(f"a message with the unknown tag {tag!r}")

    def _on_ready(self, worker: _Worker) -> None:
        if worker.state != "starting":
            return
        self._failures_in_row = 0
        self._start_error = None
        self._next_start_at = 0.0
        if self._closing:
            self._stop(worker)
        else:
            self._make_idle(worker)

    def _on_reply(self, worker: _Worker, tag: bytes, frame: bytes) -> None:
        if len(frame) < msg.ID_HEAD.size:
            raise msg.ProtocolError(f"a reply of {len(frame)} bytes, too short to name its job")
        _, job_id = msg.ID_HEAD.unpack_from(frame)
        body = frame[msg.ID_HEAD.size :]
        job = worker.job
        if job is None or job.id != job_id:
            return  # not this worker's head: it was already given an outcome
        report = _exception_report(frame) if tag == msg.RAISED else None
        worker.jobs_done += 1
        self._next_head(worker)  # first: a caller woken by this outcome finds the worker idle
        if tag == msg.RETURNED:
            try:
                value = pickle.loads(body)
            except BaseException as exc:  # whatever its classes raise when rebuilt
                error = SerializationError(
                    f"the result of job {job.id} ({job.reference}) could not be unpickled in the "
                    f"parent: {type(exc).__name__}: {exc}; return plain data, or make its classes "
                    f"importable in the parent",
                    stage="result",
                )
                self._resolve(job, error, "failed")
            else:
                self._resolve_value(job, value)
        elif tag == msg.RAISED:
            assert report is not None
            self._resolve(job, _remote_exception(job, *report), "failed")
        else:
            self._resolve(job, self._missed_error(job), "missed")

    def _on_exit(self, worker: _Worker, mask: int = 0) -> None:
        if not worker.exited:
            worker.exited = True
            self._selector.unregister(worker.process.sentinel)
        if worker.picker:
            # A caller reads its socket, and may hold a reply it has not handled yet: that
            # caller finishes this when it stops. It may wait for an end that a process the
            # job started (holding the socket) keeps away: this ends its wait.
            _shut_reading(worker)
            return
        while worker.reading and worker.poller.poll(0):
            self._on_readable(worker)  # a reply sent just before the exit still counts
        worker.reading = False
        self._unwatch(worker)
        worker.sock.close()
        self._take_from_idle(worker)
        self._reap(worker, time.monotonic())

    def _reap(self, worker: _Worker, since: float) -> None:
        # The sentinel can fire a moment before the process is reapable, or (if a job closed
        # inherited descriptors) while it still runs: retry shortly, and kill it if it lingers.
        worker.process.join(0)
        exitcode = worker.process.exitcode
        if exitcode is None:
            if time.monotonic() - since > 1.0:
                _killpg(worker.pid, signal.SIGKILL)
            self._at(time.monotonic() + 0.005, lambda: self._reap(worker, since))
            return
        if getattr(getattr(worker.process, "_popen", None), "lost", False):
            exitcode = None  # its keeper died first: that code is not the worker's
        worker.process.close()  # its sentinel now; timers may hold the worker a while longer
        if worker.pid not in self._groups_to_kill:
            _killpg(worker.pid, signal.SIGKILL)  # the job's own children die with it
        del self._workers[worker.pid]
        self._timers.cancel(worker.timeout)
        worker.timeout = None
        was_starting = worker.state == "starting"
        job, worker.job = worker.job, None
        unstarted = list(worker.waiting.values())
        for waiting in unstarted:
            self._unwait(worker, waiting.id)
        self._return_unstarted(unstarted)
        if was_starting and not self._closing:
            cause = worker.start_error or (
                f"it ended before it was ready: {_describe_exit(exitcode)}"
            )
            self._on_start_failure(f"worker {worker.pid} failed to start: {cause}")
        elif job is not None:
            error = worker.kill_error or WorkerDiedError(
                f"worker {worker.pid} died while running job {job.id} ({job.reference}): "
                f"{_describe_exit(exitcode, in_job=True)}",
                job_id=job.id,
                pid=worker.pid,
                exitcode=exitcode,
            )
            self._resolve(job, error, _KIND_OF_ERROR[type(error)])
        elif worker.state in ("idle", "busy") and not self._closing:
            logger.warning(
                "pool %r: idle worker %d died (%s); starting a replacement",
                self.name,
                worker.pid,
                _describe_exit(exitcode),
            )
        self._top_up()

    # -- starting workers ---------------------------------------------------------------------

    def _top_up(self) -> None:
        if self._closing:
            return
        live = len(self._launches) + sum(
            1 for w in self._workers.values() if w.state in ("starting", "idle", "busy")
        )
        while live < self.settings.workers:
            # A failed start sets the back-off: the retry is armed whatever failed.
            if time.monotonic() < self._next_start_at:
                if not self._top_up_armed:
                    self._top_up_armed = True
                    self._at(self._next_start_at, self._retry_top_up)
                return
            self._launch()
            live += 1

    def _retry_top_up(self) -> None:
        self._top_up_armed = False
        self._top_up()

    def _launch(self) -> None:
        """Start a worker process on a thread of its own: a start waits on the process that
        starts workers, and nothing may make supervision (or a caller) wait on that. The
        thread's outcome comes back as a command (``_on_launched``, ``_on_launch_failed``)."""
        launch = _Launch(next(self._launch_ids), time.monotonic())
        self._launches[launch.token] = launch
        limit = min(self.settings.start_timeout, _LAUNCH_DEADLINE)
        launch.timer = self._at(
            launch.began + limit, functools.partial(self._launch_timed_out, launch, limit)
        )
        threading.Thread(
            target=self._launch_thread, args=(launch,), name=f"{self.name}-start", daemon=True
        ).start()

    def _launch_thread(self, launch: _Launch) -> None:
        """On a starter thread: start one worker process and hand it to the supervisor."""
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):
            sock.setblocking(True)  # whatever socket.setdefaulttimeout() says
        child_conn = Connection(child_sock.detach())
        process = self.context.Process(
            target=worker_main,
            args=(child_conn, self._options),
            name=f"{_launch.WORKER_NAME_PREFIX}{self.name}",
        )
        try:
            process.start()
        except Exception as exc:
            parent_sock.close()
            cause = f"a worker process could not be started: {type(exc).__name__}: {exc}"
            self._hand_over(launch, functools.partial(self._on_launch_failed, launch, cause))
            return
        finally:
            child_conn.close()
        assert process.pid is not None
        ps = _psutil_process(process.pid)
        started = functools.partial(self._on_launched, launch, process, parent_sock, ps)
        if not self._hand_over(launch, started):
            _discard(process, parent_sock)  # abandoned meanwhile, or the pool is gone

    def _hand_over(self, launch: _Launch, command: Callable[[], None]) -> bool:
        """Queue a starter thread's outcome for the supervisor; ``False``: nobody wants it."""
        with self.lock:
            if launch.abandoned or self.finished.is_set():
                return False
            self.commands.append(command)
            self._wake()
        return True

    def _on_launched(
        self, launch: _Launch, process: BaseProcess, sock: socket.socket, ps: psutil.Process | None
    ) -> None:
        if self._launches.pop(launch.token, None) is None:
            threading.Thread(target=_discard, args=(process, sock), daemon=True).start()
            return  # abandoned after it was handed over
        self._timers.cancel(launch.timer)
        assert process.pid is not None
        worker = _Worker(process, sock, process.pid, ps)
        self._workers[worker.pid] = worker
        worker.on_channel = functools.partial(self._on_channel, worker)
        self._selector.register(worker.fd, selectors.EVENT_READ, worker.on_channel)
        self._selector.register(
            process.sentinel, selectors.EVENT_READ, functools.partial(self._on_exit, worker)
        )
        self._at(
            launch.began + self.settings.start_timeout,
            functools.partial(self._start_timed_out, worker),
        )
        if self._first_starts_left:
            self._first_starts_left -= 1
        else:
            self.counters.restarts += 1

    def _on_launch_failed(self, launch: _Launch, cause: str) -> None:
        if self._launches.pop(launch.token, None) is None:
            return  # abandoned: already counted
        self._timers.cancel(launch.timer)
        self._on_start_failure(cause)
        self._top_up()

    def _launch_timed_out(self, launch: _Launch, limit: float) -> None:
        """A start took longer than it may: the process that starts workers is stuck. Every
        start waiting on it is abandoned (their threads dispose of what they get) and it is
        killed (its workers live on); the next start starts a new one."""
        if launch.token not in self._launches:
            return
        self._abandon_launches()
        _launch.restart_server(self.context)
        self._on_start_failure(
            f"starting a worker took longer than {limit:g}s; the process that starts workers "
            f"was stuck and has been restarted"
        )
        self._top_up()

    def _abandon_launches(self) -> None:
        with self.lock:
            for launch in self._launches.values():
                launch.abandoned = True
        for launch in self._launches.values():
            self._timers.cancel(launch.timer)
        self._launches.clear()

    def _start_timed_out(self, worker: _Worker) -> None:
        if worker.state == "starting" and self._workers.get(worker.pid) is worker:
            worker.start_error = (
                f"it was not ready within start_timeout={self.settings.start_timeout}s"
            )
            _killpg(worker.pid, signal.SIGKILL)

    def _on_start_failure(self, cause: str) -> None:
        """Count a failed start and delay the next one (exponential back-off)."""
        self._failures_in_row += 1
        self.counters.start_failures += 1
        delay = min(_BACKOFF_FIRST * 2 ** (self._failures_in_row - 1), _BACKOFF_MAX)
        self._next_start_at = time.monotonic() + delay
        logger.error(
            "pool %r: %s (failure %d in a row); next start in %.1fs",
            self.name,
            cause.rstrip(),
            self._failures_in_row,
            delay,
        )
        if self._failures_in_row >= _FAILURES_BEFORE_GIVING_UP:
            self._start_error = WorkerStartError(
                f"pool {self.name!r} cannot start workers ({self._failures_in_row} failures in a "
                f"row); last: {cause.rstrip()}; fix the initializer or the worker's imports",
                cause=cause,
            )

    def _has_ready_worker(self) -> bool:
        return any(w.state in ("idle", "busy") for w in self._workers.values())

    # -- deadlines and killing ----------------------------------------------------------------

    def _at(self, when: float, callback: Callable[[], None]) -> Timer[Callable[[], None]]:
        return self._timers.arm(when, callback)

    def _fire_timers(self) -> float | None:
        """Run due timers; return seconds until the next one (``None``: no timer)."""
        while (job := self._deadlines.pop_due(time.monotonic())) is not None:
            job.deadline = None
            self._on_deadline(job)
        while (callback := self._timers.pop_due(time.monotonic())) is not None:
            callback()
        nearest = self._next_timer()
        return None if nearest == math.inf else max(0.0, nearest - time.monotonic())

    def _next_timer(self) -> float:
        return min(self._timers.next_at(), self._deadlines.next_at())

    def _cancel_head(self, worker: _Worker) -> None:
        job = worker.job
        assert job is not None
        error = JobCancelledError(
            f"job {job.id} ({job.reference}) was cancelled while running",
            job_id=job.id,
            started=True,
        )
        self._kill(worker, error, graceful=True)

    def _on_timeout(self, worker: _Worker, started: float) -> None:
        job = worker.job
        if job is None or worker.job_started != started:
            return  # over, or recalled and sent again: a newer timer counts
        error = JobTimeoutError(
            f"job {job.id} ({job.reference}) ran past its timeout of {job.timeout}s; "
            f"worker {worker.pid} was killed and replaced",
            job_id=job.id,
            timeout=job.timeout,
            pid=worker.pid,
        )
        self._kill(worker, error, graceful=True)

    def _check_memory(self) -> None:
        limit = self.settings.max_memory
        assert isinstance(limit, int)  # validated to bytes
        busy = [w for w in self._workers.values() if w.job is not None and w.state == "busy"]
        self._memory_watch_armed = bool(busy)
        if busy:
            self._at(time.monotonic() + self.settings.memory_check_interval, self._check_memory)
        for worker in busy:
            job = worker.job
            assert job is not None
            rss = _launch.job_memory(worker.process)  # its processes, all of them
            if rss is not None and rss > limit:
                error = MemoryLimitError(
                    f"worker {worker.pid} used {rss} bytes of memory while running job {job.id} "
                    f"({job.reference}), over max_memory={limit}; it was killed and "
                    f"replaced; raise max_memory or make the job use less",
                    job_id=job.id,
                    pid=worker.pid,
                    rss=rss,
                    limit=limit,
                )
                self._kill(worker, error, graceful=False)

    def _kill(self, worker: _Worker, error: JobError | None, *, graceful: bool) -> None:
        """Kill ``worker``'s process group; its death resolves its job with ``error``."""
        if worker.state == "killing":
            return
        self._take_from_idle(worker, "killing")
        worker.kill_error = error
        grace = self.settings.kill_grace
        if graceful and grace > 0:
            _killpg(worker.pid, signal.SIGTERM)
            self._groups_to_kill.add(worker.pid)
            self._at(time.monotonic() + grace, lambda: self._kill_group(worker.pid))
        else:
            _killpg(worker.pid, signal.SIGKILL)
        self._top_up()

    def _kill_group(self, pgid: int) -> None:
        self._groups_to_kill.discard(pgid)
        _killpg(pgid, signal.SIGKILL)

    def _stop(self, worker: _Worker) -> None:
        """Ask an idle worker to exit; kill it if it does not."""
        worker.state = "stopping"
        try:
            self._write(worker, msg.frame(msg.STOP))
        except OSError:
            return
        self._at(
            time.monotonic() + max(self.settings.kill_grace, 5.0),
            lambda: self._stop_timed_out(worker),
        )

    def _stop_timed_out(self, worker: _Worker) -> None:
        if worker.pid in self._workers and self._workers[worker.pid] is worker:
            _killpg(worker.pid, signal.SIGKILL)

    def _on_deadline(self, job: Job) -> None:
        """``job``'s start deadline passed: miss it if it is queued, recall it if it waits."""
        if job.done:
            return
        worker = job.worker
        if worker is None:
            self.counters.queued -= 1
            self._resolve(job, self._missed_error(job), "missed")
        elif worker.job is not job and not job.recalling:
            self._recall(worker, [job])

    def _missed_error(self, job: Job) -> JobMissedError:
        waited = time.monotonic() - job.submitted_at
        return JobMissedError(
            f"job {job.id} ({job.reference}) waited {waited:.3f}s for a worker, past its start "
            f"deadline; it was not run; add workers or allow a longer start deadline",
            job_id=job.id,
            waited=waited,
        )

    # -- shutdown -------------------------------------------------------------------------------

    def _begin_close(self, wait: bool, deadline: float | None) -> None:
        if self._closing:
            if not wait:
                self._cancel_running(graceful=False)
            return
        self._closing = True
        self._abandon_launches()
        self._take_in()  # take whatever was submitted before the pool stopped accepting
        while (job := self._take_queued()) is not None:
            error = JobCancelledError(
                f"job {job.id} ({job.reference}) was cancelled at shutdown before it started",
                job_id=job.id,
                started=False,
            )
            self._resolve(job, error, "cancelled")
        for worker in list(self._workers.values()):
            if self._take_from_idle(worker):
                self._stop(worker)
            elif worker.state == "starting":
                self._kill(worker, None, graceful=False)
            elif worker.waiting:
                self._recall(worker, list(worker.waiting.values()))
        if not wait:
            self._cancel_running(graceful=False)
        elif deadline is not None:
            self._at(deadline, lambda: self._cancel_running(graceful=True))

    def _cancel_running(self, *, graceful: bool) -> None:
        for worker in list(self._workers.values()):
            job = worker.job
            if job is not None:
                error = JobCancelledError(
                    f"job {job.id} ({job.reference}) was still running at shutdown and was killed",
                    job_id=job.id,
                    started=True,
                )
                self._kill(worker, error, graceful=graceful)
            elif worker.state == "killing" and not graceful:
                _killpg(worker.pid, signal.SIGKILL)

    def _abandon(self) -> None:
        """Last resort after a supervisor bug: kill every worker, fail every job."""
        self._closing = True
        self._abandon_launches()
        with self.lock:
            self.accepting = False
            self._queue.extend(self.incoming)
            self.incoming.clear()
        error_text = "the pool's supervisor failed; see the log for its traceback"
        for worker in list(self._workers.values()):
            _killpg(worker.pid, signal.SIGKILL)
            for job in [worker.job, *worker.waiting.values()]:
                if job is not None and not job.done:
                    self._resolve(job, CorralError(error_text), "failed")
            worker.job = None
            worker.waiting.clear()
            worker.process.join(1)
            if worker.picker:
                self._on_exit(worker)  # ends that caller's wait; it closes the socket after
            else:
                worker.sock.close()
        for job in self._queue:
            if not job.done:
                self._resolve(job, CorralError(error_text), "failed")

    # -- outcomes -----------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        """``job`` is over: nothing of the supervisor's may keep it any more."""
        mark = self.outlet.mark()
        if mark is not None:  # what its worker sent before its outcome goes first
            job.future._output = (self.outlet, mark)
        job.done = True
        job.worker = None
        job.future._pickup = None  # nothing to pick up: the future need not keep the job
        self._deadlines.cancel(job.deadline)
        job.deadline = None

    def _resolve_value(self, job: Job, value: Any) -> None:
        self._finish(job)
        self.counters.completed += 1
        if job.running or job.future.set_running_or_notify_cancel():
            job.future.set_result(value)

    def _resolve(self, job: Job, error: BaseException, kind: str) -> None:
        self._finish(job)
        setattr(self.counters, kind, getattr(self.counters, kind) + 1)
        if job.running or job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)

    def _emit_log(self, worker: _Worker, fields: dict[str, Any]) -> None:
        record = logging.makeLogRecord(fields)
        job = worker.job
        record.corral_job_id = None if job is None else job.id
        record.corral_job_label = None if job is None else job.label
        record.corral_worker_pid = worker.pid
        if logging.getLogger(record.name).isEnabledFor(record.levelno):
            self.outlet.log(record)  # handled on the outlet's thread: handlers may block


def _decode(frame: bytes, kind: type[_K], offset: int = 1) -> _K:
    """The pickled ``kind`` in ``frame`` after ``offset``; ``ProtocolError`` if it is not one."""
    try:
        value = pickle.loads(frame[offset:])
    except BaseException as exc:
        raise msg.ProtocolError(
            f"a {frame[:1]!r} message that does not unpickle: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(value, kind):
        raise msg.ProtocolError(f"a {frame[:1]!r} message that holds a {type(value).__name__}")
    return value


def _exception_report(frame: bytes) -> tuple[bytes | None, str, str, str]:
    """What a ``RAISED`` reply holds: the pickled exception (if it pickled), its type's name,
    its message and its traceback."""
    report = _decode(frame, tuple, msg.ID_HEAD.size)
    if not (
        len(report) == 4
        and isinstance(report[0], bytes | None)
        and all(isinstance(part, str) for part in report[1:])
    ):
        raise msg.ProtocolError("a RAISED reply that is not an exception report")
    return report


def _remote_exception(
    job: Job, exc_bytes: bytes | None, type_name: str, message: str, text: str
) -> BaseException:
    error: BaseException | None = None
    if exc_bytes is not None:
        try:
            error = pickle.loads(exc_bytes)
        except BaseException:  # whatever it raises, reported as a RemoteError below
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(
            f"job {job.id} ({job.reference}) raised {type_name}: {message} (the exception could "
            f"not be sent to the parent as itself; its traceback is kept)",
            type_name=type_name,
            traceback=text,
        )
    error.__cause__ = RemoteTraceback(text)
    return error


def _describe_exit(exitcode: int | None, *, in_job: bool = False) -> str:
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


def _discard(process: BaseProcess, sock: socket.socket) -> None:
    """Kill a worker process nobody wants any more and reap it (on a thread that may wait)."""
    sock.close()
    assert process.pid is not None
    _killpg(process.pid, signal.SIGKILL)
    process.join(30)
    if process.exitcode is not None:
        process.close()


def _killpg(pgid: int, sig: int) -> None:
    """Signal a worker's process group, or the worker alone if it has not made its group yet."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pgid, sig)


def _reraise(exc: BaseException) -> None:
    raise exc


def _receive(worker: _Worker, timeout: float | None) -> bytes | None:
    """Wait in ``recv`` for what ``worker`` sends, up to ``timeout`` seconds (the socket's own
    receive timeout); ``None``: nothing came. A thread blocked reading a socket is woken sooner
    than one waiting in ``poll`` for it."""
    if timeout != worker.receive_timeout:
        # In microseconds, at least one: zero would mean no limit.
        micro = 0 if timeout is None else max(1, int(timeout * 1e6))
        limit = _TIMEVAL.pack(*divmod(micro, 1_000_000))
        worker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        worker.receive_timeout = timeout
    try:
        return worker.sock.recv(msg.READ_SIZE)
    except BlockingIOError:  # the timeout passed
        return None
    except OSError:
        return b""


def _shut_reading(worker: _Worker) -> None:
    """End a caller's wait on ``worker``'s socket (what is already there is still read)."""
    with contextlib.suppress(OSError):
        worker.sock.shutdown(socket.SHUT_RD)


def _psutil_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _rss(process: psutil.Process | None) -> int | None:
    if process is None:
        return None
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return None
