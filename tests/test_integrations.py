"""corral under a real Ravyn app, a real ASGI framework (Lilya), and plain scripts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from asyncz.events.constants import TASK_EXECUTED
from lilya.apps import Lilya
from ravyn import Ravyn

import app_tasks
from asgi import lifespan_of
from conftest import assert_gone
from corral import Scheduler, SchedulerConfig
from corral._decorator import register, unregister
from corral.ravyn import SchedulerSettings
from schedtools import Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def declared_app_tasks() -> Iterator[None]:
    """The tasks of ``app_tasks`` are declared for these tests only."""
    specs = [app_tasks.heartbeat.__corral_task__, app_tasks.async_heartbeat.__corral_task__]  # type: ignore[attr-defined]
    for spec in specs:
        register(spec)
    yield
    for spec in specs:
        unregister(spec.id)


async def assert_tasks_run_in_workers(config: SchedulerConfig) -> list[int]:
    scheduler = config.scheduler
    assert scheduler is not None and scheduler.running
    recorder = Recorder().attach(scheduler)
    for task_id in ("app-heartbeat", "app-async-heartbeat"):
        (event, *_) = await recorder.count(TASK_EXECUTED, task_id, 2)
        assert event.return_value != os.getpid()
    stats = config.statistics()
    assert stats is not None
    return [w.pid for w in stats.workers]


async def test_ravyn_app_with_scheduler_config_argument() -> None:
    config = SchedulerConfig(enabled=True, workers=1)
    app = Ravyn(scheduler_config=config, enable_scheduler=True)  # type: ignore[arg-type]
    async with lifespan_of(app):
        pids = await assert_tasks_run_in_workers(config)
    assert config.scheduler is None
    assert_gone(pids)


class AppSettings(SchedulerSettings):
    scheduler_config: SchedulerConfig = SchedulerConfig(
        enabled=True, timezone="America/New_York", max_instances=3, workers=1
    )


async def test_ravyn_app_with_a_settings_class() -> None:
    app = Ravyn(settings_module=AppSettings)
    config = app.scheduler_config
    assert isinstance(config, SchedulerConfig) and config.timezone == "America/New_York"
    async with lifespan_of(app):
        pids = await assert_tasks_run_in_workers(config)
    assert_gone(pids)


async def test_a_disabled_config_in_ravyn_starts_nothing() -> None:
    config = SchedulerConfig(enabled=False)
    app = Ravyn(scheduler_config=config, enable_scheduler=True)  # type: ignore[arg-type]
    async with lifespan_of(app):
        assert config.scheduler is not None and not config.scheduler.running
        assert config.statistics() is None


async def test_any_asgi_app_through_the_lifespan_helper() -> None:
    scheduler = Scheduler(SchedulerConfig(enabled=True, workers=1))
    app = Lilya(lifespan=scheduler.lifespan)
    async with lifespan_of(app):
        recorder = Recorder().attach(scheduler)
        (event, *_) = await recorder.count(TASK_EXECUTED, "app-heartbeat", 1)
        assert event.return_value != os.getpid()
        stats = scheduler.statistics()
        assert stats is not None
        pids = [w.pid for w in stats.workers]
    assert not scheduler.running
    assert_gone(pids)


async def test_modules_are_imported_at_start() -> None:
    scheduler = Scheduler(SchedulerConfig(enabled=True, workers=1, modules=("app_tasks",)))
    async with scheduler:
        ids = {task.id for task in scheduler.tasks()}
        assert {"app-heartbeat", "app-async-heartbeat"} <= ids
        assert all(task.next_run_time is not None for task in scheduler.tasks())
