"""Calls handed to the scheduler's event loop from other threads: outcomes, claims settled.

Jobs end on the pool's supervisor thread, claims are decided on the ledger's thread; what follows
(asyncz's events, the next run time's job, the task's instance released) belongs on the event
loop, where the scheduler and its listeners run. ``Delivery`` carries those calls over, and never
runs one on the thread that hands it over: a listener that blocks, raises or calls back into the
scheduler cannot stall or break the thread that found the outcome.

- While the loop runs, calls that arrive together run in one turn of it (one wake-up, however
  many calls).
- A synchronous ``shutdown(wait=True)`` called on the loop's own thread keeps that loop from
  running until it returns: that thread runs the calls itself while it waits (``serve``), as the
  loop would. It holds asyncz's locks (re-entrant): a listener that looks a task up runs there.
- With no loop, or one that is closed, a thread of this delivery runs them, while there are any.

Calls run one at a time, in the order they were handed over, each taken from the queue just
before it runs: one that raises is logged and the next runs; one that shuts down (and serves)
from inside a call finds the rest still queued. None runs twice, none is lost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("corral.executor")

_Call = tuple[Callable[..., object], tuple[Any, ...]]

_of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Delivery] = (
    weakref.WeakKeyDictionary()
)
_of_loop_lock = threading.Lock()


class Delivery:
    """Runs calls handed over from any thread on the event loop's thread (see the module)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # (weak: a loop keeps no delivery alive, nor a delivery its loop)
        self._loop = None if loop is None else weakref.ref(loop)
        self._calls: collections.deque[_Call] = collections.deque()
        self._lock = threading.Lock()  # guards the flags below
        self._more = threading.Condition(self._lock)  # for a serving thread
        self._scheduled = False  # a turn of the loop will run the calls
        self._servers = 0  # threads in ``serve``
        self._helper = False  # a thread of its own runs them
        # Held by whoever runs calls: one at a time, whichever thread (re-entrant: a call may
        # serve, as a shutdown called from a listener does).
        self._running = threading.RLock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return None if self._loop is None else self._loop()

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop | None) -> Delivery:
        """The delivery to ``loop`` (one per loop: a thread serving it runs every call made for
        that loop); ``None``: a delivery of its own, on a thread of its own."""
        if loop is None:
            return cls(None)
        with _of_loop_lock:
            delivery = _of_loop.get(loop)
            if delivery is None:
                delivery = _of_loop[loop] = cls(loop)
            return delivery

    def call(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop's thread, after the calls handed over before."""
        with self._lock:
            self._calls.append((callback, args))
            if self._servers:
                self._more.notify()
                return
            if self._helper or (self._scheduled and _open(self.loop)):
                return  # what runs the calls takes this one too
        self._hand_on()

    def _hand_on(self) -> None:
        """Have the queued calls run: in a turn of the loop, or, with no open loop, on a thread
        of the delivery's own; unless one of them, or a serving thread, will already. (A turn
        asked for before the loop closed never comes.)"""
        with self._lock:
            loop = self.loop
            open_ = _open(loop)
            if self._servers or self._helper or not self._calls or (self._scheduled and open_):
                return
            self._scheduled, self._helper = open_, not open_
        if loop is not None and open_:
            try:
                loop.call_soon_threadsafe(self.run_calls)
            except RuntimeError:  # it closed in between: the helper's
                with self._lock:
                    self._scheduled = False
                self._hand_on()
            return
        threading.Thread(target=self._help, name="corral-delivery", daemon=True).start()

    def _next(self, *, helper: bool = False) -> _Call | None:
        try:
            return self._calls.popleft()  # (atomic: the lock only guards the flags)
        except IndexError:
            pass
        with self._lock:
            if self._calls:
                return self._calls.popleft()
            if helper:
                self._helper = False
            else:
                self._scheduled = False
            return None

    def run_calls(self) -> None:
        """Run what is queued (on the loop); what is handed over meanwhile runs too."""
        with self._running:
            try:
                while (call := self._next()) is not None:
                    _run(call)
            except BaseException:  # Ctrl-C in a call: the rest runs in the loop's next turn
                with self._lock:
                    self._scheduled = False
                self._hand_on()
                raise

    def _help(self) -> None:
        with self._running:
            while (call := self._next(helper=True)) is not None:
                _run(call)

    def serve(self, done: threading.Event) -> None:
        """Run the calls on this thread until ``done`` is set (it must be ``wake``'d then): a
        thread that blocks the loop while it waits delivers as the loop would."""
        with self._lock:
            self._servers += 1
        try:
            while not done.is_set():
                with self._running:
                    call = self._take()
                    if call is not None:
                        _run(call)
                        continue
                with self._lock:
                    if not self._calls and not done.is_set():
                        self._more.wait()
        finally:
            with self._lock:
                self._servers -= 1
            self._hand_on()  # what was handed over as it stopped

    def _take(self) -> _Call | None:
        try:
            return self._calls.popleft()
        except IndexError:
            return None

    def wake(self) -> None:
        """Wake the threads in ``serve`` (to look at their ``done``)."""
        with self._lock:
            self._more.notify_all()

    def run_if_stranded(self) -> None:
        """Run what is queued here if the loop does not run any more (it stopped, or closed,
        without a shutdown, and nobody serves): the drain of a shutdown calls this."""
        loop = self.loop
        if loop is None or self._servers or loop.is_running():
            return  # the loop, a serving thread or the helper runs them
        if loop.is_closed():  # a turn of it was asked for, and never comes: the helper's
            with self._lock:
                self._scheduled = False
            self._hand_on()
            return
        if not self._running.acquire(blocking=False):
            return  # another thread runs them
        try:
            while (call := self._take()) is not None:
                _run(call)
        finally:
            self._running.release()

    def on_loop_thread(self) -> bool:
        """Whether this thread runs the loop now (a call that blocks here blocks the loop)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is self.loop


def _open(loop: asyncio.AbstractEventLoop | None) -> bool:
    return loop is not None and not loop.is_closed()


def _run(call: _Call) -> None:
    callback, args = call
    try:
        callback(*args)
    except Exception:
        try:
            logger.exception("corral: %r failed; the calls after it go on", callback)
        except Exception:  # the logging itself failed (a broken filter): stderr, as logging does
            traceback.print_exc()
