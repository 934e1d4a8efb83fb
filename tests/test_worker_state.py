"""What one job leaves behind in its worker: the worker puts back the standard streams, the
working directory and the umask before the next job."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import worker_jobs
from conftest import PoolFactory, wait_until


def _collect(capfd: pytest.CaptureFixture[str]) -> Callable[[], tuple[str, str]]:
    seen = ["", ""]

    def read() -> tuple[str, str]:
        out, err = capfd.readouterr()
        seen[0] += out
        seen[1] += err
        return seen[0], seen[1]

    return read


def test_the_next_job_finds_the_streams_directory_and_umask_as_they_were(
    make_pool: PoolFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = make_pool(workers=1)
    first = pool.submit(worker_jobs.state).result(30)
    assert first["stdout"] == first["stderr"] == "_ChannelWriter"
    pid = pool.submit(worker_jobs.leave_state_behind, str(tmp_path)).result(30)
    after = pool.submit(worker_jobs.print_and_report, "still heard").result(30)
    assert after == first
    assert pid == first["pid"]  # the same worker
    read = _collect(capfd)
    wait_until(
        lambda: "still heard\n" in read()[0] and "still heard\n" in read()[1],
        what="the next job's output",
    )


def test_a_job_that_removes_its_working_directory_does_not_strand_the_next(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    first = pool.submit(worker_jobs.state).result(30)
    gone = tmp_path / "gone"
    gone.mkdir()
    assert pool.submit(worker_jobs.remove_own_directory, str(gone)).result(30) == first["pid"]
    assert pool.submit(worker_jobs.state).result(30)["cwd"] == first["cwd"]
    assert pool.submit(os.getcwd).result(30) == first["cwd"]
