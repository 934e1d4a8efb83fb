"""The Dask executor against real Dask processes: corral's embedded ``LocalCluster``, and a
``dask scheduler`` with two ``dask worker`` processes started as separate commands."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED

import dask_tasks
from conftest import assert_gone, wait_until
from corral import (
    ClusterUnavailableError,
    ConfigurationError,
    DaskExecutor,
    JobCancelledError,
    JobExitError,
    JobTimeoutError,
    NotImportableError,
    Scheduler,
    SchedulerConfig,
    TaskSpec,
    WorkerDiedError,
)
from corral._decorator import make_spec
from corral._ledger import Ledger
from schedtools import Recorder

# Real Dask processes, each importing Dask: slow to start on a busy machine.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]
ROOT = Path(__file__).parent.parent


def marked(path: Path) -> str:
    """What ``dask_tasks.mark_and_block`` wrote to ``path`` (the file exists before its line)."""
    return path.read_text().strip() if path.exists() else ""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def every(fn: Any, name: str, seconds: float = 0.3, **options: Any) -> TaskSpec:
    options.setdefault("executor", "dask")
    return make_spec(fn, name=name, trigger="interval", seconds=seconds, **options)


def once(fn: Any, name: str, **options: Any) -> TaskSpec:
    options.setdefault("executor", "dask")
    return make_spec(fn, name=name, trigger="date", run_date=datetime.now(UTC), **options)


def config(**options: Any) -> SchedulerConfig:
    options.setdefault("enabled", True)
    options.setdefault("workers", 2)
    options.setdefault("executor", "dask")
    options.setdefault("mistrigger_grace_time", None)
    return SchedulerConfig(**options)


async def until(predicate: Any, timeout: float = 30, what: str = "") -> Any:
    """``predicate()``'s first truthy value, polled without blocking the loop; fails the test
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate!r}")
        await asyncio.sleep(0.02)
    return value


def worker_pids(scheduler: Scheduler) -> set[int]:
    stats = scheduler.cluster_statistics()
    assert stats is not None
    return {w.pid for w in stats.workers if w.pid is not None}


def running_on(scheduler: Scheduler, label: str) -> Any:
    """The worker running a run of ``label`` now, if any."""
    stats = scheduler.cluster_statistics()
    assert stats is not None
    return next((w for w in stats.workers if label in w.running), None)


def cluster_size(scheduler: Scheduler) -> int:
    stats = scheduler.cluster_statistics()
    return 0 if stats is None else len(stats.workers)


def new_children(before: set[int]) -> list[int]:
    """Processes started since ``before``, but the standard library's own helpers, which live
    as long as this process (the resource tracker that spawning starts once)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            helper = any("multiprocessing.resource_tracker" in a for a in process.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if process.pid not in before and not helper:
            found.append(process.pid)
    return found


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


# -- the embedded LocalCluster ------------------------------------------------------------------


@pytest.fixture
def port_8787_taken() -> Iterator[None]:
    """Dask's default HTTP port, taken (as when another cluster runs on this machine)."""
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # taken already
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        yield


@pytest.mark.usefixtures("port_8787_taken")
async def test_values_exceptions_logs_and_prints_reach_the_app(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="dask_tasks")
    specs = [
        every(dask_tasks.where, "where"),
        every(dask_tasks.async_where, "async-where"),
        every(dask_tasks.fail, "fail", seconds=0.5),
        once(dask_tasks.exit_now, "exit"),
        once(dask_tasks.talk, "talk", args=("hello",)),
    ]
    before = children()
    scheduler = Scheduler(config(), tasks=specs)
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        assert await scheduler.wait_ready(60)
        executed = await recorder.count(TASK_EXECUTED, "where", 2)
        pids = {event.return_value for event in executed}
        assert os.getpid() not in pids
        assert pids <= worker_pids(scheduler)
        assert pids <= set(new_children(before))  # worker processes of the embedded cluster
        [async_run, *_] = await recorder.count(TASK_EXECUTED, "async-where", 1)
        assert async_run.return_value in worker_pids(scheduler)
        [failed, *_] = await recorder.count(TASK_ERROR, "fail", 1)
        assert isinstance(failed.exception, dask_tasks.TaskFailure)
        assert "task failed on purpose" in failed.traceback
        assert "dask_tasks.py" in failed.traceback and "in fail" in failed.traceback
        [exited] = await recorder.count(TASK_ERROR, "exit", 1)  # its outcome, not the app's
        assert isinstance(exited.exception, JobExitError) and exited.exception.exit_code == 3
        assert "raise SystemExit(3)" in exited.traceback
        [talked] = await recorder.count(TASK_EXECUTED, "talk", 1)
        assert talked.return_value == "hello"
        record = await until(
            lambda: next((r for r in caplog.records if r.name == "dask_tasks"), None),
            what="the task's log record in the app",
        )
        assert record.getMessage().startswith("logged hello from pid ")
        assert record.corral_job_label == "talk"
        assert record.corral_worker_pid == int(record.getMessage().rsplit(" ", 1)[1])
        await until(lambda: "printed hello" in capsys.readouterr().out, what="the printed line")
    finally:
        await scheduler.shutdown()
    assert scheduler.asyncz is None
    assert len(recorder.matching(TASK_EXECUTED, "talk")) == 1  # one event per run


async def test_a_timeout_restarts_only_the_hung_worker_and_the_cluster_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    specs = [once(dask_tasks.hang, "hang", timeout=1.0), every(dask_tasks.where, "where", 0.2)]
    scheduler = Scheduler(config(), tasks=specs)
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        assert await scheduler.wait_ready(60)
        hung = await until(lambda: running_on(scheduler, "hang"), 30, "the hang run to start")
        [timed_out] = await recorder.count(TASK_ERROR, "hang", 1, timeout=60)
        error = timed_out.exception
        assert isinstance(error, JobTimeoutError)
        assert error.timeout == 1.0 and error.pid == hung.pid
        assert "ran past its timeout of 1.0s on Dask worker" in str(error)
        assert_gone([hung.pid], timeout=10)  # "timed out" means "no longer running"
        # The other worker kept running the other task meanwhile, and goes on with it.
        during = [
            e for e in recorder.matching(TASK_EXECUTED, "where") if e.return_value != hung.pid
        ]
        assert during
        await until(lambda: cluster_size(scheduler) == 2, 30, "a replacement worker")
        done = len(recorder.matching(TASK_EXECUTED, "where"))
        await recorder.count(TASK_EXECUTED, "where", done + 2)
        stats = scheduler.cluster_statistics()
        assert stats is not None and stats.timed_out == 1
    finally:
        await scheduler.shutdown()


async def test_a_worker_killed_during_a_run_fails_that_run_once(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    specs = [
        once(dask_tasks.mark_and_block, "victim", args=(str(marks), 60)),
        every(dask_tasks.where, "where", 0.3),
    ]
    before = children()
    scheduler = Scheduler(config(), tasks=specs)
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        assert await scheduler.wait_ready(60)
        await until(lambda: marked(marks), 30, "the victim's function to run")
        victim = await until(lambda: running_on(scheduler, "victim"), 30, "the victim's start")
        os.kill(victim.pid, signal.SIGKILL)
        [died] = await recorder.count(TASK_ERROR, "victim", 1, timeout=60)
        assert isinstance(died.exception, WorkerDiedError)
        assert died.exception.pid == victim.pid
        assert "died while running run" in str(died.exception)
        await until(lambda: cluster_size(scheduler) == 2, 30, "a replacement worker")
        done = len(recorder.matching(TASK_EXECUTED, "where"))
        await recorder.count(TASK_EXECUTED, "where", done + 2)
        assert marks.read_text().split() == [str(victim.pid)]  # it ran once, never again
        assert scheduler.asyncz is not None
        executor = scheduler.asyncz.executors["default"]
        assert isinstance(executor, DaskExecutor)
        assert "victim" not in executor.instances
    finally:
        await scheduler.shutdown()
    assert_gone(new_children(before), timeout=15)


async def test_a_run_waiting_in_a_worker_that_dies_is_sent_again(tmp_path: Path) -> None:
    """One worker: the second run waits in it behind the first; the worker dies. The first run
    fails; the second never started, so it runs (once) on the replacement."""
    first, second = tmp_path / "first", tmp_path / "second"
    specs = [
        once(dask_tasks.mark_and_block, "first", args=(str(first), 60)),
        once(dask_tasks.mark_and_block, "second", args=(str(second), 0)),
    ]
    scheduler = Scheduler(config(workers=1), tasks=specs)
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        assert await scheduler.wait_ready(60)
        await until(lambda: marked(first), 30, "the first run's function to run")
        worker = await until(lambda: running_on(scheduler, "first"), 30, "the first run")
        await until(lambda: (s := scheduler.cluster_statistics()) and s.waiting == 1)
        os.kill(worker.pid, signal.SIGKILL)
        [died] = await recorder.count(TASK_ERROR, "first", 1, timeout=60)
        assert isinstance(died.exception, WorkerDiedError)
        [ran] = await recorder.count(TASK_EXECUTED, "second", 1, timeout=60)
        assert ran.return_value == 0
        assert first.read_text().split() == [str(worker.pid)]
        assert len(second.read_text().split()) == 1
        assert second.read_text().split() != [str(worker.pid)]
    finally:
        await scheduler.shutdown()


async def test_a_worker_restarted_too_slowly_for_dask_is_replaced_with_its_config() -> None:
    """On a busy machine a nanny can take longer to restart its worker than Dask's
    ``lost-worker-timeout``: ``LocalCluster`` then drops that worker for good. corral starts a
    new one, and a restarted worker keeps the embedded cluster's settings (no memory target).
    Here a timeout's restart (the nanny waits 4 s for the hung worker, then kills it) outlasts
    a lost-worker-timeout of 3 s."""
    import dask

    specs = [
        once(dask_tasks.hang, "hang", timeout=1),
        every(dask_tasks.memory_target, "probe", seconds=0.5),
    ]
    scheduler = Scheduler(config(workers=1), tasks=specs)
    recorder = Recorder()
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "3s"}):
        await scheduler.start()
        recorder.attach(scheduler)
        try:
            assert await scheduler.wait_ready(60)
            [timed_out] = await recorder.count(TASK_ERROR, "hang", 1, timeout=120)
            assert isinstance(timed_out.exception, JobTimeoutError)
            killed = timed_out.exception.pid
            later = await until(
                lambda: [
                    e
                    for e in recorder.matching(TASK_EXECUTED, "probe")
                    if e.return_value[0] != killed
                ],
                120,
                "a run on a new worker",
            )
            assert later[0].return_value[1] is False  # the embedded settings, after a restart
            assert await scheduler.wait_ready(60)
            assert cluster_size(scheduler) == 1
        finally:
            await scheduler.shutdown()


async def test_max_memory_is_the_embedded_workers_memory_limit() -> None:
    scheduler = Scheduler(
        config(max_memory="300MiB"), tasks=[once(dask_tasks.hog, "hog", args=(400,))]
    )
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        assert await scheduler.wait_ready(60)
        stats = scheduler.cluster_statistics()
        assert stats is not None
        assert {w.memory_limit for w in stats.workers} == {300 * 2**20}
        [killed] = await recorder.count(TASK_ERROR, "hog", 1, timeout=60)
        assert isinstance(killed.exception, WorkerDiedError)
        assert "max_memory=314572800" in str(killed.exception)
        await until(lambda: cluster_size(scheduler) == 2, 30, "a replacement worker")
    finally:
        await scheduler.shutdown()


async def test_shutdown_stops_a_running_run_and_leaves_no_process_behind() -> None:
    before = children()
    scheduler = Scheduler(config(shutdown_timeout=0.5), tasks=[once(dask_tasks.hang, "hang")])
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    assert await scheduler.wait_ready(60)
    await until(lambda: running_on(scheduler, "hang"), 30, "the hang run to start")
    started = new_children(before)
    assert len(started) >= 2  # the embedded cluster's worker processes
    await scheduler.shutdown()
    [cancelled] = recorder.matching(TASK_ERROR, "hang")
    assert isinstance(cancelled.exception, JobCancelledError)
    assert cancelled.exception.started is True
    assert_gone(started, timeout=15)
    assert not new_children(before)
    assert not [t for t in _threads() if t.startswith("corral-default-dask")]


async def test_a_task_s_function_travels_by_reference_as_with_the_pool() -> None:
    with pytest.raises(ConfigurationError, match="lambda"):
        every(lambda: None, "lambda")
    with pytest.raises(ConfigurationError, match=r"executor.*'dask'"):
        make_spec(dask_tasks.where, name="x", trigger="interval", seconds=1, executor="gpu")


async def test_claims_in_a_database_record_each_run_and_its_dask_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    scheduler = Scheduler(config(database=url), tasks=[every(dask_tasks.where, "where", 0.3)])
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        executed = await recorder.count(TASK_EXECUTED, "where", 2, timeout=60)
    finally:
        await scheduler.shutdown()
    pids = {event.return_value for event in executed}
    ledger = Ledger(url)
    try:
        runs = [run for run in ledger.runs(task="where") if run.status == "executed"]
    finally:
        ledger.close()
    assert len(runs) >= 2
    assert {run.worker_pid for run in runs} >= pids


def lapse(cluster: Any, term: int) -> None:
    """Let ``term`` of the lease of ``cluster`` (a ``DaskCluster``) lapse, and wait until the
    Dask scheduler has it so."""
    from distributed import Client

    cluster.hold_lease(term, -1.0)
    with Client(cluster.link.scheduler_address(), timeout=30) as client:  # type: ignore[no-untyped-call]

        def lapsed() -> bool:
            held = client.get_metadata(cluster.lease.key, None) or {}
            return bool(held.get("until", float("inf")) < time.time())

        wait_until(lapsed, 60, "the lapsed lease on the Dask scheduler")


def test_a_started_run_dask_runs_again_after_its_worker_died_is_not_taken_for_a_lapse(
    tmp_path: Path,
) -> None:
    """On a cluster corral did not start, Dask runs a run again when the worker running it dies
    (``allowed-failures``). A claimed run that had started is reported as the
    ``WorkerDiedError`` it is, even once the lease has lapsed: not as a run never started."""
    from distributed import LocalCluster

    from corral._dask_cluster import DaskCluster

    local = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    cluster = DaskCluster(local.scheduler_address, workers=2)
    cluster.start()
    gate = tmp_path / "gate"
    try:
        assert cluster.wait_ready(120)
        cluster.hold_lease(1, 600)
        run = cluster.submit("shutdown_tasks:wait_for", (str(gate),), lease=1)
        pid = wait_until(lambda: run.worker_pid, 60, "the run to start")
        lapse(cluster, 1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError, match=rf"\(pid {pid}\) stopped while running"):
            run.result(60)
    finally:
        gate.touch()
        cluster.shutdown(wait=True, timeout=30)
        local.close()


def test_a_run_under_a_lease_starts_on_a_dask_worker_only_while_the_lease_holds(
    tmp_path: Path,
) -> None:
    """A claimed run waits on the cluster behind another while the app is stopped past its
    lease: the Dask worker reads the app's lease right before it would start the run, and does
    not start it. Nor a run of an older term, once the app holds a new one."""
    from corral._dask_cluster import DaskCluster

    cluster = DaskCluster(None, workers=1)
    cluster.start()
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    try:
        assert cluster.wait_ready(120)
        cluster.hold_lease(1, 600)
        assert cluster.submit("dask_tasks:where", lease=1).result(120) > 0
        first = cluster.submit("shutdown_tasks:wait_for", (str(gate),), lease=1)
        wait_until(lambda: first.worker_pid, 60, "the first run to start")
        queued = cluster.submit("dask_tasks:mark", (str(marker),), lease=1)
        lapse(cluster, 1)  # the app was stopped past its lease
        gate.touch()
        assert first.result(60) > 0  # started while the lease held: it ran to its end
        with pytest.raises(JobCancelledError, match=r"not started: the lease .*\(term 1\)") as no:
            queued.result(60)
        assert not no.value.started
        cluster.hold_lease(2, 600)  # registered again: a new term
        with pytest.raises(JobCancelledError, match="not started"):
            cluster.submit("dask_tasks:mark", (str(marker),), lease=1).result(60)
        assert not marker.exists()
        assert cluster.submit("dask_tasks:mark", (str(marker),), lease=2).result(60) > 0
        assert marker.exists()
    finally:
        gate.touch()
        cluster.shutdown(wait=True, timeout=30)


async def test_without_distributed_executor_dask_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    scheduler = Scheduler(config(), tasks=[every(dask_tasks.where, "where")])
    with pytest.raises(ConfigurationError, match=r"pip install 'corral\[dask\]'"):
        await scheduler.start()


def test_importing_corral_imports_no_dask() -> None:
    code = (
        "import sys, corral\n"
        "corral.Scheduler, corral.SchedulerConfig, corral.DaskExecutor\n"
        "print([m for m in ('dask', 'distributed') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"


async def test_an_unreachable_scheduler_fails_each_run_clearly_and_the_loop_stays_free(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = Scheduler(config(dask_address=address), tasks=[every(dask_tasks.where, "where")])
    gaps: list[float] = []

    async def heartbeat() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - before)

    beat = asyncio.ensure_future(heartbeat())
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        failed = await recorder.count(TASK_ERROR, "where", 2, timeout=60)
    finally:
        await scheduler.shutdown()
        beat.cancel()
    for event in failed:
        assert isinstance(event.exception, ClusterUnavailableError)
        assert event.exception.started is False
        assert f"the Dask scheduler at {address} is unavailable" in str(event.exception)
    assert any(
        r.levelno == logging.WARNING and f"Dask scheduler at {address} is unavailable" in r.message
        for r in caplog.records
    )
    # A connection attempt takes seconds; the loop went on meanwhile.
    assert gaps and max(gaps) < 2.5


def test_corral_run_executor_dask(capsys: pytest.CaptureFixture[str]) -> None:
    from corral._cli import main

    try:
        assert main(["run", "cli_tasks", "--duration", "3", "--plain", "--executor", "dask"]) == 0
    finally:
        sys.modules.pop("cli_tasks", None)
    out, err = capsys.readouterr()
    assert re.search(r"task=cli-tick\b.*\bkind=executed", out + err)
    assert "dask_workers=1" in out + err  # cli_tasks' config: workers=1


async def test_a_dask_task_runs_alongside_pool_tasks_and_the_live_view_shows_both() -> None:
    from corral._monitor import Monitor

    specs = [
        every(dask_tasks.where, "on-dask"),  # @scheduler(executor="dask")
        every(dask_tasks.where, "in-pool", executor="process"),
    ]
    scheduler = Scheduler(config(executor="process"), tasks=specs)
    await scheduler.start()
    recorder = Recorder().attach(scheduler)
    try:
        [on_dask, *_] = await recorder.count(TASK_EXECUTED, "on-dask", 1, timeout=60)
        [in_pool, *_] = await recorder.count(TASK_EXECUTED, "in-pool", 1, timeout=60)
        pool = scheduler.statistics()
        assert pool is not None
        assert in_pool.return_value in {w.pid for w in pool.workers}
        assert on_dask.return_value in worker_pids(scheduler)
        monitor = Monitor(scheduler, live=True)
        monitor.console.begin_capture()
        monitor.console.print(monitor.render())
        view = monitor.console.end_capture()
    finally:
        await scheduler.shutdown()
    assert "Dask workers" in view and "embedded" in view
    assert "tcp://127.0.0.1:" in view and str(on_dask.return_value) in view
    assert "Workers" in view and str(in_pool.return_value) in view  # the local pool's


def test_the_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_DASK_ADDRESS", "tcp://scheduler:8786")
    monkeypatch.setenv("CORRAL_EXECUTOR", "dask")
    cfg = SchedulerConfig()
    assert (cfg.executor, cfg.dask_address) == ("dask", "tcp://scheduler:8786")
    executor = DaskExecutor.from_config(cfg)
    assert executor.address == "tcp://scheduler:8786"


# -- an external cluster: dask scheduler and dask worker commands --------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dask_command() -> list[str]:
    script = Path(sys.executable).parent / "dask"
    return [str(script)] if script.exists() else [shutil.which("dask") or "dask"]


class ExternalCluster:
    """``dask scheduler`` and ``dask worker`` as separate commands, on 127.0.0.1."""

    def __init__(self, port: int, folder: Path) -> None:
        self.address = f"tcp://127.0.0.1:{port}"
        self.port = port
        self.folder = folder
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests")])}

    def _start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [*dask_command(), *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-dashboard",
            name="scheduler",
        )

    def start_worker(self, name: str) -> None:
        self._start(
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--nworkers",
            "1",
            "--memory-limit",
            "0",
            "--no-dashboard",
            "--name",
            name,
            name=name,
        )

    def all_pids(self) -> list[int]:
        pids = []
        for process in self.processes:
            try:
                pids += [process.pid, *(c.pid for c in psutil.Process(process.pid).children(True))]
            except psutil.NoSuchProcess:
                pids.append(process.pid)
        return pids

    def stop(self) -> None:
        pids = self.all_pids()
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(30)
        assert_gone(pids, timeout=15)


@pytest.fixture
def external(tmp_path: Path) -> Iterator[ExternalCluster]:
    cluster = ExternalCluster(free_port(), tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_an_external_cluster_of_dask_commands(
    external: ExternalCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A module the app can import and the workers cannot (not on their PYTHONPATH).
    app_only = tmp_path / "app_only"
    app_only.mkdir()
    (app_only / "app_only_tasks.py").write_text("def job() -> int:\n    return 1\n")
    monkeypatch.syspath_prepend(str(app_only))
    app_only_tasks = importlib.import_module("app_only_tasks")

    marks = tmp_path / "marks"
    specs = [
        every(dask_tasks.where, "where", 0.3),
        every(dask_tasks.fail, "fail", 0.5),
        every(app_only_tasks.job, "app-only", 0.5),
    ]
    scheduler = Scheduler(config(dask_address=external.address, max_memory="1GiB"), tasks=specs)
    await scheduler.start()  # before the cluster exists
    recorder = Recorder().attach(scheduler)
    try:
        [unreachable, *_] = await recorder.count(TASK_ERROR, "where", 1, timeout=60)
        assert isinstance(unreachable.exception, ClusterUnavailableError)
        external.start_scheduler()
        external.start_worker("w1")
        external.start_worker("w2")
        assert await scheduler.wait_ready(60)
        await until(lambda: cluster_size(scheduler) == 2, 60, "two Dask workers")
        executed = await recorder.count(TASK_EXECUTED, "where", 2, timeout=60)
        assert {e.return_value for e in executed} <= worker_pids(scheduler)
        failed = await recorder.wait(
            lambda: [
                e
                for e in recorder.matching(TASK_ERROR, "fail")
                if isinstance(e.exception, dask_tasks.TaskFailure)
            ],
            what="a failure on the cluster",
        )
        assert "task failed on purpose" in failed[0].traceback
        not_there = await recorder.wait(
            lambda: [
                e
                for e in recorder.matching(TASK_ERROR, "app-only")
                if isinstance(e.exception, NotImportableError)
            ],
            what="a task whose module the workers lack",
        )
        message = str(not_there[0].exception)
        assert "on Dask worker tcp://127.0.0.1:" in message
        assert "must be importable on every Dask worker" in message
        messages = [r.getMessage() for r in caplog.records]
        assert any("max_memory=1073741824 is not enforced" in m for m in messages)

        # A worker killed during a run: the cluster's retry of it is refused.
        scheduler.add_task(
            dask_tasks.mark_and_block,
            trigger="date",
            run_date=datetime.now(UTC),
            name="victim",
            args=(str(marks), 60),
            executor="dask",
        )
        await until(lambda: marked(marks), 30, "the victim's function to run")
        victim = await until(lambda: running_on(scheduler, "victim"), 30, "the victim's start")
        os.kill(victim.pid, signal.SIGKILL)
        [died] = await recorder.count(TASK_ERROR, "victim", 1, timeout=60)
        assert isinstance(died.exception, WorkerDiedError)
        assert died.exception.pid == victim.pid
        assert "corral refused to run it a second time" in str(died.exception)
        assert marks.read_text().split() == [str(victim.pid)]

        # The scheduler dies while a run is in flight.
        scheduler.add_task(
            dask_tasks.mark_and_block,
            trigger="date",
            run_date=datetime.now(UTC),
            name="in-flight",
            args=(str(tmp_path / "in-flight"), 60),
            executor="dask",
        )
        await until(lambda: marked(tmp_path / "in-flight"), 30, "the run's function to run")
        await until(lambda: running_on(scheduler, "in-flight"), 30, "its start, seen by corral")
        assert external.scheduler is not None
        external.scheduler.kill()
        [lost] = await recorder.count(TASK_ERROR, "in-flight", 1, timeout=60)
        assert isinstance(lost.exception, ClusterUnavailableError)
        assert lost.exception.started is True
        assert "whether it ran to its end is unknown" in str(lost.exception)
        await recorder.wait(
            lambda: any("the connection to it was lost" in r.getMessage() for r in caplog.records),
            what="a WARNING that the connection was lost",
        )
    finally:
        await scheduler.shutdown(timeout=5)


def _threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()]
