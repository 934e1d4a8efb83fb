"""The condition of a job's future: what ``concurrent.futures.Future`` needs of
``threading.Condition``, in one object.

A pool holds a future for every job queued (100,000 by default), and the cyclic garbage
collector visits each object they hold at every full collection. A ``threading.Condition`` is
nine such objects (its ``__dict__``, a deque of waiters, the lock's bound methods copied into
it); this one is one (a reentrant lock with a slot), and makes its list of waiters only when a
thread waits. Through asyncz, with 20,000 runs due at once, this and a run's bound-method callbacks
took the collector's time from 2.7 s to 1.4 to 1.7 s (docs/benchmarks.md).
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import threading
from typing import Any


class FutureCondition(_thread.RLock):  # type: ignore[misc]
    """A condition variable that is its own reentrant lock (as ``threading.Condition()`` is over
    an ``RLock``): entering and leaving it, which a future does at every step, are the lock's
    own C methods, and a job's future holds one object for it, not two."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: collections.deque[Any] | None = None  # made by the first wait

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock (however many times this thread holds it) until notified or
        ``timeout`` passes, then take it back; whether it was notified."""
        lock: Any = self  # (the C lock's private methods, as threading.Condition uses them)
        if not lock._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _thread.allocate_lock()
        waiter.acquire()
        if self._waiters is None:
            self._waiters = collections.deque()
        self._waiters.append(waiter)
        saved = lock._release_save()
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
            lock._acquire_restore(saved)
            if not notified and self._waiters is not None:
                with contextlib.suppress(ValueError):  # notified as it timed out
                    self._waiters.remove(waiter)

    def wait_for(self, predicate: Any, timeout: float | None = None) -> Any:
        return threading.Condition.wait_for(self, predicate, timeout)  # type: ignore[arg-type]

    def notify(self, n: int = 1) -> None:
        lock: Any = self
        if not lock._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        waiters = self._waiters
        while waiters and n > 0:
            waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        waiters = self._waiters
        self.notify(len(waiters) if waiters else 0)
