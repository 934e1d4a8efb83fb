"""Logging under ``corral run``: every line in one format (``text`` or ``json``) with its time,
level, logger, event and task; what tasks log and print is labelled with the task.

A line of text is ``key=value`` fields, always ``time``, ``level``, ``logger``, ``event`` and
``task`` first; values are plain, and only the last field (``msg``, or an outcome's ``detail``)
may hold spaces. A traceback follows on lines indented by two spaces. JSON is one object a line.

Records from jobs carry ``corral_job_label`` (the task id) and ``corral_worker_pid``; what a
worker prints reaches the parent's ``sys.stdout``/``sys.stderr`` from the pool's supervisor,
where :class:`TaskStream` finds the job it came from and logs it as a record of its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime, tzinfo
from types import FrameType
from typing import Any, TextIO

from rich.console import Console

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")

# Functions in whose frames a line printed or logged comes from a known task: the pool's and the
# Dask link's handling of a worker's message (the worker or the job is a local), and asyncz's
# running of a task in this process (thread and asyncio executors: ``task`` is a local).
_SOURCES = {
    "_on_message": "corral._pool.",
    "_on_event": "corral._dask",
    "run_task": "asyncz.",
    "run_coroutine_task": "asyncz.",
}
_STACK_DEPTH = 64

# The executors' own reports of an outcome: ``corral run`` reports each outcome itself, once.
_OUTCOME_REPORTS = (
    "executed successfully",
    ") failed: ",
    "was missed",
    "raised an exception",
    "skipped: maximum",
    "skipped: Maximum",
)
_STARTS = ("Running task",)


def task_of_stack(frame: FrameType | None) -> tuple[str | None, int | None] | None:
    """The (task id, worker pid) a line written or logged from ``frame`` belongs to, if any."""
    depth = 0
    while frame is not None and depth < _STACK_DEPTH:
        prefix = _SOURCES.get(frame.f_code.co_name)
        if prefix is not None and str(frame.f_globals.get("__name__", "")).startswith(prefix):
            found = _task_in(frame.f_code.co_name, frame.f_locals)
            if found is not None:
                return found
        frame = frame.f_back
        depth += 1
    return None


def _task_in(name: str, local: dict[str, Any]) -> tuple[str | None, int | None] | None:
    if name == "_on_message":
        worker = local.get("worker")
        if worker is None:
            return None
        job = getattr(worker, "job", None)
        return getattr(job, "label", None), getattr(worker, "pid", None)
    if name == "_on_event":
        job = local.get("job")
        if job is None:
            return None
        future = getattr(job, "future", None)
        return getattr(job, "label", None), getattr(future, "worker_pid", None)
    task_id = getattr(local.get("task"), "id", None)
    return None if task_id is None else (str(task_id), None)


class _Label(logging.Filter):
    """Gives a record logged by a task in this process (thread, asyncio) its task's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "corral_job_label", None) is None:
            found = task_of_stack(sys._getframe(1))
            if found is not None:
                record.corral_job_label, pid = found
                if getattr(record, "corral_worker_pid", None) is None:
                    record.corral_worker_pid = pid
        return True


class _Once(logging.Filter):
    """Drops the executors' reports of outcomes (``corral run`` reports each one itself) and,
    under the live view, their "Running task" lines (its table of workers shows them); asyncz's
    scheduler's INFO lines (tasks added, started, paused) show at DEBUG only."""

    def __init__(self, live: bool, level: int) -> None:
        super().__init__()
        self.patterns = _OUTCOME_REPORTS + (_STARTS if live else ())
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("asyncz.executors", "asyncz.schedulers")):
            return True
        if record.name.startswith("asyncz.schedulers") and record.levelno <= logging.INFO:
            return self.level <= logging.DEBUG
        text = str(record.msg)
        return not any(pattern in text for pattern in self.patterns)


def _fields_of(record: logging.LogRecord, zone: tzinfo) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(record.created, zone).isoformat(timespec="milliseconds")
    fields: dict[str, Any] = {
        "time": stamp,
        "level": record.levelname,
        "logger": record.name,
        "event": getattr(record, "corral_event", None) or "log",
        "task": getattr(record, "corral_job_label", None),
    }
    pid = getattr(record, "corral_worker_pid", None)
    if pid is not None:
        fields["pid"] = pid
    return fields


class TextFormatter(logging.Formatter):
    """``time=... level=... logger=... event=... task=... [pid=...] msg=...``."""

    def __init__(self, zone: tzinfo) -> None:
        super().__init__()
        self.zone = zone

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields_of(record, self.zone)
        fields["task"] = fields["task"] or "-"
        own = getattr(record, "corral_fields", None)
        if own:
            fields.update(own)
        else:
            fields["msg"] = record.getMessage()
        text = " ".join(f"{key}={_plain(value)}" for key, value in fields.items())
        lines = text.split("\n")
        details = _details(self, record)
        if details:
            lines += details.rstrip("\n").split("\n")
        return "\n  ".join(lines)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the text format's fields, numbers as numbers."""

    def __init__(self, zone: tzinfo) -> None:
        super().__init__()
        self.zone = zone

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields_of(record, self.zone)
        fields["msg"] = record.getMessage()
        fields.update(getattr(record, "corral_fields", None) or {})
        details = _details(self, record)
        if details:
            fields["traceback"] = details.rstrip("\n")
        return json.dumps(fields, default=str, ensure_ascii=False)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _details(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """A record's traceback: a job's (``corral_traceback``), its exception's, or its stack."""
    text = getattr(record, "corral_traceback", None)
    if text:
        return str(text)
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    parts = [part for part in (record.exc_text, record.stack_info) if part]
    return "\n".join(parts)


class _ConsoleHandler(logging.Handler):
    """Prints formatted records through the live view's console, above the view."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


_writing = threading.local()
_Found = tuple[str | None, int | None]


class _Sent:
    """The task and worker of output a pool's worker sent, until it is written.

    The pool hands a job's output to the app's ``sys.stdout``/``sys.stderr`` from a thread of its
    own, as ``(stream, text)``, the job no longer known. :func:`label_pool_output` notes each
    text object as the thread reading the worker's message hands it over (the worker and its job
    are locals there); :class:`TaskStream` finds that very object when it is written.
    """

    LIMIT = 10_000  # texts noted and not written yet (output the pool dropped is never written)

    def __init__(self) -> None:
        self._texts: OrderedDict[int, tuple[str, _Found]] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, text: str, found: _Found) -> None:
        with self._lock:
            self._texts[id(text)] = (text, found)
            while len(self._texts) > self.LIMIT:
                self._texts.popitem(last=False)

    def take(self, text: str) -> _Found | None:
        with self._lock:
            entry = self._texts.get(id(text))
            if entry is None or entry[0] is not text:
                return None
            del self._texts[id(text)]
            return entry[1]


_sent = _Sent()


def label_pool_output(executors: Iterable[Any]) -> int:
    """Have the output of the pools of ``executors`` labelled with its task when written (see
    :class:`_Sent`); returns how many pools it could. Pools are left as they are otherwise."""
    count = 0
    for executor in executors:
        supervisor = getattr(getattr(executor, "pool", None), "_supervisor", None)
        outlet: Any = getattr(supervisor, "outlet", None)
        output = getattr(outlet, "output", None)
        if outlet is None or output is None or getattr(output, "corral_labels", False):
            continue

        def labelled(*args: Any, __output: Any = output, **kwargs: Any) -> Any:
            text = args[1] if len(args) > 1 else kwargs.get("text")
            with contextlib.suppress(Exception):  # never in the way of the pool's own work
                label = args[2] if len(args) > 2 else kwargs.get("label")
                pid = args[3] if len(args) > 3 else kwargs.get("pid")
                found = (label, pid) if label is not None else task_of_stack(sys._getframe(1))
                if found is not None and isinstance(text, str):
                    _sent.note(text, found)
            return __output(*args, **kwargs)

        labelled.corral_labels = True  # type: ignore[attr-defined]
        outlet.output = labelled
        count += 1
    return count


class TaskStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` under ``corral run``: each line written becomes a record
    of logger ``corral.stdout`` (INFO) or ``corral.stderr`` (WARNING), labelled with the task
    that printed it when it came from one."""

    def __init__(self, name: str, original: TextIO) -> None:
        self.stream_name = name
        self.original = original
        self.logger = logging.getLogger(f"corral.{name}")
        self.level = logging.INFO if name == "stdout" else logging.WARNING
        self._pending: dict[int, tuple[str, _Found | None]] = {}  # by thread: a line's start
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.original.isatty()

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if getattr(_writing, "busy", False):  # written while logging a line: straight through
            return self.original.write(text)
        found = _sent.take(text) or task_of_stack(sys._getframe(1))
        key = threading.get_ident()
        with self._lock:
            start, before = self._pending.pop(key, ("", None))
            head, newline, rest = (start + text).rpartition("\n")
            found = found or before
            if rest:
                self._pending[key] = rest, found
        if newline:
            self._log(head.split("\n"), found)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rest, found = self._pending.pop(threading.get_ident(), ("", None))
        if rest:
            self._log([rest], found)

    def _log(self, lines: list[str], found: _Found | None) -> None:
        task, pid = found or (None, None)
        extra = {"corral_event": "output", "corral_job_label": task, "corral_worker_pid": pid}
        _writing.busy = True
        try:
            for line in lines:
                self.logger.log(self.level, "%s", line, extra=extra)
        finally:
            _writing.busy = False


@contextlib.contextmanager
def configured(
    *, level: str, fmt: str, zone: tzinfo, console: Console | None, stdout: TextIO
) -> Iterator[None]:
    """Logging and output of ``corral run`` while it runs; as they were afterwards.

    The root logger gets one handler (it replaces those writing to the console) and ``level``;
    ``sys.stdout`` and ``sys.stderr`` become :class:`TaskStream` s. Lines go to ``stdout``, or
    above the live view through ``console``.
    """
    handler: logging.Handler = (
        logging.StreamHandler(stdout) if console is None else _ConsoleHandler(console)
    )
    handler.setFormatter(JsonFormatter(zone) if fmt == "json" else TextFormatter(zone))
    handler.addFilter(_Label())
    handler.addFilter(_Once(live=console is not None, level=logging.getLevelName(level)))
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    saved_streams = sys.stdout, sys.stderr
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    for old in saved_handlers:
        if isinstance(old, logging.StreamHandler) and id(old.stream) in consoles:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    sys.stdout = TaskStream("stdout", saved_streams[0])
    sys.stderr = TaskStream("stderr", saved_streams[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved_streams
        root.removeHandler(handler)
        for old in saved_handlers:
            if old not in root.handlers:
                root.addHandler(old)
        root.setLevel(saved_level)
