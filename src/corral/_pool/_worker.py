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
import reprlib
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

from corral._exceptions import JobExitError, SerializationError
from corral._pool import _messages as msg
from corral._pool._gate import NO_LEASE, GateReader
from corral._pool._launch import load_parent_main
from corral._pool._refs import resolve

_ONE_WRITE = 1 << 14  # a bigger message is written after its header, not copied behind it
MAX_TEXT = 1 << 16
"""The most characters of one line of output, or of one text of a log record, sent to the parent;
the rest is cut, and a marker says how much."""


class _Channel:
    """The worker's end of the socket; sends from any thread of the job are serialised.

    Only the worker process itself writes to it: a process a job forks inherits the socket, but
    its frames would mix with the worker's (``forked``: it sends nothing, and its output and log
    records go to its own stdout and stderr).
    """

    def __init__(self, conn: Connection) -> None:
        self.fd = conn.fileno()  # worker_main keeps conn (and so the socket) for the process's life
        self.lock = threading.Lock()
        self.forked = False
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.forked = True
        self.lock = threading.Lock()  # another thread of the worker may have held it

    def send(self, message: bytes) -> None:
        """Send one frame (blocking until all of it is written)."""
        if self.forked:
            return
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
        self.jobs: deque[tuple[int, float, int, bytes]] = deque()
        self.busy = False
        self.fresh = False  # the jobs here came with the last read, made while idle
        self.stopping = False
        self.closed = False
        self.poller = select.poll()  # to see whether the socket holds anything (``_drain``)
        self.poller.register(self.fd, select.POLLIN)

    def next_job(self) -> tuple[int, float, int, bytes] | None:
        """The next job to run, waiting for one; ``None``: stop.

        A job that waited here while another ran starts only after what has come to the socket
        since is taken in: a recall that the supervisor wrote before it read this worker's last
        reply is always honoured (the supervisor counts on it to take such jobs back without
        waiting for the answer). Jobs taken in by the read that found them need no such check.
        """
        while True:
            with self.lock:
                if self.jobs and not self.fresh:
                    self._drain()
                if self.jobs:
                    self.busy = True
                    self.fresh = False
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
                # A read that filled its buffer may have left more behind (a recall among it).
                self.fresh = len(data) < msg.READ_SIZE

    def job_done(self) -> None:
        with self.lock:
            self.busy = False

    def poll(self) -> None:
        """Take in what arrived while a job runs (the watch thread)."""
        with self.lock:
            if self.busy:
                self._drain()

    def _drain(self) -> None:
        """Take in what the socket holds now, without waiting (lock held)."""
        while not self.closed and self.poller.poll(0):
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
                _, job_id, start_by, lease = msg.JOB_HEAD.unpack_from(frame)
                self.jobs.append((job_id, start_by, lease, frame[msg.JOB_HEAD.size :]))
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
            if self.channel.forked:
                _write_all(2, (self.format(record) + "\n").encode(errors="backslashreplace"))
            else:
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
    # Extra attributes can be anything; the parent must be able to unpickle what it receives,
    # and no text of a record is sent whole past MAX_TEXT.
    for key, value in fields.items():
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                fields[key] = cut(value)
        elif not isinstance(value, _PLAIN):
            fields[key] = cut(repr(value))
    return fields


def cut(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` up to ``limit`` characters, and a marker saying how many more it had."""
    if len(text) <= limit:
        return text
    return text[:limit] + _cut_marker(len(text) - limit)


def _cut_marker(count: int) -> str:
    return f"... [{count} more characters cut]"


class _ChannelWriter(io.TextIOBase):
    """Replaces ``sys.stdout``/``sys.stderr``: forwards whole lines to the parent.

    A line is kept in pieces until it ends (never copied again as it grows), and at most
    ``MAX_TEXT`` characters of it are kept: the rest is counted and replaced by a marker. Frames
    hold at most ``MAX_TEXT`` characters of whole lines (and a cut marker).
    """

    def __init__(self, channel: _Channel, name: str) -> None:
        self.channel = channel
        self.stream_name = name
        self.pending: list[str] = []  # the start of a line not ended yet
        self.size = 0  # characters in pending
        self.dropped = 0  # characters of that line past MAX_TEXT, not kept

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        count = len(text)
        if not count:
            return 0
        if self.size + count > MAX_TEXT:
            self._write_long(text)
            return count
        end = text.rfind("\n")
        if end < 0:
            self.pending.append(text)
            self.size += count
            return count
        lines = text[: end + 1]
        if self.pending:
            lines = "".join(self.pending) + lines
        self._send(lines)
        rest = text[end + 1 :]
        self.pending = [rest] if rest else []
        self.size = len(rest)
        return count

    def _write_long(self, text: str) -> None:
        """Linear in ``len(text)``, whatever it holds; each frame holds at most ``MAX_TEXT``
        characters (and a marker)."""
        position, end = 0, len(text)
        while position < end:
            if not self.size and not self.dropped:
                # At the start of a line: send the whole lines that fit in one frame.
                last = text.rfind("\n", position, position + MAX_TEXT)
                if last >= 0:
                    self._send(text[position : last + 1])
                    position = last + 1
                    continue
            newline = text.find("\n", position)
            stop = end if newline < 0 else newline
            keep = min(stop - position, MAX_TEXT - self.size)
            if keep > 0:
                self.pending.append(text[position : position + keep])
                self.size += keep
            self.dropped += stop - position - keep
            if newline < 0:
                return
            self._send_pending("\n")
            position = newline + 1

    def _send_pending(self, end: str) -> None:
        text = "".join(self.pending)
        if self.dropped:
            text += _cut_marker(self.dropped)
        self.pending, self.size, self.dropped = [], 0, 0
        self._send(text + end)

    def _send(self, text: str) -> None:
        if self.channel.forked:
            fd = 1 if self.stream_name == "stdout" else 2
            _write_all(fd, text.encode(errors="backslashreplace"))
        else:
            self.channel.send(msg.OUTPUT + pickle.dumps((self.stream_name, text)))

    def flush(self) -> None:
        if self.size or self.dropped:
            self._send_pending("")


RUNNING_IN_WORKER = False
"""True in a worker process: ``@scheduler`` then leaves functions as they are and does nothing."""


def worker_main(
    conn: Connection, options: msg.WorkerOptions, gate: Connection | None = None
) -> None:
    """Entry point of a worker process (``gate``: the pool's start gate, ``_gate``; without
    one, no job submitted under a lease starts)."""
    global RUNNING_IN_WORKER
    RUNNING_IN_WORKER = True
    with contextlib.suppress(PermissionError):  # already a group leader if its launcher made it one
        os.setsid()  # own process group: killed as one, and out of reach of the terminal's Ctrl-C
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lease = GateReader(None if gate is None else gate.fileno(), options.parent_pid)
    if gate is not None:
        gate.close()
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
        channel.send(msg.INIT_FAILED + _cut_middle(traceback.format_exc()).encode())
        _flush(streams)
        os._exit(3)
    channel.send(msg.READY)
    runner: asyncio.Runner | None = None
    replies = _Replies(options.max_result_size)
    kept = _Kept(streams)
    while (job := inbox.next_job()) is not None:
        job_id, start_by, term, body = job
        if time.monotonic() > start_by:  # never true for NaN (no deadline)
            reply = msg.ID_HEAD.pack(msg.MISSED, job_id)
        elif term != NO_LEASE and not lease.admits(term):
            reply = msg.ID_HEAD.pack(msg.LAPSED, job_id)
        else:
            reply, runner = _run_job(job_id, body, runner, main, replies)
        _flush(streams)
        if channel.forked:  # a process the job forked came back here: the jobs are not its
            os._exit(0)
        channel.send(reply)
        inbox.job_done()
        kept.restore()  # after the reply: the parent is not waiting for this
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


class _Kept:
    """What the worker puts back after each job, if the job changed it: ``sys.stdout`` and
    ``sys.stderr`` (so that the next job's output is not lost), the working directory and the
    umask. Each is compared first; a job that changed nothing costs about a microsecond, after
    its reply is sent (docs/tuning.md lists what is not put back)."""

    def __init__(self, streams: tuple[_ChannelWriter, _ChannelWriter]) -> None:
        self.stdout, self.stderr = streams
        self.cwd = os.getcwd()
        self.umask = os.umask(0o022)
        os.umask(self.umask)

    def restore(self) -> None:
        if sys.stdout is not self.stdout:
            sys.stdout = self.stdout
        if sys.stderr is not self.stderr:
            sys.stderr = self.stderr
        try:
            moved = os.getcwd() != self.cwd
        except OSError:  # the directory it left us in was removed
            moved = True
        if moved:
            with contextlib.suppress(OSError):
                os.chdir(self.cwd)
        os.umask(self.umask)  # the only way to read it sets it


class _TooBig(Exception):
    """The result being pickled passed ``max_result_size``."""


class _Replies:
    """Builds each job's ``RETURNED`` reply, pickling its value no further than
    ``max_result_size``: the pickler writes here, and a large ``bytes`` value is handed over as
    itself, so a value over the limit costs neither a full pickle nor a copy."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.parts: list[Any] = []
        self.size = 0
        self.pickler = self._pickler()

    def _pickler(self) -> pickle.Pickler:
        return pickle.Pickler(self, protocol=pickle.HIGHEST_PROTOCOL)

    def write(self, data: Any) -> int:
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        self.size += size
        if self.limit is not None and self.size > self.limit:
            raise _TooBig
        self.parts.append(data)
        return size

    def returned(self, job_id: int, value: Any) -> bytes:
        """The reply for ``value``; raises ``_TooBig``, or what pickling it raised."""
        if self.limit is None:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            return msg.ID_HEAD.pack(msg.RETURNED, job_id) + data
        self.parts = [msg.ID_HEAD.pack(msg.RETURNED, job_id)]
        self.size = 0
        try:
            self.pickler.dump(value)
            self.pickler.clear_memo()
            parts = self.parts
            return parts[0] + parts[1] if len(parts) == 2 else b"".join(parts)
        except BaseException:
            self.pickler = self._pickler()  # a fresh one: that one stopped halfway
            raise
        finally:
            self.parts = []


def _run_job(
    job_id: int,
    body: bytes,
    runner: asyncio.Runner | None,
    main: _MainLoader,
    replies: _Replies,
) -> tuple[bytes, asyncio.Runner | None]:
    """Run one job; return its reply (``RETURNED`` or ``RAISED``) and the asyncio runner."""
    reference: str | None = None
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
        return _raised(job_id, exc, reference, replies.limit), runner
    try:
        return replies.returned(job_id, value), runner
    except _TooBig:
        limit = replies.limit
        error = SerializationError(
            f"the job's result {_short_repr(value)} takes more bytes pickled than allowed, "
            f"over max_result_size={limit}; write large data to a file or a database "
            f"and return its location, or raise max_result_size",
            stage="result",
        )
    except BaseException as exc:
        error = SerializationError(
            f"the job's result {_short_repr(value)} could not be pickled: "
            f"{type(exc).__name__}: {_short_text(exc)}; return plain data (numbers, strings, "
            f"lists, dicts, dataclasses of them) instead",
            stage="result",
        )
    return _raised(job_id, error, reference, replies.limit), runner


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


def _raised(
    job_id: int,
    exc: BaseException,
    reference: str | None = None,
    max_size: int | None = None,
) -> bytes:
    text = _cut_middle("".join(traceback.format_exception(exc)))
    if not isinstance(exc, Exception):
        exc = _exit_error(job_id, exc, reference)
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # reported below as a RemoteError
        exc_bytes = None
    if exc_bytes is not None and max_size is not None and len(exc_bytes) > max_size:
        exc_bytes = None  # too big to send as itself: its type, message and traceback go
    details = pickle.dumps((exc_bytes, _type_name(exc), _short_text(exc, MAX_TEXT), text))
    return msg.ID_HEAD.pack(msg.RAISED, job_id) + details


def _cut_middle(text: str, limit: int = 4 * MAX_TEXT) -> str:
    """A traceback up to ``limit`` characters: its start, and its end (where the exception is)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + _cut_marker(len(text) - 2 * half) + "\n" + text[-half:]


def _exit_error(job_id: int, exc: BaseException, reference: str | None) -> JobExitError:
    """What the caller gets for a job's ``SystemExit``, ``KeyboardInterrupt`` or other exception
    that is not an ``Exception``: never the exception itself, which would end the caller."""
    code: int | str | None = None
    what = type(exc).__qualname__
    if isinstance(exc, SystemExit):
        raw = exc.code
        code = raw if raw is None or isinstance(raw, (int, str)) else _short_repr(raw)
        if isinstance(code, str):
            code = cut(code, 1000)
        what = f"SystemExit with exit code {code!r}"
    job = f"job {job_id}" + ("" if reference is None else f" ({reference})")
    return JobExitError(
        f"{job} raised {what}, which ends the job and nothing else (not its worker, not the "
        f"caller); return a value, or raise an Exception to report a failure",
        job_id=job_id,
        type_name=_type_name(exc),
        exit_code=code,
    )


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _short_text(exc: BaseException, limit: int = 1000) -> str:
    try:
        return cut(str(exc), limit)
    except BaseException:
        return "<str() of the exception failed>"


class _ShortRepr(reprlib.Repr):
    """``repr`` that never builds more than a few dozen characters of any part of a value:
    strings and bytes are sliced first, containers shown in part, and other objects by their
    type alone (their own ``repr`` could be of any size)."""

    _OWN_REPR = (
        int,
        float,
        complex,
        bool,
        type(None),
        type,
        FunctionType,
        BuiltinFunctionType,
        MethodType,
        ModuleType,
        range,
        slice,
    )

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = 60

    def repr_str(self, value: str, level: int) -> str:
        return self._sliced(value, "characters")

    def repr_bytes(self, value: bytes, level: int) -> str:
        return self._sliced(value, "bytes")

    def repr_bytearray(self, value: bytearray, level: int) -> str:
        return self._sliced(value, "bytes")

    def _sliced(self, value: str | bytes | bytearray, unit: str) -> str:
        if len(value) <= self.maxstring:
            return repr(value)
        return f"{value[:24]!r}... ({len(value)} {unit})"

    def repr_instance(self, value: object, level: int) -> str:
        cls = type(value)
        if isinstance(value, self._OWN_REPR):
            text = repr(value)
            return text if len(text) <= self.maxother else text[: self.maxother] + "..."
        return f"<{cls.__module__}.{cls.__qualname__} object>"


_short = _ShortRepr()


def _short_repr(value: object, limit: int = 80) -> str:
    try:
        text = _short.repr(value)
    except BaseException:
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _capture_output(channel: _Channel) -> tuple[_ChannelWriter, _ChannelWriter]:
    out, err = _ChannelWriter(channel, "stdout"), _ChannelWriter(channel, "stderr")
    sys.stdout, sys.stderr = out, err
    return out, err


def _flush(streams: tuple[_ChannelWriter, _ChannelWriter]) -> None:
    for stream in streams:
        if stream.size or stream.dropped:
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
