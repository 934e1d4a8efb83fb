"""The shell's side of one worker: its process and its socket (I/O only; see ``_supervisor``)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import psutil

from corral._pool import _messages as msg
from corral._pool._link import Link
from corral._pool._state import Worker

_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO


class Channel:
    """A worker's process and socket, and who reads the socket.

    The socket blocks (for a caller that picks up a reply: it waits in ``recv``), but the
    supervisor reads and writes it with ``MSG_DONTWAIT`` only: it never waits on a worker. What
    the socket cannot take now waits in the link's outbox, written as room appears; a frame read
    in part waits in the link's inbox.
    """

    def __init__(self, process: BaseProcess, sock: socket.socket, limit: int) -> None:
        assert process.pid is not None
        self.process = process
        self.sock = sock
        self.pid = process.pid
        self.fd = sock.fileno()
        self.link = Link(limit)
        self.worker: Worker | None = None  # the core's record of it
        self.ps = _psutil_process(self.pid)
        self.on_channel: Callable[[int], None] = lambda mask: None  # the selector's handler
        self.watched = False  # its socket is registered with the selector
        self.picker = False  # a caller reads its socket (``pick_up``); not watched meanwhile
        self.reading = True  # its socket has not reached its end (nor broken the protocol)
        self.exited = False  # its process has ended (its sentinel fired)
        self.receive_timeout: float | None = None  # its socket's SO_RCVTIMEO (``receive``)
        self.poller = select.poll()  # to check its socket without reading it
        self.poller.register(self.fd, select.POLLIN)

    def write(self, data: bytes) -> bool:
        """Write ``data`` without ever waiting: what the socket cannot take now waits in the
        outbox (a worker that stops reading, even one stopped by SIGSTOP, holds up only
        itself). ``False``: the write failed at once (the worker is gone)."""
        outbox = self.link.outbox
        if outbox:
            outbox += data
            return True
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < len(data):
            outbox += data[sent:]
        return True

    def flush(self) -> None:
        """Write what the outbox holds, as far as the socket takes it now."""
        outbox = self.link.outbox
        try:
            sent = self.sock.send(outbox, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:  # it died: its sentinel says how
            sent = len(outbox)
        del outbox[:sent]

    def readable(self) -> bool:
        return bool(self.poller.poll(0))

    def read(self) -> bytes | None:
        """One read, never waiting: ``None`` if nothing is there, ``b""`` at its end."""
        try:
            return self.sock.recv(msg.READ_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def receive(self, timeout: float | None) -> bytes | None:
        """Wait in ``recv`` for what the worker sends, up to ``timeout`` seconds (the socket's
        own receive timeout); ``None``: nothing came. A thread blocked reading a socket is woken
        sooner than one waiting in ``poll`` for it."""
        if timeout != self.receive_timeout:
            # In microseconds, at least one: zero would mean no limit.
            micro = 0 if timeout is None else max(1, int(timeout * 1e6))
            limit = _TIMEVAL.pack(*divmod(micro, 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            self.receive_timeout = timeout
        try:
            return self.sock.recv(msg.READ_SIZE)
        except BlockingIOError:  # the timeout passed
            return None
        except OSError:
            return b""

    def shut_reading(self) -> None:
        """End a caller's wait on the socket (what is already there is still read)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)


def _psutil_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def rss(process: psutil.Process | None) -> int | None:
    if process is None:
        return None
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return None
