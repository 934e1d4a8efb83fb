"""Starting workers: light, private, and with nothing left behind.

Workers are not started by ``multiprocessing``'s own start methods, for three reasons:

- *Private.* Its forkserver listens on a Unix socket that any process of the same user can
  connect to and have it run code (no authentication before Python 3.14). corral's fork server
  (``_keeper.serve``) is reached over a socket pair only the app holds: nothing listens.
- *Nothing left behind.* Each worker runs below a keeper that kills whatever the job left when
  the worker ends, and the worker itself when the app dies, whatever state the worker is in
  (see ``_keeper``).
- *Light.* ``multiprocessing`` re-imports the parent's main module in every child it starts (and
  its forkserver imports it once more). For a web app that main module is the server and the app
  itself. corral's workers load it only when a job refers to ``__main__`` (``load_parent_main``).

``context(start_method, preload)`` gives the supervisor an object with a ``Process`` class like
``multiprocessing``'s (a ``BaseProcess``: ``start``, ``pid``, ``sentinel``, ``join``,
``exitcode``, ``close``), whose ``start`` asks the fork server for the worker. With
``"forkserver"`` the server has imported the worker's module (and the pool's ``preload``
modules) and workers are forks of it; with ``"spawn"`` each worker executes a fresh interpreter.
Pools that start workers the same way (the same start method and ``preload``) share a server;
it stops once no pool uses it (its contexts are gone), or at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import multiprocessing
import multiprocessing.spawn
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from corral._pool import _keeper

WORKER_NAME_PREFIX = "corral-worker:"
_MAIN_KEYS = ("init_main_from_path", "init_main_from_name")
_original = multiprocessing.spawn.get_preparation_data
_installed = False
_START_TIMEOUT = 60.0  # seconds the fork server may take to say a worker's pid


def _preparation_data(name: str) -> dict[str, Any]:
    data: dict[str, Any] = _original(name)
    if name.startswith(WORKER_NAME_PREFIX):
        for key in _MAIN_KEYS:
            data.pop(key, None)
    return data


def install() -> None:
    """For a worker started with ``multiprocessing`` itself (as a test may do): route the
    stdlib's preparation of child processes through :func:`_preparation_data`, which leaves the
    app's ``__main__`` out of processes named with ``WORKER_NAME_PREFIX``."""
    global _installed
    if not _installed:
        multiprocessing.spawn.get_preparation_data = _preparation_data
        _installed = True


def parent_main() -> tuple[str, str] | None:
    """How the parent's ``__main__`` can be loaded again: ``("path"|"name", value)``."""
    data = _original("")
    for key in _MAIN_KEYS:
        if key in data:
            return ("path" if key.endswith("path") else "name", data[key])
    return None


def load_parent_main(main: tuple[str, str] | None) -> None:
    """In a worker: make ``__main__`` the parent's main module, as multiprocessing would."""
    if main is None:
        return
    kind, value = main
    if kind == "path":
        multiprocessing.spawn._fixup_main_from_path(value)  # type: ignore[attr-defined]
    else:
        multiprocessing.spawn._fixup_main_from_name(value)  # type: ignore[attr-defined]


# -- the app's side --------------------------------------------------------------------------------


class Context:
    """What the supervisor starts its workers with (``Context.Process`` as in
    ``multiprocessing``)."""

    def __init__(self, start_method: str, preload: tuple[str, ...] = ()) -> None:
        self.start_method = start_method
        self.executes = start_method == "spawn"
        modules = (m for m in preload if m != "__main__")
        self.key: ServerKey = (self.executes, () if self.executes else tuple(modules))
        _use(self.key)
        weakref.finalize(self, _release, self.key)

    def Process(
        self,
        target: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> WorkerProcess:
        process = WorkerProcess(target=target, args=args, kwargs=kwargs or {}, name=name)
        process.server_key = self.key
        return process

    def server_proven(self) -> bool:
        """Whether the fork server this context starts workers with runs, and has started one
        (for any pool): a start from it is a fork, not a fresh server's imports."""
        with _servers_lock:
            server = _servers.get(self.key)
        return server is not None and server.proven and server.sock is not None


def context(start_method: str, preload: tuple[str, ...] = ()) -> Context:
    return Context(start_method, preload)


_DAEMONIC = threading.Lock()  # a daemonic app's flag is lifted for one start at a time


class WorkerProcess(BaseProcess):
    """A worker process started by corral's fork server (see the module's docstring)."""

    server_key: ServerKey = (False, ())  # which fork server starts it (``Context.key``)

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return launch(process_obj)

    def start(self) -> None:
        """``BaseProcess.start``, from a daemonic process too, such as hypercorn's workers.

        ``multiprocessing`` refuses children to a daemonic process because it is ended without
        joining them, which would leave them running. A worker's keeper ends the worker, and
        everything below it, when the app's process ends however it ends: nothing is left."""
        config: dict[str, Any] = getattr(multiprocessing.current_process(), "_config", {})
        if not config.get("daemon"):
            super().start()
            return
        with _DAEMONIC:  # starts may run on several threads: the flag is put back by the last
            config["daemon"] = False
            try:
                super().start()
            finally:
                config["daemon"] = True


def launch(process: WorkerProcess) -> Launched:
    """Start ``process`` (``BaseProcess.start`` calls this); raises OSError if it cannot."""
    return Launched(process)


class Launched:
    """A started worker, as ``BaseProcess`` expects its ``_popen`` to be: its pid, a sentinel
    that becomes readable when it has exited (and everything it started is gone), its exit code.

    The sentinel is the read end of the status pipe its keeper writes to: the worker's pid at
    once, its exit code at its end (``_keeper.STATUS``; a negative one names the signal that
    killed it)."""

    method = "corral"

    def __init__(self, process: WorkerProcess) -> None:
        self.returncode: int | None = None
        self.lock = threading.Lock()
        # Its keeper ended without a word: how the worker ended is unknown (``returncode`` is
        # UNKNOWN_STATUS then). The supervisor reads this to say so instead of blaming the job.
        self.lost = False
        key = process.server_key
        executes = key[0]
        fds: list[int] = []
        args = []
        for arg in process._args:  # type: ignore[attr-defined]
            if isinstance(arg, Connection):
                args.append(_keeper.Descriptor(len(fds)))
                fds.append(arg.fileno())
            else:
                args.append(arg)
        call = pickle.dumps(
            (process._target, tuple(args), process._kwargs),  # type: ignore[attr-defined]
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        payload = pickle.dumps((executes, _preparation(process.name, executes), call))
        status_r, status_w = os.pipe()
        server = _server(key)
        try:
            server.request(payload, [status_w, *fds])
            asked = server.process  # (a restart meanwhile makes another one the server)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        self.sentinel = status_r
        try:
            self.pid, self.keeper = _read_pids(status_r)
        except BaseException:
            os.close(status_r)
            self.sentinel = -1
            raise
        if server.process is asked:
            server.proven = True

    def poll(self, flag: int = os.WNOHANG) -> int | None:
        return self.wait(0 if flag == os.WNOHANG else None)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code, waiting up to ``timeout`` for it. Safe from any thread
        (``multiprocessing`` polls every process it knows of whenever one starts)."""
        if self.returncode is not None:
            return self.returncode
        if (timeout is None or timeout > 0) and (  # the owner waits: nobody closes it meanwhile
            self.sentinel < 0 or not select.select([self.sentinel], [], [], timeout)[0]
        ):
            return None
        with self.lock:
            if (
                self.returncode is None
                and self.sentinel >= 0
                and select.select([self.sentinel], [], [], 0)[0]
            ):
                try:
                    data = os.read(self.sentinel, _keeper.STATUS.size)
                except OSError:
                    data = b""
                if len(data) == _keeper.STATUS.size:
                    (self.returncode,) = _keeper.STATUS.unpack(data)
                else:  # its keeper ended without a word (killed by someone)
                    self.returncode = _keeper.UNKNOWN_STATUS
                    self.lost = True  # the supervisor blames the keeper then, not the job
        return self.returncode

    def terminate(self) -> None:
        self._signal(15)

    def kill(self) -> None:
        self._signal(9)

    def _signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)

    def close(self) -> None:
        with self.lock:
            if self.sentinel >= 0:
                os.close(self.sentinel)
                self.sentinel = -1


def _read_pids(status_r: int) -> tuple[int, int]:
    """The worker's pid and its keeper's, as the keeper writes them."""
    data = b""
    while len(data) < _keeper.PID.size:
        if not select.select([status_r], [], [], _START_TIMEOUT)[0]:
            raise OSError(f"corral's fork server did not start a worker in {_START_TIMEOUT:.0f}s")
        more = os.read(status_r, _keeper.PID.size - len(data))
        if not more:
            raise OSError("corral's fork server could not start a worker process")
        data += more
    pid, keeper = _keeper.PID.unpack(data)
    return int(pid), int(keeper)


def _preparation(name: str | None, executes: bool) -> dict[str, Any]:
    """What a worker takes from the app when it starts (``_keeper.prepare``)."""
    prep: dict[str, Any] = {
        "name": name,
        "sys_path": list(sys.path),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "authkey": bytes(multiprocessing.current_process().authkey),
    }
    if executes:  # a fresh interpreter: as the app's, with the app's environment now
        prep["executable"] = multiprocessing.spawn.get_executable()
        prep["flags"] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        prep["env"] = dict(os.environ)
    return prep


class _Server:
    """The app's end of one fork server, started on first use and again if it has gone. A
    forking one has imported the worker's module and the ``preload`` modules of its pools."""

    def __init__(self, key: ServerKey) -> None:
        self.executes, preload = key
        self.modules = () if self.executes else ("corral._pool._worker", *preload)
        self.users = 0  # the contexts (pools) that start workers with it
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.alive_w = -1
        self.process: subprocess.Popen[bytes] | None = None
        self.proven = False  # the running server has started a worker (its imports are done)

    def request(self, payload: bytes, fds: list[int]) -> None:
        """Ask for a worker; the descriptors go with the request."""
        head = _keeper.HEAD.pack(len(payload), len(fds))
        with self.lock:
            for attempt in range(2):
                if self.sock is None:
                    self._start(self.modules)
                assert self.sock is not None
                try:
                    socket.send_fds(self.sock, [head], fds)
                    self.sock.sendall(payload)
                    return
                except OSError:
                    self._forget()  # it has gone: start another one
                    if attempt:
                        raise

    def _start(self, modules: tuple[str, ...]) -> None:
        self.proven = False
        ours, theirs = socket.socketpair()
        alive_r, self.alive_w = os.pipe()
        code = (
            f"import sys; sys.path[:] = {sys.path!r}; "
            f"from corral._pool._keeper import serve; "
            f"serve({theirs.fileno()}, {alive_r}, {os.getpid()}, {list(modules)!r})"
        )
        executable = multiprocessing.spawn.get_executable()
        flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        try:
            self.process = subprocess.Popen(
                [executable, *flags, "-c", code],
                pass_fds=(theirs.fileno(), alive_r),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # out of reach of the terminal's Ctrl-C
            )
        except BaseException:
            ours.close()
            os.close(self.alive_w)
            raise
        finally:
            theirs.close()
            os.close(alive_r)
        self.sock = ours

    def _forget(self) -> None:
        if self.sock is not None:
            self.sock.close()
            os.close(self.alive_w)
            self.sock = None
        if self.process is not None:
            with contextlib.suppress(OSError):
                self.process.kill()
            if self.process.poll() is None:  # not dead yet
                _reap_later(self.process)
            self.process = None

    def stop(self, wait: bool = True) -> None:
        """Close the app's end: the server then kills what is left below it, and exits. With
        ``wait``, reap it now; else it is reaped later (``_reap_later``)."""
        with self.lock:
            process = self.process
            if self.sock is not None:
                self.sock.close()
                os.close(self.alive_w)
                self.sock = None
            self.process = None
        if process is None:
            return
        if not wait:
            _reap_later(process)
            return
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


ServerKey = tuple[bool, tuple[str, ...]]  # executes?, preload
_servers: dict[ServerKey, _Server] = {}
_servers_lock = threading.Lock()
_stopped: list[subprocess.Popen[bytes]] = []  # servers told to stop, not reaped yet


_released: collections.deque[ServerKey] = collections.deque()  # from finalizers: no lock


def _use(key: ServerKey) -> None:
    """A context (a pool) will start workers with the server for ``key``. Servers that no
    context uses any more are stopped here."""
    unused = []
    with _servers_lock:
        while _released:
            released = _released.popleft()
            server = _servers.get(released)
            if server is not None:
                server.users -= 1
        server = _servers.get(key)
        if server is None:
            server = _servers[key] = _Server(key)
        server.users += 1
        for other, server in list(_servers.items()):
            if server.users <= 0:
                del _servers[other]
                unused.append(server)
    for server in unused:
        server.stop(wait=False)


def _reap_later(process: subprocess.Popen[bytes]) -> None:
    """Keep ``process`` until it has ended: the next ``_server`` call, or the exit, reaps it."""
    with _servers_lock:
        _stopped.append(process)


def _release(key: ServerKey) -> None:
    """A context is gone, and its pool with it. Called by a finalizer, on whichever thread
    collected it, maybe while that thread holds ``_servers_lock``: only noted here."""
    _released.append(key)


def _server(key: ServerKey) -> _Server:
    with _servers_lock:
        _stopped[:] = [process for process in _stopped if process.poll() is None]
        server = _servers.get(key)
        if server is None:  # a process object made without a context (not by the supervisor)
            server = _servers[key] = _Server(key)
            server.users += 1
        return server


@atexit.register
def _stop_servers() -> None:
    """At interpreter exit (after the pools, whose hook was registered later and so runs
    first): stop the fork servers."""
    with _servers_lock:
        servers = list(_servers.values())
    for server in servers:
        server.stop()
    for process in _stopped:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


def restart_server(context: Context) -> None:
    """Kill the fork server that starts ``context``'s workers: it is stuck (a start took longer
    than it may). The starts waiting on it fail at once, and the next start starts a new one;
    the workers it started live on below their keepers."""
    with _servers_lock:
        server = _servers.get(context.key)
    process = None if server is None else server.process
    if process is not None:
        with contextlib.suppress(OSError):
            process.kill()


# -- the memory of a job's processes ---------------------------------------------------------------


def job_memory(process: BaseProcess) -> int | None:
    """The memory the job running in ``process`` holds, in bytes: the worker's RSS while it runs
    alone; once processes it started run below it (or below its keeper, which adopts those whose
    parent ended), the sum of their PSS and the worker's (a page they share counts once)."""
    pid = process.pid
    if pid is None:
        return None
    popen = getattr(process, "_popen", None)
    root = popen.keeper if isinstance(popen, Launched) else pid
    members = _tree.below(root)
    if root == pid:
        members.append(pid)
    if len(members) <= 1:
        return _rss(pid)
    return sum(_pss(member) or _rss(member) or 0 for member in members) or None


class _Tree:
    """Which processes each worker has below it, from one shared scan of ``/proc`` at most every
    ``max_age`` seconds (a scan costs about 30 microseconds a process on the machine)."""

    max_age = 0.5

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.children: dict[int, list[int]] = {}
        self.scanned = -1.0

    def below(self, pid: int) -> list[int]:
        """Every process below ``pid`` (as of the last scan)."""
        now = time.monotonic()
        with self.lock:
            if now - self.scanned > self.max_age:
                self.children = _keeper.children_map()
                self.scanned = now
            children = self.children
        return _keeper.descendants(pid, children)


_tree = _Tree()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
