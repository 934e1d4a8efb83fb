"""No run is lost to a busy or starting pool: the grace time measures the scheduler's lateness,
a queued run waits for a worker, saturation is visible, and events come in asyncz's order."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from asyncz.events.constants import (
    TASK_EXECUTED,
    TASK_MISSED,
    TASK_SUBMITTED,
)

import jobs
from corral import ProcessExecutor, Scheduler, SchedulerConfig, _executor
from schedtools import Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_runs_due_while_every_worker_is_busy_wait_and_run_none_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sched = Scheduler(SchedulerConfig(enabled=True, workers=1))
    with caplog.at_level(logging.WARNING, logger="corral.executor"):
        async with sched:
            recorder = Recorder().attach(sched)
            # Added once the scheduler runs: its start on a busy machine is no lateness.
            soon = datetime.now(UTC) + timedelta(seconds=0.5)
            sched.add_task(jobs.sleep, trigger="date", run_date=soon, args=(3.0,), name="long")
            sched.add_task(jobs.pid, trigger="interval", seconds=1, name="beat")
            once = soon + timedelta(seconds=0.5)  # due while "long" holds the only worker
            sched.add_task(jobs.pid, trigger="date", run_date=once, name="once")
            await recorder.count(TASK_EXECUTED, "long", 1, timeout=60)
            await recorder.count(TASK_EXECUTED, "once", 1, timeout=60)
            await recorder.count(TASK_EXECUTED, "beat", 3, timeout=60)
            stats = sched.statistics()
    assert recorder.matching(TASK_MISSED) == []  # waiting for a worker is not a misfire
    long_done = recorder.matching(TASK_EXECUTED, "long")[0]
    assert long_done.return_value == 3.0
    assert stats is not None and stats.waited >= 1  # runs that waited over a second
    waits = [r.getMessage() for r in caplog.records if "for a free worker" in r.getMessage()]
    assert any("Task 'once' waited" in m or "Task 'beat' waited" in m for m in waits), waits
    assert all("raise workers=" in message for message in waits)
    # At most one warning per task (a minute has not passed).
    tasks = [message.split("'")[1] for message in waits]
    assert len(tasks) == len(set(tasks))


async def test_a_run_due_while_workers_start_slowly_waits_for_them() -> None:
    sched = Scheduler(
        SchedulerConfig(enabled=True, workers=1, initializer=jobs.sleep, initargs=(2.0,))
    )
    async with sched:  # its worker takes 2 s to start
        recorder = Recorder().attach(sched)
        soon = datetime.now(UTC) + timedelta(seconds=0.2)
        sched.add_task(jobs.pid, trigger="date", run_date=soon, name="first")
        [done] = await recorder.count(TASK_EXECUTED, "first", 1, timeout=60)
    assert recorder.matching(TASK_MISSED) == []
    assert isinstance(done.return_value, int)


async def test_a_run_too_late_to_start_is_submitted_then_reported_missed() -> None:
    late = datetime.now(UTC) - timedelta(seconds=30)
    sched = Scheduler(SchedulerConfig(enabled=True, workers=1))
    sched.add_task(jobs.noop, trigger="date", run_date=late, name="late", mistrigger_grace_time=1)
    async with sched:
        recorder = Recorder().attach(sched)
        # The scheduler was already started: the run is handed over on its next wake-up.
        await recorder.count(TASK_MISSED, "late", 1, timeout=30)
    codes = [e.code for e in recorder.events if getattr(e, "task_id", None) == "late"]
    assert codes.index(TASK_SUBMITTED) < codes.index(TASK_MISSED)


async def test_max_instances_above_workers_is_warned_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sched = Scheduler(SchedulerConfig(enabled=True, workers=2))
    sched.add_task(jobs.noop, trigger="interval", hours=1, name="wide", max_instances=5)
    with caplog.at_level(logging.WARNING, logger="corral.scheduler"):
        async with sched:
            pass
    [warning] = [r.getMessage() for r in caplog.records if "max_instances=5" in r.getMessage()]
    assert "Task 'wide'" in warning and "workers=2" in warning
    assert "raise workers or lower max_instances" in warning


def test_waits_warn_once_a_minute_per_task_and_for_five_tasks_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of many tasks that all wait gives five lines and a count, not a line each; a
    task is warned about again after a minute. (Only the clock is simulated.)"""
    now = [1000.0]
    monkeypatch.setattr(_executor, "time", SimpleNamespace(monotonic=lambda: now[0]))
    executor = ProcessExecutor(workers=2)
    waited = SimpleNamespace(queue_wait=2.5)  # a job's future, as far as the warning reads

    def started(task_id: str) -> None:
        run = SimpleNamespace(task_id=task_id)
        executor._note_start(run, datetime.now(UTC), waited)  # type: ignore[arg-type]

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "for a free worker" in r.getMessage()]
        caplog.clear()
        return found

    caplog.set_level(logging.WARNING, logger="corral.executor")
    for i in range(100):
        started(f"task-{i}")
    started("task-0")
    lines = warnings()
    assert [line.split("'")[1] for line in lines] == [f"task-{i}" for i in range(5)]
    assert all("waited 2.5 s" in line and "raise workers=" in line for line in lines)

    now[0] += 30  # the same minute: nothing new
    started("task-99")
    assert warnings() == []

    now[0] += 31  # a minute on: a line, with the count of the runs not warned about
    started("task-0")
    started("task-1")
    [first, second] = warnings()
    assert "Task 'task-0' waited" in first and "97 more run(s) waited" in first
    assert "Task 'task-1' waited" in second and "more run(s)" not in second
