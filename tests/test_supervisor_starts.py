"""Starting workers: a failed start is retried with back-off, whatever failed."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.context import ForkServerProcess, SpawnProcess
from typing import Any

import pytest

import jobs
from conftest import PoolFactory, wait_until, worker_pids
from corral import WorkerStartError


class FailingStarts:
    """Makes the next ``count`` process starts of one start method fail as ``process.start()``
    does when the parent is out of descriptors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start_method: str) -> None:
        cls = ForkServerProcess if start_method == "forkserver" else SpawnProcess
        original: Callable[[Any], Any] = cls._Popen
        self.lock = threading.Lock()
        self.left = 0
        self.failed = 0

        def popen(process: Any) -> Any:
            with self.lock:
                failing = self.left > 0
                if failing:
                    self.left -= 1
                    self.failed += 1
            if failing:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return original(process)

        monkeypatch.setattr(cls, "_Popen", staticmethod(popen))

    def fail(self, count: int) -> None:
        with self.lock:
            self.left = count


@pytest.fixture
def failing_starts(monkeypatch: pytest.MonkeyPatch, start_method: str) -> FailingStarts:
    return FailingStarts(monkeypatch, start_method)


def test_a_start_that_fails_once_is_retried(
    make_pool: PoolFactory, failing_starts: FailingStarts
) -> None:
    pool = make_pool(workers=1)
    [victim] = worker_pids(pool)
    failing_starts.fail(1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(pool), what="the death to be seen")
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    assert failing_starts.failed == 1
    stats = pool.statistics()
    assert stats.start_failures == 1
    assert [w.pid for w in stats.workers] != [victim]


def test_starts_that_keep_failing_back_off_fail_the_jobs_and_recover(
    make_pool: PoolFactory, failing_starts: FailingStarts, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(workers=1)
    [victim] = worker_pids(pool)
    failing_starts.fail(1_000_000)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(pool), what="the death to be seen")
    with pytest.raises(WorkerStartError, match="cannot start workers") as caught:
        pool.submit(jobs.add, 1, 2).result(20)
    assert "Too many open files" in caught.value.cause
    assert 3 <= pool.statistics().start_failures <= 6  # a back-off, not a spin
    delays = [
        r.getMessage().rsplit("next start in ", 1)[1]
        for r in caplog.records
        if r.name == "corral.pool" and "next start in" in r.getMessage()
    ]
    assert delays[:3] == ["0.1s", "0.2s", "0.4s"]
    failing_starts.fail(0)
    # The next retry (after at most 10 s) starts a worker, and jobs run again.
    wait_until(lambda: pool.wait_ready(0), timeout=30, what="a worker to start again")
    assert pool.submit(jobs.add, 2, 2).result(20) == 4
