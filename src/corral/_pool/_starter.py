"""Starting worker processes off the supervisor's thread.

A process start waits on the process that starts workers (corral's fork server, ``_launch``): if
that one is stopped or stuck, the start waits too. So each start runs on a thread of its own, and
its result comes back to the supervisor as a command (``Supervisor.request``): supervision, and
the callers that read replies themselves, never wait on a start. The core abandons a start that
takes too long (``Starts``); a process it gives after all is killed here, off the supervisor's
thread too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from corral._pool import _launch
from corral._pool import _messages as msg
from corral._pool._gate import Gate
from corral._pool._worker import worker_main

Started = Callable[[int, BaseProcess, socket.socket], None]
Failed = Callable[[int, str], None]


class Starter:
    """Starts workers, each on a thread of its own; hands each result over with ``hand_over``
    (which says ``False`` when the supervisor is gone: the process is killed then)."""

    def __init__(
        self,
        context: _launch.Context,
        options: msg.WorkerOptions,
        name: str,
        hand_over: Callable[[Callable[[], None]], bool],
        gate: Gate,
    ) -> None:
        self.context = context
        self.options = options
        self.gate = gate  # the start gate (``_gate``): its page is passed to each worker
        self.name = name
        self.hand_over = hand_over
        self._discarding = 0  # processes being killed and reaped (``discard_later``)
        self._discarded = threading.Condition()

    def start(self, token: int, started: Started, failed: Failed) -> None:
        threading.Thread(
            target=self._start,
            args=(token, started, failed),
            name=f"{self.name}-start-{token}",
            daemon=True,
        ).start()

    def _start(self, token: int, started: Started, failed: Failed) -> None:
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):
            sock.setblocking(True)  # whatever socket.setdefaulttimeout() says
        child_conn = Connection(child_sock.detach())
        gate: Connection | None = None
        try:
            gate = Connection(self.gate.dup())
            process = self.context.Process(
                target=worker_main,
                args=(child_conn, self.options, gate),
                name=f"{_launch.WORKER_NAME_PREFIX}{self.name}",
            )
            process.start()
        except Exception as exc:
            parent_sock.close()
            cause = f"a worker process could not be started: {type(exc).__name__}: {exc}"
            self.hand_over(lambda: failed(token, cause))
            return
        finally:
            child_conn.close()
            if gate is not None:
                gate.close()
        if not self.hand_over(lambda: started(token, process, parent_sock)):
            self._discarding_one(+1)
            self._discard(process, parent_sock)

    def discard_later(self, process: BaseProcess, sock: socket.socket) -> None:
        """``discard`` on a thread of its own; ``wait_discarded`` waits for it."""
        self._discarding_one(+1)
        threading.Thread(
            target=self._discard,
            args=(process, sock),
            name=f"{self.name}-discard-{process.pid}",
            daemon=True,
        ).start()

    def wait_discarded(self, timeout: float | None) -> bool:
        """Wait until every process being discarded is reaped; ``False``: ``timeout`` passed."""
        with self._discarded:
            return self._discarded.wait_for(lambda: not self._discarding, timeout)

    def _discard(self, process: BaseProcess, sock: socket.socket) -> None:
        try:
            discard(process, sock)
        finally:
            self._discarding_one(-1)

    def _discarding_one(self, change: int) -> None:
        with self._discarded:
            self._discarding += change
            if not self._discarding:
                self._discarded.notify_all()


def discard(process: BaseProcess, sock: socket.socket) -> None:
    """Kill a worker process nobody wants and reap it (on a thread that may wait)."""
    sock.close()
    if process.pid is not None:
        kill_group(process.pid, signal.SIGKILL)
    process.join(30)
    if process.exitcode is not None:
        process.close()


def kill_group(pgid: int, sig: int) -> None:
    """Signal a worker's process group, or the worker alone if it has not made its group yet."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pgid, sig)
