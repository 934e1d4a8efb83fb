"""The scheduler guide's examples (docs/examples/guide_*.py) do what the guide says."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from asyncz.events.constants import TASK_EXECUTED

from asgi import lifespan_of
from conftest import assert_gone
from corral import Pool, Scheduler, SchedulerConfig, TaskSpec
from corral._decorator import next_run_times
from schedtools import Recorder

pytestmark = pytest.mark.anyio
UTC = UTC


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def specs_of(module: ModuleType) -> list[TaskSpec]:
    return [
        fn.__corral_task__
        for fn in vars(module).values()
        if callable(fn) and hasattr(fn, "__corral_task__") and fn.__module__ == module.__name__
    ]


def spec_of(fn: Any) -> TaskSpec:
    return fn.__corral_task__  # type: ignore[no-any-return]


def upcoming(fn: Any, count: int = 5, tz: str = "UTC") -> list[datetime]:
    trigger = spec_of(fn).build_trigger(tz)
    return next_run_times(trigger, ZoneInfo(tz), count)


def gaps(times: list[datetime]) -> set[timedelta]:
    return {later - earlier for earlier, later in itertools.pairwise(times)}


async def run_now(scheduler: Scheduler, task_id: str, **changes: Any) -> None:
    assert scheduler.asyncz is not None
    scheduler.asyncz.update_task(task_id, next_run_time=datetime.now(UTC), **changes)


async def test_quick_start_runs_the_scheduler_with_the_app(load: Any) -> None:
    guide = load("guide_quick_start")
    config = guide.app.scheduler_config
    assert isinstance(config, SchedulerConfig) and config.enabled
    async with lifespan_of(guide.app):
        assert config.scheduler is not None and config.scheduler.running
        stats = config.statistics()
        assert stats is not None
    assert config.scheduler is None
    assert_gone([w.pid for w in stats.workers])


def test_complete_configuration(load: Any) -> None:
    config = load("guide_complete_config").app.scheduler_config
    assert (config.timezone, config.max_instances, config.coalesce) == ("UTC", 3, True)
    assert (config.workers, config.timeout, config.max_memory) == (4, 600, 1024**3)


async def test_decorated_task_runs_every_hour_in_a_worker(
    load: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    guide = load("guide_decorator")
    assert inspect.iscoroutinefunction(guide.cleanup_old_data)  # still the function itself
    assert gaps(upcoming(guide.cleanup_old_data)) == {timedelta(hours=1)}
    config = guide.app.scheduler_config
    async with lifespan_of(guide.app):
        scheduler = config.scheduler
        recorder = Recorder().attach(scheduler)
        await run_now(scheduler, "cleanup_task")
        await recorder.count(TASK_EXECUTED, "cleanup_task", 1)
    assert "Cleanup completed" in capsys.readouterr().out


def test_cron_daily_report_at_nine(load: Any) -> None:
    times = upcoming(load("guide_cron").generate_daily_report)
    assert {(t.hour, t.minute, t.second) for t in times} == {(9, 0, 0)}
    assert gaps(times) == {timedelta(days=1)}


def test_interval_triggers(load: Any) -> None:
    guide = load("guide_intervals")
    assert gaps(upcoming(guide.sync_data)) == {timedelta(minutes=30)}
    assert gaps(upcoming(guide.backup_database)) == {timedelta(hours=2)}
    assert gaps(upcoming(guide.daily_cleanup)) == {timedelta(days=1)}


def test_cron_triggers(load: Any) -> None:
    guide = load("guide_cron_patterns")
    nightly = upcoming(guide.nightly_backup)
    assert {(t.hour, t.minute) for t in nightly} == {(3, 0)} and gaps(nightly) == {timedelta(1)}
    weekly = upcoming(guide.weekly_report)
    assert {(t.weekday(), t.hour, t.minute) for t in weekly} == {(0, 9, 0)}
    assert gaps(weekly) == {timedelta(weeks=1)}
    monthly = upcoming(guide.monthly_billing)
    assert {(t.day, t.hour, t.minute) for t in monthly} == {(1, 0, 0)}
    assert len({t.month for t in monthly}) == 5


def test_date_trigger_runs_once_at_its_date(load: Any) -> None:
    times = upcoming(load("guide_date").end_campaign)
    assert times == [datetime(2026, 12, 31, 23, 59, tzinfo=ZoneInfo("UTC"))]


def test_patterns_do_their_work(
    load: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    database, feed = tmp_path / "app.db", tmp_path / "users.json"
    monkeypatch.setenv("APP_DATABASE", str(database))
    monkeypatch.setenv("APP_USERS_FEED", str(feed))
    now = datetime.now(UTC)
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE sessions (created_at TEXT)")
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany(
            "INSERT INTO sessions VALUES (?)",
            [((now - timedelta(days=d)).isoformat(),) for d in (1, 40, 90)],
        )
    feed.write_text(json.dumps([{"id": 1, "name": "Ada"}, {"id": 2, "name": "Lin"}]))
    guide = load("guide_patterns")

    assert guide.cleanup_old_sessions() == 2
    assert "Cleaned up sessions older than" in capsys.readouterr().out
    assert guide.sync_users_from_api() == 2
    caplog.set_level(logging.INFO)
    assert guide.send_daily_report() == {"users": 2, "sessions": 1}
    assert "Daily report for admin@example.com" in caplog.text
    assert {(t.hour, t.minute) for t in upcoming(guide.cleanup_old_sessions)} == {(2, 0)}
    assert gaps(upcoming(guide.sync_users_from_api)) == {timedelta(minutes=15)}
    assert {(t.hour, t.minute) for t in upcoming(guide.send_daily_report)} == {(8, 0)}


async def test_settings_class_form(load: Any) -> None:
    guide = load("guide_settings")
    config = guide.app.scheduler_config
    assert (config.enabled, config.timezone, config.max_instances) == (
        True,
        "America/New_York",
        3,
    )
    async with lifespan_of(guide.app):
        assert config.scheduler is not None and config.scheduler.running
        assert config.scheduler.asyncz.timezone == ZoneInfo("America/New_York")


async def test_max_instances_and_coalescing(load: Any) -> None:
    guide = load("guide_advanced")
    assert guide.conditional_backup() == "skipped"
    specs = specs_of(guide)
    scheduler = Scheduler(
        SchedulerConfig(enabled=True, workers=2, mistrigger_grace_time=None), tasks=specs
    )
    async with scheduler:
        assert scheduler.asyncz is not None
        heavy, sync = scheduler.asyncz.get_task("heavy_task"), scheduler.asyncz.get_task("sync")
        assert heavy is not None and sync is not None
        assert heavy.max_instances == 3
        assert sync.coalesce is True and heavy.coalesce is False
        # Four run times of "sync" are overdue: coalescing runs it once, not four times.
        recorder = Recorder().attach(scheduler)
        scheduler.asyncz.update_task(
            "sync", next_run_time=datetime.now(UTC) - timedelta(minutes=35)
        )
        await recorder.count(TASK_EXECUTED, "sync", 1)
        # And without coalescing, each overdue run time gets its own run.
        scheduler.asyncz.update_task(
            "heavy_task", next_run_time=datetime.now(UTC) - timedelta(minutes=14)
        )
        await recorder.count(TASK_EXECUTED, "heavy_task", 3)
        await asyncio.sleep(0)
        assert len(recorder.matching(TASK_EXECUTED, "sync")) == 1


def test_best_practices(load: Any, caplog: pytest.LogCaptureFixture) -> None:
    guide = load("guide_best_practices")
    assert gaps(upcoming(guide.health_check)) == {timedelta(minutes=5)}
    assert spec_of(guide.sync_with_retry).timeout == 300
    assert guide.sync_with_retry() is False
    assert "Sync failed: the partner API is down" in caplog.text


def test_blocking_task_runs_in_a_worker_process(load: Any) -> None:
    guide = load("guide_blocking")
    assert spec_of(guide.blocking_task).timeout == 120
    with Pool(workers=1) as pool:
        assert pool.submit(guide.blocking_task, 0.05).result(30) != os.getpid()
