from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import corral
import jobs
from conftest import PoolFactory, busy_pids, wait_until
from corral import (
    JobCancelledError,
    JobMissedError,
    JobTimeoutError,
    NotImportableError,
    Pool,
    PoolNotRunningError,
    QueueFullError,
    RemoteTraceback,
    SerializationError,
)


def test_sync_and_async_functions_run_in_worker_processes(pool: Pool) -> None:
    assert pool.submit(jobs.add, 2, 3).result(10) == 5
    assert pool.submit(jobs.add, 2, kwargs={"b": 5}).result(10) == 7
    assert pool.submit(jobs.async_add, 2, 3).result(10) == 5
    assert pool.submit(jobs.returns_coroutine, 41).result(10) == 42
    worker_pid = pool.submit(jobs.pid).result(10)
    assert worker_pid != os.getpid()
    assert worker_pid in [w.pid for w in pool.statistics().workers]


def test_a_reference_string_names_the_function(pool: Pool) -> None:
    assert pool.submit("jobs:add", 1, 1).result(10) == 2
    assert pool.submit("os.path:join", "a", "b").result(10) == os.path.join("a", "b")


def test_a_reference_to_a_missing_function_fails_that_job_only(pool: Pool) -> None:
    future = pool.submit("jobs:no_such_function")
    with pytest.raises(NotImportableError, match="has no attribute 'no_such_function'"):
        future.result(10)
    assert pool.submit(jobs.add, 1, 1).result(10) == 2


def test_exception_keeps_type_message_and_remote_traceback(pool: Pool) -> None:
    future = pool.submit(jobs.fail, "disk full")
    with pytest.raises(jobs.JobFailure, match="disk full") as caught:
        future.result(10)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "jobs.py" in cause.text
    assert "in fail" in cause.text
    assert "disk full" in cause.text


def test_sys_exit_in_a_job_is_its_outcome_and_the_worker_survives(pool: Pool) -> None:
    before = sorted(w.pid for w in pool.statistics().workers)
    with pytest.raises(corral.JobExitError, match="SystemExit with exit code 4") as caught:
        pool.submit(jobs.exit_with, 4).result(10)
    assert caught.value.exit_code == 4
    assert sorted(w.pid for w in pool.statistics().workers) == before


def dummy() -> None:
    """A module-level function of a test module."""


class Holder:
    def method(self) -> None:
        pass

    @staticmethod
    def static(x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("make_fn", "expected"),
    [
        (lambda: lambda: None, "is a lambda"),
        (lambda: _closure(), "defined inside another function"),
        (lambda: Holder().method, "bound method"),
        (lambda: 42, "has no importable name"),
        (lambda: "no_colon", "not of the form 'package.module:function'"),
    ],
    ids=["lambda", "closure", "bound-method", "not-callable", "bad-reference"],
)
def test_functions_that_cannot_be_imported_by_reference_fail_at_submit(
    pool: Pool, make_fn: Any, expected: str
) -> None:
    with pytest.raises(NotImportableError, match=expected) as caught:
        pool.submit(make_fn())
    assert "importable module" in str(caught.value) or "form" in str(caught.value)
    assert pool.statistics().submitted == 0


def _closure() -> Any:
    def inner() -> None:
        pass

    return inner


def test_static_methods_go_by_reference(pool: Pool) -> None:
    assert pool.submit(Holder.static, 7).result(10) == 7


def test_functions_of_an_interactive_main_are_rejected(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    interactive = types.ModuleType("__main__")

    def typed_at_the_prompt() -> None:
        pass

    typed_at_the_prompt.__module__ = "__main__"
    typed_at_the_prompt.__qualname__ = "typed_at_the_prompt"
    interactive.typed_at_the_prompt = typed_at_the_prompt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", interactive)
    with pytest.raises(NotImportableError, match="lives in __main__"):
        pool.submit(typed_at_the_prompt)


def test_unpicklable_arguments_fail_at_submit(pool: Pool) -> None:
    with pytest.raises(SerializationError, match="cannot be pickled") as caught:
        pool.submit(jobs.takes, lambda: None)
    assert caught.value.stage == "arguments"
    assert pool.submit(jobs.takes, 1).result(10) == "int"


def test_submit_before_start_and_after_shutdown_is_a_clear_error() -> None:
    pool = Pool(workers=1)
    with pytest.raises(PoolNotRunningError, match=r"call pool.start\(\)"):
        pool.submit(jobs.noop)
    pool.start()
    pool.shutdown()
    with pytest.raises(PoolNotRunningError, match="shut down"):
        pool.submit(jobs.noop)
    with pytest.raises(PoolNotRunningError, match="cannot start again"):
        pool.start()


def test_supervision_goes_on_while_the_callers_event_loop_is_blocked(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool(workers=1, kill_grace=0.1)

    async def app() -> None:
        future = pool.submit(jobs.sleep, 30, timeout=0.3)
        # Block the event loop itself until the outcome arrives: only a supervisor that does not
        # depend on this loop can deliver the timeout.
        with pytest.raises(JobTimeoutError):
            future.result(timeout=20)

    asyncio.run(app())


def test_run_awaits_the_value(pool: Pool) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(pool.run(jobs.add, 1, 2), pool.run(jobs.async_add, 3, 4)))

    assert asyncio.run(main()) == [3, 7]


def test_cancelling_run_kills_the_running_job(pool: Pool) -> None:
    futures: list[Future[Any]] = []
    original = pool.submit

    def spy(*args: Any, **kwargs: Any) -> Any:
        future = original(*args, **kwargs)
        futures.append(future)
        return future

    pool.submit = spy  # type: ignore[method-assign]

    async def main() -> None:
        task = asyncio.ensure_future(pool.run(jobs.sleep, 60))
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_until(lambda: busy_pids(pool), what="the job to start")
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    with pytest.raises(JobCancelledError, match="cancelled while running"):
        futures[0].result(10)
    wait_until(lambda: pool.statistics().cancelled == 1, what="the cancel to be counted")


def test_a_job_cancelled_before_it_starts_never_runs(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1, max_jobs_per_worker=1)  # nothing is sent behind the blocker
    blocker = pool.submit(jobs.sleep, 0.5)
    waiting = pool.submit(jobs.add, 1, 1)
    assert waiting.cancel()
    assert blocker.result(10) == 0.5
    wait_until(lambda: pool.statistics().cancelled == 1)
    assert pool.statistics().completed == 1


def test_jobs_that_wait_past_their_start_deadline_are_missed(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1)
    blocker = pool.submit(jobs.sleep, 1)
    wait_until(lambda: busy_pids(pool))
    late = pool.submit(jobs.add, 1, 1, start_within=0.1)
    with pytest.raises(JobMissedError, match="past its start deadline"):
        late.result(10)
    assert not blocker.done()  # reported while the worker is still busy, not when it frees up
    assert blocker.result(10) == 1
    assert pool.statistics().missed == 1


def test_initializer_runs_once_in_every_worker(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2, initializer=jobs.initializer_sets, initargs=("ready",))
    assert pool.submit(jobs.read_init).result(10) == "ready"


def test_backpressure_beyond_the_queue_bound(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1, queue_size=2)
    pool.submit(jobs.sleep, 30)
    wait_until(lambda: busy_pids(pool))
    queued = [pool.submit(jobs.noop), pool.submit(jobs.noop)]
    with pytest.raises(QueueFullError, match="queue_size") as caught:
        pool.submit(jobs.noop)
    assert caught.value.max_queued == 2
    assert pool.statistics().queued == 2
    pool.shutdown(wait=False)
    for future in queued:
        with pytest.raises(JobCancelledError, match="before it started"):
            future.result(10)


def test_statistics_show_the_running_job(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2)
    future = pool.submit(jobs.sleep, 30, label="nightly-report")
    stats = wait_until(
        lambda: (s := pool.statistics()).running == 1 and s, what="the job to be running"
    )
    (busy,) = [w for w in stats.workers if w.state == "busy"]
    assert busy.job_id == future.job_id
    assert busy.job_label == "nightly-report"
    assert busy.running_for is not None
    assert busy.running_for >= 0
    assert busy.rss is not None
    assert busy.rss > 1_000_000
    assert stats.submitted == 1
    assert stats.finished == 0
    pool.shutdown(wait=False)
    with pytest.raises(JobCancelledError):
        future.result(10)


def test_log_records_reach_the_parent_with_the_job_identity(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    future = pool.submit(jobs.log_and_print, "hello", label="greeter")
    assert future.result(10) == "hello"
    records = [r for r in caplog.records if r.name == "tests.jobs"]
    assert [r.getMessage() for r in records] == ["job says hello"]
    record = records[0]
    assert record.corral_job_id == future.job_id  # type: ignore[attr-defined]
    assert record.corral_job_label == "greeter"  # type: ignore[attr-defined]
    assert record.process != os.getpid()


def test_logged_exceptions_keep_their_traceback(
    pool: Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    pool.submit(jobs.log_exception).result(10)
    (record,) = [r for r in caplog.records if r.name == "tests.jobs"]
    assert record.exc_text is not None
    assert "ValueError: inside" in record.exc_text


def test_stdout_and_stderr_of_jobs_reach_the_parent(
    pool: Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    pool.submit(jobs.log_and_print, "hi").result(10)
    out, err = capsys.readouterr()
    assert "stdout: hi\n" in out
    assert "partial line without newline" in out
    assert "stderr: hi\n" in err


def test_what_a_job_prints_cannot_corrupt_the_channel(pool: Pool) -> None:
    assert pool.submit(jobs.print_garbage).result(10) == "ok"
    assert pool.submit(jobs.add, 1, 1).result(10) == 2


def test_the_pool_is_a_context_manager(start_method: str) -> None:
    with Pool(workers=1, start_method=start_method) as pool:
        assert pool.submit(jobs.add, 1, 1).result(30) == 2
        pids = [w.pid for w in pool.statistics().workers]
    from conftest import assert_gone

    assert_gone(pids)


def test_the_pool_is_an_async_context_manager(start_method: str) -> None:
    async def main() -> list[int]:
        async with Pool(workers=1, start_method=start_method) as pool:
            assert await pool.run(jobs.add, 1, 1) == 2
            return [w.pid for w in pool.statistics().workers]

    from conftest import assert_gone

    assert_gone(asyncio.run(main()))


def test_settings_are_validated_with_clear_errors() -> None:
    with pytest.raises(ValueError, match="workers"):
        Pool(workers=0)
    with pytest.raises(ValueError, match="start_method"):
        Pool(start_method="fork")
    with pytest.raises(ValueError, match="worker_count"):
        Pool(worker_count=2)
    with pytest.raises(ValueError, match="max_memory"):
        Pool(max_memory="lots")
    with pytest.raises(ValueError, match=r"(?s)initializer.*is a lambda"):
        Pool(initializer=lambda: None)
    assert Pool(max_memory="512MiB").settings.max_memory == 512 * 1024 * 1024


@pytest.mark.parametrize(
    "error",
    [
        corral.JobTimeoutError("late", job_id=1, timeout=2.0, pid=3),
        corral.WorkerDiedError("died", job_id=1, pid=3, exitcode=-11),
        corral.MemoryLimitError("big", job_id=1, pid=3, rss=10, limit=5),
        corral.JobMissedError("missed", job_id=1, waited=0.5),
        corral.JobCancelledError("cancelled", job_id=1, started=True),
        corral.SerializationError("bad", stage="result"),
        corral.RemoteError("remote", type_name="x.Y", traceback="tb"),
        corral.QueueFullError("full", max_queued=3),
        corral.WorkerStartError("start", cause="boom"),
        corral.NotImportableError("nope"),
        corral.PoolNotRunningError("stopped"),
        corral.ConfigurationError("config"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_exception_survives_pickling(error: corral.CorralError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.details == error.details
    for name, value in error.details.items():
        assert getattr(copy, name) == value


LIGHT_MAIN = """
import os, sys
from pathlib import Path
if __name__ != "__main__":  # imported again, in some other process
    Path(sys.argv[1], f"main-imported-in-{os.getpid()}").touch()

from corral import Pool

def double(x):
    return 2 * x

if __name__ == "__main__":
    with Pool(workers=1, start_method=sys.argv[2]) as pool:
        worker = pool.submit(os.getpid).result(60)
        before = sorted(p.name for p in Path(sys.argv[1]).iterdir())
        print(worker, before, pool.submit(double, 21).result(60))
        after = sorted(p.name for p in Path(sys.argv[1]).iterdir())
        print(after)
"""


def test_workers_import_the_apps_main_module_only_when_a_job_needs_it(
    start_method: str, tmp_path: Path
) -> None:
    script = tmp_path / "app_main.py"
    script.write_text(LIGHT_MAIN)
    markers = tmp_path / "markers"
    markers.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), str(markers), start_method],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    worker, before, value = first.split(" ")
    assert before == "[]"  # neither the worker nor a forkserver ran the app's main module
    assert value == "42"
    assert second == f"['main-imported-in-{worker}']"


def test_preloaded_modules_are_imported_before_the_first_job(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1, preload=("decimal",))
    assert pool.submit(jobs.imported, "decimal").result(30) is True
    plain = make_pool(workers=1)
    assert plain.submit(jobs.imported, "fractions").result(30) is False


def test_a_preload_that_fails_is_a_start_failure() -> None:
    pool = Pool(workers=1, preload=("no_such_module_either",))
    pool.start()
    try:
        with pytest.raises(corral.WorkerStartError, match="no_such_module_either"):
            pool.submit(jobs.noop).result(30)
    finally:
        pool.shutdown(wait=True, timeout=5)


async def _scheduler_preloads_task_modules() -> corral.PoolSettings:
    import tasks
    from corral._decorator import make_spec

    spec = make_spec(tasks.where, name="where", trigger="interval", hours=1)
    scheduler = corral.Scheduler(corral.SchedulerConfig(enabled=True, workers=1), tasks=[spec])
    async with scheduler:
        executor = scheduler._process_executor
        assert executor is not None
        return executor.settings


def test_the_scheduler_preloads_its_tasks_modules() -> None:
    settings = asyncio.run(_scheduler_preloads_task_modules())
    assert settings.preload == ("tasks",)
