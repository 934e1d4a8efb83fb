"""A worker's byte stream as the parent sees it, without the socket: framing and decoding.

``Link`` holds what was read and is not a whole frame yet (``inbox``) and what waits to be
written (``outbox``); ``messages`` turns what was read into decoded messages, tuples whose first
item is the tag (``_messages``):

- ``(READY,)``, ``(INIT_FAILED, text)``
- ``(RETURNED, job id, pickled value)``, ``(RAISED, job id, report)``, ``(MISSED, job id)``,
  ``(LAPSED, job id)``
- ``(RECALLED, [job ids])``, ``(LOG, record fields)``, ``(OUTPUT, stream name, text)``

Bytes that do not decode end the stream: the messages before them count, nothing after them is
read. A value is unpickled only when it is known to be the outcome of the worker's head
(``outcome``).
"""

from __future__ import annotations

import pickle
from typing import Any, TypeVar

from corral._exceptions import RemoteError, RemoteTraceback, SerializationError
from corral._pool import _messages as msg
from corral._pool._actions import Outcome
from corral._pool._state import Job

_K = TypeVar("_K")
Message = tuple[Any, ...]


class Link:
    """One worker's byte stream: bytes read and not yet framed, bytes waiting to be written."""

    __slots__ = ("inbox", "limit", "outbox")

    def __init__(self, limit: int = msg.NO_LIMIT) -> None:
        self.inbox = bytearray()  # bytes read, not yet a whole frame
        self.outbox = bytearray()  # bytes its socket could not take yet
        self.limit = limit  # the longest frame it may send

    def messages(self, data: bytes) -> tuple[list[Message], str | None]:
        """The messages in what was read (``data``), decoded, and what is wrong with the bytes
        after them if they are no message (``None``: nothing). Nothing after such bytes is
        read: the caller stops reading this worker."""
        try:
            frames = msg.frames(self.inbox, data, self.limit)
            error = None
        except msg.ProtocolError as exc:
            frames, error = exc.found, str(exc)
        messages = []
        for frame in frames:
            try:
                messages.append(decode(frame))
            except msg.ProtocolError as exc:
                return messages, str(exc)
        return messages, error


def decode(frame: bytes) -> Message:
    """One message from ``frame``; raises ``ProtocolError`` if it is none."""
    tag = frame[:1]
    if tag in (msg.RETURNED, msg.RAISED, msg.MISSED, msg.LAPSED):
        if len(frame) < msg.ID_HEAD.size:
            raise msg.ProtocolError(f"a reply of {len(frame)} bytes, too short to name its job")
        _, job_id = msg.ID_HEAD.unpack_from(frame)
        if tag == msg.RETURNED:
            return (tag, job_id, frame[msg.ID_HEAD.size :])
        if tag == msg.RAISED:
            return (tag, job_id, _exception_report(frame))
        return (tag, job_id)
    if tag == msg.LOG:
        return (tag, _load(frame, dict))
    if tag == msg.OUTPUT:
        name, text = _load(frame, tuple)
        if name not in ("stdout", "stderr") or not isinstance(text, str):
            raise msg.ProtocolError("an OUTPUT message that is not a stream's text")
        return (tag, name, text)
    if tag == msg.RECALLED:
        ids = _load(frame, list)
        if not all(type(job_id) is int for job_id in ids):
            raise msg.ProtocolError("a RECALLED message that is not a list of job ids")
        return (tag, ids)
    if tag == msg.READY:
        return (tag,)
    if tag == msg.INIT_FAILED:
        return (tag, frame[1:].decode(errors="replace"))
    raise msg.ProtocolError(f"a message with the unknown tag {tag!r}")


def _load(frame: bytes, kind: type[_K], offset: int = 1) -> _K:
    """The pickled ``kind`` in ``frame`` after ``offset``; ``ProtocolError`` if it is not one."""
    try:
        value = pickle.loads(frame[offset:])
    except BaseException as exc:  # whatever unpickling it raises: the worker is at fault
        raise msg.ProtocolError(
            f"a {frame[:1]!r} message that does not unpickle: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(value, kind):
        raise msg.ProtocolError(f"a {frame[:1]!r} message that holds a {type(value).__name__}")
    return value


def _exception_report(frame: bytes) -> tuple[bytes | None, str, str, str]:
    """What a ``RAISED`` reply holds: the pickled exception (if it pickled), its type's name,
    its message and its traceback."""
    report = _load(frame, tuple, msg.ID_HEAD.size)
    if not (
        len(report) == 4
        and isinstance(report[0], bytes | None)
        and all(isinstance(part, str) for part in report[1:])
    ):
        raise msg.ProtocolError("a RAISED reply that is not an exception report")
    return report


def outcome(job: Job, message: Message) -> Outcome:
    """The outcome a ``RETURNED`` or ``RAISED`` reply gives ``job`` (its worker's head)."""
    if message[0] == msg.RETURNED:
        try:
            return Outcome.returned(pickle.loads(message[2]))
        except BaseException as exc:  # whatever its classes raise when rebuilt
            error = SerializationError(
                f"the result of job {job.id} ({job.reference}) could not be unpickled in the "
                f"parent: {type(exc).__name__}: {exc}; return plain data, or make its classes "
                f"importable in the parent",
                stage="result",
            )
            return Outcome.raised(error)
    return Outcome.raised(_remote_exception(job, *message[2]))


def _remote_exception(
    job: Job, exc_bytes: bytes | None, type_name: str, message: str, text: str
) -> BaseException:
    error: BaseException | None = None
    if exc_bytes is not None:
        try:
            error = pickle.loads(exc_bytes)
        except BaseException:  # whatever it raises, reported as a RemoteError below
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(
            f"job {job.id} ({job.reference}) raised {type_name}: {message} (the exception could "
            f"not be sent to the parent as itself; its traceback is kept)",
            type_name=type_name,
            traceback=text,
        )
    error.__cause__ = RemoteTraceback(text)
    return error
