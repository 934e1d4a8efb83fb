"""Jobs sent to busy workers while jobs pile up: taken back when that is better, never lost.

Each test holds a worker on a job that waits at a gate (a named pipe the test opens), so which
jobs wait where is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest

import jobs
from conftest import PoolFactory, busy_pids, wait_until
from corral import JobCancelledError, Pool, WorkerDiedError
from corral._pool import _launch
from corral._pool import _messages as msg
from corral._pool._worker import worker_main


class Gate:
    """A named pipe a job blocks on (``jobs.hold``) until the test releases it."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)

    def release(self) -> None:
        def opened() -> int | None:
            try:
                return os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no job has opened it for reading yet
                return None

        os.close(wait_until(opened, what="a job to wait at the gate"))


def hold_the_only_worker(pool: Pool, tmp_path: Path) -> tuple[Gate, Future[Any]]:
    """Keep ``pool``'s worker busy on a job until the returned gate is released."""
    gate = Gate(tmp_path / "gate")
    holder = pool.submit(jobs.hold, gate.path)
    wait_until(lambda: busy_pids(pool), what="the worker to be busy")
    return gate, holder


def waiting(pool: Pool) -> int:
    return sum(worker.waiting for worker in pool.statistics().workers)


def test_jobs_waiting_behind_a_long_job_move_to_a_worker_that_frees_up(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=2)
    gate_a, gate_b = Gate(tmp_path / "a"), Gate(tmp_path / "b")
    long_a = pool.submit(jobs.hold, gate_a.path)
    long_b = pool.submit(jobs.hold, gate_b.path)
    wait_until(lambda: len(busy_pids(pool)) == 2, what="both workers to be busy")
    quick = [pool.submit(jobs.pid) for _ in range(4)]
    wait_until(lambda: waiting(pool) == 4, what="the jobs to be sent behind the busy ones")
    assert all(worker.waiting == 2 for worker in pool.statistics().workers)

    gate_b.release()
    freed = long_b.result(10)
    assert [future.result(10) for future in quick] == [freed] * 4
    assert not long_a.done()  # the two that waited behind it were taken back, not left there
    gate_a.release()
    assert long_a.result(10) != freed
    assert pool.statistics().completed == 6


def test_a_worker_that_dies_gives_back_the_jobs_waiting_in_it(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate = Gate(tmp_path / "gate")
    doomed = pool.submit(jobs.hold_then_exit, gate.path)
    [first_pid] = wait_until(lambda: busy_pids(pool))
    behind = [pool.submit(jobs.pid) for _ in range(3)]
    wait_until(lambda: waiting(pool) == 3, what="the jobs to be sent behind the doomed one")

    gate.release()
    with pytest.raises(WorkerDiedError, match="exit code 7"):
        doomed.result(10)
    pids = {future.result(10) for future in behind}
    assert len(pids) == 1 and first_pid not in pids  # they ran, once each, on the replacement
    stats = pool.statistics()
    assert (stats.crashed, stats.completed, stats.finished) == (1, 3, 4)


def test_cancelling_run_takes_back_a_job_waiting_in_a_worker(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    marker = tmp_path / "ran"

    async def main() -> None:
        task = asyncio.ensure_future(pool.run(jobs.create, str(marker)))
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: waiting(pool) == 1, what="the job to wait")
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: pool.statistics().cancelled == 1, what="the cancel to be counted")
    assert not holder.done()  # taken back while the job ahead of it still runs
    gate.release()
    worker_pid = holder.result(10)
    assert pool.submit(jobs.pid).result(10) == worker_pid  # no worker was killed for it
    assert not marker.exists()


def test_shutdown_cancels_the_jobs_waiting_in_workers_and_lets_running_ones_finish(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    behind = [pool.submit(jobs.create, str(tmp_path / f"ran-{i}")) for i in range(2)]
    wait_until(lambda: waiting(pool) == 2, what="the jobs to wait in the worker")

    closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    closer.start()
    for future in behind:
        with pytest.raises(JobCancelledError, match="at shutdown before it started"):
            future.result(10)
    assert not holder.done()
    gate.release()
    assert isinstance(holder.result(10), int)
    closer.join(10)
    assert not closer.is_alive()
    assert not list(tmp_path.glob("ran-*"))


def test_max_jobs_per_worker_counts_the_jobs_sent_ahead(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1, max_jobs_per_worker=3)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    quick = [pool.submit(jobs.pid) for _ in range(4)]
    wait_until(lambda: waiting(pool) == 2, what="two jobs to be sent ahead")
    gate.release()
    first = holder.result(10)
    pids = collections.Counter(future.result(10) for future in quick)
    assert pids[first] == 2  # 3 jobs in all on the first worker, then a fresh one
    assert sum(pids.values()) == 4 and len(pids) == 2


def test_large_and_small_jobs_queued_behind_a_busy_worker_all_return_their_values(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    values = [b"x" * 200_000, 1, b"y" * 50_000, "two", list(range(5000))]
    futures = [pool.submit(jobs.echo, value) for value in values]
    gate.release()
    holder.result(10)
    assert [future.result(10) for future in futures] == values


def bare_worker(name: str, watch_interval: float) -> tuple[BaseProcess, Connection]:
    """A worker process with no pool, on a pipe whose other end the test holds: the test
    plays the supervisor."""
    _launch.install()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    options = msg.WorkerOptions(
        initializer=None,
        initargs_bytes=pickle.dumps(()),
        log_level=30,
        parent_pid=os.getpid(),
        watch_interval=watch_interval,
        main=None,
        max_result_size=None,
        preload=(),
    )
    name = f"{_launch.WORKER_NAME_PREFIX}{name}"
    process = context.Process(target=worker_main, args=(child, options), name=name)
    process.start()
    child.close()
    return process, parent


def test_a_worker_skips_a_job_whose_start_deadline_passed_before_it_got_to_it() -> None:
    """The worker checks each job's deadline itself (``time.monotonic()`` is the same clock in
    every process), so a job sent ahead is never run late, even if no recall reaches it."""
    process, parent = bare_worker("deadline-test", watch_interval=0.1)
    try:
        assert parent.poll(30)
        assert parent.recv_bytes() == msg.READY
        body = pickle.dumps(("jobs:add", (1, 2), {}))
        now = time.monotonic()
        parent.send_bytes(msg.job_frame(1, now - 1, body)[msg.HEADER.size :])
        parent.send_bytes(msg.job_frame(2, now + 60, body)[msg.HEADER.size :])
        parent.send_bytes(msg.job_frame(3, None, body)[msg.HEADER.size :])
        replies = []
        for _ in range(3):
            assert parent.poll(10)
            replies.append(parent.recv_bytes())
        assert replies[0] == msg.ID_HEAD.pack(msg.MISSED, 1)
        for job_id, reply in zip((2, 3), replies[1:], strict=True):
            assert reply[: msg.ID_HEAD.size] == msg.ID_HEAD.pack(msg.RETURNED, job_id)
            assert pickle.loads(reply[msg.ID_HEAD.size :]) == 3
        parent.send_bytes(msg.STOP)
        process.join(10)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)


def test_back_to_back_jobs_from_several_threads_each_get_their_outcome(
    make_pool: PoolFactory,
) -> None:
    """A job submitted while a worker idles is written to it from the submitting thread; its
    reply can be read before that write returns. Thousands of round trips from three threads
    (and the supervisor dispatching the overflow) each end in their own value."""
    pool = make_pool(workers=2)

    def caller(offset: int) -> list[int]:
        return [pool.submit(jobs.add, offset, i).result(20) for i in range(1000)]

    with ThreadPoolExecutor(3) as threads:
        results = list(threads.map(caller, (0, 10_000, 20_000)))
    for offset, values in zip((0, 10_000, 20_000), results, strict=True):
        assert values == [offset + i for i in range(1000)]
    stats = pool.statistics()
    assert (stats.completed, stats.finished, stats.queued) == (3000, 3000, 0)


class _IdleListWatch(list[Any]):
    """A pool's idle list that notes each change made without the submitters' lock held (by
    the thread that makes it)."""

    def __init__(self, items: list[Any], lock: Any) -> None:
        super().__init__(items)
        self.lock = lock
        self.unlocked: list[str] = []

    def _check(self, what: str) -> None:
        if not self.lock._is_owned():  # (a re-entrant lock's, as Condition uses it)
            self.unlocked.append(what)

    def pop(self, index: Any = -1) -> Any:
        self._check("pop")
        return super().pop(index)

    def append(self, item: Any) -> None:
        self._check("append")
        super().append(item)

    def remove(self, item: Any) -> None:
        self._check("remove")
        super().remove(item)

    def clear(self) -> None:
        self._check("clear")
        super().clear()


def test_submitters_and_the_supervisor_take_idle_workers_under_one_lock(
    make_pool: PoolFactory,
) -> None:
    """A submitting thread takes an idle worker under the pool's lock; the supervisor, giving
    queued jobs to idle workers or making a worker idle, holds that same lock. (With a lock of
    its own, both could see the last idle worker free and both take it.)"""
    pool = make_pool(workers=2)
    supervisor = pool._supervisor
    assert supervisor is not None
    fleet = supervisor.core.fleet
    with supervisor.lock:
        watch = _IdleListWatch(fleet.idle, supervisor.lock)
        fleet.idle = supervisor.core.idle = watch

    def caller(offset: int) -> list[int]:
        return [pool.submit(jobs.add, offset, i).result(20) for i in range(200)]

    # Direct writes from the threads, and jobs queued from the main thread that the
    # supervisor hands to workers as they free up.
    queued = [pool.submit(jobs.add, 1, i) for i in range(200)]
    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(caller, (0, 1000)))
    assert [future.result(20) for future in queued] == [1 + i for i in range(200)]
    assert results == [[offset + i for i in range(200)] for offset in (0, 1000)]
    assert watch.unlocked == []


def test_a_job_under_a_lease_starts_only_if_the_lease_holds_when_its_turn_comes(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """The worker reads the pool's lease right before it starts a job submitted under one,
    however long the job waited behind another: one whose term no longer holds by then is not
    run and ends cancelled, never started; jobs under the current term, or under none, run."""
    pool = make_pool(workers=1)
    pool.hold_lease(1, 3600)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    marks = [tmp_path / f"ran-{index}" for index in range(4)]
    old = pool.submit(jobs.create, str(marks[0]), lease=1)
    wait_until(lambda: waiting(pool) == 1, what="the job sent behind the long one")
    pool.hold_lease(2, 3600)  # a new term: term 1's jobs may not start
    current = pool.submit(jobs.create, str(marks[1]), lease=2)
    free = pool.submit(jobs.create, str(marks[2]))
    gate.release()
    holder.result(30)
    with pytest.raises(JobCancelledError, match=r"not started: the lease .* \(term 1\)") as error:
        old.result(30)
    assert error.value.started is False
    assert not marks[0].exists()
    assert current.result(30) == free.result(30)  # the same worker ran both
    pool.hold_lease(2, -1)  # term 2 expired (not renewed in time)
    with pytest.raises(JobCancelledError):
        pool.submit(jobs.create, str(marks[3]), lease=2).result(30)
    assert not marks[3].exists()
    assert pool.statistics().cancelled == 2
