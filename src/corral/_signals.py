"""While corral drains at shutdown, SIGINT or SIGTERM stops running jobs at once, under any server.

A server (uvicorn, hypercorn, gunicorn's workers) handles the first signal: it stops serving and
runs the app's lifespan shutdown, where corral lets running tasks finish. What a second signal
does then is the server's choice, and often nothing (uvicorn waits for the lifespan to return).
So for as long as corral drains, it adds a handler of its own for both signals: it has ``stop``
called on the event loop, then calls the handler that was there before, so the server still sees
every signal. Handlers a server registered with ``loop.add_signal_handler`` run as before: the
loop learns of a signal through its wake-up descriptor, whatever the Python-level handler is.

Python's default SIGINT handler (``KeyboardInterrupt``) is not called: raised in the middle of
the drain it would leave the workers behind instead of stopping them. A signal set to be ignored
stays ignored, but for SIGINT in a process that ``multiprocessing`` started: hypercorn's workers
are such processes, and ignore SIGINT so that a terminal's Ctrl-C reaches only the server's
parent process, which then shuts its workers down; the second Ctrl-C, which that parent takes
no further, is corral's (and only corral's: the signal stays ignored otherwise). Only the main
thread can set handlers; elsewhere nothing is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_call(stop: Callable[[], None]) -> Iterator[bool]:
    """Within the block, SIGINT and SIGTERM also call ``stop`` on the running event loop.

    Yields whether the handlers are in place. On the way out, each signal gets back the handler
    it had, unless something else replaced corral's meanwhile.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(stop)
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signum, frame)

    for sig in SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None:  # set outside Python
            continue
        if handler is signal.SIG_IGN and not _ignored_for_the_parent(sig):
            continue
        previous[sig] = signal.signal(sig, on_signal)
    try:
        yield bool(previous)
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is on_signal:
                signal.signal(signum, handler)


def _ignored_for_the_parent(sig: int) -> bool:
    """Whether ``sig``, ignored here, is ignored so that the parent process alone takes it: SIGINT
    in a process ``multiprocessing`` started, as a server's worker (hypercorn's)."""
    return sig == signal.SIGINT and multiprocessing.parent_process() is not None
