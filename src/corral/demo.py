"""A demo of what the supervisor handles: ``corral run corral.demo``.

Six tasks share a pool of two workers: CPU-heavy, blocking, async, one that hangs past its
timeout, one that crashes its worker, and one that grows past the memory limit. The live view
shows each outcome, the workers being replaced, and the app's event loop staying responsive.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time

from corral._config import SchedulerConfig
from corral._decorator import scheduler

scheduler_config = SchedulerConfig(
    enabled=True,
    workers=2,
    timeout=10,
    kill_grace=1,
    max_memory="300MiB",
    mistrigger_grace_time=None,
    shutdown_timeout=5,
)


@scheduler(name="cpu-heavy", trigger="interval", seconds=3)
def count_primes(limit: int = 60_000) -> int:
    """Burns a CPU core for about a second, in a worker."""
    return sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))


@scheduler(name="blocking", trigger="interval", seconds=4)
def blocking_io(seconds: float = 1.5) -> str:
    """A blocking call (a slow API, a file copy) that would stall an event loop."""
    time.sleep(seconds)
    return f"slept {seconds}s in process {os.getpid()}"


@scheduler(name="async", trigger="interval", seconds=2)
async def async_io() -> str:
    """An ``async def`` task, awaited in the worker's own event loop."""
    await asyncio.sleep(0.5)
    return "awaited"


@scheduler(name="hangs", trigger="interval", seconds=6, timeout=2)
def hangs_forever() -> None:
    """Never returns: stopped at its 2 s timeout, and runs again at its next time."""
    while True:
        time.sleep(1)


@scheduler(name="crashes", trigger="interval", seconds=7)
def crashes() -> None:
    """A segmentation fault: the worker dies, the run fails alone, a new worker starts."""
    ctypes.string_at(0)


@scheduler(name="leaks", trigger="interval", seconds=9)
def leaks_memory(step_mb: int = 20) -> int:
    """Grows until the pool's 300 MiB limit stops it."""
    hoard = []
    while True:
        hoard.append(bytearray(step_mb * 1024 * 1024))
        time.sleep(0.05)
