"""The supervisor's I/O: carrying out the core's actions on sockets, processes and futures.

``Shell`` holds what the core's decisions act on: the selector over the workers' sockets and exit
sentinels, each worker's ``Channel``, the outlet for jobs' output and the starter threads. Its
methods run on whichever thread holds ``state_lock`` (the supervisor's, a submitter's or a caller
picking up a reply: see ``_supervisor``); none of them waits on anything.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from corral._pool import _launch
from corral._pool import _messages as msg
from corral._pool._actions import (
    Abandon,
    Action,
    Drain,
    Launch,
    Log,
    Measure,
    Output,
    Record,
    Resolve,
    Signal,
    Started,
    Write,
)
from corral._pool._channel import Channel
from corral._pool._core import Core
from corral._pool._gate import Gate
from corral._pool._outlet import Outlet
from corral._pool._settings import PoolSettings
from corral._pool._starter import Starter, kill_group
from corral._pool._state import Job

if TYPE_CHECKING:
    from corral._pool._supervisor import JobFuture

logger = logging.getLogger("corral.pool")

_WATCH_INTERVAL = 0.1  # how often a worker checks its parent, and reads while a job runs
_FRAME_SLACK = 1 << 20  # room in a reply frame beyond max_result_size (header, traceback)


class Shell:
    """The core (``core``), and the sockets, processes and futures its actions act on."""

    def __init__(self, settings: PoolSettings, context: _launch.Context, name: str) -> None:
        self.settings = settings
        self.context = context
        self.name = name
        # Re-entrant: a signal handler run on the main thread while it submits may call the pool.
        self.lock = threading.RLock()
        self.core = Core(settings, name, idle_lock=self.lock)  # submitters take idle workers
        # A fork server shared with pools that have started workers is no fresh one: a start
        # stuck on it is abandoned as soon as for those pools.
        self.core.starts.server_proven = context.server_proven()
        self.counters = self.core.counters
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
        self._workers: dict[int, Channel] = {}  # by pid
        limit = settings.max_result_size
        self._frame_limit = msg.NO_LIMIT if limit is None else int(limit) + _FRAME_SLACK
        self.outlet = Outlet(name)  # hands jobs' output and log records to the app
        options = msg.WorkerOptions(
            initializer=settings.initializer_reference,
            initargs_bytes=pickle.dumps(settings.initargs),
            log_level=logging.getLogger().getEffectiveLevel(),
            parent_pid=os.getpid(),
            watch_interval=_WATCH_INTERVAL,
            main=_launch.parent_main(),
            max_result_size=settings.max_result_size,  # type: ignore[arg-type]
            preload=settings.preload,
        )
        self.gate = Gate()  # the lease jobs submitted under one start by (``_gate``)
        self._starter = Starter(context, options, name, self._hand_over, self.gate)

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

    def _hand_over(self, command: Callable[[], None]) -> bool:
        """Queue ``command`` for the supervisor thread; ``False``: it has finished."""
        with self.lock:
            if self.finished.is_set():
                return False
            self.commands.append(command)
            self._wake()
        return True

    def _wake(self) -> None:
        """Wake the supervisor thread if it sleeps (lock held): an awake supervisor takes
        ``incoming`` and ``commands`` in before it next waits; a sleeping one gets one byte."""
        if self._sleeping and not self._wake_pending:
            self._wake_pending = True
            os.write(self._wake_w, b"\0")

    def _execute(self) -> None:
        """Carry out the core's actions, in order (those they lead to come after)."""
        actions = self.core.actions
        while actions:
            batch = actions.copy()
            actions.clear()
            for action in batch:
                self._do(action)

    def _do(self, action: Action) -> None:
        if isinstance(action, Write):
            channel = action.worker.io
            if not channel.write(action.data):
                self.core.write_failed(action.worker, action.jobs)
            elif channel.link.outbox:
                self._watch(channel)
        elif isinstance(action, Resolve):
            self._resolve(action)
        elif isinstance(action, Started):
            future = action.job.future
            future.worker_pid = action.worker.pid
            future.queue_wait = action.wait
            if future.on_start is not None:
                self._on_start(future, action.job)
        elif isinstance(action, Signal):
            kill_group(action.pid, action.signal)
        elif isinstance(action, Drain):
            self._drain(action.worker.io)
        elif isinstance(action, Output):
            self.outlet.output(action.stream, action.text, action.label, action.pid)
        elif isinstance(action, Record):
            self._record(action)
        elif isinstance(action, Launch):
            self._starter.start(action.token, self._launched, self._launch_failed)
        elif isinstance(action, Abandon):
            if action.restart:
                _launch.restart_server(self.context)
        elif isinstance(action, Measure):
            for worker in action.workers:
                self.core.measured(worker, _launch.job_memory(worker.io.process))
        elif isinstance(action, Log):
            record = logger.makeRecord(
                logger.name, action.level, __file__, 0, action.message, action.args, None
            )
            if logger.isEnabledFor(action.level):
                self.outlet.log(record)  # a slow handler must not stall supervision

    @staticmethod
    def _on_start(future: JobFuture[Any], job: Job) -> None:
        assert future.on_start is not None
        try:
            future.on_start(future)
        except Exception:
            logger.exception("on_start callback of job %d failed", job.id)

    def _resolve(self, action: Resolve) -> None:
        job, outcome = action.job, action.outcome
        future = job.future
        future._pickup = future._supervisor = None  # the future need not keep the job now
        mark = self.outlet.mark()
        if mark is not None:  # what its worker sent before its outcome goes first
            future._output = (self.outlet, mark)
        if outcome.error is None:
            future.set_result(outcome.value)
        else:
            future.set_exception(outcome.error)

    def _record(self, action: Record) -> None:
        record = logging.makeLogRecord(action.fields)
        record.corral_job_id = action.job_id
        record.corral_job_label = action.label
        record.corral_worker_pid = action.pid
        if logging.getLogger(record.name).isEnabledFor(record.levelno):
            self.outlet.log(record)  # handled on the outlet's thread: handlers may block

    def _launched(self, token: int, process: BaseProcess, sock: socket.socket) -> None:
        channel = Channel(process, sock, self._frame_limit)
        worker = self.core.launched(token, channel.pid)
        if worker is None:
            self._starter.discard_later(process, sock)  # abandoned meanwhile: it took too long
            return
        worker.io = channel
        channel.worker = worker
        self._workers[channel.pid] = channel
        channel.on_channel = functools.partial(self._on_channel, channel)
        self._watch(channel)
        self._selector.register(
            process.sentinel, selectors.EVENT_READ, functools.partial(self._on_exit, channel)
        )
        self._execute()

    def _launch_failed(self, token: int, cause: str) -> None:
        self.core.launch_failed(token, cause)
        self._execute()

    def _watch(self, channel: Channel) -> None:
        """Register ``channel``'s socket with the selector for reading, and for writing while its
        outbox holds anything; not while a caller reads it, nor after its end."""
        if channel.picker or not channel.reading or self._stopped:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.link.outbox else 0)
        if channel.watched:
            self._selector.modify(channel.fd, events, channel.on_channel)
        else:
            self._selector.register(channel.fd, events, channel.on_channel)
            channel.watched = True

    def _unwatch(self, channel: Channel) -> None:
        if channel.watched:
            self._selector.unregister(channel.fd)
            channel.watched = False

    def _on_channel(self, channel: Channel, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and channel.link.outbox:
            channel.flush()
            if not channel.link.outbox:
                self._watch(channel)
        if mask & selectors.EVENT_READ and not channel.picker:  # else that caller reads it
            self._on_readable(channel)
        self._execute()

    def _on_readable(self, channel: Channel) -> None:
        """Read what the worker's socket holds (one read, never waiting), then each whole frame.
        A frame a worker has only half written waits in its link: a worker stopped in the middle
        of a write can never stall supervision."""
        if channel.reading:
            data = channel.read()
            if data is not None:
                self._on_data(channel, data)

    def _on_data(self, channel: Channel, data: bytes) -> None:
        """Hand what was read from ``channel`` to the core: messages, or its end (``b""``)."""
        worker = channel.worker
        if not channel.reading or worker is None:
            return  # it broke the protocol: nothing more from it counts
        if not data:
            channel.reading = False
            self._unwatch(channel)
            return
        messages, error = channel.link.messages(data)
        self.core.received(worker, messages)
        if error is not None:
            channel.reading = False
            channel.link.inbox.clear()
            self._unwatch(channel)
            self.core.broken(worker, error)

    def _drain(self, channel: Channel) -> None:
        """Read what ``channel``'s worker sent; tell the core whether the jobs recalled from it
        can be taken back without its answer (see ``Drain``)."""
        worker = channel.worker
        if worker is None or channel.link.outbox or channel.picker or not channel.reading:
            return
        head = worker.job
        while channel.reading and channel.readable():
            self._on_readable(channel)
        if worker.job is head and channel.reading and not channel.link.inbox:
            self.core.steal(worker)

    def _on_exit(self, channel: Channel, mask: int = 0) -> None:
        if not channel.exited:
            channel.exited = True
            self._selector.unregister(channel.process.sentinel)
        worker = channel.worker
        if worker is not None:
            # First: no submitter takes it from now on (one that did has written to it, or
            # failed to: the job is queued again), even if what is left to read makes it idle.
            self.core.exiting(worker)
        if channel.picker:
            # A caller reads its socket, and may hold a reply it has not handled yet: that
            # caller finishes this when it stops. It may wait for an end that a process the
            # job started (holding the socket) keeps away: this ends its wait.
            channel.shut_reading()
            return
        while channel.reading and channel.readable():
            self._on_readable(channel)  # a reply sent just before the exit still counts
        channel.reading = False
        self._unwatch(channel)
        channel.sock.close()
        process = channel.process
        process.join(0)
        exitcode = process.exitcode
        if getattr(getattr(process, "_popen", None), "lost", False):
            exitcode = None  # its keeper died first: that code is not the worker's
        process.close()
        if channel.pid not in self.core.fleet.grace:
            kill_group(channel.pid, signal.SIGKILL)  # whatever the job left in its group
        self._workers.pop(channel.pid, None)
        if worker is not None and self.core.workers.get(worker.pid) is worker:
            self.core.exited(worker, exitcode)
            self._execute()
