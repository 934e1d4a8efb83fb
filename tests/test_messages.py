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
