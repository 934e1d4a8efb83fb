"""The condition of a job's future: what ``concurrent.futures.Future`` needs of
``threading.Condition``, in two slots.

A pool holds a future for every job queued (100,000 by default), and the cyclic garbage
collector visits each object they hold at every full collection. A ``threading.Condition`` is
nine such objects (its ``__dict__``, a deque of waiters, the lock's bound methods copied into
it); this one is two (itself and its lock), and makes its list of waiters only when a thread
waits. Through asyncz, with 20,000 runs due at once, this and a run's bound-method callbacks
took the collector's time from 2.7 s to 1.4 to 1.7 s (docs/benchmarks.md).
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import threading
from types import TracebackType
from typing import Any


class FutureCondition:
    """A condition variable over a reentrant lock (as ``threading.Condition()`` makes)."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock: Any = threading.RLock()
        self._waiters: collections.deque[Any] | None = None  # made by the first wait

    def __enter__(self) -> bool:
        return bool(self._lock.__enter__())

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._lock.__exit__(kind, error, traceback)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock (however many times this thread holds it) until notified or
        ``timeout`` passes, then take it back; whether it was notified."""
        if not self._lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = collections.deque()
        self._waiters.append(waiter)
        saved = self._lock._release_save()
        notified = False
        try:
            if timeout is None:
                notified = waiter.acquire()
            elif timeout > 0:
                notified = waiter.acquire(True, timeout)
            else:
                notified = waiter.acquire(False)
            return notified
        finally:
            self._lock._acquire_restore(saved)
            if not notified and self._waiters is not None:
                with contextlib.suppress(ValueError):  # notified as it timed out
                    self._waiters.remove(waiter)

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        return threading.Condition.wait_for(self, predicate, timeout)  # type: ignore[arg-type]

    def notify(self, n: int = 1) -> None:
        if not self._lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        waiters = self._waiters
        self.notify(len(waiters) if waiters else 0)
