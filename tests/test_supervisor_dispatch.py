"""Dispatch: a job never waits behind a busy worker while another worker idles."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import jobs
import supervisor_jobs
from conftest import PoolFactory, busy_pids, wait_until
from corral._pool import _messages as msg
from test_pool_batches import Gate, bare_worker


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


def test_a_worker_reads_a_recall_before_it_starts_a_job_that_waited(tmp_path: Path) -> None:
    """What the supervisor counts on to take jobs back without the worker's answer: a recall
    written while the head runs is read by the worker before it starts the job behind the head,
    even when its watch thread (which answers recalls while a job runs) does not run, as when
    the head holds the GIL. Here the watch thread sleeps for the whole test."""
    process, parent = bare_worker("recall-test", watch_interval=3600)
    gate, runs, ran = Gate(tmp_path / "gate"), tmp_path / "head-runs", tmp_path / "behind-ran"
    try:
        assert parent.poll(30)
        assert parent.recv_bytes() == msg.READY
        head = pickle.dumps(("supervisor_jobs:mark_then_hold", (str(runs), gate.path), {}))
        behind = pickle.dumps(("jobs:create", (str(ran),), {}))
        os.write(parent.fileno(), msg.job_frame(1, None, head) + msg.job_frame(2, None, behind))
        wait_until(runs.exists, what="the head to run")
        parent.send_bytes(msg.RECALL + pickle.dumps([2]))
        gate.release()
        replies = []
        for _ in range(2):
            assert parent.poll(30)
            replies.append(parent.recv_bytes())
        assert replies[0][: msg.ID_HEAD.size] == msg.ID_HEAD.pack(msg.RETURNED, 1)
        assert replies[1] == msg.RECALLED + pickle.dumps([2])
        parent.send_bytes(msg.STOP)
        process.join(10)
        assert process.exitcode == 0
        assert not ran.exists()
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)
