"""The start gate: a lease the pool's workers read before they start a job submitted under it.

A job submitted with ``lease=term`` may wait in a worker behind other jobs, and the app that
holds the lease may be stopped (SIGSTOP, a suspended VM) or cut off meanwhile. The worker itself
checks, right before it starts such a job, that the lease still holds for that term; if not, the
job is not started and ends cancelled. So it never starts once the lease may have passed to
someone else, however long its parent has not been heard from.

The lease lives in one page of memory shared by the pool and its workers (a file with no name,
passed to each worker at its start): one aligned 8-byte word, written and read whole, holds the
term (low 16 bits) and until when it holds (the high bits: milliseconds of ``lease_clock()``,
which every process of the machine shares and which goes on while the machine is suspended,
rounded down). No word: no job under a lease starts. Terms are compared modulo 2**16: a job
would have to wait through 65,536 new terms to be taken for one of the current term.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import threading

from corral._clock import lease_clock

_WORD = struct.Struct("=Q")  # native: one aligned load or store
_TERM_BITS = 16
_TERM_MASK = (1 << _TERM_BITS) - 1
NO_LEASE = -1
"""The lease of a job that starts whatever the gate says (in a JOB frame)."""


_MAX_MS = (1 << (64 - _TERM_BITS)) - 1


def _word(term: int, until: float) -> int:
    if not until > 0:  # not held (or NaN)
        return 0
    until_ms = _MAX_MS if until * 1000 >= _MAX_MS else int(until * 1000)
    return (until_ms << _TERM_BITS) | (term & _TERM_MASK)


def admits(word: int, term: int, now: float) -> bool:
    """Whether a job submitted under ``term`` may start at ``now`` (``lease_clock()``)."""
    return (
        word != 0
        and (word & _TERM_MASK) == (term & _TERM_MASK)
        and now * 1000 < (word >> _TERM_BITS)
    )


class Gate:
    """The pool's side: holds the shared page, writes the lease, gives each worker a copy of
    its descriptor (``dup``)."""

    def __init__(self) -> None:
        self._fd = _anonymous_file()
        self._lock = threading.Lock()  # (a start may copy the descriptor while the pool closes)
        try:
            os.ftruncate(self._fd, mmap.PAGESIZE)
            self._map: mmap.mmap | None = mmap.mmap(self._fd, mmap.PAGESIZE)
        except BaseException:
            os.close(self._fd)
            raise

    def hold(self, term: int, seconds: float) -> None:
        """Jobs submitted under ``term`` may start for ``seconds`` more; jobs under any other
        term may not start any more."""
        with self._lock:
            if self._map is not None:
                _WORD.pack_into(self._map, 0, _word(term, lease_clock() + seconds))

    def dup(self) -> int:
        """A new descriptor of the page, for a worker; raises ``OSError`` once closed."""
        with self._lock:
            if self._map is None:
                raise OSError("the pool has closed")
            return os.dup(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
                os.close(self._fd)


class GateReader:
    """A worker's side: reads the lease before it starts a job submitted under one.

    While the app is stopped (SIGSTOP), it cannot renew its lease, and another replica takes
    the job's run once the lease lapses: the worker waits then, and starts the job only once
    the app runs again with the lease still held. (Its workers are not stopped with it.)
    """

    def __init__(self, fd: int | None, app_pid: int) -> None:
        self._map = None if fd is None else mmap.mmap(fd, mmap.PAGESIZE, prot=mmap.PROT_READ)
        self._app_stat = f"/proc/{app_pid}/stat"

    def admits(self, term: int) -> bool:
        """Whether a job submitted under ``term`` may start now (waiting while the app is
        stopped)."""
        while self._map is not None:
            if not admits(_WORD.unpack_from(self._map, 0)[0], term, lease_clock()):
                return False
            if not _stopped(self._app_stat):
                return True
            _NEVER.wait(_STOPPED_POLL)
        return False


_STOPPED_POLL = 0.05  # seconds between two looks at a stopped app
_NEVER = threading.Event()  # (never set: waited on for a pause)


def _stopped(stat: str) -> bool:
    """Whether the process of this ``/proc/<pid>/stat`` is stopped (where there is ``/proc``)."""
    try:
        with open(stat, "rb") as source:
            state = source.read().rpartition(b")")[2][1:2]
    except OSError:
        return False
    return state in (b"T", b"t")


def _anonymous_file() -> int:
    """A file descriptor of a file with no name (gone with its last descriptor)."""
    create = getattr(os, "memfd_create", None)
    if create is not None:
        try:
            fd: int = create("corral-gate", os.MFD_CLOEXEC)
            return fd
        except OSError:
            pass
    handle, path = tempfile.mkstemp(prefix="corral-gate-")
    os.unlink(path)
    return handle
