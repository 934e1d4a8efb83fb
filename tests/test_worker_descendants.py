"""Nothing a job starts outlives its worker: a timeout, a memory kill or the worker's own end
stops every process below it, even those in a session of their own and double-forked daemons;
and ``max_memory`` counts them all."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import worker_jobs
from conftest import PoolFactory, assert_gone, wait_until
from corral import JobTimeoutError, MemoryLimitError

MiB = 1 << 20


_started: list[int] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Whatever a test sees started is killed afterwards, even if the test failed."""
    yield
    while _started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_started.pop(), signal.SIGKILL)


def _pids(directory: Path, *names: str) -> list[int]:
    files = [directory / name for name in names]
    wait_until(lambda: all(f.exists() for f in files), timeout=30, what=f"{names} to start")
    pids = [int(f.read_text()) for f in files]
    _started.extend(pids)
    return pids


def test_a_timeout_stops_children_in_their_own_session_and_daemons(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1, kill_grace=0.2)
    future = pool.submit(
        worker_jobs.start_session_child_and_daemon_and_hang, str(tmp_path), timeout=5
    )
    session, daemon, worker = _pids(tmp_path, "session", "daemon", "worker")
    with pytest.raises(JobTimeoutError):
        future.result(60)
    # Reported once nothing of the job runs any more: gone already, a short bound is enough.
    assert_gone([worker, session, daemon], timeout=1)


def test_a_memory_limit_counts_the_children_of_the_job(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1, max_memory="300MiB", memory_check_interval=0.05)
    pid_file = tmp_path / "child"
    future = pool.submit(worker_jobs.child_holding_memory, 400, str(pid_file), timeout=120)
    with pytest.raises(MemoryLimitError, match="over max_memory") as caught:
        future.result(120)
    assert caught.value.rss > caught.value.limit == 300 * MiB
    [child] = _pids(tmp_path, "child")
    assert_gone([child], timeout=1)
    assert pool.submit(pow, 2, 3).result(30) == 8


def test_what_a_job_leaves_running_ends_with_its_worker(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """A worker recycled after its job (``max_jobs_per_worker``): the process its job started
    in a session of its own goes with it."""
    pool = make_pool(workers=1, max_jobs_per_worker=1)
    pid_file = tmp_path / "session"
    child = pool.submit(worker_jobs.start_session_child_and_return, str(pid_file)).result(30)
    _started.append(child)
    wait_until(lambda: pool.statistics().recycled == 1, what="the worker to be recycled")
    assert_gone([child])
