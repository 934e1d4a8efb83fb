"""The scheduler API over the pool: config, @scheduler, the asyncz executor, and running it."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from asyncz.events.constants import (
    TASK_ERROR,
    TASK_EXECUTED,
    TASK_MAX_INSTANCES,
    TASK_MISSED,
)
from asyncz.schedulers import AsyncIOScheduler
from asyncz.triggers import DateTrigger, IntervalTrigger

import corral
import tasks
from conftest import assert_gone
from corral import (
    ConfigurationError,
    JobTimeoutError,
    ProcessExecutor,
    Scheduler,
    SchedulerConfig,
    WorkerDiedError,
    scheduler,
)
from corral._decorator import make_spec, unregister
from schedtools import Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(fn: Any, name: str, **options: Any) -> corral.TaskSpec:
    options.setdefault("trigger", "interval")
    if options["trigger"] == "interval":
        options.setdefault("seconds", 0.2)
    return make_spec(fn, name=name, **options)


def config(**options: Any) -> SchedulerConfig:
    options.setdefault("enabled", True)
    options.setdefault("workers", 2)
    options.setdefault("kill_grace", 0.2)
    return SchedulerConfig(**options)


# -- SchedulerConfig ---------------------------------------------------------------------------


def test_config_has_the_documented_defaults() -> None:
    cfg = SchedulerConfig()
    assert (cfg.enabled, cfg.timezone, cfg.max_instances, cfg.coalesce) == (False, "UTC", 1, False)
    assert cfg.executor == "process"
    assert cfg.start_method == "forkserver"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers"),
        ({"timeout": -1}, "timeout"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"executor": "gpu"}, "executor.*'process', 'thread', 'asyncio' or 'dask'"),
        ({"max_instances": 0}, "max_instances"),
        ({"enabeld": True}, "enabeld.*Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"(?s){message}"):
        SchedulerConfig(**options)


def test_config_reads_the_environment_but_code_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_WORKERS", "3")
    monkeypatch.setenv("CORRAL_ENABLED", "true")
    monkeypatch.setenv("CORRAL_MODULES", "tasks, jobs")
    monkeypatch.setenv("CORRAL_MAX_MEMORY", "256MiB")
    monkeypatch.setenv("CORRAL_INITARGS", '["db.sqlite", 3]')
    cfg = SchedulerConfig()
    assert cfg.initargs == ("db.sqlite", 3)
    assert (cfg.workers, cfg.enabled, cfg.modules) == (3, True, ("tasks", "jobs"))
    assert cfg.max_memory == 256 * 1024 * 1024
    assert SchedulerConfig(workers=5).workers == 5
    monkeypatch.setenv("CORRAL_WORKERS", "zero")
    with pytest.raises(ValueError, match="workers"):
        SchedulerConfig()


async def test_disabled_config_starts_nothing_and_spawns_no_process() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cfg = SchedulerConfig(enabled=False)
    await cfg.start()
    assert cfg.scheduler is not None
    assert not cfg.scheduler.running
    assert cfg.statistics() is None
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after - before == set()
    await cfg.shutdown()


# -- @scheduler ----------------------------------------------------------------------------------


@pytest.fixture
def declared() -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    for task_id in ids:
        unregister(task_id)


def test_decorator_returns_the_function_itself(declared: list[str]) -> None:
    decorated = scheduler(name="t-where", trigger="interval", hours=1)(tasks.where)
    declared.append("t-where")
    assert decorated is tasks.where
    assert decorated() == os.getpid()
    assert pickle.loads(pickle.dumps(decorated)) is tasks.where
    options = decorated.__corral_task__  # type: ignore[attr-defined]
    assert options.id == "t-where"
    assert options.trigger_args == {"hours": 1}
    assert options in corral.registered_tasks()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"trigger": "interval", "hour": 1},
            "interval trigger has no argument 'hour'; did you mean 'hours'",
        ),
        ({"trigger": "interval"}, "needs a length"),
        ({"trigger": "interval", "minutes": -5}, "minutes=-5"),
        ({"trigger": "cron", "hour": 25}, "invalid cron trigger.*25"),
        ({"trigger": "cron", "day_of_week": "funday"}, "funday"),
        ({"trigger": "cron", "hours": 1}, "did you mean 'hour'"),
        ({"trigger": "date", "run_time": "2030-01-01"}, "did you mean 'run_at'|run_date"),
        ({"trigger": "weekly"}, "unknown trigger 'weekly'"),
        ({}, "needs a trigger"),
        ({"trigger": "interval", "hours": 1, "executor": "gpu"}, "executor='gpu'"),
        ({"trigger": "interval", "hours": 1, "max_instances": 0}, "max_instances=0"),
        ({"trigger": "interval", "hours": 1, "timeout": 0}, "timeout=0"),
        (
            {"trigger": "interval", "hours": 1, "timeout": 5, "executor": "thread"},
            "needs executor='process'",
        ),
    ],
)
def test_decorator_rejects_what_asyncz_would_misread(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"(?s){message}"):
        scheduler(name="bad", **kwargs)(tasks.where)
    assert "bad" not in {s.id for s in corral.registered_tasks()}


def test_date_trigger_takes_run_date(declared: list[str]) -> None:
    when = datetime(2030, 12, 31, 23, 59, tzinfo=UTC)
    scheduler(name="t-campaign", trigger="date", run_date=when)(tasks.where)
    declared.append("t-campaign")
    trigger = tasks.where.__corral_task__.build_trigger("UTC")  # type: ignore[attr-defined]
    assert isinstance(trigger, DateTrigger)
    assert trigger.get_next_trigger_time(UTC, None) == when


def test_functions_that_cannot_run_in_a_worker_are_refused_at_decoration() -> None:
    def local() -> None:
        pass

    with pytest.raises(ConfigurationError, match="defined inside another function"):
        scheduler(name="local", trigger="interval", hours=1)(local)
    # The same function is fine where it runs in the parent.
    assert make_spec(local, name="local", trigger="interval", hours=1, executor="thread")


def test_one_id_belongs_to_one_function(declared: list[str]) -> None:
    scheduler(name="t-dup", trigger="interval", hours=1)(tasks.where)
    declared.append("t-dup")
    with pytest.raises(ConfigurationError, match="already used by tasks:where"):
        scheduler(name="t-dup", trigger="interval", hours=1)(tasks.block)


# -- the executor with plain asyncz --------------------------------------------------------------


@pytest.mark.parametrize("form", ["instance", "dict"])
async def test_process_executor_is_a_drop_in_for_asyncz(form: str) -> None:
    executor: Any = (
        ProcessExecutor(workers=1)
        if form == "instance"
        else {"class": "corral:ProcessExecutor", "workers": 1}
    )
    asyncz = AsyncIOScheduler(executors={"default": executor})
    asyncz.start()
    recorder = Recorder()
    asyncz.add_listener(recorder)
    try:
        every = IntervalTrigger(seconds=0.2)  # type: ignore[arg-type]
        asyncz.add_task(tasks.where, trigger=every, id="where")
        (event, *_) = await recorder.count(TASK_EXECUTED, "where", 1)
        assert event.return_value != os.getpid()
        pool = asyncz.executors["default"].pool  # type: ignore[attr-defined]
        assert event.return_value in [w.pid for w in pool.statistics().workers]
    finally:
        asyncz.shutdown()
        await asyncio.sleep(0)  # asyncz shuts down on its loop


# -- outcomes become events ----------------------------------------------------------------------


async def test_every_outcome_becomes_one_event_and_releases_the_instance() -> None:
    sched = Scheduler(
        config(workers=2, mistrigger_grace_time=None),  # no run is missed: every one is a job
        tasks=[
            spec(tasks.where, "ok"),
            spec(tasks.fail, "fails"),
            spec(tasks.crash, "crashes", seconds=0.3),
            spec(tasks.hang, "hangs", timeout=0.3, seconds=0.3),
        ],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        (ok, *_) = await recorder.count(TASK_EXECUTED, "ok", 2)
        (failed, *_) = await recorder.count(TASK_ERROR, "fails", 1)
        (crashed, *_) = await recorder.count(TASK_ERROR, "crashes", 2)
        (hung, *_) = await recorder.count(TASK_ERROR, "hangs", 2)
        assert ok.return_value != os.getpid()
        assert isinstance(failed.exception, tasks.TaskFailure)
        assert "task failed on purpose" in failed.traceback
        assert "in fail" in failed.traceback
        assert isinstance(crashed.exception, WorkerDiedError)
        assert "SIGSEGV" in str(crashed.exception)
        assert isinstance(hung.exception, JobTimeoutError)
        asyncz, executor = sched.asyncz, sched._process_executor
        assert asyncz is not None
        assert executor is not None
        assert executor.pool is not None
    # After shutdown: every job submitted ended in exactly one event, every instance released.
    stats = executor.pool.statistics()
    outcomes = [e for e in recorder.events if e.code in (TASK_EXECUTED, TASK_ERROR, TASK_MISSED)]
    assert len(outcomes) == stats.submitted == stats.finished
    assert stats.crashed >= 2
    assert stats.timed_out >= 2
    assert dict(asyncz.instances) == {}


async def test_a_hung_task_times_out_and_runs_again() -> None:
    sched = Scheduler(config(workers=1), tasks=[spec(tasks.hang, "hangs", timeout=0.3)])
    async with sched:
        recorder = Recorder().attach(sched)
        errors = await recorder.count(TASK_ERROR, "hangs", 3)
        assert all(isinstance(e.exception, JobTimeoutError) for e in errors)
        # max_instances=1: later run times were skipped while it hung, then it ran again.
        assert recorder.matching(TASK_MAX_INSTANCES, "hangs")


async def test_a_crashing_task_fails_alone_and_scheduling_goes_on() -> None:
    sched = Scheduler(
        config(workers=2), tasks=[spec(tasks.crash, "crashes"), spec(tasks.where, "steady")]
    )
    async with sched:
        recorder = Recorder().attach(sched)
        await recorder.count(TASK_ERROR, "crashes", 3)
        await recorder.count(TASK_EXECUTED, "steady", 3)
        assert not recorder.matching(TASK_ERROR, "steady")


async def test_a_run_that_waits_for_a_worker_past_its_grace_time_still_runs() -> None:
    sched = Scheduler(
        config(workers=1),
        tasks=[
            # Runs of "late" wait up to 3 s behind the hog, past a grace time that even a busy
            # machine's scheduler keeps when it hands a run over.
            spec(tasks.block, "hog", args=(3.0,), seconds=10),
            spec(tasks.where, "late", seconds=0.2, mistrigger_grace_time=1.0),
        ],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        await recorder.count(TASK_EXECUTED, "hog", 1)
        await recorder.count(TASK_EXECUTED, "late", 2)
    # The grace time measures how late the scheduler hands a run over, not the queue.
    assert recorder.matching(TASK_MISSED, "late") == []


async def test_max_instances_allows_that_many_runs_at_once() -> None:
    sched = Scheduler(
        config(workers=2),
        tasks=[spec(tasks.block, "heavy", args=(0.8,), seconds=0.1, max_instances=2)],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        await recorder.count(TASK_MAX_INSTANCES, "heavy", 1)
        stats = await recorder.wait(
            lambda: (s := sched.statistics()) is not None and s.running == 2 and s,
            what="two runs at once",
        )
        assert [w.job_label for w in stats.workers] == ["heavy", "heavy"]


@pytest.mark.parametrize("executor", ["process", "thread", "asyncio"])
async def test_async_tasks_run_their_body_on_every_executor(executor: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    sched = Scheduler(
        config(executor=executor),
        tasks=[spec(tasks.async_touch, "async", args=(str(marker),))],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        (event, *_) = await recorder.count(TASK_EXECUTED, "async", 1)
    assert marker.read_text() == "ran"
    if executor == "process":
        assert event.return_value == "async body ran"


async def test_sync_blocking_and_cpu_tasks_run_in_workers_while_the_loop_stays_responsive() -> None:
    sched = Scheduler(
        config(workers=2),
        tasks=[
            spec(tasks.burn, "cpu", args=(1.5,), seconds=0.1),
            spec(tasks.block, "blocking", args=(1.5,), seconds=0.1),
        ],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        lags: list[float] = []
        while not (
            recorder.matching(TASK_EXECUTED, "cpu") and recorder.matching(TASK_EXECUTED, "blocking")
        ):
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - before - 0.01)
            assert len(lags) < 5000, "tasks did not finish"
        stats = sched.statistics()
        assert stats is not None
        assert stats.completed >= 2
    # A generous safety net, not a performance claim: the loop was never stalled by the tasks.
    assert max(lags) < 0.5


async def test_the_pool_stops_with_the_scheduler() -> None:
    sched = Scheduler(config(workers=2), tasks=[spec(tasks.where, "ok")])
    async with sched:
        recorder = Recorder().attach(sched)
        await recorder.count(TASK_EXECUTED, "ok", 1)
        stats = sched.statistics()
        assert stats is not None
        pids = [w.pid for w in stats.workers]
    final = sched.statistics()
    assert final is not None and final.workers == () and final.completed >= 1
    assert_gone(pids)


async def test_add_task_programmatically_with_a_timeout() -> None:
    sched = Scheduler(config(workers=1), tasks=[])
    async with sched:
        recorder = Recorder().attach(sched)
        sched.add_task(tasks.hang, trigger="interval", seconds=0.2, name="added", timeout=0.2)
        (event, *_) = await recorder.count(TASK_ERROR, "added", 1)
        assert isinstance(event.exception, JobTimeoutError)
        assert event.exception.timeout == 0.2


async def test_config_default_timeout_applies_to_process_tasks() -> None:
    sched = Scheduler(config(workers=1, timeout=0.2), tasks=[spec(tasks.hang, "hangs")])
    async with sched:
        recorder = Recorder().attach(sched)
        (event, *_) = await recorder.count(TASK_ERROR, "hangs", 1)
        assert event.exception.timeout == 0.2


async def test_run_until_stopped() -> None:
    stop = asyncio.Event()
    sched = Scheduler(config(workers=1), tasks=[spec(tasks.where, "ok")])
    runner = asyncio.ensure_future(sched.run(stop=stop))
    while not sched.running:
        await asyncio.sleep(0.01)
    recorder = Recorder().attach(sched)
    await recorder.count(TASK_EXECUTED, "ok", 1)
    stop.set()
    await asyncio.wait_for(runner, 20)
    assert not sched.running


async def test_start_reports_tasks_whose_function_is_not_importable() -> None:
    def local() -> None:
        pass

    local.__qualname__ = (
        "local"  # pretends to be module-level, but tests_scheduler has no such name
    )
    sched = Scheduler(config(workers=1), tasks=[spec(local, "ghost")])
    with pytest.raises(ConfigurationError, match=r"task 'ghost'.*is not what"):
        await sched.start()
    assert not sched.running


async def test_shutdown_stops_running_tasks_after_the_shutdown_timeout() -> None:
    sched = Scheduler(
        config(workers=1, shutdown_timeout=0.3, mistrigger_grace_time=None),
        tasks=[spec(tasks.hang, "hangs")],
    )
    await sched.start()
    recorder = Recorder().attach(sched)
    await recorder.wait(lambda: (s := sched.statistics()) is not None and s.running == 1)
    asyncz = sched.asyncz
    assert asyncz is not None
    await asyncio.wait_for(sched.shutdown(), 20)
    (event,) = recorder.matching(TASK_ERROR, "hangs")
    assert isinstance(event.exception, corral.JobCancelledError)
    assert "still running at shutdown" in str(event.exception)
    assert dict(asyncz.instances) == {}


async def test_a_run_refused_by_a_full_queue_is_reported_not_dropped() -> None:
    sched = Scheduler(
        config(workers=1, queue_size=1, mistrigger_grace_time=None),
        tasks=[spec(tasks.block, "hog", args=(1.0,), seconds=0.05, max_instances=5)],
    )
    async with sched:
        recorder = Recorder().attach(sched)
        (event, *_) = await recorder.count(TASK_ERROR, "hog", 1)
        assert isinstance(event.exception, corral.QueueFullError)
        asyncz = sched.asyncz
        assert asyncz is not None
    assert dict(asyncz.instances) == {}
