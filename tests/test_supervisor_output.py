"""Jobs' output and log records reach the app off the supervisor's thread: a stream or handler
that breaks, blocks or crawls costs that output (counted), never supervision."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import jobs
import supervisor_jobs
from conftest import PoolFactory, wait_until
from corral import JobTimeoutError, Pool
from corral._pool import _outlet


@pytest.fixture
def start_method() -> str:
    """How workers start does not matter here."""
    return "forkserver"


class BrokenStream(io.TextIOBase):
    """A stream whose reader has gone (``python app.py | true``)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def close(self) -> None:
        """Nothing to flush or close (``io.IOBase`` flushes on close, and so when collected)."""


class StuckStream(io.TextIOBase):
    """A stream whose writes block until it is released (a pipe nobody reads)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.entered = threading.Event()
        self.text: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.entered.set()
        self.released.wait(60)
        self.text.append(text)
        return len(text)


class StuckHandler(logging.Handler):
    """A log handler that takes as long as the test wants for each record."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.entered = threading.Event()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.released.wait(60)
        self.records.append(record.getMessage())


def a_timeout_is_reported_in_time(pool: Pool) -> None:
    """A 1-s timeout of a job that would run 60 s is reported long before its natural end."""
    began = time.monotonic()
    with pytest.raises(JobTimeoutError):
        pool.submit(jobs.sleep, 60, timeout=1).result(40)
    assert time.monotonic() - began < 20


def test_a_broken_stdout_costs_the_output_not_the_pool(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(workers=2, kill_grace=0.1)
    monkeypatch.setattr(sys, "stdout", BrokenStream())
    assert pool.submit(supervisor_jobs.print_lines, 10, 100).result(20) == 10
    assert pool.submit(jobs.log_and_print, "hi").result(20) == "hi"
    a_timeout_is_reported_in_time(pool)
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    stats = wait_until(lambda: (s := pool.statistics()).output_dropped >= 1010 and s)
    assert stats.completed == 3
    assert stats.logs_dropped == 0


def test_a_stdout_nobody_reads_stalls_neither_timeouts_nor_outcomes(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_outlet, "LIMIT", 1 << 16)
    pool = make_pool(workers=2, kill_grace=0.1)
    stuck = StuckStream()
    monkeypatch.setattr(sys, "stdout", stuck)
    try:
        began = time.monotonic()
        assert pool.submit(supervisor_jobs.print_lines, 10, 100).result(20) == 10
        assert stuck.entered.wait(20)
        # The outlet is stuck in a write: more output waits (up to its bound), then is dropped.
        futures = [pool.submit(supervisor_jobs.print_lines, 100, 1000) for _ in range(4)]
        assert [future.result(20) for future in futures] == [100] * 4
        assert time.monotonic() - began < 20
        a_timeout_is_reported_in_time(pool)
        stats = pool.statistics()
        assert stats.output_dropped > 0
        assert stats.completed == 5
    finally:
        stuck.released.set()
        outlet = pool._supervisor.outlet  # type: ignore[union-attr]
        wait_until(lambda: outlet.handled == outlet.queued, what="what waited to be written")


def test_a_slow_log_handler_stalls_neither_timeouts_nor_outcomes(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(workers=2, kill_grace=0.1)
    handler = StuckHandler()
    target = logging.getLogger("tests.supervisor_jobs")
    target.addHandler(handler)
    try:
        assert pool.submit(supervisor_jobs.log_records, 3).result(20) == 3
        assert handler.entered.wait(20)
        a_timeout_is_reported_in_time(pool)
        assert pool.submit(jobs.add, 1, 2).result(20) == 3
        handler.released.set()
        wait_until(lambda: len(handler.records) == 3, what="the records to be handled at last")
    finally:
        handler.released.set()
        target.removeHandler(handler)
    assert handler.records == ["record 0", "record 1", "record 2"]
    assert pool.statistics().logs_dropped == 0


def test_output_and_log_records_reach_the_app_before_the_outcome_in_order(
    pool: Pool, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for round_ in range(20):
        assert pool.submit(supervisor_jobs.print_lines, 3, 10).result(20) == 3
        assert pool.submit(supervisor_jobs.log_records, 2).result(20) == 2
        out, _ = capsys.readouterr()
        assert out == "".join(str(n) * 10 + "\n" for n in range(3)), round_
        records = [r.getMessage() for r in caplog.records if r.name == "tests.supervisor_jobs"]
        assert records == ["record 0", "record 1"], round_
        caplog.clear()


PIPED_APP = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import jobs, supervisor_jobs
    from corral import Pool, JobTimeoutError

    if __name__ == "__main__":
        report = open({report!r}, "w", buffering=1)
        with Pool(workers=2, kill_grace=0.1) as pool:
            pool.wait_ready(60)
            for _ in range(5):  # 20 MB: more than the pipe and the outlet hold
                pool.submit(supervisor_jobs.print_lines, 20_000, 200).result(60)
            report.write("printed\\n")
            began = time.monotonic()
            try:
                pool.submit(jobs.sleep, 60, timeout=1).result(60)
            except JobTimeoutError:
                report.write(f"timed out after {{time.monotonic() - began:.1f}}\\n")
            report.write(f"add {{pool.submit(jobs.add, 1, 2).result(60)}}\\n")
            report.write(f"dropped {{pool.statistics().output_dropped > 0}}\\n")
        report.write("done\\n")
    """
)


@pytest.mark.parametrize("reader", ["closed", "never-reads"])
def test_an_app_whose_stdout_pipe_is_closed_or_never_read_keeps_its_pool(
    tmp_path: Path, reader: str
) -> None:
    """``python app.py | true`` and ``python app.py | (sleep 600)``, for real."""
    script, report = tmp_path / "app.py", tmp_path / "report.txt"
    script.write_text(PIPED_APP.format(tests=str(Path(__file__).parent), report=str(report)))
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    assert app.stdout is not None
    if reader == "closed":
        app.stdout.close()
    try:
        wait_until(
            lambda: report.exists() and report.read_text().endswith("done\n"),
            timeout=50,
            what="the app to finish",
        )
    finally:
        app.kill()
        app.wait(10)
        if app.stdout is not None and not app.stdout.closed:
            app.stdout.close()
    lines = report.read_text().splitlines()
    assert lines[0] == "printed"
    assert lines[1].startswith("timed out after ")
    assert float(lines[1].split()[-1]) < 20
    assert lines[2:] == ["add 3", "dropped True", "done"]


@pytest.fixture(autouse=True)
def _no_leftover_handlers() -> Iterator[None]:
    yield
    target = logging.getLogger("tests.supervisor_jobs")
    for handler in list(target.handlers):
        if isinstance(handler, StuckHandler):
            target.removeHandler(handler)
