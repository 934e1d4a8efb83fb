"""Frames survive any split of the byte stream into reads."""

from __future__ import annotations

from corral._pool import _messages as msg


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    payloads = [b"", b"a", b"job" * 100, bytes(range(256)) * 300, b"z"]
    stream = b"".join(msg.frame(payload) for payload in payloads)
    for size in (1, 3, 4, 5, 7, 64, 4096, len(stream)):
        inbox = bytearray()
        found: list[bytes] = []
        for start in range(0, len(stream), size):
            found += msg.frames(inbox, stream[start : start + size])
        assert found == payloads, size
        assert inbox == b""


def test_a_partial_frame_waits_in_the_inbox() -> None:
    whole, partial = msg.frame(b"first"), msg.frame(b"second")
    inbox = bytearray()
    assert msg.frames(inbox, whole + partial[:6]) == [b"first"]
    assert inbox == partial[:6]
    assert msg.frames(inbox, partial[6:]) == [b"second"]
    assert inbox == b""


def test_a_job_frame_is_its_head_and_body_framed() -> None:
    """A job's frame is built in one step; it reads back as the head and body it was made of,
    with a start-by deadline or without (NaN), and a lease's term or none (-1)."""
    body = b"pickled call" * 50
    for job_id, start_by, term in ((1, None, -1), (2**40, 12.5, 7)):
        (found,) = msg.frames(bytearray(), msg.job_frame(job_id, start_by, body, term))
        tag, read_id, read_start_by, read_term = msg.JOB_HEAD.unpack_from(found)
        assert (tag, read_id, read_term) == (msg.JOB, job_id, term)
        assert found[msg.JOB_HEAD.size :] == body
        assert read_start_by == start_by if start_by is not None else read_start_by != read_start_by
