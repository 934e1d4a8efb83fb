"""corral in place of asyncz's ProcessPoolExecutor: what asyncz accepts, corral accepts (methods
of module-level instances, asyncz's executor arguments, a ``type`` name), and it logs each run as
asyncz does."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED
from asyncz.schedulers import AsyncIOScheduler
from asyncz.triggers import IntervalTrigger

import jobs
import tasks
from conftest import wait_until
from corral import (
    ConfigurationError,
    NotImportableError,
    Pool,
    ProcessExecutor,
    Scheduler,
    SchedulerConfig,
)
from corral._pool._refs import reference_of
from schedtools import Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**options: Any) -> SchedulerConfig:
    options.setdefault("enabled", True)
    options.setdefault("workers", 1)
    return SchedulerConfig(**options)


def _now() -> datetime:
    return datetime.now(UTC)


class Local:
    def run(self) -> None:
        pass


# -- methods of module-level instances -----------------------------------------------------------


def test_a_method_of_a_module_level_instance_is_sent_as_a_reference_to_that_instance() -> None:
    assert reference_of(tasks.cleaner.run) == "tasks:cleaner.run"
    assert reference_of(tasks.cleaner.run_async) == "tasks:cleaner.run_async"
    with Pool(workers=1) as pool:
        text = pool.submit(tasks.cleaner.run, 3).result(30)
        assert text.startswith("cleaned 3 in ") and int(text.split()[-1]) != os.getpid()


async def test_a_method_task_runs_in_a_worker_under_the_scheduler() -> None:
    sched = Scheduler(config(), tasks=[])
    sched.add_task(tasks.cleaner.run, trigger="interval", seconds=0.2, name="clean", args=(7,))
    async with sched:
        recorder = Recorder().attach(sched)
        (event, *_) = await recorder.count(TASK_EXECUTED, "clean", 1)
        stats = sched.statistics()
        assert stats is not None
    prefix, pid = event.return_value.rsplit(" in ", 1)
    assert prefix == "cleaned 7"
    assert int(pid) in [w.pid for w in stats.workers] and int(pid) != os.getpid()


async def test_a_method_task_runs_in_a_worker_under_plain_asyncz() -> None:
    asyncz = AsyncIOScheduler(executors={"default": ProcessExecutor(workers=1)})
    recorder = Recorder()
    asyncz.add_listener(recorder)
    asyncz.start()
    try:
        every = IntervalTrigger(seconds=0.2)  # type: ignore[arg-type]
        asyncz.add_task(tasks.cleaner.run_async, trigger=every, id="clean-async")
        (event, *_) = await recorder.count(TASK_EXECUTED, "clean-async", 1)
        assert event.return_value != os.getpid()
        assert not recorder.matching(TASK_ERROR)
    finally:
        asyncz.shutdown()
        await asyncio.sleep(0)


def test_add_task_refuses_at_once_a_method_no_worker_can_reach() -> None:
    sched = Scheduler(config(), tasks=[])
    local = Local()
    with pytest.raises(ConfigurationError) as caught:
        sched.add_task(local.run, trigger="interval", hours=1, name="local-method")
    message = str(caught.value)
    assert "task 'local-method'" in message
    assert "Local.run of <test_dropin.Local object" in message  # the value
    assert "no module-level name holds" in message  # what was expected
    assert "at the top level of an importable module (local = Local())" in message  # the fix
    assert "executor='thread' or 'asyncio'" in message
    # Where it runs in the app's process, it is fine.
    sched.add_task(local.run, trigger="interval", hours=1, name="local-thread", executor="thread")
    with pytest.raises(NotImportableError, match="no module-level name holds"):
        reference_of(Local().run)


# -- asyncz's ProcessPoolExecutor arguments --------------------------------------------------------


def test_process_executor_takes_asyncz_process_pool_arguments() -> None:
    executor = ProcessExecutor(
        max_workers=3,
        pool_kwargs={
            "max_tasks_per_child": 5,
            "initializer": jobs.initializer_sets,
            "initargs": ("x",),
            "mp_context": multiprocessing.get_context("spawn"),
        },
        cancel_futures=True,
        overwrite_wait=False,
    )
    settings = executor.settings
    assert (settings.workers, settings.max_jobs_per_worker, settings.start_method) == (
        3,
        5,
        "spawn",
    )
    assert (settings.initializer, settings.initargs) == ("jobs:initializer_sets", ("x",))
    assert executor.overwrite_wait is False and executor.cancel_futures is True
    # as strings, as asyncz configurations often give them; asyncz's defaults otherwise
    executor = ProcessExecutor(max_workers="2", overwrite_wait="true")
    assert (executor.settings.workers, executor.overwrite_wait) == (2, True)
    assert ProcessExecutor().cancel_futures is False and ProcessExecutor().overwrite_wait is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_workers": 2, "workers": 3}, "max_workers=2 and workers=3 are both given"),
        ({"pool_kwargs": {"max_workers": 2}, "max_workers": 2}, "keep only workers="),
        ({"pool_kwargs": {"executor_class": 1}}, "corral has no equivalent of 'executor_class'"),
        ({"pool_kwargs": [1]}, "pool_kwargs=\\[1\\]; expected a dict"),
        ({"overwrite_wait": "maybe"}, "overwrite_wait='maybe'; expected True or False"),
    ],
)
def test_asyncz_arguments_without_an_equivalent_are_refused_with_the_reason(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ProcessExecutor(**options)


async def until(predicate: Callable[[], Any], timeout: float = 20) -> None:
    """Wait for ``predicate()`` while the event loop goes on (the scheduler runs on it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.01)


def _writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: the job has not opened it for reading yet
        return None


async def test_overwrite_wait_replaces_the_wait_of_asynczs_shutdown(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    executor = ProcessExecutor(workers=1, overwrite_wait=False)
    asyncz = AsyncIOScheduler(executors={"default": executor})
    recorder = Recorder()
    asyncz.add_listener(recorder)
    asyncz.start()
    every = IntervalTrigger(hours=1)
    asyncz.add_task(jobs.hold, args=(str(gate),), trigger=every, id="held", next_run_time=_now())
    await until(lambda: (s := executor.statistics()) is not None and s.running == 1)
    asyncz.shutdown(wait=True)  # had it waited, it would wait for the gate forever
    stats = executor.statistics()
    assert stats is not None and stats.running == 1
    os.close(wait_until(lambda: _writer(gate), what="the job to wait at the gate"))
    (event,) = await recorder.count(TASK_EXECUTED, "held", 1)
    assert event.return_value != os.getpid()


# -- {"type": "corral"} ----------------------------------------------------------------------------


async def test_asyncz_config_dicts_name_corrals_executor_by_type() -> None:
    asyncz = AsyncIOScheduler(
        executors={"default": {"type": "corral", "max_workers": 1, "timeout": 60}}
    )
    executor = asyncz.executors["default"]
    assert isinstance(executor, ProcessExecutor)
    assert (executor.settings.workers, executor.settings.timeout) == (1, 60)
    recorder = Recorder()
    asyncz.add_listener(recorder)
    asyncz.start()
    try:
        every = IntervalTrigger(seconds=0.2)  # type: ignore[arg-type]
        asyncz.add_task(tasks.where, trigger=every, id="where")
        (event, *_) = await recorder.count(TASK_EXECUTED, "where", 1)
        assert event.return_value != os.getpid()
    finally:
        asyncz.shutdown()
        await asyncio.sleep(0)


def test_the_type_name_is_there_whichever_is_imported_first_and_corral_stays_light() -> None:
    code = (
        "import sys\n"
        "import corral\n"
        "assert 'asyncz' not in sys.modules, 'import corral loaded asyncz'\n"
        "from asyncz.schedulers import AsyncIOScheduler\n"
        "s = AsyncIOScheduler(executors={'default': {'type': 'corral', 'workers': 1}})\n"
        "print(type(s.executors['default']).__name__)\n"
        "print(sum(type(f).__name__ == '_AliasOnImport' for f in sys.meta_path))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["ProcessExecutor", "0"]  # and the import hook is gone once it did its work


# -- run logging -----------------------------------------------------------------------------------


async def test_each_run_is_logged_at_info_as_asyncz_does_with_the_worker_pid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="asyncz.executors")
    sched = Scheduler(config(), tasks=[])
    sched.add_task(tasks.where, trigger="interval", seconds=0.2, name="logged")
    async with sched:
        recorder = Recorder().attach(sched)
        (event, *_) = await recorder.count(TASK_EXECUTED, "logged", 1)
    pid = event.return_value
    records = [r for r in caplog.records if r.name == "asyncz.executors.default"]
    running = [r for r in records if r.getMessage().startswith('Running task "logged')]
    executed = [r for r in records if "executed successfully in worker" in r.getMessage()]
    assert running and executed
    assert {r.levelno for r in running + executed} == {logging.INFO}
    assert running[0].getMessage().endswith(f"in worker {pid}")  # logged as the run starts
    assert executed[0].getMessage().startswith("Task 'logged")
    assert executed[0].getMessage().endswith(f"executed successfully in worker {pid}")
    assert executed[0].corral_worker_pid == pid  # type: ignore[attr-defined]
    assert executed[0].corral_job_label == "logged"  # type: ignore[attr-defined]
