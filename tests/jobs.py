"""Job functions that tests send to worker processes (importable by reference)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("tests.jobs")


def add(a: int, b: int) -> int:
    return a + b


def noop() -> None:
    return None


def pid() -> int:
    return os.getpid()


def echo(value: Any) -> Any:
    return value


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def leave_a_thread_behind(seconds: float) -> int:
    """Return at once, leaving a thread of the event loop's default executor asleep: a worker
    asked to exit waits for it."""
    asyncio.get_running_loop().run_in_executor(None, time.sleep, seconds)
    return os.getpid()


def returns_coroutine(a: int) -> Any:
    return async_add(a, 1)


class JobFailure(Exception):
    pass


def fail(message: str) -> NoReturn:
    raise JobFailure(message)


def exit_with(code: int) -> NoReturn:
    sys.exit(code)


def hard_exit(code: int) -> NoReturn:
    os._exit(code)


def kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(30)


def segfault() -> None:
    ctypes.string_at(0)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def spin(seconds: float) -> int:
    """Busy CPU loop for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def ignore_sigterm_and_hang(ready_file: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready_file).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def spawn_child_and_hang(pid_file: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(str(child.pid))
    while True:
        time.sleep(0.05)


def write_pid_and_hang(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def write_pid_and_spin(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


def grow_memory(megabytes: int) -> int:
    chunks = []
    for _ in range(megabytes):
        chunks.append(bytearray(1024 * 1024))
        time.sleep(0.002)
    time.sleep(30)
    return len(chunks)


def log_and_print(message: str) -> str:
    log.warning("job says %s", message)
    print(f"stdout: {message}")
    print(f"stderr: {message}", file=sys.stderr)
    sys.stdout.write("partial line without newline")
    return message


def log_exception() -> None:
    try:
        raise ValueError("inside")
    except ValueError:
        log.exception("caught it")


def print_garbage() -> str:
    sys.stdout.write("\x00\xff" * 1000 + "\n")
    os.write(1, b"raw bytes on fd 1\n")
    return "ok"


def return_unpicklable() -> Any:
    return lambda: None


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = __import__("threading").Lock()


def raise_unpicklable() -> NoReturn:
    raise UnpicklableError()


class LocalOnly:
    """Pickles, but unpickling raises in whichever process loads it."""

    def __reduce__(self) -> Any:
        return (_refuse, ())


def _refuse() -> NoReturn:
    raise RuntimeError("this object refuses to be unpickled")


def return_unloadable() -> Any:
    return LocalOnly()


class BadUnpickleError(Exception):
    def __reduce__(self) -> Any:
        return (_refuse, ())


def raise_unloadable() -> NoReturn:
    raise BadUnpickleError("its class cannot be rebuilt in the parent")


def takes(value: Any) -> str:
    return type(value).__name__


def initializer_sets(value: str) -> None:
    os.environ["CORRAL_TEST_INIT"] = value


def read_init() -> str | None:
    return os.environ.get("CORRAL_TEST_INIT")


def failing_initializer() -> None:
    raise RuntimeError("initializer cannot connect")


# -- the crash matrix: a fault, acted out where a test places it ---------------------------------


def act(how: str) -> Any:
    """Fail in the way ``how`` names, in whichever process runs this."""
    if how == "exception":
        raise JobFailure("failed on purpose")
    if how == "sys.exit":
        sys.exit(5)
    if how == "os._exit":
        os._exit(5)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "hang":
        while True:
            time.sleep(0.05)
    raise AssertionError(f"unknown fault {how!r}")


class FaultOnLoad:
    """Pickles fine; acts out its fault when unpickled."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        return (act, (self.how,))


class FaultOnDump:
    """Acts out its fault when pickled."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> Any:
        act(self.how)
        raise AssertionError("unreachable")


def return_fault_on_dump(how: str) -> FaultOnDump:
    return FaultOnDump(how)


def return_fault_on_load(how: str) -> FaultOnLoad:
    return FaultOnLoad(how)


def open_descriptors() -> list[str]:
    """What this process has open: descriptor number and target."""
    found = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        with contextlib.suppress(OSError):
            found.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


def big_result(megabytes: int) -> bytes:
    return b"x" * (megabytes * 1024 * 1024)


def imported(module: str) -> bool:
    return module in sys.modules


def import_and_list_heavy(module: str) -> list[str]:
    """Import ``module`` here, then name the scheduler-side packages this process has loaded."""
    __import__(module)
    return [name for name in ("asyncz", "pydantic", "rich", "ravyn") if name in sys.modules]


def write_half_a_frame_and_hang() -> None:
    """Start a 1000-byte frame on the channel to the parent, write 10 bytes of it, then hang."""
    import struct

    for fd in _socket_fds():
        with contextlib.suppress(OSError):
            os.write(fd, struct.pack("!i", 1000) + b"x" * 10)
    while True:
        time.sleep(0.05)


def hold(fifo: str) -> int:
    """Block until the test writes to the named pipe ``fifo``; return this worker's pid."""
    with open(fifo) as gate:
        gate.read()
    return os.getpid()


def hold_then_exit(fifo: str) -> None:
    """Block until released through ``fifo``, then end the worker process."""
    hold(fifo)
    os._exit(7)


def leave_a_holder_of_the_socket_then_exit(fifo: str, pid_file: str) -> None:
    """Start a process in a session of its own (out of reach of the worker's process group)
    that keeps this worker's sockets open; block until released, then end the worker."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()"],
        pass_fds=_socket_fds(),
        start_new_session=True,
    )
    Path(pid_file).write_text(str(holder.pid))
    hold_then_exit(fifo)


def _socket_fds() -> list[int]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                found.append(int(fd))
    return found


def create(path: str) -> int:
    """Create the file ``path`` (proof that the job ran); return this worker's pid."""
    with open(path, "x"):
        pass
    return os.getpid()


def hold_then_log(fifo: str, message: str) -> str:
    """Block until released through ``fifo``, then log and print ``message``."""
    hold(fifo)
    return log_and_print(message)


def hold_then_print_lines(fifo: str, count: int) -> int:
    """Block until released through ``fifo``, then print ``count`` lines a millisecond apart
    (each one message to the parent, or a few together on a busy machine)."""
    hold(fifo)
    for number in range(count):
        print(f"line {number}", flush=True)
        time.sleep(0.001)
    return count
