"""The integration, tuning and migration pages' examples do what the pages say."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncz.events.constants import TASK_EXECUTED

from asgi import lifespan_of
from conftest import wait_until
from corral import ProcessExecutor, Scheduler
from corral._config import ENV_PREFIX, SchedulerConfig
from schedtools import Recorder

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_asgi_lifespan_runs_the_pool_with_the_app(load: Any) -> None:
    example = load("integration_asgi")
    async with lifespan_of(example.app):
        assert example.tasks.running
        assert [t.id for t in example.tasks.tasks()] == ["refresh-cache"]
        assert await example.tasks.wait_ready(30)
        assert await example.health() == {"workers": 2}
    assert not example.tasks.running


async def test_ravyns_asyncz_config_form_runs_ravyns_tasks_in_workers(load: Any) -> None:
    example = load("integration_ravyn")
    load("integration_ravyn_tasks")
    config = example.scheduler_config
    assert (config.workers, config.coalesce, config.timezone) == (2, True, "UTC")
    async with lifespan_of(example.app):
        scheduler = config.scheduler
        assert scheduler is not None and scheduler.running
        assert {t.id for t in scheduler.tasks()} == {"collect-market-data", "send-newsletter"}
        recorder = Recorder().attach(scheduler)
        assert scheduler.asyncz is not None
        scheduler.asyncz.update_task("collect-market-data", next_run_time=datetime.now(UTC))
        (event, *_) = await recorder.count(TASK_EXECUTED, "collect-market-data", 1)
        assert event.return_value.startswith("collected in process ")
        assert int(event.return_value.split()[-1]) != os.getpid()


async def test_litestar_lifespan_list_runs_the_pool_with_the_app(load: Any) -> None:
    example = load("integration_litestar")
    async with lifespan_of(example.app):
        assert example.tasks.running
        assert [t.id for t in example.tasks.tasks()] == ["rebuild-index"]
        assert await example.tasks.wait_ready(30)
        assert await example.health.fn() == {"workers": 2}
    assert not example.tasks.running


async def test_plain_asyncz_runs_tasks_in_corral_workers(load: Any) -> None:
    example = load("integration_asyncz")
    (pid,) = await asyncio.wait_for(example.main(), 30)
    assert pid != os.getpid()


def test_standalone_script_runs_until_sigterm() -> None:
    script = ROOT / "docs" / "examples" / "integration_standalone.py"
    process = subprocess.Popen(
        [sys.executable, str(script)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert process.stderr is not None
    try:
        for line in process.stderr:
            if "corral scheduler started: 1 task(s)" in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "corral scheduler stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


async def test_initializer_opens_one_connection_per_worker(
    load: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "visits.db"
    monkeypatch.setenv("APP_DATABASE", str(database))
    example = load("tuning_initializer")
    assert example.config.initializer == "tuning_initializer:open_database"
    scheduler = Scheduler(example.config, tasks=[example.record_visit.__corral_task__])
    async with scheduler:
        recorder = Recorder().attach(scheduler)
        assert scheduler.asyncz is not None
        scheduler.asyncz.update_task("record-visit", next_run_time=datetime.now(UTC))
        (event, *_) = await recorder.count(TASK_EXECUTED, "record-visit", 1)
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        assert db.execute("SELECT pid FROM visits").fetchall() == [(event.return_value,)]
    assert event.return_value != os.getpid()


async def test_migrating_changes_only_the_executor(load: Any) -> None:
    example = load("migrating")
    executor = example.scheduler.executors["default"]
    assert isinstance(executor, ProcessExecutor)
    assert (executor.settings.workers, executor.settings.timeout) == (4, 300)
    assert executor.settings.max_memory == 1024**3


def test_configuration_reference_lists_every_field_default_and_variable() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in SchedulerConfig.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"{name} is missing from docs/configuration.md"
        assert f"`{ENV_PREFIX}{name.upper()}`" in row, name
        default = field.get_default(call_default_factory=False)
        if field.default_factory is None:
            assert f"`{default!r}`" in row, (name, default)


def test_wait_until_is_bounded() -> None:
    with pytest.raises(pytest.fail.Exception, match="timed out"):
        wait_until(lambda: False, timeout=0.05, what="nothing")
