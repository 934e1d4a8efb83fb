"""The jobs the benchmarks run, in a module of their own (as an app's tasks would be)."""

from __future__ import annotations

import os
import signal
import time


def noop() -> None:
    return None


def noop_arg(_: int) -> None:
    return None


def die() -> None:
    os._exit(1)


def started_at() -> float:
    return time.time()


def burn(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


async def burn_async(seconds: float) -> int:
    return burn(seconds)  # CPU-bound, never awaits: the worst case for an event loop


def ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
