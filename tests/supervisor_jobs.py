"""Job functions for the supervisor's tests (importable by reference in the workers)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import struct
import sys
from typing import Any, NoReturn

log = logging.getLogger("tests.supervisor_jobs")


def _raise_in_parent(name: str) -> NoReturn:
    raise {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[name]()


class RaisesOnLoad:
    """Pickles in the worker; unpickling it (in the parent) raises ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> Any:
        return (_raise_in_parent, (self.name,))


def return_raising_on_load(name: str) -> RaisesOnLoad:
    return RaisesOnLoad(name)


class LoadRaisingError(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __reduce__(self) -> Any:
        return (_raise_in_parent, (self.name,))


def raise_raising_on_load(name: str) -> NoReturn:
    raise LoadRaisingError(name)


def _channel() -> int:
    """The worker's end of its channel to the parent (its only socket)."""
    for fd in sorted(int(fd) for fd in os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return fd
    raise AssertionError("no channel")


def send_raw(data: bytes) -> str:
    """Write ``data`` onto the channel to the parent, as if it were a message, and return."""
    os.write(_channel(), data)
    return "sent"


def log_then_send_raw(data: bytes) -> str:
    log.warning("before the bad bytes")
    return send_raw(data)


def frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload


def _print_big(n: int) -> int:
    print(str(n) * 40_000, flush=True)  # one line, over 16 KiB
    return n


def _quiet() -> None:
    """In a forked child: its stdout and stderr (the app's) go nowhere, to keep tests' output
    readable. What it prints still goes through the streams it inherited from the worker."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def fork_and_print_big_lines(lines: int) -> str:
    """Fork a child that prints long lines while this worker prints too; wait for the child."""
    pid = os.fork()
    if pid == 0:
        try:
            _quiet()
            for n in range(lines):
                print(f"child {n} " + "c" * 40_000, flush=True)
                print(f"child err {n} " + "e" * 40_000, file=sys.stderr, flush=True)
                log.warning("child logs %d %s", n, "l" * 40_000)
        finally:
            os._exit(0)
    for n in range(lines):
        print(f"parent {n} " + "p" * 40_000, flush=True)
        log.warning("parent logs %d", n)
    os.waitpid(pid, 0)
    return "forked"


def fork_pool_printing_big_lines(count: int) -> list[int]:
    with multiprocessing.get_context("fork").Pool(2, initializer=_quiet) as pool:
        return pool.map(_print_big, range(count))


def mark_then_hold(marker: str, fifo: str) -> int:
    """Create ``marker``, then block until the test releases ``fifo`` (``jobs.hold``)."""
    with open(marker, "x"):
        pass
    with open(fifo) as gate:
        gate.read()
    return os.getpid()


def backtrack(length: int) -> bool:
    """Hold the GIL for a very long time: catastrophic backtracking inside ``re``."""
    return re.match(r"(a+)+$", "a" * length + "b") is not None


def print_lines(count: int, width: int) -> int:
    for n in range(count):
        print(str(n % 10) * width)
    return count


def log_records(count: int) -> int:
    for n in range(count):
        log.warning("record %d", n)
    return count


def payload(megabytes: int) -> bytes:
    return os.urandom(megabytes * 1024 * 1024)
