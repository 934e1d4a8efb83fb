"""What runs on a Dask worker for each corral run: :func:`run`.

A run travels as a call of :func:`run` with the task's function *reference* (``module:qualname``,
resolved here exactly as corral's own workers resolve it), its arguments, and a few facts about
the run (its Dask key, the app's topic, the app's log level, ``max_result_size``). It:

0. for a run claimed under the app's lease, reads that lease from the Dask scheduler, and does
   not start the run if it no longer holds (``_dask_lease``);
1. records its start on the Dask scheduler under its own key (task metadata, forgotten with the
   key). A start recorded already means that Dask is running it a second time: the worker that
   ran it died or was restarted, and the scheduler's ``allowed-failures`` let it try again. It
   then refuses, and says where it ran first;
2. tells the app that it started, on which worker and in which process (``Worker.log_event`` on
   the app's topic): the app arms the run's timeout and records the start;
3. runs the function (an ``async def`` in an event loop of this thread), sending the log records
   and the output lines of this thread to the app meanwhile, as events on the same topic;
4. returns its outcome as corral's own workers report it: the pickled value, or the exception
   (pickled if it can be) with its type, message and traceback text. Dask only carries it.

This module imports the standard library and corral's light modules only; ``distributed`` is
the worker's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pickle
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

from corral._exceptions import NotImportableError, SerializationError
from corral._pool import _worker as _pool_worker
from corral._pool._refs import resolve
from corral._pool._worker import _exit_error, _portable_record, _short_repr, _type_name

RETURNED = "returned"
RAISED = "raised"
REFUSED = "refused"
LAPSED = "lapsed"
LEASE_RECORD = "corral-lease"
"""Where an app's lease is recorded in the Dask scheduler's metadata (under its link's token)."""
START_RECORD = "corral-start"
"""Where a run's start is recorded in the Dask scheduler's metadata of its key."""
_OWN_LOGGERS = ("distributed", "tornado")  # Dask's own records are never a run's

_current = threading.local()  # .forwarder: the run this thread runs, if any
_install_lock = threading.Lock()
_installed = False
_functions: dict[str, tuple[Callable[..., Any], bool]] = {}


def run(
    reference: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: dict[str, Any]
) -> tuple[str, Any]:
    """Run one corral run on this Dask worker; return ``(tag, payload)``.

    ``(RETURNED, pickled value)``, ``(RAISED, (pickled exception or None, type name, message,
    traceback text))``, ``(REFUSED, {"first": where it started first, ...})`` or ``(LAPSED,
    {"held": the app's lease as read, ...})``.
    """
    from distributed import get_worker
    from distributed.utils import sync

    _pool_worker.RUNNING_IN_WORKER = True  # task modules imported here schedule nothing
    worker = get_worker()
    key = meta["key"]
    start = {"worker": str(worker.address), "pid": os.getpid(), "at": time.time()}
    lease = meta.get("lease")  # (the app's lease record, the term the run was claimed in)
    if lease is not None:
        held, first = sync(worker.loop, _before_start, worker, lease[0], key)
        if first is not None:  # it started before (Dask runs it again): not a lapse
            return REFUSED, {"first": first, **start}
        if not _holds(held, lease[1]):
            return LAPSED, {"held": held, **start}
    levels = dict(meta["levels"])
    forwarder = _Forwarder(worker, meta["topic"], key, levels)
    # Sent first, so that it travels while the start is recorded; the app ignores the start
    # event of a second start (its first is known).
    forwarder.send("start", **start)
    first = sync(worker.loop, _record_start, worker, key, start)
    if first is not None:
        return REFUSED, {"first": first, **start}
    _install(levels)
    _current.forwarder = forwarder
    try:
        value = _call(reference, args, kwargs, str(worker.address))
    except BaseException as exc:  # a run's SystemExit is its outcome, not the worker's
        return RAISED, exception_payload(exc, meta.get("id"), reference)
    finally:
        _current.forwarder = None
        forwarder.flush()
    return _returned(value, meta["max_result_size"])


def _holds(held: Any, term: int) -> bool:
    """Whether the app's lease as read (``{"term", "until"}``) covers a run claimed in
    ``term`` now, on this machine's clock."""
    if not isinstance(held, dict):
        return False
    return bool(held.get("term") == term and time.time() < float(held.get("until", 0)))


async def _before_start(worker: Any, lease_record: list[str], key: str) -> tuple[Any, Any]:
    """The app's lease, and the first start recorded under ``key`` if any (one round trip)."""
    held, recorded = await asyncio.gather(
        worker.scheduler.get_metadata(keys=lease_record, default=None),
        worker.scheduler.get_metadata(keys=[key, START_RECORD], default=None),
    )
    return held, _first(recorded)


def _first(recorded: Any, token: str | None = None) -> Any:
    """The earliest of the starts ``recorded`` (by token), leaving out ``token``'s own."""
    others = [s for t, s in (recorded or {}).items() if t != token and isinstance(s, dict)]
    return min(others, key=lambda s: s.get("at", 0)) if others else None


async def _record_start(worker: Any, key: str, start: dict[str, Any]) -> Any:
    """Record this start under ``key``; return a start recorded there by another, if any.

    Each start is recorded under a token of its own, and the starts recorded are read at the
    same time (one round trip): whichever the scheduler handles first, a start other than this
    one means that the run started before.
    """
    token = uuid.uuid4().hex
    recorded, _ = await asyncio.gather(
        worker.scheduler.get_metadata(keys=[key, START_RECORD], default=None),
        worker.scheduler.set_metadata(keys=[key, START_RECORD, token], value=start),
    )
    return _first(recorded, token)


def _call(reference: str, args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> Any:
    fn, is_async = _function(reference, where)
    if is_async:
        return _runner().run(fn(*args, **kwargs))
    value = fn(*args, **kwargs)
    if value is not None and inspect.isawaitable(value):
        value = _runner().run(_await(value))
    return value


def _function(reference: str, where: str) -> tuple[Callable[..., Any], bool]:
    found = _functions.get(reference)
    if found is None:
        try:
            fn = resolve(reference)
        except NotImportableError as exc:
            raise NotImportableError(
                f"on Dask worker {where}: {exc}. A task's module must be importable on every "
                f"Dask worker: install its package in the workers' environment (or put it on "
                f"their PYTHONPATH)"
            ) from None
        found = _functions[reference] = (fn, inspect.iscoroutinefunction(fn))
    return found


def _runner() -> asyncio.Runner:
    runner: asyncio.Runner | None = getattr(_current, "runner", None)
    if runner is None:
        runner = _current.runner = asyncio.Runner()
    return runner


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _returned(value: Any, max_result_size: int | None) -> tuple[str, Any]:
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        error = SerializationError(
            f"the run's result {_short_repr(value)} could not be pickled: "
            f"{type(exc).__name__}: {exc}; return plain data (numbers, strings, lists, dicts, "
            f"dataclasses of them) instead",
            stage="result",
        )
        return RAISED, exception_payload(error)
    if max_result_size is not None and len(data) > max_result_size:
        error = SerializationError(
            f"the run's result {_short_repr(value)} is {len(data)} bytes pickled, over "
            f"max_result_size={max_result_size}; write large data to a file or a database "
            f"and return its location, or raise max_result_size",
            stage="result",
        )
        return RAISED, exception_payload(error)
    return RETURNED, data


def exception_payload(
    exc: BaseException, run_id: int | None = None, reference: str | None = None
) -> tuple[bytes | None, str, str, str]:
    """``(pickled exception or None, type name, message, traceback text)``; a ``SystemExit``
    or other exception that is not an ``Exception`` travels as a ``JobExitError``, as from
    corral's own workers."""
    text = "".join(traceback.format_exception(exc))
    if not isinstance(exc, Exception):
        exc = _exit_error(run_id or 0, exc, reference)
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # rebuilt as a RemoteError in the app
        exc_bytes = None
    try:
        message = str(exc)
    except BaseException:
        message = "<str() of the exception failed>"
    return exc_bytes, _type_name(exc), message, text


# -- log records and output lines of a run, to the app -------------------------------------------


class _Forwarder:
    """One run's way to the app: events on the app's topic, through the Dask scheduler."""

    def __init__(self, worker: Any, topic: str, key: str, levels: dict[str, int]) -> None:
        self.worker = worker
        self.topic = topic
        self.key = key
        self.levels = levels
        self.pending = {"stdout": "", "stderr": ""}

    def wants(self, record: logging.LogRecord) -> bool:
        """Whether the app's logger of the record's name is enabled for its level."""
        name = record.name
        while name not in self.levels and name:
            name = name.rpartition(".")[0]
        return record.levelno >= self.levels.get(name, logging.WARNING)

    def send(self, op: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):  # the worker is closing: nobody is left to tell
            self.worker.log_event(self.topic, {"op": op, "key": self.key, **fields})

    def write(self, stream: str, text: str) -> None:
        head, newline, rest = (self.pending[stream] + text).rpartition("\n")
        self.pending[stream] = rest
        if newline:
            self.send("output", stream=stream, text=head + newline)

    def flush(self) -> None:
        for stream, text in self.pending.items():
            if text:
                self.pending[stream] = ""
                self.send("output", stream=stream, text=text)


class _ThreadStream:
    """``sys.stdout``/``sys.stderr`` of the worker process: what a thread running a corral run
    writes goes to the app, whole lines at a time; what other threads write goes where it went."""

    def __init__(self, original: Any, name: str) -> None:
        self._original = original
        self._name = name

    def write(self, text: str) -> int:
        forwarder: _Forwarder | None = getattr(_current, "forwarder", None)
        if forwarder is None:
            return int(self._original.write(text))
        forwarder.write(self._name, text)
        return len(text)

    def flush(self) -> None:
        if getattr(_current, "forwarder", None) is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class _RunLogHandler(logging.Handler):
    """On the worker's root logger: records of a thread running a corral run go to the app."""

    def emit(self, record: logging.LogRecord) -> None:
        forwarder: _Forwarder | None = getattr(_current, "forwarder", None)
        if forwarder is None:
            # What Python prints when a record finds no handler, as before this one was added.
            last = logging.lastResort
            alone = logging.getLogger().handlers == [self]
            if last is not None and record.levelno >= last.level and alone:
                last.handle(record)
            return
        if record.name.split(".")[0] in _OWN_LOGGERS or not forwarder.wants(record):
            return
        try:
            forwarder.send("log", record=_portable_record(record))
        except Exception:
            self.handleError(record)


def _install(levels: dict[str, int]) -> None:
    """Once per worker process: the thread-aware streams and log handler. And the levels the
    app set on its loggers (``""``: the root), where the worker set none (the root's is only
    lowered), so that a run's records at those levels are made at all."""
    global _installed
    with _install_lock:
        if not _installed:
            _installed = True
            sys.stdout = _ThreadStream(sys.stdout, "stdout")
            sys.stderr = _ThreadStream(sys.stderr, "stderr")
            logging.getLogger().addHandler(_RunLogHandler())
        for name, level in levels.items():
            target = logging.getLogger(name or None)
            takes_it = target.level == logging.NOTSET if name else target.level > level
            if takes_it:
                target.setLevel(level)
