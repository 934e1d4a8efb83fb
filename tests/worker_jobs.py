"""Job functions for the worker's tests (importable by reference in the workers)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import resource
import signal
import sys
import time
from typing import Any, NoReturn

log = logging.getLogger("tests.worker_jobs")


# -- what a job may raise ------------------------------------------------------------------------


class Stop(BaseException):
    """An exception that is not an ``Exception``."""


def leave(how: str) -> NoReturn:
    """End the job with ``how``: ``exit:CODE``, ``exit-text``, ``exit-none``, ``interrupt``,
    ``generator-exit`` or ``base``."""
    if how.startswith("exit:"):
        sys.exit(int(how.split(":", 1)[1]))
    if how == "exit-text":
        sys.exit("cannot go on")
    if how == "exit-none":
        sys.exit()
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "generator-exit":
        raise GeneratorExit
    if how == "base":
        raise Stop("stopped")
    raise AssertionError(f"unknown way out {how!r}")


async def leave_async(how: str) -> NoReturn:
    await asyncio.sleep(0)
    leave(how)


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


# -- sizes -----------------------------------------------------------------------------------------


def big_bytes(megabytes: int) -> bytes:
    return b"x" * (megabytes << 20)


def peak_rss() -> int:
    """The most memory this process has held so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def log_long(characters: int) -> None:
    log.warning("%s", "y" * characters)


def print_long(characters: int) -> None:
    print("z" * characters)
    print("short line after")


def write_without_newlines(megabytes: int, piece: int) -> float:
    """Write ``megabytes`` MiB to stdout in pieces of ``piece`` characters, with no newline, then
    one newline; return the seconds it took."""
    text = "w" * piece
    count = (megabytes << 20) // piece
    started = time.perf_counter()
    write = sys.stdout.write
    for _ in range(count):
        write(text)
    write("\n")
    return time.perf_counter() - started


def many_short_lines(count: int) -> int:
    sys.stdout.write("line\n" * count)
    return count


# -- what a job leaves behind ---------------------------------------------------------------------


def state() -> dict[str, Any]:
    umask = os.umask(0)
    os.umask(umask)
    return {
        "cwd": os.getcwd(),
        "umask": umask,
        "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
        "stdout": type(sys.stdout).__name__,
        "stderr": type(sys.stderr).__name__,
        "pid": os.getpid(),
    }


def leave_state_behind(directory: str) -> int:
    """Change what the next job in this worker would find, and restore none of it."""
    sys.stdout = io.StringIO()
    sys.stderr = io.StringIO()
    os.chdir(directory)
    os.umask(0o077)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return os.getpid()


def remove_own_directory(directory: str) -> int:
    """Move into ``directory`` and remove it: the worker is left in a directory that is gone."""
    os.chdir(directory)
    os.rmdir(directory)
    return os.getpid()


def print_and_report(text: str) -> dict[str, Any]:
    print(text)
    print(text, file=sys.stderr)
    return state()
