"""Ravyn's own forms run in corral's pool (``AsynczConfig(tasks=...)`` with Ravyn's
``@scheduler``), and set-ups that Ravyn would leave idle say so."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncz.events.constants import TASK_EXECUTED
from lilya.apps import Lilya
from ravyn import Ravyn, RavynSettings

import ravyn_tasks
from asgi import lifespan_of
from conftest import assert_gone
from corral import ConfigurationError, Scheduler
from corral._cli import main
from corral.ravyn import AsynczConfig, SchedulerConfig, SchedulerSettings
from schedtools import Recorder

pytestmark = pytest.mark.anyio

TASKS = {"collect": "ravyn_tasks", "async_collect": "ravyn_tasks", "pooled": "ravyn_tasks"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Collected(logging.Handler):
    """corral's WARNING records, kept on corral's logger: Ravyn and Lilya apps replace the root
    logger's handlers (pytest's caplog among them) when they are made."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


@pytest.fixture
def warnings_() -> Iterator[Collected]:
    handler, logger = Collected(), logging.getLogger("corral")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# -- AsynczConfig: Ravyn's form, corral's pool -----------------------------------------------------


async def test_ravyns_asyncz_config_form_runs_ravyn_tasks_in_corrals_workers() -> None:
    config = AsynczConfig(
        tasks={**TASKS, "switched_off": "ravyn_tasks"},
        timezone="UTC",
        configurations={
            "asyncz.task_defaults.coalesce": "true",
            "asyncz.task_defaults.mistrigger_grace_time": 5,
            "asyncz.executors.default": {"type": "processpool", "max_workers": "2"},
            "asyncz.executors.pool": {"class": "corral:ProcessExecutor"},
        },
    )
    assert (config.enabled, config.workers, config.coalesce) == (True, 2, True)
    assert config.mistrigger_grace_time == 5
    app = Ravyn(scheduler_config=config, enable_scheduler=True)
    async with lifespan_of(app):
        scheduler = config.scheduler
        assert scheduler is not None
        recorder = Recorder().attach(scheduler)
        for task_id in ("ravyn-collect", "ravyn-async-collect", "ravyn-pooled"):
            (event, *_) = await recorder.count(TASK_EXECUTED, task_id, 2)
            stats = config.statistics()
            assert stats is not None
            assert event.return_value in [w.pid for w in stats.workers]
            assert event.return_value != os.getpid()
        assert {t.id for t in scheduler.tasks()} == {
            "ravyn-collect",
            "ravyn-async-collect",
            "ravyn-pooled",
        }
        assert {t.max_instances for t in scheduler.tasks() if t.id == "ravyn-collect"} == {2}
        final = config.statistics()
        assert final is not None
        pids = [w.pid for w in final.workers]
    assert_gone(pids)


async def test_corrals_scheduler_config_takes_ravyns_tasks_form_too() -> None:
    config = SchedulerConfig(enabled=True, workers=1, tasks={"collect": "ravyn_tasks"})
    app = Ravyn(scheduler_config=config, enable_scheduler=True)
    async with lifespan_of(app):
        assert config.scheduler is not None
        recorder = Recorder().attach(config.scheduler)
        (event, *_) = await recorder.count(TASK_EXECUTED, "ravyn-collect", 1)
        assert event.return_value != os.getpid()


def test_asyncz_config_takes_ravyns_time_zone_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC
    from zoneinfo import ZoneInfo

    # a tzinfo, as Ravyn's AsynczConfig takes it (typed as the name it is stored as)
    assert AsynczConfig(timezone=ZoneInfo("Europe/Paris")).timezone == "Europe/Paris"  # type: ignore[arg-type]
    assert AsynczConfig(timezone=UTC).timezone == "UTC"  # type: ignore[arg-type]
    assert AsynczConfig(configurations={"asyncz.timezone": "Asia/Tokyo"}).timezone == "Asia/Tokyo"
    from ravyn.conf import settings

    monkeypatch.setattr(settings, "timezone", "America/Chicago")
    assert AsynczConfig().timezone == "America/Chicago"  # Ravyn's settings.timezone, as Ravyn


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"configurations": {"asyncz.stores.default": {"type": "redis"}}},
            "task store 'default'.*corral keeps the tasks declared in code in memory",
        ),
        (
            {"configurations": {"asyncz.executors.default": {"type": "debug"}}},
            "executor 'default' is 'debug'; expected a type or class among 'corral'",
        ),
        (
            {"configurations": {"asyncz.executors.default": {"type": "corral", "x": 1}}},
            "x\\s+Extra inputs are not permitted",
        ),
        (
            {
                "configurations": {
                    "asyncz.executors.default": {"type": "corral", "cancel_futures": True}
                }
            },
            "with cancel_futures=True.*set shutdown_timeout=",
        ),
        (
            {"configurations": {"asyncz.jobstores": {}}},
            "configurations\\['asyncz.jobstores'\\]: corral has no use for it; accepted:",
        ),
        ({"scheduler_class": object}, "scheduler_class=<class 'object'>.*remove scheduler_class="),
        ({"tasks": {"collect": 3}}, "tasks.collect\\s+Input should be a valid string"),
    ],
)
def test_asyncz_config_refuses_what_corral_would_not_honour(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"(?s){message}"):
        AsynczConfig(**options)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"nothing": "ravyn_tasks"}, "ravyn_tasks.nothing is missing.*expected a task declared"),
        ({"every": "ravyn_tasks"}, "ravyn_tasks.every is <function every.*which has no trigger"),
        ({"collect": "no_such_module"}, "cannot import 'no_such_module'"),
    ],
)
async def test_tasks_that_cannot_be_scheduled_are_named_at_start(
    tasks: dict[str, str], message: str
) -> None:
    config = AsynczConfig(tasks=tasks, workers=1)
    with pytest.raises(ConfigurationError, match=f"(?s)tasks=.*{message}"):
        await config.start()
    assert config.scheduler is None


def test_corral_check_reads_the_tasks_of_an_asyncz_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = tmp_path / "ravyn_app.py"
    module.write_text(
        "from ravyn import Ravyn\n"
        "from corral.ravyn import AsynczConfig\n"
        "config = AsynczConfig(tasks={'collect': 'ravyn_tasks'}, timezone='Asia/Tokyo')\n"
        "app = Ravyn(scheduler_config=config, enable_scheduler=True)\n"
    )
    try:
        assert main(["check", str(module)]) == 0
    finally:
        sys.modules.pop("ravyn_app", None)
    out = capsys.readouterr().out
    assert "ok   ravyn-collect (ravyn_tasks:collect.fn), next runs:" in out
    assert "+09:00" in out  # the app's time zone
    assert "1 of 1 task(s) ok" in out


# -- set-ups that would do nothing, silently -------------------------------------------------------


def test_ravyn_without_enable_scheduler_warns(warnings_: Collected) -> None:
    Ravyn(scheduler_config=SchedulerConfig(enabled=True))
    text = warnings_.text()
    assert "without enable_scheduler=True, so it never starts the scheduler" in text
    assert "Fix: Ravyn(..., enable_scheduler=True)" in text
    warnings_.records.clear()
    Ravyn(scheduler_config=SchedulerConfig(enabled=True), enable_scheduler=True)
    Ravyn(scheduler_config=SchedulerConfig(enabled=False))
    assert warnings_.text() == ""


def test_a_settings_class_whose_scheduler_config_ravyn_hides_warns(
    warnings_: Collected,
) -> None:
    with pytest.warns(UserWarning, match="shadows an attribute in parent"):

        class AppSettings(RavynSettings):
            scheduler_config: SchedulerConfig = SchedulerConfig(enabled=True)

    Ravyn(settings_module=AppSettings)
    text = warnings_.text()
    assert "AppSettings declares scheduler_config, but RavynSettings defines" in text
    assert "Fix: derive AppSettings from corral.ravyn.SchedulerSettings" in text

    class Fixed(SchedulerSettings):
        scheduler_config: SchedulerConfig = SchedulerConfig(enabled=True)

    warnings_.records.clear()
    Ravyn(settings_module=Fixed)
    assert warnings_.text() == ""


async def test_a_scheduler_with_no_task_warns(warnings_: Collected) -> None:
    async with Scheduler(SchedulerConfig(enabled=True, workers=1), tasks=[]):
        pass
    assert "corral scheduler started with no task: nothing will run" in warnings_.text()


async def test_ravyn_tasks_that_nothing_schedules_are_named(
    warnings_: Collected,
) -> None:
    assert ravyn_tasks.collect.is_enabled
    async with Scheduler(SchedulerConfig(enabled=True, workers=1), tasks=[]):
        pass
    text = warnings_.text()
    assert "task(s) declared with Ravyn's @scheduler are not scheduled" in text
    assert "ravyn_tasks:collect" in text and "ravyn_tasks:switched_off" not in text
    assert "tasks={'collect': 'ravyn_tasks'}" in text


async def test_a_disabled_scheduler_under_an_asgi_app_warns(
    warnings_: Collected,
) -> None:
    scheduler = Scheduler(SchedulerConfig(workers=1))  # enabled defaults to False
    async with lifespan_of(Lilya(lifespan=scheduler.lifespan)):
        assert not scheduler.running
    text = warnings_.text()
    assert "corral scheduler is disabled (enabled=False): no task will run" in text
    assert "SchedulerConfig(enabled=True, ...) or CORRAL_ENABLED=true" in text
