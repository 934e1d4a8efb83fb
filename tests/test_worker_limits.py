"""What a worker sends its parent is bounded: a result over ``max_result_size`` is refused without
being pickled whole (or its ``repr`` built), and output and log records are cut to
``MAX_TEXT`` characters a line, in linear time."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

import worker_jobs
from conftest import PoolFactory, wait_until
from corral import SerializationError
from corral._pool._worker import MAX_TEXT

MiB = 1 << 20


def test_a_result_over_max_result_size_is_refused_without_copying_it(
    make_pool: PoolFactory,
) -> None:
    """A 200 MiB result under a 16 MiB limit: the worker's peak memory grows by the value itself,
    not by a full pickle of it and its repr (three times as much)."""
    pool = make_pool(workers=1, max_result_size="16MiB")
    before = pool.submit(worker_jobs.peak_rss).result(30)
    with pytest.raises(SerializationError, match="over max_result_size=16777216") as caught:
        pool.submit(worker_jobs.big_bytes, 200).result(60)
    message = str(caught.value)
    assert len(message) < 500, message[:1000]
    assert "(209715200 bytes)" in message  # what it was, without all of it
    peak = pool.submit(worker_jobs.peak_rss).result(30)  # the same worker
    assert peak - before < 300 * MiB, (before, peak)
    assert pool.submit(worker_jobs.big_bytes, 1).result(30) == b"x" * MiB  # under the limit


def _collect(capfd: pytest.CaptureFixture[str]) -> Callable[[], tuple[str, str]]:
    seen = ["", ""]

    def read() -> tuple[str, str]:
        out, err = capfd.readouterr()
        seen[0] += out
        seen[1] += err
        return seen[0], seen[1]

    return read


def test_a_huge_print_reaches_the_parent_cut_with_a_marker(
    make_pool: PoolFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = make_pool(workers=1)
    pool.submit(worker_jobs.print_long, 10 * MiB).result(60)
    read = _collect(capfd)
    out, _ = wait_until(lambda: "short line after" in read()[0] and read())
    long_line, after = out.splitlines()[-2:]
    assert long_line == "z" * MAX_TEXT + f"... [{10 * MiB - MAX_TEXT} more characters cut]"
    assert after == "short line after"


def test_a_huge_log_message_reaches_the_parent_cut_with_a_marker(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(workers=1)
    pool.submit(worker_jobs.log_long, 10 * MiB).result(60)
    records = wait_until(
        lambda: [r for r in caplog.records if r.name == "tests.worker_jobs"], what="the record"
    )
    assert [r.levelno for r in records] == [logging.WARNING]
    message = records[0].getMessage()
    assert message == "y" * MAX_TEXT + f"... [{10 * MiB - MAX_TEXT} more characters cut]"


def test_output_without_newlines_takes_linear_time(
    make_pool: PoolFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    """64 MiB written in small pieces with no newline: the line is kept in pieces up to MAX_TEXT
    and then only counted, so each write costs its own length (appending to one growing string
    would copy it again at every write, quadratic: 64 MiB would take hours)."""
    pool = make_pool(workers=1)
    small = min(
        pool.submit(worker_jobs.write_without_newlines, 4, 256).result(60) for _ in range(3)
    )
    large = min(
        pool.submit(worker_jobs.write_without_newlines, 64, 256, timeout=60).result(90)
        for _ in range(3)
    )
    # 16 times the size: about 16 times the time if linear, 256 times if quadratic.
    assert large < 64 * small + 0.1, (small, large)
    read = _collect(capfd)
    cut = f"... [{64 * MiB - MAX_TEXT} more characters cut]"
    out, _ = wait_until(lambda: read()[0].count(cut) == 3 and read())
    assert out.splitlines()[-1] == "w" * MAX_TEXT + cut


def test_many_short_lines_in_one_write_all_arrive(
    make_pool: PoolFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = make_pool(workers=1)
    count = 200_000  # 1 MB in one write, sent in frames of at most MAX_TEXT characters
    assert pool.submit(worker_jobs.many_short_lines, count).result(60) == count
    read = _collect(capfd)
    wait_until(lambda: read()[0].count("line\n") == count, what="every line")
