"""The worker process: run its jobs one at a time, in order, and report exactly one reply per job.

The worker imports only the standard library and this package's pool modules; a job's own imports
are its business. It leads its own process group so that the supervisor can kill it together with
any child processes a job starts, and it kills that group itself if its parent disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import io
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from corral._exceptions import SerializationError
from corral._pool import _messages as msg
from corral._pool._launch import load_parent_main
from corral._pool._refs import resolve

_ONE_WRITE = 1 << 14  # a bigger message is written after its header, not copied behind it


class _Channel:
    """The worker's end of the socket; sends from any thread of the job are serialised."""

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()  # worker_main keeps conn (and so the socket) for the process's life
        self.lock = threading.Lock()

    def send(self, message: bytes) -> None:
        """Send one frame (blocking until all of it is written)."""
        head = msg.header(len(message))
        with self.lock:
            if len(message) <= _ONE_WRITE:
                _write_all(self.fd, head + message)
            else:
                _write_all(self.fd, head)
                _write_all(self.fd, message)


def _write_all(fd: int, data: bytes) -> None:
    sent = os.write(fd, data)
    if sent < len(data):
        view = memoryview(data)[sent:]
        while view:
            view = view[os.write(fd, view) :]


class _Inbox:
    """What the supervisor sent and the worker has not started yet.

    The main thread reads the socket while it has nothing to run; while a job runs, the watch
    thread reads it every ``watch_interval`` (the ``busy`` flag, under the lock, decides which
    thread may read), so a recall of jobs waiting behind a long job is answered while it runs.
    """

    def __init__(self, conn: Connection, channel: _Channel) -> None:
        self.fd = conn.fileno()
        self.channel = channel
        self.lock = threading.Lock()
        self.received = bytearray()
        self.jobs: deque[tuple[int, float, bytes]] = deque()
        self.busy = False
        self.stopping = False
        self.closed = False

    def next_job(self) -> tuple[int, float, bytes] | None:
        """The next job to run, waiting for one; ``None``: stop."""
        while True:
            with self.lock:
                if self.jobs:
                    self.busy = True
                    return self.jobs.popleft()
                if self.stopping or self.closed:
                    return None
            try:
                # Wait in read() itself: a thread blocked reading a socket is woken sooner than
                # one waiting in poll() for it.
                data = os.read(self.fd, msg.READ_SIZE)  # only this thread reads while not busy
            except OSError:
                data = b""
            with self.lock:
                self._take_in(data)

    def job_done(self) -> None:
        with self.lock:
            self.busy = False

    def poll(self) -> None:
        """Take in what arrived while a job runs (the watch thread)."""
        with self.lock:
            while self.busy and not self.closed and select.select([self.fd], [], [], 0)[0]:
                try:
                    data = os.read(self.fd, msg.READ_SIZE)
                except OSError:
                    data = b""
                self._take_in(data)

    def _take_in(self, data: bytes) -> None:
        if not data:
            self.closed = True
            return
        for frame in msg.frames(self.received, data):
            tag = frame[:1]
            if tag == msg.JOB:
                _, job_id, start_by = msg.JOB_HEAD.unpack_from(frame)
                self.jobs.append((job_id, start_by, frame[msg.JOB_HEAD.size :]))
            elif tag == msg.RECALL:
                wanted = set(pickle.loads(frame[1:]))
                given = [job[0] for job in self.jobs if job[0] in wanted]
                self.jobs = deque(job for job in self.jobs if job[0] not in wanted)
                self.channel.send(msg.RECALLED + pickle.dumps(given))
            elif tag == msg.STOP:
                self.stopping = True


class _ChannelHandler(logging.Handler):
    """Sends log records to the parent, where they are handled by the logger of the same name."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(msg.LOG + pickle.dumps(_portable_record(record)))
        except Exception:
            self.handleError(record)


_PLAIN = (str, int, float, bool, type(None))


def _portable_record(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(record.__dict__)
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info:
        fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
    fields["exc_info"] = None
    # Extra attributes can be anything; the parent must be able to unpickle what it receives.
    for key, value in fields.items():
        if not isinstance(value, _PLAIN):
            fields[key] = repr(value)
    return fields


class _ChannelWriter(io.TextIOBase):
    """Replaces ``sys.stdout``/``sys.stderr``: forwards whole lines to the parent."""

    def __init__(self, channel: _Channel, name: str) -> None:
        self.channel = channel
        self.stream_name = name
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            head, _, self.pending = self.pending.rpartition("\n")
            self.channel.send(msg.OUTPUT + pickle.dumps((self.stream_name, head + "\n")))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            text, self.pending = self.pending, ""
            self.channel.send(msg.OUTPUT + pickle.dumps((self.stream_name, text)))


RUNNING_IN_WORKER = False
"""True in a worker process: ``@scheduler`` then leaves functions as they are and does nothing."""


def worker_main(conn: Connection, options: msg.WorkerOptions) -> None:
    """Entry point of a worker process."""
    global RUNNING_IN_WORKER
    RUNNING_IN_WORKER = True
    os.setsid()  # own process group: killed as one, and out of reach of the terminal's Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(conn)
    inbox = _Inbox(conn, channel)
    _watch(options.parent_pid, options.watch_interval, inbox)
    streams = _capture_output(channel)
    _capture_logging(channel, options.log_level)
    main = _MainLoader(options.main)
    try:
        for module in options.preload:
            if module == "__main__":
                main.load()
            else:
                importlib.import_module(module)
        if options.initializer is not None:
            if options.initializer.startswith("__main__:"):
                main.load()
            initargs = pickle.loads(options.initargs_bytes)
            resolve(options.initializer)(*initargs)
    except BaseException:
        channel.send(msg.INIT_FAILED + traceback.format_exc().encode())
        _flush(streams)
        os._exit(3)
    channel.send(msg.READY)
    runner: asyncio.Runner | None = None
    while (job := inbox.next_job()) is not None:
        job_id, start_by, body = job
        if time.monotonic() > start_by:  # never true for NaN (no deadline)
            reply = msg.ID_HEAD.pack(msg.MISSED, job_id)
        else:
            reply, runner = _run_job(job_id, body, runner, main, options.max_result_size)
        _flush(streams)
        channel.send(reply)
        inbox.job_done()
    _flush(streams)
    if runner is not None:
        runner.close()
    os._exit(0)


class _MainLoader:
    """Loads the parent's ``__main__`` once, the first time a job refers to it."""

    def __init__(self, main: tuple[str, str] | None) -> None:
        self.main = main
        self.loaded = main is None

    def load(self) -> None:
        if not self.loaded:
            self.loaded = True
            load_parent_main(self.main)


def _run_job(
    job_id: int,
    body: bytes,
    runner: asyncio.Runner | None,
    main: _MainLoader,
    max_result_size: int | None,
) -> tuple[bytes, asyncio.Runner | None]:
    """Run one job; return its reply (``RETURNED`` or ``RAISED``) and the asyncio runner."""
    try:
        if b"__main__" in body:
            main.load()  # before unpickling: the arguments may be instances of its classes
        try:
            reference, args, kwargs = pickle.loads(body)
        except Exception as exc:
            raise SerializationError(
                f"the worker could not unpickle the job's arguments: {type(exc).__name__}: {exc}; "
                f"pass arguments whose classes the worker can import",
                stage="arguments",
            ) from exc
        fn, is_async = _function(reference)
        if is_async:
            runner = runner or asyncio.Runner()
            value = runner.run(fn(*args, **kwargs))
        else:
            value = fn(*args, **kwargs)
            if value is not None and inspect.isawaitable(value):
                runner = runner or asyncio.Runner()
                value = runner.run(_await(value))
    except BaseException as exc:  # a job's SystemExit is its outcome, not ours
        return _raised(job_id, exc), runner
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        error = SerializationError(
            f"the job's result {_short_repr(value)} could not be pickled: "
            f"{type(exc).__name__}: {exc}; return plain data (numbers, strings, lists, dicts, "
            f"dataclasses of them) instead",
            stage="result",
        )
        return _raised(job_id, error), runner
    if max_result_size is not None and len(data) > max_result_size:
        error = SerializationError(
            f"the job's result {_short_repr(value)} is {len(data)} bytes pickled, over "
            f"max_result_size={max_result_size}; write large data to a file or a database "
            f"and return its location, or raise max_result_size",
            stage="result",
        )
        return _raised(job_id, error), runner
    return msg.ID_HEAD.pack(msg.RETURNED, job_id) + data, runner


_functions: dict[str, tuple[Callable[..., Any], bool]] = {}


def _function(reference: str) -> tuple[Callable[..., Any], bool]:
    """The function ``reference`` names, and whether it is ``async def`` (looked up once)."""
    found = _functions.get(reference)
    if found is None:
        fn = resolve(reference)
        found = _functions[reference] = (fn, inspect.iscoroutinefunction(fn))
    return found


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _raised(job_id: int, exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(exc))
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # reported below as a RemoteError
        exc_bytes = None
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    details = pickle.dumps((exc_bytes, _type_name(exc), message, text))
    return msg.ID_HEAD.pack(msg.RAISED, job_id) + details


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except BaseException:
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _capture_output(channel: _Channel) -> tuple[_ChannelWriter, _ChannelWriter]:
    out, err = _ChannelWriter(channel, "stdout"), _ChannelWriter(channel, "stderr")
    sys.stdout, sys.stderr = out, err
    return out, err


def _flush(streams: tuple[_ChannelWriter, _ChannelWriter]) -> None:
    for stream in streams:
        if stream.pending:
            with contextlib.suppress(Exception):  # the channel is gone; nothing left to tell
                stream.flush()


def _capture_logging(channel: _Channel, level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ChannelHandler(channel))
    root.setLevel(level)


def _watch(parent_pid: int, interval: float, inbox: _Inbox) -> None:
    """Every ``interval``: kill this worker's whole process group if the process that started it
    is gone, and take in what the supervisor sent while a job runs.

    ``os.getppid()`` changes when the parent dies (the worker is re-parented), which a thread
    notices even while the job keeps the main thread busy in a CPU loop.
    """
    original = os.getppid()

    def watch() -> None:
        event = threading.Event()
        while not event.wait(interval):
            if os.getppid() != original or not _alive(parent_pid):
                os.killpg(os.getpgid(0), signal.SIGKILL)
            inbox.poll()

    threading.Thread(target=watch, name="corral-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
