"""Task functions for the Dask executor's tests (importable by reference on Dask workers)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger("dask_tasks")


def where() -> int:
    return os.getpid()


async def async_where() -> int:
    await asyncio.sleep(0)
    return os.getpid()


class TaskFailure(Exception):
    pass


def fail() -> None:
    raise TaskFailure("task failed on purpose")


def exit_now() -> None:
    raise SystemExit(3)


def talk(word: str) -> str:
    """Logs a record and prints a line: both must reach the app."""
    logger.info("logged %s from pid %d", word, os.getpid())
    print(f"printed {word}")
    return word


def hang() -> None:
    while True:
        time.sleep(0.05)


def mark_and_block(path: str, seconds: float) -> float:
    """Append one line per start to ``path`` (so a second start shows), then block."""
    with open(path, "a") as marks:
        marks.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return seconds


def mark(path: str) -> int:
    Path(path).write_text(str(os.getpid()))
    return os.getpid()


def hog(megabytes: int) -> int:
    """Hold ``megabytes`` of written memory (so that it counts in the process's RSS)."""
    held = b"x" * (megabytes * 2**20)
    time.sleep(30)
    return len(held)


def memory_target() -> tuple[int, object]:
    """This worker's pid and its Dask memory target (corral's embedded cluster: ``False``)."""
    import dask

    return os.getpid(), dask.config.get("distributed.worker.memory.target")
