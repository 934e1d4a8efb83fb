"""Where jobs' output and log records leave the pool: the app's ``sys.stdout``, ``sys.stderr``
and loggers, on a thread of the outlet's own.

Writing to the app's streams and calling its log handlers can block (a pipe nobody reads, a slow
handler) or fail (a closed pipe: ``python app.py | head``). The thread that reads a worker's
messages (the supervisor, or a caller picking up its reply) only queues them here, so neither can
ever stall or break supervision. What waits here is bounded (``limit`` characters); past it, and
whatever the app's streams or handlers raise, output is dropped and counted
(``PoolStatistics.output_dropped``, ``logs_dropped``).

A job's output and log records come before its outcome: its future, once done, waits in
``result()``/``exception()`` (within its timeout) until what was queued before the outcome has
been handed on, unless the outlet is stalled (no progress for ``STALL`` seconds).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque

logger = logging.getLogger("corral.pool")

LIMIT = 8 << 20  # characters of output (and estimated sizes of log records) that may wait
STALL = 0.1  # seconds without progress after which the outlet is not waited for
_RECORD_SIZE = 256  # what a log record counts for, beyond the length of its message

_Item = tuple[str, str] | logging.LogRecord  # (stream name, text), or a record


class Outlet:
    """Hands output and log records to the app on a thread of its own (started when needed)."""

    def __init__(self, name: str, limit: int | None = None) -> None:
        self.name = name
        self.limit = LIMIT if limit is None else limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._items: deque[tuple[_Item, int]] = deque()
        self._size = 0  # of what waits in _items
        self.queued = 0  # items taken in so far
        self.handled = 0  # items handed on (or dropped by a failure) so far
        self.output_dropped = 0  # characters
        self.logs_dropped = 0  # records
        self._progress = time.monotonic()  # when the thread last finished an item
        self._thread: threading.Thread | None = None
        self._closing = False
        self._warned = False

    # -- the reading thread's side: never blocks beyond the lock ----------------------------------

    def output(
        self, stream: str, text: str, label: str | None = None, pid: int | None = None
    ) -> None:
        """Hand ``text`` to the app's ``stream``; ``label`` and ``pid`` say which job and worker
        wrote it (for whoever wraps this method to label output)."""
        self._put((stream, text), len(text))

    def log(self, record: logging.LogRecord) -> None:
        self._put(record, _RECORD_SIZE + len(str(record.msg)))

    def _put(self, item: _Item, size: int) -> None:
        with self._lock:
            if self._closing or self._size + size > self.limit:
                self._drop(item)
                return
            if not self._items:
                self._progress = time.monotonic()  # a stall counts from the first wait
            self._items.append((item, size))
            self._size += size
            self.queued += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"{self.name}-outlet", daemon=True
                )
                self._thread.start()
            else:
                self._changed.notify()

    def _drop(self, item: _Item) -> None:
        """Count ``item`` as lost (lock held)."""
        if isinstance(item, logging.LogRecord):
            self.logs_dropped += 1
        else:
            self.output_dropped += len(item[1])

    def mark(self) -> int | None:
        """What a job resolved now must wait for (``wait``): ``None`` if nothing waits here."""
        queued = self.queued
        return None if queued == self.handled else queued

    def close(self) -> None:
        """Take nothing more; the thread ends once it has handed on what waits."""
        with self._lock:
            self._closing = True
            self._changed.notify()

    # -- callers of result() ----------------------------------------------------------------------

    def wait(self, mark: int, deadline: float | None) -> None:
        """Until the items queued before ``mark`` are handed on, ``deadline`` passes
        (``time.monotonic()``), or the outlet makes no progress for ``STALL`` seconds."""
        with self._lock:
            while self.handled < mark:
                now = time.monotonic()
                pause = STALL - (now - self._progress)
                if deadline is not None:
                    pause = min(pause, deadline - now)
                if pause <= 0:
                    return
                self._changed.wait(pause)

    # -- the outlet's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._items:
                    if self._closing:
                        return
                    self._changed.wait()
                item, size = self._items.popleft()
            failure = _hand_on(item)
            with self._lock:
                if failure is not None:
                    self._drop(item)
                self._size -= size
                self.handled += 1
                self._progress = time.monotonic()
                self._changed.notify_all()
            if failure is not None and not self._warned:
                self._warned = True
                logger.warning(
                    "pool %r: jobs' output could not be handed to the app (%s: %s); what cannot "
                    "be is dropped and counted in statistics()",
                    self.name,
                    type(failure).__name__,
                    failure,
                )


def _hand_on(item: _Item) -> Exception | None:
    """Write or handle ``item``; what that raised, if it did."""
    try:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            stream = sys.stdout if item[0] == "stdout" else sys.stderr
            stream.write(item[1])
            stream.flush()
    except Exception as exc:
        return exc
    return None
