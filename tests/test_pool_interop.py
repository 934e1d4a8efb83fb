"""The pool where Python code expects one: ``await pool.run`` under trio as under asyncio, and
``pool.executor()`` wherever a ``concurrent.futures.Executor`` is expected."""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import functools
import os
import threading
import time
from pathlib import Path

import anyio
import pytest
import trio

import jobs
from conftest import PoolFactory, busy_pids, wait_until
from corral import (
    JobCancelledError,
    JobFuture,
    JobMissedError,
    JobTimeoutError,
    Pool,
    PoolExecutor,
)
from corral._pool._condition import FutureCondition
from test_pool_batches import Gate, hold_the_only_worker, waiting

# -- trio -----------------------------------------------------------------------------------------


def test_run_awaits_the_value_under_trio(pool: Pool) -> None:
    async def main() -> tuple[int, int, int]:
        return (
            await pool.run(jobs.add, 1, 2),
            await pool.run(jobs.async_add, 3, 4),
            await pool.run(jobs.pid),
        )

    added, awaited, pid = trio.run(main)
    assert (added, awaited) == (3, 7)
    assert pid != os.getpid()


def test_run_raises_the_jobs_exception_under_trio(pool: Pool) -> None:
    async def main() -> None:
        with pytest.raises(jobs.JobFailure, match="disk full"):
            await pool.run(jobs.fail, "disk full")
        with pytest.raises(JobTimeoutError):
            await pool.run(jobs.sleep, 60, timeout=0.3)

    trio.run(main)


def test_runs_wait_side_by_side_under_anyio_on_trio(pool: Pool) -> None:
    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await pool.run(jobs.add, n, n)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for n in range(6):
                group.start_soon(one, n)

    anyio.run(main, backend="trio")
    assert results == {n: 2 * n for n in range(6)}


def test_cancelling_run_under_trio_kills_the_running_job(pool: Pool) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(pool.run, jobs.sleep, 60))
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: busy_pids(pool), what="the job to start")
            )
            nursery.cancel_scope.cancel()

    began = time.monotonic()
    trio.run(main)
    stats = wait_until(
        lambda: (s := pool.statistics()).cancelled == 1 and s, what="the cancel to be counted"
    )
    assert stats.completed == 0  # killed, not run to its end
    wait_until(lambda: not busy_pids(pool), what="the worker to be free")
    assert time.monotonic() - began < 60  # long before the job's own end


def test_cancelling_run_under_trio_takes_back_a_job_that_has_not_started(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    marker = tmp_path / "ran"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(pool.run, jobs.create, str(marker)))
            await trio.to_thread.run_sync(
                lambda: wait_until(lambda: waiting(pool) == 1, what="the job to wait")
            )
            nursery.cancel_scope.cancel()

    trio.run(main)
    wait_until(lambda: pool.statistics().cancelled == 1, what="the cancel to be counted")
    assert not holder.done()  # taken back while the job ahead of it still runs
    gate.release()
    worker_pid = holder.result(10)
    assert pool.submit(jobs.pid).result(10) == worker_pid  # no worker was killed for it
    assert not marker.exists()


# -- concurrent.futures.Executor ------------------------------------------------------------------


def test_the_executor_is_a_concurrent_futures_executor_over_the_pool(pool: Pool) -> None:
    executor = pool.executor(label="report")
    assert isinstance(executor, concurrent.futures.Executor)
    assert isinstance(executor, PoolExecutor)
    future = executor.submit(jobs.takes, value=3)
    assert isinstance(future, JobFuture)
    assert (future.result(10), future.label) == ("int", "report")
    assert executor.submit(jobs.pid).result(10) != os.getpid()


def test_run_in_executor_runs_in_a_worker(pool: Pool) -> None:
    async def main() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        executor = pool.executor()
        return (
            await loop.run_in_executor(executor, jobs.add, 1, 2),
            await loop.run_in_executor(executor, functools.partial(jobs.add, b=10), 5),
            await loop.run_in_executor(executor, jobs.pid),
        )

    added, partial, pid = asyncio.run(main())
    assert (added, partial) == (3, 15)
    assert pid != os.getpid()


def test_map_keeps_the_executors_timeout_for_each_call(pool: Pool) -> None:
    executor = pool.executor(timeout=2)
    results = executor.map(jobs.sleep, [0, 60, 0])
    assert next(results) == 0
    with pytest.raises(JobTimeoutError, match="ran past its timeout of 2"):
        next(results)
    assert list(executor.map(jobs.add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    assert pool.statistics().timed_out == 1


def test_maps_own_timeout_stops_the_calls_still_running(pool: Pool) -> None:
    executor = pool.executor(timeout=None)
    results = executor.map(jobs.sleep, [60, 60], timeout=0.5)
    with pytest.raises(TimeoutError):
        next(results)
    wait_until(lambda: pool.statistics().cancelled == 2, what="both calls to be stopped")
    wait_until(lambda: not busy_pids(pool), what="the workers to be free")


def test_map_with_a_buffer_submits_as_results_are_read(pool: Pool) -> None:
    executor = pool.executor()
    assert list(executor.map(jobs.add, range(10), range(10), buffersize=2)) == list(range(0, 20, 2))
    assert pool.statistics().submitted == 10
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(jobs.add, [1], [1], buffersize=0)


def test_start_within_is_carried_to_each_call(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = make_pool(workers=1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    late = pool.executor(start_within=0.2).submit(jobs.pid)
    with pytest.raises(JobMissedError):
        late.result(10)
    gate.release()
    holder.result(10)


def test_with_block_waits_for_its_calls_then_refuses_new_ones(pool: Pool) -> None:
    with pool.executor() as executor:
        futures = [executor.submit(jobs.sleep, 0.2) for _ in range(4)]
    assert all(future.done() for future in futures)
    assert [future.result() for future in futures] == [0.2] * 4
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(jobs.pid)
    assert pool.submit(jobs.add, 1, 1).result(10) == 2  # the pool keeps running


def test_shutdown_can_cancel_the_calls_not_started(make_pool: PoolFactory, tmp_path: Path) -> None:
    pool = make_pool(workers=1)
    gate = Gate(tmp_path / "gate")
    executor = pool.executor()
    holder = executor.submit(jobs.hold, gate.path)
    wait_until(lambda: busy_pids(pool), what="the worker to be busy")
    queued = [executor.submit(jobs.create, str(tmp_path / f"ran-{n}")) for n in range(3)]
    executor.shutdown(wait=False, cancel_futures=True)
    for future in queued:
        with pytest.raises((concurrent.futures.CancelledError, JobCancelledError)):
            future.result(10)
    assert not holder.done()
    gate.release()
    executor.shutdown(wait=True)
    assert holder.result() == holder.worker_pid
    assert not list(tmp_path.glob("ran-*"))


def test_shutdown_in_a_calls_done_callback_returns_and_the_other_calls_go_on(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """The callback runs on the thread that handles the replies the other calls wait for:
    ``shutdown(wait=True)`` there returns without waiting (as ``Pool.shutdown`` does), and the
    calls end as they would."""
    pool = make_pool(workers=2)
    first_gate, second_gate = Gate(tmp_path / "first"), Gate(tmp_path / "second")
    executor = pool.executor()
    second = executor.submit(jobs.hold, second_gate.path)
    first = executor.submit(jobs.hold, first_gate.path)
    returned = threading.Event()

    def shut_down(_: object) -> None:
        executor.shutdown(wait=True)
        returned.set()

    first.add_done_callback(shut_down)
    first_gate.release()
    assert returned.wait(10), "shutdown in the done-callback waited"
    assert not second.done()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(jobs.pid)
    second_gate.release()
    assert second.result(10) == second.worker_pid
    assert pool.submit(jobs.add, 1, 2).result(10) == 3


def test_waiting_for_another_job_in_a_done_callback_is_refused_at_once(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """A done-callback runs on the thread that handles the pool's replies; waiting there for a
    job that is not done would wait for that very thread: ``RuntimeError`` says so at once,
    and supervision goes on."""
    pool = make_pool(workers=2)
    first_gate, second_gate = Gate(tmp_path / "first"), Gate(tmp_path / "second")
    first = pool.submit(jobs.hold, first_gate.path)
    second = pool.submit(jobs.hold, second_gate.path)
    raised: list[BaseException] = []
    called = threading.Event()

    def wait_for_second(_: object) -> None:
        try:
            second.result(5)
        except BaseException as exc:
            raised.append(exc)
        called.set()

    first.add_done_callback(wait_for_second)
    first_gate.release()
    assert called.wait(10)
    [error] = raised
    assert isinstance(error, RuntimeError)
    assert f"job {second.job_id} is not done, and this thread cannot wait for it" in str(error)
    assert "add_done_callback" in str(error)
    second_gate.release()
    assert second.result(10) == second.worker_pid


# -- the job's future -----------------------------------------------------------------------------


def test_a_job_future_has_the_state_of_a_future() -> None:
    """``JobFuture`` sets ``Future``'s state itself (with a lighter condition): every attribute
    ``Future.__init__`` sets is there, so a new Python's additions are noticed here."""
    plain = vars(concurrent.futures.Future())
    future: JobFuture[int] = JobFuture(1, "label")
    assert set(plain) <= set(vars(future))
    assert not future.done() and not future.running()


def test_job_futures_work_with_the_standard_waiting_functions(pool: Pool, tmp_path: Path) -> None:
    """``concurrent.futures.wait`` and ``as_completed`` wait on a job's future as on any, and
    several threads can wait on one future, with or without a timeout."""
    gate = Gate(tmp_path / "gate")
    held = pool.submit(jobs.hold, gate.path)
    quick = [pool.submit(jobs.add, n, n) for n in range(5)]
    assert held in concurrent.futures.wait([held, *quick], timeout=0.2).not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(quick, timeout=60)) == [
        0,
        2,
        4,
        6,
        8,
    ]
    with pytest.raises(concurrent.futures.TimeoutError):
        held.result(timeout=0.05)
    with concurrent.futures.ThreadPoolExecutor(4) as waiters:
        results = [waiters.submit(held.result, 60) for _ in range(4)]
        first = concurrent.futures.wait([held], return_when="FIRST_COMPLETED", timeout=0.05)
        assert first.not_done == {held}
        gate.release()
        pids = {r.result(60) for r in results}
    assert len(pids) == 1 and held.done()


def test_the_futures_condition_behaves_as_threading_condition() -> None:
    """Waiting needs the lock, gives all of it up (a reentrant hold too) until notified or
    timed out, and takes it back; a waiter that timed out is not left behind. It is one object,
    the lock itself, with no ``__dict__`` for the collector to visit."""
    condition = FutureCondition()
    assert isinstance(condition, _thread.RLock) and not hasattr(condition, "__dict__")
    with pytest.raises(RuntimeError, match="un-acquired"):
        condition.wait(0)
    with condition:
        assert condition.wait(0) is False
        assert condition.wait(0.01) is False
        assert not condition._waiters  # the timed-out waiters were removed
    woke = threading.Event()
    result: list[bool] = []

    def waiter() -> None:
        with condition, condition:  # held twice: wait gives up both
            woke.set()
            result.append(condition.wait(60))

    thread = threading.Thread(target=waiter)
    thread.start()
    woke.wait(60)
    with condition:  # the waiter gave the lock up: this thread can take it
        condition.notify_all()
    thread.join(60)
    assert result == [True]
    assert condition.acquire(blocking=False)  # and the waiter gave it back in full
    condition.release()
