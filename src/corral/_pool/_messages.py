"""The messages between the supervisor and a worker, and how they are framed.

Every message is one frame on the worker's private socket: a 4-byte big-endian length, then that
many bytes (the framing of ``multiprocessing.Connection.send_bytes``). A frame's first byte is its
tag. Several frames may travel in one write: the supervisor sends a worker a batch of jobs at once
when jobs are waiting, and both sides read whatever has arrived and take the whole frames from it.

Supervisor -> worker:
    ``JOB``     id, start-by deadline (``time.monotonic()``, shared by every process; NaN: none),
                lease term (``_gate``; -1: none), then ``pickle((reference, args, kwargs))``
    ``RECALL``  ``pickle([job ids])``: give back those of these jobs that have not started
    ``STOP``    exit once idle

Worker -> supervisor (job ids say which job a reply is for; a worker runs its jobs in the order
it received them, one at a time, and reports each before it starts the next):
    ``READY``, ``INIT_FAILED`` (the traceback text)
    ``RETURNED`` id, ``pickle(value)``; ``RAISED`` id, ``pickle((exception bytes | None,
    type name, message, traceback text))``; ``MISSED`` id (past its start-by deadline, not run);
    ``LAPSED`` id (its lease did not hold when its turn came, not run)
    ``RECALLED`` ``pickle([job ids])``: given back, never started; one answer per ``RECALL``,
                in the order of the recalls (the supervisor matches each answer to its recall)
    ``LOG`` ``pickle(record fields)``; ``OUTPUT`` ``pickle((stream name, text))``

A worker reads what came to its socket (a recall among it) before it starts a job that waited in
it, and reports its head before it starts the next job: once a recall is written and what the
worker sent holds no reply to its head, the supervisor knows the jobs recalled cannot have
started, and takes them back without waiting for the answer (``Jobs.steal``), which matters when
the head holds the GIL and the worker's watch thread cannot answer.

Values travel pickled on their own, so a value that fails to unpickle in the parent never hides
which job it belongs to.

Only the worker process itself writes frames. A process a job forks inherits the socket (and the
worker's ``sys.stdout``, ``sys.stderr`` and log handler), but never writes to it: its output and
log records go to its own stdout and stderr as plain text, so that its writes cannot cut into the
worker's frames.

Bytes that are not frames of this protocol (a length over the limit the parent sets, a message
that does not decode, an unknown tag) cost the worker that sent them: the parent kills it and its
job fails with a ``WorkerDiedError`` that says so (``ProtocolError`` here).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

JOB, RECALL, STOP = b"J", b"C", b"S"
READY, INIT_FAILED, RETURNED, RAISED, MISSED, LAPSED, RECALLED, LOG, OUTPUT = (
    b"Y",
    b"I",
    b"R",
    b"E",
    b"M",
    b"P",
    b"B",
    b"L",
    b"O",
)

HEADER = struct.Struct("!i")  # a frame's length
_LONG_HEADER = struct.Struct("!Q")  # after a -1 length, for frames of 2 GiB and more
JOB_HEAD = struct.Struct("!cQdq")  # tag, job id, start-by deadline, lease term
ID_HEAD = struct.Struct("!cQ")  # tag, job id
READ_SIZE = 1 << 16


def header(size: int) -> bytes:
    """What goes before a payload of ``size`` bytes."""
    if size > 0x7FFFFFFF:
        return HEADER.pack(-1) + _LONG_HEADER.pack(size)
    return HEADER.pack(size)


def frame(payload: bytes) -> bytes:
    """``payload`` framed for the other side."""
    return header(len(payload)) + payload


_JOB_FRAME_HEAD = struct.Struct("!icQdq")  # a JOB frame's length, then its head (below 2 GiB)


def job_frame(job_id: int, start_by: float | None, body: bytes, lease: int = -1) -> bytes:
    deadline = math.nan if start_by is None else start_by
    size = JOB_HEAD.size + len(body)
    if size > 0x7FFFFFFF:
        return frame(JOB_HEAD.pack(JOB, job_id, deadline, lease) + body)
    return _JOB_FRAME_HEAD.pack(size, JOB, job_id, deadline, lease) + body


class ProtocolError(Exception):
    """Bytes that are not a message of this protocol (the sender is broken or not ours).

    ``found``: the whole frames before them, which are still good."""

    def __init__(self, message: str, found: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.found = [] if found is None else found


NO_LIMIT = 1 << 62


def frames(inbox: bytearray, data: bytes, limit: int = NO_LIMIT) -> list[bytes]:
    """The whole frames in what ``inbox`` held followed by ``data``; a partial frame at the end
    stays in ``inbox``. (Most reads bring whole frames to an empty inbox: nothing is copied
    into it then.)

    Raises ``ProtocolError`` for a length that no frame has (negative, or over ``limit``), with
    the frames before it (nothing after it can be trusted).
    """
    buffer: bytes | bytearray = data
    if inbox:
        inbox += data
        buffer = inbox
    found: list[bytes] = []
    offset, end = 0, len(buffer)
    while end - offset >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer, offset)
        start = offset + HEADER.size
        if size == -1:
            if end - start < _LONG_HEADER.size:
                break
            (size,) = _LONG_HEADER.unpack_from(buffer, start)
            start += _LONG_HEADER.size
        if not 0 <= size <= limit:
            raise ProtocolError(f"a frame length of {size} bytes (the limit is {limit})", found)
        if end - start < size:
            break
        found.append(bytes(buffer[start : start + size]))
        offset = start + size
    if buffer is inbox:
        del inbox[:offset]
    elif offset < end:
        inbox += data[offset:]
    return found


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker process needs from the pool, sent once at its start."""

    initializer: str | None
    initargs_bytes: bytes
    log_level: int
    parent_pid: int
    watch_interval: float
    main: tuple[str, str] | None  # how to load the parent's __main__, if a job needs it
    max_result_size: int | None
    preload: tuple[str, ...]
