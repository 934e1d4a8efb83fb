"""How a :class:`ProcessExecutor` shuts down: asyncz's contract, bounded by a timeout.

asyncz promises that ``shutdown()`` does not interrupt the runs already handed to an executor,
and that ``shutdown(wait=True)`` returns once they are over. corral keeps that promise, up to
``shutdown_timeout``:

1. The pool goes on taking jobs while the executor's runs drain: runs still waiting for a worker
   start when one frees up, and a run with several due run times goes on to the next. With a
   database, fires handed over whose claim is still in flight are waited for too, and run if
   won.
2. When none is left, or at the deadline, the pool shuts down. What still runs then is stopped
   (SIGTERM, ``kill_grace``, SIGKILL); what waits is cancelled, and so are the run times a run
   had not reached: each is reported as a ``JobCancelledError``.
3. The drain is over once every run has reported its last outcome. With a database, a run's
   last outcome is reported once it is recorded: that is waited for until the deadline, and
   while the database is away no longer than the run's lease surely holds.

With ``cancel_futures=True`` (asyncz's option), step 1 is left out: the pool shuts down at once,
cancelling what waits for a worker and giving what runs until the deadline.

A thread of its own does this, so that ``shutdown(wait=False)`` returns at once while the runs
finish, ``aclose()`` waits without blocking the event loop, and ``shutdown(wait=True)`` blocks as
asyncz's does. The first shutdown sets the deadline; ``kill_running()`` (the pool's
``shutdown(wait=False)``) stops everything at any point, and the drain then ends. The thread is
not a daemon: as with asyncz's pools, a program that ends right after ``shutdown(wait=False)``
still lets the runs finish (within the deadline) before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Protocol

_TICK = 0.1  # seconds between two looks for outcomes that no event loop will hand over


class Stoppable(Protocol):
    """What a drain stops: corral's ``Pool``, or the Dask executor's link to its cluster."""

    name: str

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None: ...


class Drain:
    """Counts an executor's runs in flight, and shuts its pool down once they are over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (counting a run takes it alone: no Python-level step)
        self._cond = threading.Condition(self._lock)
        self._runs = 0
        self._claims = 0
        self._thread: threading.Thread | None = None
        self._hurried = False  # everything is being stopped now: wait for nothing that lingers
        self._wakers: list[Callable[[], None]] = []
        self.finished = threading.Event()
        """Set once the pool has shut down and every run has reported its last outcome."""

    @property
    def started(self) -> bool:
        """Whether a shutdown has begun."""
        return self._thread is not None

    @property
    def runs(self) -> int:
        """Runs handed to the executor that have not reported their last outcome yet."""
        return self._runs

    def run_started(self) -> None:
        with self._lock:
            self._runs += 1

    def run_ended(self) -> None:
        with self._lock:
            self._runs -= 1
            if self._runs <= 0:
                self._cond.notify_all()

    def claim_sent(self) -> None:
        """Fires handed over are being claimed (with a database): until the pool shuts down,
        the drain waits for them as for runs."""
        with self._cond:
            self._claims += 1

    def claim_settled(self) -> None:
        with self._cond:
            self._claims -= 1
            if self._claims <= 0:
                self._cond.notify_all()

    def begin(
        self,
        pool: Stoppable,
        timeout: float | None,
        *,
        cancel_queued: bool,
        hand_over: Callable[[bool], None],
    ) -> None:
        """Start the drain, unless it has begun already (the first call sets the deadline).

        Args:
            pool: The executor's pool.
            timeout: Seconds the runs may take; ``None``: as long as they take.
            cancel_queued: Cancel what waits for a worker at once (``cancel_futures=True``).
            hand_over: Called on the drain's thread at each look while it waits, with whether
                the deadline has passed (or :meth:`hurry` was called): delivers outcomes that
                wait for an event loop that no longer runs, and gives up waiting for what
                cannot come in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run,
                args=(pool, deadline, cancel_queued, hand_over),
                name=f"{pool.name}-shutdown",
            )
        self._thread.start()

    def hurry(self) -> None:
        """Everything is being stopped now (``kill_running``): from now on the drain looks at
        what is left as it does past its deadline."""
        with self._cond:
            self._hurried = True
            self._cond.notify_all()

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once :attr:`finished` is set (at once if it is), on the thread
        that sets it."""
        with self._cond:
            if not self.finished.is_set():
                self._wakers.append(callback)
                return
        callback()

    async def wait(self) -> None:
        """Wait for :attr:`finished` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits
                loop.call_soon_threadsafe(done.set)

        if self.finished.is_set():
            return
        self.when_finished(wake)
        await done.wait()

    def _run(
        self,
        pool: Stoppable,
        deadline: float | None,
        cancel_queued: bool,
        hand_over: Callable[[bool], None],
    ) -> None:

        def tick() -> None:
            hand_over(self._hurried or (deadline is not None and time.monotonic() >= deadline))

        try:
            if not cancel_queued:
                self._wait_for_runs(deadline, tick, claims=True)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            pool.shutdown(wait=True, timeout=left)
            self._wait_for_runs(None, tick, claims=False)
        finally:
            with self._cond:
                self.finished.set()
                wakers, self._wakers = self._wakers, []
            for wake in wakers:
                wake()

    def _wait_for_runs(
        self, deadline: float | None, tick: Callable[[], None], *, claims: bool
    ) -> None:
        """Return when no run (and with ``claims``, no claim) is left, or at ``deadline``."""
        while True:
            with self._cond:
                if self._runs <= 0 and (not claims or self._claims <= 0):
                    return
                wait = _TICK if deadline is None else min(_TICK, deadline - time.monotonic())
                if wait <= 0:
                    return
                self._cond.wait(wait)
            tick()
