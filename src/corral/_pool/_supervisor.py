"""The supervisor: the pool's core and its shell (``_shell``), on a thread of its own.

::

    submit() --> incoming --+    (or straight to an idle worker, if one is free)
                            |                          +--> worker process (its jobs in order,
      (any thread)          |   supervisor thread      |      one at a time; one reply each)
                            v                          |
                wake-up pipe --> selector.select() --> core (``_core``): events in, actions out
                (only if the     ^   ^   ^                  write, signal, start, resolve...
                 thread sleeps)  |   |   |
            worker sockets ------+   |   +------ the core's timers: timeouts, kill grace, memory,
            exit sentinels ----------+           back-off, start deadlines
                                  |
                                  v
              exactly one outcome per job --> JobFuture (value, exception, or a JobError)

The decisions are the core's: a state machine of jobs, workers and timers with no I/O. This
module feeds it events and carries out its actions. The supervisor's thread waits in one place
only, ``select()``, until the core's next timer. What could wait on anything else runs elsewhere:
process starts on starter threads (``_starter``), and jobs' output and log records on the
outlet's thread (``_outlet``).

Whoever holds ``state_lock`` drives the core: the supervisor's thread (which lets go of it only
while it waits in ``select()``), or a caller waiting on a job that ``submit`` wrote to an idle
worker (it reads the reply itself: ``pick_up``). ``lock`` guards what any thread may touch without
it: ``incoming``, ``commands``, ``accepting``, the wake-up and the idle list; a submitter that
finds an idle worker takes it and writes its job to it under ``lock`` alone, whoever holds the
state (``Jobs.submit`` says what that may touch). Whoever holds both took ``state_lock`` first.
``snapshot`` reads plain attributes without either.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import PENDING as _PENDING
from typing import Any, TypeVar

from corral._exceptions import CorralError, PoolNotRunningError, QueueFullError
from corral._pool import _launch
from corral._pool._actions import (
    Resolve,
    Signal,
)
from corral._pool._channel import Channel, rss
from corral._pool._condition import FutureCondition
from corral._pool._jobs import WAIT_WARNING
from corral._pool._outlet import Outlet
from corral._pool._settings import PoolSettings
from corral._pool._shell import Shell
from corral._pool._starter import kill_group
from corral._pool._state import Job
from corral._pool._stats import PoolStatistics, WorkerStatistics

__all__ = ["WAIT_WARNING", "Job", "JobFuture", "Supervisor"]

logger = logging.getLogger("corral.pool")

_WATCH_INTERVAL = 0.1  # how often a worker checks its parent, and reads while a job runs
_FRAME_SLACK = 1 << 20  # room in a reply frame beyond max_result_size (header, traceback)

_T = TypeVar("_T")


class JobFuture(Future[_T]):
    """A :class:`concurrent.futures.Future` that knows its job.

    Waiting on it with :meth:`result` or :meth:`exception` may read the job's reply on the
    waiting thread itself (see ``Supervisor.pick_up``), so that the outcome does not wait for
    the supervisor thread to wake up.
    """

    def __init__(self, job_id: int, label: str | None) -> None:
        # ``Future.__init__``'s state, with a condition of one object instead of nine (see
        # ``_condition``; ``test_a_job_future_has_the_state_of_a_future`` checks the names).
        self._condition = FutureCondition()  # type: ignore[assignment]
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[_T]], object]] = []
        self.job_id = job_id
        self.label = label
        self.worker_pid: int | None = None  # the worker that started it, once one did
        self.queue_wait: float | None = None  # seconds from submit until a worker started it
        # Called once a worker starts the job, on whichever thread starts it: must not block.
        self.on_start: Callable[[JobFuture[Any]], None] | None = None
        self._pickup: tuple[Supervisor, Job] | None = None  # set when submit wrote the job itself
        self._supervisor: Supervisor | None = None  # until its outcome: who must not wait here
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

    def _pick_up(self, timeout: float | None) -> float | None:
        """Read the reply on this thread if it may; return what is left of ``timeout``. Raise
        ``RuntimeError`` if the job is not done and this thread can never see it done."""
        pickup, self._pickup = self._pickup, None
        if pickup is not None and not self.done():
            deadline = None if timeout is None else time.monotonic() + timeout
            pickup[0].pick_up(pickup[1], deadline)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        supervisor = self._supervisor  # (``None`` once it has its outcome)
        if (
            supervisor is not None
            and timeout != 0
            and not supervisor.may_wait_here()
            and not self.done()
        ):
            raise RuntimeError(
                f"job {self.job_id} is not done, and this thread cannot wait for it: it runs "
                f"the pool's own handling of jobs (the supervisor thread, a done-callback or "
                f"on_start callback, or a signal handler that interrupted a submit), which that "
                f"job's outcome needs; wait on another thread, or use add_done_callback"
            )
        return timeout

    def _await_output(self, began: float | None, timeout: float | None) -> None:
        """The job's output and log records, queued before its outcome, reach the app first
        (within ``timeout``, and unless the app's streams are stuck: see ``Outlet.wait``)."""
        output = self._output
        if output is not None and self.done():
            deadline = None if began is None or timeout is None else began + timeout
            output[0].wait(output[1], deadline)


class Supervisor(Shell):
    """Runs the workers of one pool: a thread that feeds the core its events and carries out
    its actions (``Shell``), and what any thread may call."""

    def __init__(self, settings: PoolSettings, context: _launch.Context, name: str) -> None:
        super().__init__(settings, context, name)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._thread = threading.Thread(target=self._run, name=f"{name}-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Send ``job`` to an idle worker, or queue it; never blocks beyond a lock and a write."""
        with self.lock:
            if not self.accepting:
                raise PoolNotRunningError(
                    f"pool {self.name!r} is shut down; it takes no new jobs; make a new pool"
                )
            core = self.core
            queued = len(self.incoming) + len(core.queue) + core.waiting
            if queued >= self.settings.queue_size:
                raise QueueFullError(
                    f"pool {self.name!r} has {queued} jobs waiting, its queue_size; "
                    f"wait for jobs to finish, add workers, or raise queue_size",
                    max_queued=self.settings.queue_size,
                )
            self.counters.submitted += 1
            if core.idle and not self.incoming and _may_drive() and self._send_now(job):
                return
            self.incoming.append(job)
            self._wake()

    def _send_now(self, job: Job) -> bool:
        """Write ``job`` to an idle worker from the submitting thread (lock held), whoever holds
        the state: the job starts without waiting for the supervisor thread. ``False``: it
        could not; queue it.

        The worker taken from the idle list is this thread's until the write is done (see
        ``Jobs.submit``); what needs the state (the head's timers, a write that failed, the rest
        of a frame its socket could not take) goes to the supervisor as commands."""
        core = self.core
        if self._stopped or core.idle[-1].io.link.outbox:
            return False
        worker = core.submit(job)
        if worker is None:
            return False
        channel = worker.io
        started = worker.job_started
        future = job.future
        # All before the write: the reply can come, and be handled, before send returns.
        future.worker_pid = worker.pid
        future.queue_wait = wait = started - job.submitted_at
        future._pickup = (self, job)  # (its outcome lets go of it)
        if future.on_start is not None:
            self._on_start(future, job)
        try:
            sent = channel.sock.send(job.frame, socket.MSG_DONTWAIT)
        except BlockingIOError:  # its socket is full: the frame waits in its outbox
            sent = 0
        except OSError:  # it has gone: the job never reached it, and is queued
            future._pickup = future.worker_pid = future.queue_wait = None
            core.unsubmit(worker, job)  # no outcome can have come: nothing reached it
            self.commands.append(lambda: self.core.write_failed(worker, ()))
            self._wake()
            return False
        if sent < len(job.frame):  # the rest when its socket has room, never waiting here
            channel.link.outbox += job.frame[sent:]
            self.commands.append(functools.partial(self._watch, channel))
        worker.writing = False  # only now: the supervisor writes what is left in the outbox
        if job.timeout is not None or self.settings.max_memory is not None:
            self.commands.append(lambda: self.core.arm(worker, job, started))
        if wait > WAIT_WARNING:  # (the counters are the state's)
            self.commands.append(self.core.count_wait)
        if self.commands:
            self._wake()
        return True

    def has_idle_worker(self) -> bool:
        """A worker is idle and nothing is queued (read without the lock: a hint)."""
        return bool(self.core.idle) and not self.incoming and not self.core.queue

    def request(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the supervisor thread."""
        self._hand_over(command)

    def close(self, wait: bool, timeout: float | None) -> None:
        """Stop taking jobs and wind down (see ``Pool.shutdown``)."""
        with self.lock:
            self.accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        self.request(lambda: self.core.close(wait, deadline))

    def join(self, timeout: float | None) -> bool:
        """Wait for the supervisor thread to end, and for the processes of abandoned starts
        that are being killed to be reaped (if this thread may wait)."""
        if not self.may_wait_here():
            return not self._thread.is_alive()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return self._starter.wait_discarded(left)

    def may_wait_here(self) -> bool:
        """Whether this thread may wait for jobs to end: not one the supervisor would wait for
        (itself, or one that holds the state lock: a done-callback, or a signal handler, run
        while that thread handles a reply; nor a signal handler run while it holds ``lock``)."""
        me = threading.current_thread()
        if me is self._thread or self._owner == me.ident:
            return False
        return not self.lock._is_owned()  # type: ignore[attr-defined]  # (what Condition uses)

    def snapshot(self) -> PoolStatistics:
        workers = []
        now = time.monotonic()
        for channel in list(self._workers.values()):
            worker = channel.worker
            if worker is None:
                continue
            job = worker.job
            workers.append(
                WorkerStatistics(
                    pid=worker.pid,
                    state=worker.state,
                    job_id=None if job is None else job.id,
                    job_label=None if job is None else job.label,
                    # (a job that started since ``now``: 0)
                    running_for=None if job is None else max(0.0, now - worker.job_started),
                    rss=rss(channel.ps),
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
            queued=len(self.core.queue) + len(self.incoming) + self.core.waiting,
            running=sum(1 for w in workers if w.job_id is not None),
        )

    def kill_job(self, job_id: int) -> None:
        """Kill the worker running job ``job_id``; take the job back if it waits in a worker."""
        self.request(lambda: self.core.kill_job(job_id))

    def pick_up(self, job: Job, deadline: float | None) -> None:
        """Wait for ``job``'s reply on the calling thread, reading its worker's socket here.

        ``submit`` wrote the job to an idle worker itself; a caller now waiting for its outcome
        takes that worker's socket from the selector, reads it (waiting without the lock), and
        hands what it read to the core under ``state_lock``, as the supervisor thread would. The
        supervisor thread sleeps on: one thread hand-off less per job. Its timers still run: a
        timeout or a memory kill ends the worker, and so the wait (``_on_exit`` leaves the rest
        of the death to this caller). Returns when the job is over, at ``deadline``
        (``time.monotonic()``), or at once if the job is not its worker's head any more or
        another thread reads.
        """
        if self._owner == threading.get_ident() or not _may_drive():
            # A done-callback run while this thread handles replies cannot wait here; the main
            # thread waits for the supervisor thread to read the reply.
            return
        if not self._hold(deadline):
            return  # the state stayed busy past the caller's deadline
        try:
            worker = job.worker
            channel = None if worker is None else worker.io
            if (
                job.done
                or worker is None
                or worker.job is not job
                or channel is None
                or channel.picker
                or not channel.reading
                or channel.link.outbox
                or self._stopped
            ):
                return
            channel.picker = True
            self._unwatch(channel)
            try:
                # As the supervisor's own loop: the lock is let go only while waiting.
                while not job.done and channel.reading:
                    if deadline is not None and (wait := deadline - time.monotonic()) <= 0:
                        break
                    self._let_go()
                    try:
                        data = channel.receive(None if deadline is None else wait)
                    finally:
                        self._hold()
                    if data is not None:
                        queued = len(self.core.queue)
                        try:
                            self._on_data(channel, data)
                            self._execute()
                        except Exception as exc:  # a bug: the supervisor thread fails with it
                            with self.lock:
                                self.commands.append(functools.partial(_reraise, exc))
                            break
                        if len(self.core.queue) > queued:  # jobs a recall gave back
                            self._wake_if_needed()
            finally:
                self._stop_picking(channel)
        finally:
            self._let_go()

    def _stop_picking(self, channel: Channel) -> None:
        """The caller stops reading ``channel`` (state lock held): back to the supervisor."""
        channel.picker = False
        if channel.exited:
            self._on_exit(channel)  # what the supervisor left to the caller
            self._execute()
        else:
            self._watch(channel)
        self._wake_if_needed()

    def _wake_if_needed(self) -> None:
        """Wake the supervisor thread if what a caller handled (state lock held) left it work:
        it sleeps until something it watches happens, and would not see this."""
        # _sleeping cannot change while the state lock is held; a command queued meanwhile
        # by another thread comes with its own wake-up.
        if self._sleeping and not self._stopped and self._has_work_for_the_loop():
            with self.lock:
                self._wake()

    def _has_work_for_the_loop(self) -> bool:
        core = self.core
        return bool(
            self.commands
            or core.queue  # to dispatch
            or (core.waiting and core.idle)  # to recall
            or core.next_timer() < self._sleep_until  # a timer it must keep
            or core.finished  # the last worker is gone: it ends
        )

    def _run(self) -> None:
        self._hold()
        try:
            self.core.fleet.top_up()
            self._execute()
            while True:
                nearest = self.core.fire()  # may reap the last worker: check before waiting
                self._execute()
                if self.core.finished:
                    break
                with self.lock:
                    taking_in = bool(self.incoming or self.commands)
                    self._sleeping = not taking_in
                    self._sleep_until = nearest
                if taking_in:
                    self._take_in()
                    delay: float | None = 0
                else:
                    delay = None if nearest == math.inf else max(0.0, nearest - time.monotonic())
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
            for pgid in self.core.fleet.grace:
                kill_group(pgid, signal.SIGKILL)
            with self.lock:
                self.accepting = False
                self._stopped = True
                self._selector.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self.finished.set()
                late = list(self.commands)  # a start that finished meanwhile: its process goes
                self.commands.clear()
            for command in late:
                command()
            self.gate.close()
            self.core.actions.clear()
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
        self.core.take_in(jobs)
        for command in commands:
            command()
            self._execute()

    def _dispatch(self) -> None:
        core = self.core
        core.dispatch()
        self._execute()
        for _ in range(3):  # jobs taken back meanwhile (``Drain``) go to the idle workers
            if not (core.idle and core.queue):
                break
            core.dispatch()
            self._execute()

    def _abandon(self) -> None:
        """Last resort after a supervisor bug: kill every worker, fail every job."""
        with self.lock:
            self.accepting = False
            jobs = list(self.incoming)
            self.incoming.clear()
        core = self.core
        core.take_in(jobs)
        error = CorralError("the pool's supervisor failed; see the log for its traceback")
        core.fail_everything(error)
        actions = [a for a in core.actions if isinstance(a, Resolve | Signal)]
        core.actions.clear()
        for action in actions:
            if isinstance(action, Signal):
                kill_group(action.pid, action.signal)
            else:
                self._resolve(action)
        for channel in list(self._workers.values()):
            channel.process.join(1)
            if channel.picker:
                self._on_exit(channel)  # ends that caller's wait; it closes the socket after
            else:
                channel.sock.close()


def _reraise(exc: BaseException) -> None:
    raise exc


def _may_drive() -> bool:
    """Whether this thread may drive the pool's state (``_send_now``, ``pick_up``): not the
    main thread. Python runs signal handlers there, between any two lines, and one that raises
    (Ctrl-C's ``KeyboardInterrupt``) would leave the state, or the selector under it, halfway
    through a change. The main thread hands its jobs to the supervisor thread and waits."""
    return threading.current_thread() is not threading.main_thread()
