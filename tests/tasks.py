"""Task functions for scheduler tests (importable by reference in worker processes)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from pathlib import Path


def where() -> int:
    return os.getpid()


async def async_where() -> int:
    await asyncio.sleep(0)
    return os.getpid()


async def async_touch(path: str) -> str:
    await asyncio.sleep(0)
    Path(path).write_text("ran")
    return "async body ran"


def block(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def burn(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def hang() -> None:
    while True:
        time.sleep(0.05)


def crash() -> None:
    ctypes.string_at(0)


class TaskFailure(Exception):
    pass


def fail() -> None:
    raise TaskFailure("task failed on purpose")


class Cleaner:
    """A task that is a method: ``cleaner.run`` runs in a worker, on the worker's ``cleaner``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def run(self, n: int) -> str:
        return f"{self.prefix} {n} in {os.getpid()}"

    async def run_async(self) -> int:
        await asyncio.sleep(0)
        return os.getpid()


cleaner = Cleaner("cleaned")
