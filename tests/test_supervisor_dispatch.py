"""Dispatch: a job never waits behind a busy worker while another worker idles."""

from __future__ import annotations

import time
from pathlib import Path

import jobs
import supervisor_jobs
from conftest import PoolFactory, busy_pids, wait_until
from test_pool_batches import Gate


def running_for(pool_stats: object, pid: int) -> float:
    for worker in pool_stats.workers:  # type: ignore[attr-defined]
        if worker.pid == pid:
            return float(worker.running_for or 0.0)
    return 0.0


def test_jobs_are_not_sent_behind_a_job_that_holds_the_gil(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """A job stuck in ``re`` holds the GIL: its worker cannot give back jobs sent behind it
    until it ends. Small jobs submitted while it runs go to the other worker as soon as that
    one is free, never behind the stuck one."""
    pool = make_pool(workers=2, kill_grace=0.1)
    stuck = pool.submit(supervisor_jobs.backtrack, 64, timeout=120)  # runs for ages
    [stuck_pid] = wait_until(lambda: busy_pids(pool), what="the backtracking job to start")
    wait_until(lambda: running_for(pool.statistics(), stuck_pid) > 0.2, what="it to run a while")
    gate = Gate(tmp_path / "gate")
    holder = pool.submit(jobs.hold, gate.path)
    wait_until(lambda: len(busy_pids(pool)) == 2, what="the other worker to be busy")
    small = [pool.submit(jobs.pid) for _ in range(9)]
    gate.release()
    other_pid = holder.result(20)
    began = time.monotonic()
    assert [future.result(20) for future in small] == [other_pid] * 9
    assert time.monotonic() - began < 10  # not after the stuck job: it would take minutes
    assert not stuck.done()
    assert sum(w.waiting for w in pool.statistics().workers) == 0
    pool.shutdown(wait=False)  # kills the stuck job
