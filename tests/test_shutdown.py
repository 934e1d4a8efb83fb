"""Shutdown keeps asyncz's contract: the runs already handed over finish and report first, up to
``shutdown_timeout``; then, or on ``kill_running()`` (a second signal), each is reported cancelled.

The tasks wait for a file the test creates (``shutdown_tasks.wait_for``), so which runs run and
which wait for a worker when the shutdown begins is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import psutil
import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED
from asyncz.schedulers import AsyncIOScheduler
from asyncz.triggers import DateTrigger, IntervalTrigger

import shutdown_tasks
from conftest import assert_gone, still_alive, wait_until
from corral import JobCancelledError, ProcessExecutor, Scheduler, SchedulerConfig, TaskSpec
from corral import scheduler as declare
from corral._decorator import make_spec
from corral._signals import signals_call
from schedtools import Recorder
from test_cli import ROOT, Output

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**options: Any) -> SchedulerConfig:
    options.setdefault("enabled", True)
    options.setdefault("workers", 2)
    options.setdefault("kill_grace", 0.2)
    options.setdefault("mistrigger_grace_time", None)
    return SchedulerConfig(**options)


def gated(gate: Path, count: int) -> list[TaskSpec]:
    """``count`` tasks due now, each waiting for ``gate`` to exist."""
    now = datetime.now(UTC)
    return [
        make_spec(
            shutdown_tasks.wait_for,
            name=f"run-{i}",
            trigger="date",
            run_date=now,
            args=(str(gate),),
        )
        for i in range(count)
    ]


async def until(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """``predicate()``'s first truthy value, looked for while the event loop goes on."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)
    return value


def executor_of(sched: Scheduler) -> ProcessExecutor:
    executor = sched._process_executor
    assert executor is not None
    return executor


async def running_and_waiting(sched: Scheduler, running: int, waiting: int) -> None:
    await until(
        lambda: (
            (s := sched.statistics()) is not None and (s.running, s.queued) == (running, waiting)
        ),
        f"{running} run(s) running and {waiting} waiting for a worker",
    )


async def draining(executor: ProcessExecutor) -> None:
    await until(lambda: executor._drain.started, "the shutdown to begin")


def open_once_draining(executor: ProcessExecutor, gate: Path) -> threading.Thread:
    """Create ``gate`` (a thread of its own) once the executor's shutdown has begun: for a
    shutdown that blocks the test's loop."""

    def open_the_gate() -> None:
        wait_until(lambda: executor._drain.started, what="the shutdown to begin")
        gate.touch()

    opener = threading.Thread(target=open_the_gate)
    opener.start()
    return opener


def cancelled(recorder: Recorder) -> list[JobCancelledError]:
    errors = [event.exception for event in recorder.matching(TASK_ERROR)]
    assert all(isinstance(error, JobCancelledError) for error in errors), errors
    return errors


# -- shutdown(wait=True) -------------------------------------------------------------------------


async def test_shutdown_runs_the_runs_already_handed_over_before_it_returns(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    sched = Scheduler(config(workers=2), tasks=gated(gate, 5))
    await sched.start()
    recorder = Recorder().attach(sched)
    asyncz, executor = sched.asyncz, executor_of(sched)
    assert asyncz is not None
    await running_and_waiting(sched, 2, 3)

    closing = asyncio.ensure_future(sched.shutdown())
    await draining(executor)
    stats = sched.statistics()
    assert stats is not None
    assert (stats.queued, stats.cancelled) == (3, 0)  # the three waiting ones are not cancelled
    assert not closing.done()
    gate.touch()
    await asyncio.wait_for(closing, 30)

    executed = recorder.matching(TASK_EXECUTED)
    assert sorted(event.task_id for event in executed) == [f"run-{i}" for i in range(5)]
    assert not recorder.matching(TASK_ERROR)
    assert dict(asyncz.instances) == {}
    final = sched.statistics()
    assert final is not None and final.workers == () and final.completed == 5


async def test_shutdown_stops_what_is_left_at_shutdown_timeout_and_reports_it_cancelled(
    tmp_path: Path,
) -> None:
    sched = Scheduler(config(workers=1, shutdown_timeout=0.5), tasks=gated(tmp_path / "never", 3))
    await sched.start()
    recorder = Recorder().attach(sched)
    asyncz = sched.asyncz
    assert asyncz is not None
    await running_and_waiting(sched, 1, 2)

    began = time.monotonic()
    await asyncio.wait_for(sched.shutdown(), 30)
    assert time.monotonic() - began >= 0.5  # the deadline, not before

    errors = cancelled(recorder)
    assert len(errors) == 3
    assert sorted(error.started for error in errors) == [False, False, True]
    (killed,) = [error for error in errors if error.started]
    assert "still running at shutdown" in str(killed)
    assert all("at shutdown before it started" in str(e) for e in errors if not e.started)
    assert dict(asyncz.instances) == {}


async def test_kill_running_during_the_drain_stops_the_runs_at_once(tmp_path: Path) -> None:
    sched = Scheduler(config(workers=1, shutdown_timeout=None), tasks=gated(tmp_path / "never", 2))
    await sched.start()
    recorder = Recorder().attach(sched)
    executor = executor_of(sched)
    await running_and_waiting(sched, 1, 1)
    pids = [w.pid for w in executor.statistics().workers]  # type: ignore[union-attr]

    closing = asyncio.ensure_future(sched.shutdown())  # no time limit: it would wait forever
    await draining(executor)
    sched.kill_running()
    await asyncio.wait_for(closing, 20)

    errors = cancelled(recorder)
    assert sorted(error.started for error in errors) == [False, True]
    assert_gone(pids)


async def test_a_shutdown_no_longer_waited_for_stops_what_is_left(tmp_path: Path) -> None:
    """A server may stop waiting for its app's lifespan (gunicorn's ASGI worker gives it 30 s)
    and cancel it: the runs left are stopped then, each with its outcome, rather than keep the
    process alive until ``shutdown_timeout``."""
    sched = Scheduler(config(workers=1, shutdown_timeout=None), tasks=gated(tmp_path / "never", 2))
    await sched.start()
    recorder = Recorder().attach(sched)
    asyncz, executor = sched.asyncz, executor_of(sched)
    assert asyncz is not None
    await running_and_waiting(sched, 1, 1)

    closing = asyncio.ensure_future(sched.shutdown())
    await draining(executor)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing

    await recorder.count(TASK_ERROR, None, 2)
    assert sorted(error.started for error in cancelled(recorder)) == [False, True]
    await until(executor._drain.finished.is_set, "the pool to shut down")
    await asyncz.shutdown(wait=False)


# -- a run with several run times ----------------------------------------------------------------


# -- shutdown(wait=False) ------------------------------------------------------------------------


async def test_shutdown_without_wait_lets_the_runs_finish_and_report(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    sched = Scheduler(config(workers=2), tasks=gated(gate, 3))
    await sched.start()
    recorder = Recorder().attach(sched)
    asyncz, executor = sched.asyncz, executor_of(sched)
    assert asyncz is not None
    await running_and_waiting(sched, 2, 1)

    await asyncio.wait_for(sched.shutdown(wait=False), 5)  # returns while they run
    assert not sched.running
    stats = executor.statistics()
    assert stats is not None and (stats.running, stats.cancelled) == (2, 0)
    gate.touch()

    executed = await recorder.count(TASK_EXECUTED, None, 3)
    assert sorted(event.task_id for event in executed) == ["run-0", "run-1", "run-2"]
    await until(executor._drain.finished.is_set, "the pool to shut down")
    assert executor.statistics().workers == ()  # type: ignore[union-attr]
    assert dict(asyncz.instances) == {}


# -- plain asyncz ----------------------------------------------------------------------------------


def plain_asyncz(executor: ProcessExecutor, gate: Path, count: int) -> AsyncIOScheduler:
    asyncz = AsyncIOScheduler(executors={"default": executor})
    asyncz.start()
    now = datetime.now(UTC)
    for i in range(count):
        asyncz.add_task(
            shutdown_tasks.wait_for,
            trigger=DateTrigger(run_at=now),
            args=[str(gate)],
            id=f"run-{i}",
            mistrigger_grace_time=None,
        )
    return asyncz


def overdue(asyncz: AsyncIOScheduler, gate: Path) -> None:
    """A task three of whose run times are due (hourly since 2.5 hours ago, not coalesced):
    asyncz hands them over in one run."""
    asyncz.add_task(
        shutdown_tasks.wait_for,
        trigger=IntervalTrigger(hours=1),
        next_run_time=datetime.now(UTC) - timedelta(hours=2, minutes=30),
        args=[str(gate)],
        id="catch-up",
        coalesce=False,
        mistrigger_grace_time=None,
    )


async def test_a_run_goes_on_to_its_next_run_times_during_the_drain(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    executor = ProcessExecutor(workers=1, kill_grace=0.2)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, gate, 0)
    asyncz.add_listener(recorder)
    overdue(asyncz, gate)
    await until(lambda: (s := executor.statistics()) and s.running == 1, "the first run time")

    closing = asyncio.ensure_future(executor.aclose())
    await draining(executor)
    gate.touch()
    await asyncio.wait_for(closing, 30)

    executed = recorder.matching(TASK_EXECUTED, "catch-up")
    assert len({event.scheduled_run_time for event in executed}) == len(executed) == 3
    assert not recorder.matching(TASK_ERROR)
    assert dict(asyncz.instances) == {}
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_run_times_not_reached_when_the_pool_stops_are_reported_cancelled(
    tmp_path: Path,
) -> None:
    executor = ProcessExecutor(workers=1, kill_grace=0.2, shutdown_timeout=0.3)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, tmp_path / "never", 0)
    asyncz.add_listener(recorder)
    overdue(asyncz, tmp_path / "never")
    await until(lambda: (s := executor.statistics()) and s.running == 1, "the first run time")
    await asyncio.wait_for(executor.aclose(), 30)

    errors = cancelled(recorder)
    assert len(errors) == 3  # one outcome per run time
    assert [error.started for error in errors] == [True, False, False]
    assert "cancelled at shutdown before it started" in str(errors[1])
    assert "shutdown_timeout" in str(errors[1])  # what to change
    assert dict(asyncz.instances) == {}
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_asyncz_own_shutdown_blocks_its_loop_until_every_run_has_reported(
    tmp_path: Path,
) -> None:
    """asyncz runs ``shutdown(wait=True)`` on the event loop's thread, which then cannot hand
    outcomes over: they are handled where they are read, and the runs go on to their end."""
    gate = tmp_path / "gate"
    executor = ProcessExecutor(workers=1, kill_grace=0.2)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, gate, 3)
    asyncz.add_listener(recorder)
    await until(
        lambda: (s := executor.statistics()) is not None and (s.running, s.queued) == (1, 2),
        "one run running and two waiting",
    )

    opener = open_once_draining(executor, gate)
    asyncz.shutdown()  # asyncz runs it on this loop, at the next turn
    await asyncio.sleep(0)
    opener.join(10)
    assert executor._drain.finished.is_set()  # it returned only once the runs were over
    executed = await recorder.count(TASK_EXECUTED, None, 3)
    assert sorted(event.task_id for event in executed) == ["run-0", "run-1", "run-2"]
    assert dict(asyncz.instances) == {}


async def test_thousands_of_run_times_not_reached_in_a_blocking_shutdown_each_report(
    tmp_path: Path,
) -> None:
    """A run with 2,000 run times when the pool stops in asyncz's own (blocking) shutdown: each
    one not reached is reported cancelled, one after another (not one call inside the other,
    which Python's recursion limit would end halfway), and the instance is released."""
    executor = ProcessExecutor(workers=1, kill_grace=0.2, shutdown_timeout=0.5)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, tmp_path / "never", 0)
    asyncz.add_listener(recorder)
    asyncz.pause()
    task = asyncz.add_task(
        shutdown_tasks.wait_for,
        trigger=IntervalTrigger(hours=1),
        args=[str(tmp_path / "never")],
        id="catch-up",
        coalesce=False,
        mistrigger_grace_time=None,
    )
    now = datetime.now(UTC)
    executor.send_task(task, [now - timedelta(seconds=2000 - i) for i in range(2000)])
    await until(lambda: (s := executor.statistics()) and s.running == 1, "the first run time")
    asyncz.shutdown()  # on this loop, at the next turn: blocks it until the runs are over
    await asyncio.sleep(0)
    assert executor._drain.finished.is_set()
    errors = cancelled(recorder)
    assert len(errors) == 2000
    assert dict(asyncz.instances) == {}


async def test_a_listener_that_looks_a_task_up_during_asyncz_own_shutdown_runs(
    tmp_path: Path,
) -> None:
    """asyncz holds its store lock (re-entrant) on the loop's thread while its shutdown waits
    for the runs: their events are dispatched on that thread, so a listener that looks a task
    up there runs at once instead of waiting for the lock forever."""
    gate = tmp_path / "gate"
    executor = ProcessExecutor(workers=1, kill_grace=0.2, shutdown_timeout=None)
    asyncz = plain_asyncz(executor, gate, 1)
    looked_up: list[tuple[str, bool]] = []

    def look_up(event: Any) -> None:
        task = asyncz.get_task(event.task_id)  # asyncz's store lock
        looked_up.append((threading.current_thread().name, task is None))

    asyncz.add_listener(look_up, TASK_EXECUTED)
    await until(lambda: (s := executor.statistics()) and s.running == 1, "the run to start")

    opener = open_once_draining(executor, gate)
    asyncz.shutdown()
    await asyncio.sleep(0)
    opener.join(10)
    assert executor._drain.finished.is_set()
    assert looked_up == [(threading.current_thread().name, True)]  # (a date task is gone)


async def test_a_listener_that_shuts_the_executor_down_waits_for_the_other_runs(
    tmp_path: Path,
) -> None:
    """A listener runs on the loop; one that calls ``shutdown(wait=True)`` blocks the loop
    there: the outcomes handed over with its event and after it are delivered on that thread
    while it waits, so it returns once the other runs have reported."""
    first_gate, second_gate = tmp_path / "first", tmp_path / "second"
    executor = ProcessExecutor(workers=2, kill_grace=0.2, shutdown_timeout=None)
    asyncz = plain_asyncz(executor, first_gate, 0)
    now = datetime.now(UTC)
    for name, gate in (("first", first_gate), ("second", second_gate)):
        asyncz.add_task(
            shutdown_tasks.wait_for,
            trigger=DateTrigger(run_at=now),
            args=[str(gate)],
            id=name,
            mistrigger_grace_time=None,
        )
    executed: list[str] = []
    returned: list[list[str]] = []

    def listener(event: Any) -> None:
        executed.append(event.task_id)
        if event.task_id == "first":
            executor.shutdown(wait=True)
            returned.append(list(executed))

    asyncz.add_listener(listener, TASK_EXECUTED)
    await until(lambda: (s := executor.statistics()) and s.running == 2, "both runs to start")

    opener = open_once_draining(executor, second_gate)
    first_gate.touch()
    await until(lambda: returned, "the listener's shutdown to return")
    opener.join(10)
    assert returned == [["first", "second"]]
    assert dict(asyncz.instances) == {}
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_an_executor_started_again_after_a_shutdown_drains_its_new_pool(
    tmp_path: Path,
) -> None:
    """asyncz can start a scheduler again after a shutdown: the executor's second shutdown
    waits for the runs handed over since, and stops the pool it started the second time."""
    gate = tmp_path / "gate"
    executor = ProcessExecutor(workers=1, kill_grace=0.2)
    asyncz = plain_asyncz(executor, gate, 0)
    asyncz.shutdown()
    await asyncio.sleep(0)
    first_pool = executor.pool
    asyncz.start()
    recorder = Recorder()
    asyncz.add_listener(recorder)
    asyncz.add_task(
        shutdown_tasks.wait_for,
        trigger=DateTrigger(run_at=datetime.now(UTC)),
        args=[str(gate)],
        id="second",
        mistrigger_grace_time=None,
    )
    await until(lambda: (s := executor.statistics()) and s.running == 1, "the run to start")
    pool = executor.pool
    assert pool is not None and pool is not first_pool
    closing = asyncio.ensure_future(executor.aclose())
    await until(lambda: executor._drain.started, "the second shutdown to begin")
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done()  # the run is still going
    gate.touch()
    await asyncio.wait_for(closing, 30)
    assert [event.task_id for event in recorder.matching(TASK_EXECUTED)] == ["second"]
    supervisor = pool._supervisor
    assert supervisor is not None
    assert supervisor.finished.wait(10)
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_a_claim_in_flight_when_the_executor_starts_again_settles_on_the_drain_it_was_on(
    tmp_path: Path,
) -> None:
    """With a database, a fire handed over is claimed first, and the drain of a shutdown waits
    for that claim. Started again before the answer comes, the executor has a drain of its
    own: the answer settles the claim on the first drain (which then ends), not the second."""
    executor = ProcessExecutor(workers=1, kill_grace=0.2, shutdown_timeout=None)
    asyncz = plain_asyncz(executor, tmp_path / "gate", 0)
    settled = executor.claim_sent()  # its answer comes after the restart
    first = executor._drain
    asyncz.shutdown(wait=False)
    await asyncio.sleep(0)
    asyncz.start()
    second = executor._drain
    assert second is not first
    assert not first.finished.is_set()  # it waits for the claim
    settled()
    await until(first.finished.is_set, "the first drain to end once its claim settled")
    assert second._claims == 0  # (taking it there would let its shutdown skip a claim)
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_an_outcome_whose_logging_raises_is_still_reported_and_releases_its_instance(
    tmp_path: Path,
) -> None:
    """A logging filter of the app raises on one run's lines: its event is still dispatched,
    its instance released, and the outcomes handed over with it are reported too."""

    class Broken(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if getattr(record, "corral_job_label", None) == "run-0":
                raise RuntimeError("a broken filter")
            return True

    gate = tmp_path / "gate"
    gate.touch()
    executor = ProcessExecutor(workers=2, kill_grace=0.2)
    executor_logger = logging.getLogger("asyncz.executors.default")
    broken = Broken()
    executor_logger.addFilter(broken)
    level = executor_logger.level
    executor_logger.setLevel(logging.INFO)
    try:
        recorder = Recorder()
        asyncz = plain_asyncz(executor, gate, 3)
        asyncz.add_listener(recorder)  # (before this loop's next turn: before any event)
        executed = await recorder.count(TASK_EXECUTED, None, 3)
        assert sorted(event.task_id for event in executed) == ["run-0", "run-1", "run-2"]
        await until(lambda: not asyncz.instances, "every instance to be released")
        await asyncio.wait_for(executor.aclose(), 30)
        assert executor._drain.runs == 0
        asyncz.shutdown()
        await asyncio.sleep(0)
    finally:
        executor_logger.removeFilter(broken)
        executor_logger.setLevel(level)


async def test_cancel_futures_cancels_the_runs_still_waiting_for_a_worker(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    executor = ProcessExecutor(workers=1, kill_grace=0.2, cancel_futures=True)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, gate, 3)
    asyncz.add_listener(recorder)
    await until(
        lambda: (s := executor.statistics()) is not None and (s.running, s.queued) == (1, 2),
        "one run running and two waiting",
    )

    closing = asyncio.ensure_future(executor.aclose())
    errors = await recorder.count(TASK_ERROR, None, 2)
    assert all("at shutdown before it started" in str(event.exception) for event in errors)
    gate.touch()
    await asyncio.wait_for(closing, 20)
    (executed,) = recorder.matching(TASK_EXECUTED)
    assert executed.task_id == "run-0"
    asyncz.shutdown()
    await asyncio.sleep(0)


async def test_send_task_with_no_run_times_does_nothing(tmp_path: Path) -> None:
    executor = ProcessExecutor(workers=1)
    recorder = Recorder()
    asyncz = plain_asyncz(executor, tmp_path / "gate", 0)
    asyncz.add_listener(recorder)
    later = DateTrigger(run_at=datetime.now(UTC) + timedelta(days=1))
    task = asyncz.add_task(shutdown_tasks.stuck, trigger=later, id="idle")

    executor.send_task(task, [])

    assert dict(asyncz.instances) == {}
    await executor.aclose()  # every outcome of what was sent is in once this returns
    stats = executor.statistics()
    assert stats is not None and stats.submitted == 0
    assert not recorder.matching(TASK_EXECUTED) and not recorder.matching(TASK_ERROR)
    asyncz.shutdown()
    await asyncio.sleep(0)


# -- signals while draining ------------------------------------------------------------------------


@pytest.fixture
def sigterm_recorded() -> Iterator[list[int]]:
    """SIGTERM goes to a handler that records it (as a server's would), not to the default."""
    seen: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    yield seen
    signal.signal(signal.SIGTERM, previous)


async def test_a_signal_while_draining_calls_stop_and_still_reaches_the_handler_before(
    sigterm_recorded: list[int],
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    stopped = asyncio.Event()
    with signals_call(stopped.set) as watching:
        assert watching
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(stopped.wait(), 10)
    assert sigterm_recorded == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before  # given back


async def test_a_signal_while_draining_still_reaches_a_handler_of_the_event_loop(
    sigterm_recorded: list[int],
) -> None:
    """hypercorn and gunicorn's workers register theirs with ``loop.add_signal_handler``."""
    loop = asyncio.get_running_loop()
    seen_by_loop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, seen_by_loop.set)
    try:
        stopped = asyncio.Event()
        with signals_call(stopped.set):
            signal.raise_signal(signal.SIGTERM)
            await asyncio.wait_for(stopped.wait(), 10)
            await asyncio.wait_for(seen_by_loop.wait(), 10)
        assert stopped.is_set() and seen_by_loop.is_set()  # both saw the one signal
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_sigint_while_draining_does_not_raise_keyboard_interrupt_midway() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stopped = asyncio.Event()
        with signals_call(stopped.set):
            signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt here
            await asyncio.wait_for(stopped.wait(), 10)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


async def test_scheduler_config_shutdown_stops_running_jobs_on_a_further_signal(
    sigterm_recorded: list[int],
) -> None:
    """What Ravyn drives: ``await config.shutdown()`` with a server's signal handlers in place."""
    cfg = config(workers=1, shutdown_timeout=None)
    declare(name="cfg-stuck", trigger="date", run_date=datetime.now(UTC))(shutdown_tasks.stuck)
    await cfg.start()
    sched = cfg.scheduler
    assert sched is not None
    recorder = Recorder().attach(sched)
    executor = executor_of(sched)
    await running_and_waiting(sched, 1, 0)

    closing = asyncio.ensure_future(cfg.shutdown())  # no time limit: it would wait forever
    await draining(executor)
    signal.raise_signal(signal.SIGTERM)  # the server's second signal
    await asyncio.wait_for(closing, 20)

    (error,) = cancelled(recorder)
    assert error.started
    assert sigterm_recorded == [signal.SIGTERM]  # the server's handler saw it too


async def test_run_stops_running_jobs_on_a_second_signal(
    tmp_path: Path, sigterm_recorded: list[int]
) -> None:
    sched = Scheduler(config(workers=1, shutdown_timeout=None), tasks=gated(tmp_path / "never", 1))
    runner = asyncio.ensure_future(sched.run())
    await until(lambda: sched.running, "the scheduler to start")
    recorder = Recorder().attach(sched)
    executor = executor_of(sched)
    await running_and_waiting(sched, 1, 0)

    signal.raise_signal(signal.SIGTERM)  # the first: finish running jobs (no time limit)
    await draining(executor)
    signal.raise_signal(signal.SIGTERM)  # the second: stop them
    await asyncio.wait_for(runner, 20)

    (error,) = cancelled(recorder)
    assert error.started


# -- a real server ---------------------------------------------------------------------------------


def test_a_second_sigint_under_uvicorn_stops_a_running_task_at_once(tmp_path: Path) -> None:
    """uvicorn ignores a second SIGINT while the app's lifespan shuts down; corral does not.

    ``tests/uvicorn_app.py`` allows a 120 s drain for a task of 60 s: only the second signal
    can end the server within the bound below.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "uvicorn_app:app", "--uds", str(tmp_path / "sock")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        output = Output(server)
        worker = int(output.wait_for(r"long task started in worker (\d+)").split()[-1])
        server.send_signal(signal.SIGINT)
        output.wait_for(r"letting 1 task run\(s\) finish")  # draining, corral's handler is in
        server.send_signal(signal.SIGINT)
        server.wait(20)
        output.wait_for(r"JobCancelledError: .* was still running at shutdown")
        output.wait_for(r"Application shutdown complete")
        assert_gone([worker])
    finally:
        server.kill()
        server.wait()
        assert server.stdout is not None
        server.stdout.close()


def test_ctrl_c_twice_under_hypercorns_worker_processes_stops_a_running_task(
    tmp_path: Path,
) -> None:
    """hypercorn's default mode serves from a daemonic worker process that ignores SIGINT: the
    first Ctrl-C (to the terminal's whole process group) reaches hypercorn's parent, which shuts
    the worker down; corral takes the second. Its workers start from a daemonic process too."""
    command = ["hypercorn", "uvicorn_app:app", "--bind", f"unix:{tmp_path}/sock"]
    stopped = ctrl_c_twice_in_a_terminal(command)
    assert stopped.status == 0
    assert "long_task" in stopped.cancelled and not stopped.left


def test_ctrl_c_twice_under_gunicorns_uvicorn_workers_stops_a_running_task(
    tmp_path: Path,
) -> None:
    """gunicorn's master and its uvicorn worker both get the terminal's Ctrl-C: the first starts
    the worker's lifespan shutdown (corral drains), the second stops the running task at once."""
    command = [
        *("gunicorn", "-k", "uvicorn.workers.UvicornWorker"),
        *("-w", "1", "-b", f"unix:{tmp_path}/sock", "uvicorn_app:app"),
    ]
    stopped = ctrl_c_twice_in_a_terminal(command, then=r"Application shutdown complete")
    # (gunicorn's own exit status after two Ctrl-Cs is not fixed: it is not asserted)
    assert "long_task" in stopped.cancelled and not stopped.left
    assert "Application shutdown complete" in stopped.then


class Stopped(NamedTuple):
    status: int  # the server's exit status
    cancelled: str  # the line that reports the running task cancelled
    then: str  # the line matching ``then``, if asked for
    left: list[tuple[int, str]]  # the app's processes still alive (pid, status)


def ctrl_c_twice_in_a_terminal(module_and_args: list[str], *, then: str | None = None) -> Stopped:
    """Serve ``tests/uvicorn_app.py`` with ``python -m <module_and_args>`` in a process group of
    its own, as a terminal does, and press Ctrl-C twice once its long task runs (a 60-s task
    with a 120-s drain allowed): the first starts the drain, the second must stop the task.
    Returns what it saw: the exit status, the lines, and the app's processes still alive once
    the server exited (waiting a few seconds for them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", *module_and_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # a terminal's process group: Ctrl-C reaches all of it
    )
    try:
        output = Output(server)
        worker = int(output.wait_for(r"long task started in worker (\d+)").split()[-1])
        app_processes = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        os.killpg(server.pid, signal.SIGINT)
        output.wait_for(r"letting 1 task run\(s\) finish")
        os.killpg(server.pid, signal.SIGINT)
        cancelled = output.wait_for(r"JobCancelledError: .* was still running at shutdown")
        seen = "" if then is None else output.wait_for(then)
        status = server.wait(20)
        return Stopped(status, cancelled, seen, still_alive([worker, *app_processes]))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        assert server.stdout is not None
        server.stdout.close()
