"""Job functions for the worker's tests (importable by reference in the workers)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
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


# -- processes a job leaves behind ----------------------------------------------------------------

SLEEPER = "import time; time.sleep(600)"

DAEMON = """
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _write_pid(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` at once (a reader never sees a part of it)."""
    Path(path + ".tmp").write_text(str(pid))
    os.rename(path + ".tmp", path)


def _hang() -> NoReturn:
    while True:
        time.sleep(0.05)


def start_session_child(pid_file: str) -> int:
    """Start a process in a session of its own (out of the worker's process group)."""
    child = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    _write_pid(pid_file, child.pid)
    return child.pid


def start_daemon(pid_file: str) -> None:
    """Start a daemon the classic way (fork, setsid, fork again): its parent exits at once, and
    it writes its pid to ``pid_file``."""
    subprocess.run([sys.executable, "-c", DAEMON, pid_file], check=True)


def start_session_child_and_daemon_and_hang(directory: str) -> NoReturn:
    start_session_child(os.path.join(directory, "session"))
    start_daemon(os.path.join(directory, "daemon"))
    _write_pid(os.path.join(directory, "worker"), os.getpid())
    _hang()


def start_session_child_and_return(pid_file: str) -> int:
    return start_session_child(pid_file)


def child_holding_memory(megabytes: int, pid_file: str) -> str:
    """Start a child that holds ``megabytes`` MiB for 30 s, and wait for it."""
    code = f"import time; data = b'x' * ({megabytes} << 20); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    _write_pid(pid_file, child.pid)
    child.wait()
    return "held"


def write_pid_and_hang(pid_file: str) -> NoReturn:
    _write_pid(pid_file, os.getpid())
    _hang()


def write_pid_and_hold_the_gil(pid_file: str) -> bool:
    """Hold the GIL for ages: catastrophic backtracking inside ``re`` (one call into C)."""
    _write_pid(pid_file, os.getpid())
    return re.match(r"(a+)+$", "a" * 64 + "b") is not None


def write_pid_and_exec(pid_file: str) -> None:
    """Replace this worker's program: nothing of the worker's own code runs any more."""
    _write_pid(pid_file, os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", SLEEPER + "  # executed by a job"])
