"""Soak under faults: thousands of jobs and runs, a seeded mix of everything that goes wrong.

At the end every job has exactly one outcome of the kind its fault implies, the counters agree
with what was seen, and nothing is left behind: no process, no descriptor, no memory growth.
``--soak-jobs N`` runs a longer soak (the default keeps it near a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_MISSED

import jobs
import tasks
from conftest import assert_gone
from corral import (
    JobCancelledError,
    JobTimeoutError,
    MemoryLimitError,
    Pool,
    PoolStatistics,
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SerializationError,
    WorkerDiedError,
)
from corral._decorator import make_spec
from schedtools import Recorder

# fault -> (weight, expected outcome)
FAULTS: dict[str, tuple[int, type[BaseException] | None]] = {
    "return": (70, None),
    "slow": (6, None),
    "raise": (6, jobs.JobFailure),
    "os._exit": (3, WorkerDiedError),
    "SIGKILL": (3, WorkerDiedError),
    "segfault": (3, WorkerDiedError),
    "unpicklable": (3, SerializationError),
    "hang": (1, JobTimeoutError),
    "ignore-sigterm": (1, JobTimeoutError),
    "child-and-hang": (1, JobTimeoutError),
    "memory": (1, MemoryLimitError),
}


def submit_fault(pool: Pool, fault: str, tmp: Path, n: int) -> Future[Any]:
    if fault == "return":
        return pool.submit(jobs.echo, n)
    if fault == "slow":
        return pool.submit(jobs.sleep, 0.05)
    if fault in ("raise", "os._exit", "SIGKILL", "segfault"):
        return pool.submit(jobs.act, "exception" if fault == "raise" else fault)
    if fault == "unpicklable":
        return pool.submit(jobs.return_unpicklable)
    if fault == "hang":
        return pool.submit(jobs.act, "hang", timeout=0.3)
    if fault == "ignore-sigterm":
        return pool.submit(jobs.ignore_sigterm_and_hang, str(tmp / f"ready-{n}"), timeout=0.3)
    if fault == "child-and-hang":
        return pool.submit(jobs.spawn_child_and_hang, str(tmp / f"child-{n}.pid"), timeout=0.5)
    assert fault == "memory"
    return pool.submit(jobs.grow_memory, 300, timeout=30)


def test_pool_soak_every_job_ends_in_the_outcome_its_fault_implies(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    count = request.config.getoption("--soak-jobs")
    rng = random.Random(20261127)
    names = list(FAULTS)
    plan = rng.choices(names, weights=[FAULTS[n][0] for n in names], k=count)
    me = psutil.Process()
    fds_before, rss_before = open_fds(), me.memory_info().rss
    pool = Pool(
        workers=4,
        kill_grace=0.1,
        max_memory="150MiB",
        memory_check_interval=0.05,
        queue_size=50,
        max_jobs_per_worker=8,
    )
    pool.start()
    futures: list[tuple[str, Future[Any]]] = []
    full = 0
    for n, fault in enumerate(plan):
        while True:
            try:
                futures.append((fault, submit_fault(pool, fault, tmp_path, n)))
                break
            except QueueFullError:  # backpressure: wait for the oldest job, then retry
                full += 1
                next(f for _, f in futures if not f.done()).exception(timeout=60)
    seen: Counter[str] = Counter()
    for (fault, future), n in zip(futures, range(count), strict=True):
        error = future.exception(timeout=120)
        expected = FAULTS[fault][1]
        if expected is None:
            assert error is None, (n, fault, error)
            seen["completed"] += 1
        else:
            assert isinstance(error, expected), (n, fault, error)
            seen[expected.__name__] += 1
    stats = pool.statistics()
    workers = [w.pid for w in stats.workers]
    pool.shutdown(wait=True, timeout=10)

    assert full > 0, "the soak should have filled the queue at least once"
    assert stats.submitted == count == stats.finished
    assert stats.completed == seen["completed"]
    assert stats.failed == seen["JobFailure"] + seen["SerializationError"]
    assert stats.crashed == seen["WorkerDiedError"]
    assert stats.timed_out == seen["JobTimeoutError"]
    assert stats.memory_exceeded == seen["MemoryLimitError"]
    assert stats.recycled > 0
    children = [int(p.read_text()) for p in tmp_path.glob("child-*.pid") if p.read_text()]
    assert children, "the soak should have started grandchildren"
    assert_gone(workers + children)
    fds_after = open_fds()
    new = {fd: what for fd, what in fds_after.items() if fds_before.get(fd) != what}
    assert len(fds_after) <= len(fds_before) + 5, f"descriptors opened and kept: {new}"
    grown = me.memory_info().rss - rss_before
    assert grown < 64 * 2**20, f"the app's memory grew by {grown / 2**20:.0f} MiB"


def open_fds() -> dict[int, str]:
    """This process's open descriptors, and what each refers to."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the one listdir used is closed by now)
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


async def _scheduler_soak(
    seconds: float,
) -> tuple[list[Any], PoolStatistics, dict[str, int], list[int]]:
    specs = [
        make_spec(tasks.where, name="steady", trigger="interval", seconds=0.05, max_instances=2),
        make_spec(tasks.fail, name="raises", trigger="interval", seconds=0.1),
        make_spec(tasks.crash, name="crashes", trigger="interval", seconds=0.2),
        make_spec(
            tasks.hang, name="hangs", trigger="interval", seconds=0.2, timeout=0.3, max_instances=2
        ),
        make_spec(
            tasks.block, name="slow", trigger="interval", seconds=0.05, args=(0.3,), max_instances=3
        ),
    ]
    config = SchedulerConfig(
        enabled=True, workers=3, kill_grace=0.1, shutdown_timeout=2, mistrigger_grace_time=0.5
    )
    scheduler = Scheduler(config, tasks=specs)
    async with scheduler:
        recorder = Recorder().attach(scheduler)
        await asyncio.sleep(seconds)  # let the soak run: the load is the point here
        asyncz, executor = scheduler.asyncz, scheduler._process_executor
        assert asyncz is not None and executor is not None and executor.pool is not None
        pids = [w.pid for w in executor.pool.statistics().workers]
    return recorder.events, executor.pool.statistics(), dict(asyncz.instances), pids


def test_scheduler_soak_releases_every_instance_and_counts_every_outcome(
    request: pytest.FixtureRequest,
) -> None:
    seconds = max(5.0, request.config.getoption("--soak-jobs") / 200)
    events, stats, instances, pids = asyncio.run(_scheduler_soak(seconds))
    outcomes = [e for e in events if e.code in (TASK_EXECUTED, TASK_ERROR, TASK_MISSED)]
    by_task = Counter((e.task_id, e.code) for e in outcomes)
    assert by_task[("steady", TASK_EXECUTED)] > 20
    assert by_task[("raises", TASK_ERROR)] > 5 and by_task[("raises", TASK_EXECUTED)] == 0
    assert by_task[("crashes", TASK_ERROR)] > 2 and by_task[("crashes", TASK_EXECUTED)] == 0
    assert by_task[("hangs", TASK_ERROR)] > 2 and by_task[("hangs", TASK_EXECUTED)] == 0
    # Every job the pool took ended in exactly one event. Events without a job: runs missed
    # before they were submitted, and run times the shutdown reached before their job was
    # submitted (a slow machine lets runs outlast shutdown_timeout; they are cancelled then).
    missed_unsubmitted = sum(1 for e in outcomes if e.code == TASK_MISSED) - stats.missed
    cancelled_unsubmitted = sum(
        1
        for e in outcomes
        if isinstance(e.exception, JobCancelledError) and e.exception.job_id is None
    )
    unsubmitted = missed_unsubmitted + cancelled_unsubmitted
    assert len(outcomes) - unsubmitted == stats.submitted == stats.finished
    errors = Counter(type(e.exception).__name__ for e in outcomes if e.code == TASK_ERROR)
    assert errors["WorkerDiedError"] == stats.crashed
    assert errors["JobTimeoutError"] == stats.timed_out
    assert instances == {}
    assert stats.workers == ()
    assert_gone(pids)
