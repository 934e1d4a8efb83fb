"""Tasks for the shutdown tests (importable by reference in worker processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def wait_for(path: str) -> int:
    """Return this worker's pid once the file ``path`` exists: the test creates it when it
    lets every run waiting here go on at once."""
    gate = Path(path)
    while not gate.exists():
        time.sleep(0.01)
    return os.getpid()


def mark_then_wait_for(mark: str, path: str) -> str:
    """Create the file ``mark``, then return once the file ``path`` exists."""
    Path(mark).touch()
    gate = Path(path)
    while not gate.exists():
        time.sleep(0.01)
    return mark


def stuck() -> None:
    """Never return: only a timeout or a kill ends it."""
    while True:
        time.sleep(0.05)


def long_task() -> None:
    """A minute of work, announced on stdout with the worker's pid."""
    print(f"long task started in worker {os.getpid()}", flush=True)
    time.sleep(60)
