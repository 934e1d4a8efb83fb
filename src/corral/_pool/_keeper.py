"""Where worker processes come from, and what makes sure nothing they start outlives them.

The app starts one *fork server* per start method (and set of modules to preload), on first use:
a small interpreter it talks to over a private socket pair, so nothing listens for connections.
For each worker the app sends it a request (the worker's end of its channel and a status pipe
ride along as descriptors); the server forks a *keeper*, which forks the worker itself.

The keeper is the worker's parent and a child subreaper (``PR_SET_CHILD_SUBREAPER``): a process
the job starts stays below it even when its own parent exits (a double-forked daemon), or when it
leaves the worker's process group or session. The keeper:

- writes the worker's pid to the status pipe, then waits;
- when the worker has exited (a crash, a kill by the supervisor, a normal stop), kills every
  process left below it, reaps them, and only then writes the worker's exit status: the parent
  sees a worker as dead when nothing it started runs any more;
- when the app is gone (its end of a pipe closes, or its pid ends), kills the worker with
  SIGKILL, which works whatever the worker does (stopped, holding the GIL in C code, or replaced
  by ``os.execv``), then everything below it.

The server is a subreaper too, and kills everything below it when the app is gone. ``spawn``
workers come from a server of their own: the keeper's child executes a fresh interpreter.

This module runs in the server, in keepers, and first in an executed worker: standard library
only, and nothing at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any

PID = struct.Struct("!qq")  # keeper -> app: the worker's pid and its own, at once
STATUS = struct.Struct("!i")  # keeper -> app: its exit code (-N: killed by signal N), at its end
HEAD = struct.Struct("!II")  # app -> server: a request's length, and its number of descriptors
MAX_FDS = 16
UNKNOWN_STATUS = 255  # the keeper ended without saying how the worker did
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_CLEANUP_TIMEOUT = 5.0  # seconds to kill what is left below a process before giving up


# -- the fork server -------------------------------------------------------------------------------


def serve(sock_fd: int, alive_fd: int, app_pid: int, preload: list[str]) -> None:
    """The fork server's main loop (never returns)."""
    global _program_name
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _program_name = _name()
    _set_name(b"corral-server")
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if preload:  # a server that workers are forks of: what it imports, it imports for them
        from corral._pool import _worker

        _worker.RUNNING_IN_WORKER = True  # a task module's @scheduler then registers nothing
    for module in preload:
        with contextlib.suppress(BaseException):  # the worker imports it again, and reports
            importlib.import_module(module)
    sock = socket.socket(fileno=sock_fd)
    wake_r = _on_child_exit()
    watched = [alive_fd, *_pidfd(app_pid)]
    try:
        while True:
            ready = select.select([sock.fileno(), wake_r, *watched], [], [])[0]
            _drain(wake_r)
            reap()
            if any(fd in ready for fd in watched):
                break
            if sock.fileno() in ready:
                request = _receive(sock)
                if request is None:
                    break  # the app closed its end
                _fork_keeper(*request, server_fds=[sock.fileno(), wake_r], watched=watched)
    finally:
        kill_descendants(wake_r)
        os._exit(0)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One request: its bytes and its descriptors; ``None`` at the end of the socket."""
    head, fds, _, _ = socket.recv_fds(sock, HEAD.size, MAX_FDS)
    while 0 < len(head) < HEAD.size:
        more = sock.recv(HEAD.size - len(head))
        if not more:
            break
        head += more
    if len(head) < HEAD.size:
        _close(fds)
        return None
    size, _count = HEAD.unpack(head)
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            _close(fds)
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks), fds


def _fork_keeper(
    payload: bytes, fds: list[int], *, server_fds: list[int], watched: list[int]
) -> None:
    try:
        pid = os.fork()
    except OSError:
        _close(fds)  # the status pipe closes: the app sees the start fail
        return
    if pid == 0:
        code = 70
        try:
            _close(server_fds)
            _keep(payload, fds, watched)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _close(fds)


# -- the keeper ------------------------------------------------------------------------------------


def _keep(payload: bytes, fds: list[int], watched: list[int]) -> None:
    """Start the worker, watch it and the app, clean up after it (never returns)."""
    _set_name(b"corral-keeper")
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    wake_r = _on_child_exit()
    status_fd, *channel_fds = fds
    executes, prep, call = pickle.loads(payload)
    pipe = os.pipe() if executes else None
    worker = os.fork()
    if worker == 0:
        try:
            _set_name(_program_name)  # what the app's processes are called, not the keeper's
            _close([status_fd, wake_r, *watched])
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if pipe is not None:
                os.close(pipe[1])
                _execute(prep, channel_fds, pipe[0])
            _run(prep, call, channel_fds)
        finally:
            os._exit(1)
    _close(channel_fds)
    with contextlib.suppress(OSError):
        os.write(status_fd, PID.pack(worker, os.getpid()))
    if pipe is not None:
        os.close(pipe[0])
        with contextlib.suppress(OSError):  # it died before reading: its exit says so
            _write_all(pipe[1], pickle.dumps((prep, call, channel_fds)))
        os.close(pipe[1])
    status = _wait_for(worker, wake_r, watched)
    kill_descendants(wake_r)
    with contextlib.suppress(OSError):
        os.write(status_fd, STATUS.pack(status))
    os._exit(0)


def _wait_for(worker: int, wake_r: int, watched: list[int]) -> int:
    """The worker's exit code, once it has exited; kill it first if the app is gone. Children
    that end meanwhile (adopted ones) are reaped as they go."""
    while True:
        for pid, status in reap():
            if pid == worker:
                return os.waitstatus_to_exitcode(status)
        ready = select.select([wake_r, *watched], [], [])[0]
        _drain(wake_r)
        if any(fd in ready for fd in watched):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
            try:
                _, status = os.waitpid(worker, 0)
            except ChildProcessError:  # reaped above already
                return -signal.SIGKILL
            return os.waitstatus_to_exitcode(status)


# -- the worker, forked or executed ----------------------------------------------------------------


def _run(prep: dict[str, Any], call: bytes, channel_fds: list[int]) -> None:
    """In the worker: become the app's worker process and run its target (never returns)."""
    code = 1
    try:
        with contextlib.suppress(PermissionError):
            os.setsid()
        prepare(prep)
        target, args, kwargs = _rebuild(call, channel_fds)
        target(*args, **kwargs)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _execute(prep: dict[str, Any], channel_fds: list[int], read_fd: int) -> None:
    """In the keeper's child: become a fresh interpreter that reads its call from ``read_fd``."""
    code = 127
    try:
        os.setsid()
        for fd in (*channel_fds, read_fd):
            os.set_inheritable(fd, True)
        bootstrap = (
            f"import sys; sys.path[:] = {prep['sys_path']!r}; "
            f"from corral._pool._keeper import executed; executed({read_fd})"
        )
        argv = [prep["executable"], *prep["flags"], "-c", bootstrap]
        os.execve(prep["executable"], argv, prep["env"])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def executed(read_fd: int) -> None:
    """The first thing an executed worker runs (never returns)."""
    with os.fdopen(read_fd, "rb") as source:
        prep, call, channel_fds = pickle.load(source)
    _run(prep, call, channel_fds)


class Descriptor:
    """Stands in an argument for a connection whose descriptor travels on its own."""

    def __init__(self, index: int) -> None:
        self.index = index


def _rebuild(call: bytes, channel_fds: list[int]) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    from multiprocessing.connection import Connection

    target, args, kwargs = pickle.loads(call)
    args = tuple(
        Connection(channel_fds[arg.index]) if isinstance(arg, Descriptor) else arg for arg in args
    )
    return target, args, kwargs


def prepare(prep: dict[str, Any]) -> None:
    """What a worker takes from the app: its import path, arguments, directory and name."""
    sys.path[:] = prep["sys_path"]
    sys.argv[:] = prep["argv"]
    with contextlib.suppress(OSError):
        os.chdir(prep["cwd"])
    from multiprocessing import process

    current = process.current_process()
    current.name = prep["name"]
    current.authkey = prep["authkey"]


# -- processes below a process ---------------------------------------------------------------------


def reap() -> list[tuple[int, int]]:
    """Reap every child that has ended; return their pids and wait statuses."""
    return _reap()[0]


def _reap() -> tuple[list[tuple[int, int]], bool]:
    """``reap``, and whether a child is left (running, or stopped)."""
    found: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found, False
        if pid == 0:
            return found, True
        found.append((pid, status))


def children_map() -> dict[int, list[int]]:
    """Each process's children, from ``/proc`` (empty where there is no ``/proc``)."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return children
    for name in names:
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
        except OSError:
            continue
        try:
            data = os.read(fd, 512)
        except OSError:
            continue
        finally:
            os.close(fd)
        fields = data.rpartition(b")")[2].split(None, 2)
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``root`` (its children, theirs, and so on)."""
    if children is None:
        children = children_map()
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def kill_descendants(wake_r: int) -> None:
    """SIGKILL everything below this process (a subreaper) until nothing is left: what a dying
    process starts, or leaves behind, comes here and is found by the next round. Children are
    reaped as they go."""
    me = os.getpid()
    deadline = time.monotonic() + _CLEANUP_TIMEOUT
    while True:
        if not _reap()[1]:
            return  # no child, so nothing below: an orphan below a subreaper becomes its child
        left = descendants(me)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        select.select([wake_r], [], [], 0.01)  # until a child ends (or a moment passes)
        _drain(wake_r)


# -- small things ----------------------------------------------------------------------------------


def _on_child_exit() -> int:
    """A pipe that becomes readable when a child ends (SIGCHLD); return its read end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, _ignore)
    signal.set_wakeup_fd(wake_w)
    return wake_r


def _ignore(signum: int, frame: Any) -> None:
    pass


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 4096):
            pass


def _pidfd(pid: int) -> list[int]:
    """A descriptor that becomes readable when ``pid`` ends, where the system has them."""
    try:
        return [os.pidfd_open(pid)]
    except (AttributeError, OSError):
        if not _exists(pid):
            os._exit(0)  # the app is gone already
        return []


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _close(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_libc: Any = None


def _prctl(option: int, value: int | bytes) -> None:
    """``prctl(2)`` where there is one (Linux); nothing elsewhere."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.prctl  # noqa: B018 - present on Linux only
        except (ImportError, OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.prctl(option, value, 0, 0, 0)


def _set_name(name: bytes) -> None:
    if name:
        _prctl(_PR_SET_NAME, name)


def _name() -> bytes:
    try:
        with open("/proc/self/comm", "rb") as comm:
            return comm.read().strip()
    except OSError:
        return b""


_program_name = b""
