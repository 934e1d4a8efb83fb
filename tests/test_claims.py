"""Schedulers sharing a database, in one process: claims decide who runs a fire, events come
from the winner only, run times agree, and the database going away is survivable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asyncz.events.constants import TASK_ERROR, TASK_EXECUTED, TASK_SUBMITTED
from asyncz.triggers import IntervalTrigger
from sqlalchemy.engine import make_url

import jobs
import shutdown_tasks
from conftest import fresh_database, wait_until
from corral import (
    ConfigurationError,
    DatabaseUnavailableError,
    JobCancelledError,
    Ledger,
    Scheduler,
    SchedulerConfig,
)
from corral._ledger import Claim, ClaimResult, ClaimWithdrawn, Coordinator
from corral._replicas import anchored, multi_worker_server
from netproxy import Proxy
from schedtools import Recorder

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(database: str, **options: object) -> SchedulerConfig:
    return SchedulerConfig(enabled=True, workers=1, database=database, **options)  # type: ignore[arg-type]


async def test_two_schedulers_run_each_fire_once_and_only_the_winner_reports_it(
    database_url: str,
) -> None:
    first, second = Scheduler(config(database_url)), Scheduler(config(database_url))
    for sched in (first, second):
        sched.add_task(jobs.pid, trigger="interval", seconds=1, name="beat")
    async with first, second:
        recorders = [Recorder().attach(first), Recorder().attach(second)]
        attached = datetime.now(UTC)
        await recorders[0].wait(
            lambda: sum(len(r.matching(TASK_EXECUTED, "beat")) for r in recorders) >= 6,
            timeout=60,
            what="six runs between them",
        )
    executed = [e for r in recorders for e in r.matching(TASK_EXECUTED, "beat")]
    times = [e.scheduled_run_time for e in executed]
    assert len(set(times)) == len(times)  # no fire reported (or run) twice
    # The loser of a claim stays silent: even asyncz's TASK_SUBMITTED comes from the winner.
    submitted = [
        {t for e in r.matching(TASK_SUBMITTED, "beat") for t in e.scheduled_run_times}
        for r in recorders
    ]
    assert not submitted[0] & submitted[1]
    for recorder, handed in zip(recorders, submitted, strict=True):
        # (a fire handed over before the recorders were attached has no TASK_SUBMITTED here)
        after = {
            e.scheduled_run_time
            for e in recorder.matching(TASK_EXECUTED, "beat")
            if e.scheduled_run_time > attached
        }
        assert after <= handed
    stats = [first.ledger_statistics(), second.ledger_statistics()]
    assert all(s is not None for s in stats)
    won = sum(s.claims_won for s in stats if s is not None)
    assert won >= len(executed)
    ledger = Ledger(database_url)
    try:
        recorded = {r.scheduled: r for r in ledger.runs(task="beat", limit=None)}
    finally:
        ledger.close()
    for event in executed:
        run = recorded[event.scheduled_run_time]
        assert run.status == "executed"
        assert run.worker_pid == event.return_value  # the worker that ran it, as recorded
    assert {r.replica for r in recorded.values()} <= {first.replica_id, second.replica_id}


async def test_the_database_going_away_stops_runs_reports_each_fire_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(fresh_database("postgresql", tmp_path))
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    caplog.set_level(logging.WARNING, logger="corral.ledger")
    sched = Scheduler(config(through))
    sched.add_task(jobs.pid, trigger="interval", seconds=1, name="beat")
    try:
        async with sched:
            recorder = Recorder().attach(sched)
            await recorder.count(TASK_EXECUTED, "beat", 1, timeout=60)
            proxy.cut()
            failed = await recorder.wait(
                lambda: len(errors := recorder.matching(TASK_ERROR, "beat")) >= 3 and errors,
                timeout=60,
                what="three fires reported while the database is away",
            )
            ran_before = len(recorder.matching(TASK_EXECUTED, "beat"))
            proxy.restore()
            await recorder.count(TASK_EXECUTED, "beat", ran_before + 2, timeout=60)
    finally:
        proxy.close()
    assert all(isinstance(e.exception, DatabaseUnavailableError) for e in failed)
    failed_times = [e.scheduled_run_time for e in failed]
    assert len(set(failed_times)) == len(failed_times)  # each fire reported once
    ran_times = {e.scheduled_run_time for e in recorder.matching(TASK_EXECUTED, "beat")}
    assert not ran_times & set(failed_times)  # a fire that could not be claimed did not run
    assert "could not be claimed" in str(failed[0].exception)
    warnings = [r for r in caplog.records if "cannot reach its database" in r.getMessage()]
    assert len(warnings) == 1  # one WARNING for the outage, not one per fire
    assert f":{proxy.port}/" in warnings[0].getMessage()  # it names the database


def test_messages_never_show_the_database_password() -> None:
    ledger = Ledger("postgresql://app:s3cret@db.example/app")
    try:
        assert "s3cret" not in repr(ledger)
        assert "app:***@db.example" in repr(ledger)
    finally:
        ledger.close()


def test_interval_run_times_are_the_same_in_every_process_whenever_it_started() -> None:
    early = IntervalTrigger(seconds=7, timezone=UTC)
    early.start_at -= timedelta(seconds=3)  # as if built three seconds earlier, elsewhere
    late = IntervalTrigger(seconds=7, timezone=UTC)
    now = datetime.now(UTC)
    times = [
        anchored(trigger, "t", explicit_start=False).get_next_trigger_time(UTC, None, now)
        for trigger in (early, late)
    ]
    assert times[0] == times[1]
    assert times[0] is not None and int(times[0].timestamp()) % 7 == 0
    chosen = datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)
    kept = IntervalTrigger(seconds=7, start_at=chosen, timezone=UTC)
    assert anchored(kept, "t", explicit_start=True) is kept
    assert kept.start_at == chosen
    future = IntervalTrigger(hours=1, start_at=now + timedelta(days=2), timezone=UTC)
    assert anchored(future, "t", explicit_start=False) is future
    assert future.start_at == now + timedelta(days=2)


def test_jitter_is_refused_with_a_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"task 'j': jitter=5 .* remove jitter"):
        anchored(IntervalTrigger(seconds=10, jitter=5), "j", explicit_start=False)


async def test_a_scheduler_with_a_database_anchors_named_interval_tasks(tmp_path: Path) -> None:
    sched = Scheduler(config(fresh_database("sqlite", tmp_path)))
    sched.add_task(jobs.noop, trigger="interval", minutes=10, name="ten")
    start = datetime(2026, 1, 1, 0, 3, tzinfo=UTC)
    sched.add_task(jobs.noop, trigger="interval", minutes=10, name="at3", start_date=start)
    async with sched:
        tasks = {t.id: t.next_run_time for t in sched.tasks()}
    assert tasks["ten"] is not None and tasks["ten"].minute % 10 == 0
    assert tasks["ten"].second == 0
    assert tasks["at3"] is not None and tasks["at3"].minute % 10 == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mysql://db/x", "expected 'sqlite:///path/to/corral.db'"),
        ("sqlite://", "in-memory SQLite database, which other processes cannot share"),
        ("sqlite:////no/such/folder/c.db", "the folder '/no/such/folder' does not exist"),
    ],
)
def test_a_database_corral_cannot_use_is_refused_clearly(value: str, expected: str) -> None:
    with pytest.raises(ValueError, match="database=") as error:
        SchedulerConfig(database=value)
    assert expected in str(error.value)


def test_the_database_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'corral.db'}"
    monkeypatch.setenv("CORRAL_DATABASE", url)
    monkeypatch.setenv("CORRAL_LEDGER_RETENTION", "P2D")
    settings = SchedulerConfig()
    assert settings.database == url
    assert settings.ledger_retention == timedelta(days=2)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)


def test_several_server_workers_are_recognised(
    no_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert multi_worker_server() is None  # pytest's parent is no server
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert multi_worker_server() == "WEB_CONCURRENCY=4"
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    assert multi_worker_server() is None


async def test_a_scheduler_without_a_database_under_several_workers_warns_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    sched = Scheduler(SchedulerConfig(enabled=True, workers=1))
    sched.add_task(jobs.noop, trigger="interval", hours=1, name="hourly")
    with caplog.at_level(logging.WARNING, logger="corral.scheduler"):
        async with sched:
            pass
    [warning] = [r for r in caplog.records if "without a database" in r.getMessage()]
    assert "WEB_CONCURRENCY=3" in warning.getMessage()
    assert "database='sqlite:///path/to/corral.db'" in warning.getMessage()


async def test_outcomes_finished_while_the_database_is_away_are_recorded_when_it_is_back(
    tmp_path: Path,
) -> None:
    url = make_url(fresh_database("postgresql", tmp_path))
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    coordinator = Coordinator(Ledger(through, lease=3), on_lost=lambda lost: None)
    coordinator.start()
    try:
        claimed: list[list[ClaimResult] | None] = []
        coordinator.claim(
            "job", [datetime(2030, 1, 1, tzinfo=UTC)], 1, lambda r, e: claimed.append(r)
        )
        [[result]] = wait_until(lambda: claimed, timeout=30, what="the claim")
        assert result.claim is Claim.WON
        proxy.cut()
        coordinator.finish(result.run_id, "executed", worker_pid=7, started_at=1.0)
        wait_until(
            lambda: coordinator.statistics().unrecorded_outcomes == 1,
            timeout=30,
            what="the outcome kept while the database is away",
        )
        assert not coordinator.statistics().available
        proxy.restore()
        wait_until(
            lambda: coordinator.statistics().unrecorded_outcomes == 0,
            timeout=30,
            what="the outcome recorded once the database is back",
        )
    finally:
        coordinator.stop()
        proxy.close()
    ledger = Ledger(fresh_url := url.render_as_string(hide_password=False))
    try:
        [run] = ledger.runs(task="job")
    finally:
        ledger.close()
    assert (run.status, run.worker_pid) == ("executed", 7), fresh_url


@pytest.mark.parametrize("executor", ["thread", "asyncio"])
async def test_every_executor_claims_before_it_runs(executor: str, tmp_path: Path) -> None:
    url = fresh_database("sqlite", tmp_path)
    first, second = (Scheduler(config(url, executor=executor)) for _ in range(2))
    for sched in (first, second):
        sched.add_task(
            jobs.async_add if executor == "asyncio" else jobs.add,
            trigger="interval",
            seconds=1,
            name="sum",
            args=(1, 2),
        )
    async with first, second:
        recorders = [Recorder().attach(first), Recorder().attach(second)]
        await recorders[0].wait(
            lambda: sum(len(r.matching(TASK_EXECUTED, "sum")) for r in recorders) >= 4,
            timeout=60,
            what="four runs between them",
        )
    times = [e.scheduled_run_time for r in recorders for e in r.matching(TASK_EXECUTED, "sum")]
    assert len(set(times)) == len(times)
    ledger = Ledger(url)
    try:
        recorded = {r.scheduled: r.status for r in ledger.runs(task="sum", limit=None)}
    finally:
        ledger.close()
    assert all(recorded[moment] == "executed" for moment in times)


async def test_a_shutdown_without_waiting_still_records_the_runs_that_finish_after_it(
    tmp_path: Path,
) -> None:
    url = fresh_database("sqlite", tmp_path)
    sched = Scheduler(config(url, mistrigger_grace_time=30))  # a busy machine's start is late
    soon = datetime.now(UTC) + timedelta(seconds=0.2)
    sched.add_task(jobs.sleep, trigger="date", run_date=soon, args=(1.5,), name="slow")
    await sched.start()
    recorder = Recorder().attach(sched)
    ledger = Ledger(url)
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: [r for r in ledger.runs(task="slow") if r.worker_pid is not None],
            60,
            "the run started in a worker",
        )
        await sched.shutdown(wait=False)
        await recorder.count(TASK_EXECUTED, "slow", 1, timeout=60)
        [run] = wait_until(
            lambda: [r for r in ledger.runs(task="slow") if r.status != "claimed"],
            timeout=30,
            what="the run's outcome in the ledger",
        )
        assert run.status == "executed"
        wait_until(lambda: not ledger.replicas(), timeout=30, what="the replica gone")
    finally:
        ledger.close()


async def test_a_run_lost_before_the_scheduler_has_its_tasks_is_still_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that starts just after another died can reap the dead one's runs before its
    own tasks are scheduled (its first lease tick comes during a slow start): the rerun waits
    for the tasks, rather than finding no such task."""
    url = fresh_database("sqlite", tmp_path)
    dead = Ledger(url, lease=0.2)  # a replica that died in the middle of a run
    dead.join()
    scheduled = datetime(2026, 1, 1, tzinfo=UTC)
    [claimed] = dead.claim("sum", [scheduled], 1)
    assert claimed.claim is Claim.WON
    expired = time.time() + 0.2
    dead.close()
    wait_until(lambda: time.time() > expired, what="the dead replica's lease to expire")

    start = Coordinator.start

    def start_then_tick(self: Coordinator) -> None:
        start(self)
        self._maintain()  # the first tick, before the scheduler has its tasks

    monkeypatch.setattr(Coordinator, "start", start_then_tick)
    sched = Scheduler(config(url))
    sched.add_task(jobs.add, trigger="interval", hours=1, name="sum", args=(1, 2), rerun_lost=True)
    async with sched:
        recorder = Recorder().attach(sched)
        [event] = await recorder.count(TASK_EXECUTED, "sum", 1)
    assert event.scheduled_run_time == scheduled
    assert event.return_value == 3


async def test_a_rerun_waits_for_the_run_in_progress_instead_of_being_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost run of a ``max_instances=1`` task is rerun after the task's run in progress on
    another replica ends: a rerun is not a new fire, and past max_instances it waits."""
    url = fresh_database("sqlite", tmp_path)
    scheduled = datetime(2026, 1, 1, tzinfo=UTC)
    dead = Ledger(url, lease=0.2)  # died in the middle of the fire at ``scheduled``
    dead.join()
    [lost] = dead.claim("sum", [scheduled], 1)
    expired = time.time() + 0.2
    dead.close()
    busy = Ledger(url, lease=3600)  # alive, running the task's next fire
    busy.join()
    [running] = busy.claim("sum", [scheduled + timedelta(hours=1)], 2)
    assert (lost.claim, running.claim) == (Claim.WON, Claim.WON)
    wait_until(lambda: time.time() > expired, what="the dead replica's lease to expire")
    caplog.set_level(logging.INFO, logger="corral.ledger")
    sched = Scheduler(config(url))
    sched.add_task(jobs.add, trigger="interval", hours=1, name="sum", args=(1, 2), rerun_lost=True)
    try:
        async with sched:
            recorder = Recorder().attach(sched)
            await asyncio.to_thread(
                wait_until,
                lambda: "Rerun of task 'sum' waits" in caplog.text,
                60,
                "the rerun to wait for the run in progress",
            )
            assert not recorder.matching(TASK_EXECUTED, "sum")
            assert busy.finish(running.run_id, "executed")  # type: ignore[arg-type]
            [event] = await recorder.count(TASK_EXECUTED, "sum", 1, timeout=60)
        assert (event.scheduled_run_time, event.return_value) == (scheduled, 3)
        runs = busy.runs(task="sum", limit=None)
        assert [(r.scheduled, r.attempt, r.status) for r in runs] == [
            (scheduled + timedelta(hours=1), 0, "executed"),
            (scheduled, 1, "executed"),
            (scheduled, 0, "lost"),
        ]
    finally:
        busy.close()


async def test_a_fire_being_claimed_when_shutdown_begins_runs_before_the_pool_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncz's contract: runs handed over before ``shutdown()`` run. With a database, a fire
    is handed over when its claim is sent: the drain waits for the claim, then for the run."""
    url = fresh_database("sqlite", tmp_path)
    entered, release = _stall(monkeypatch)  # the database answers late
    sched = Scheduler(config(url, mistrigger_grace_time=30))  # a busy machine's start is late
    sched.add_task(jobs.add, trigger="date", run_date=datetime.now(UTC), name="sum", args=(1, 2))
    await sched.start()
    recorder = Recorder().attach(sched)
    await asyncio.to_thread(entered.wait, 60)
    stopping = asyncio.ensure_future(sched.shutdown())
    await asyncio.sleep(0)  # the drain has begun, the claim still in flight
    assert not stopping.done()
    release.set()
    await stopping
    [event] = recorder.matching(TASK_EXECUTED, "sum")
    assert event.return_value == 3
    assert _statuses(url, "sum") == ["executed"]


async def test_a_fire_being_claimed_when_a_blocking_shutdown_begins_on_the_loop_runs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncz calls ``shutdown(wait=True)`` on the event loop's thread, which the claim's answer
    needs: the blocked thread settles the claim itself, and the fire runs before it returns
    (not cancelled at ``shutdown_timeout``, nor waited for forever without one)."""
    url = fresh_database("sqlite", tmp_path)
    entered, release = _stall(monkeypatch)  # the database answers once the shutdown has begun
    sched = Scheduler(config(url, mistrigger_grace_time=30, shutdown_timeout=None))
    sched.add_task(jobs.add, trigger="date", run_date=datetime.now(UTC), name="sum", args=(1, 2))
    await sched.start()
    recorder = Recorder().attach(sched)
    executor = sched._process_executor
    assert executor is not None
    await asyncio.to_thread(entered.wait, 60)

    def answer_once_draining() -> None:
        wait_until(lambda: executor._drain.started, what="the shutdown to begin")
        release.set()

    answerer = threading.Thread(target=answer_once_draining)
    answerer.start()
    executor.shutdown(wait=True)  # blocks this loop's thread, as asyncz's shutdown does
    answerer.join(10)
    [event] = recorder.matching(TASK_EXECUTED, "sum")
    assert event.return_value == 3
    assert not recorder.matching(TASK_ERROR)
    await sched.shutdown()


async def test_with_a_database_a_runs_event_comes_once_its_outcome_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener that looks the run up in the ledger finds its outcome there; a shutdown that
    begins while the outcome is being written waits for it, and for its event."""
    url = fresh_database("sqlite", tmp_path)
    entered, release = _stall(monkeypatch, "finish_many")
    sched = Scheduler(config(url, mistrigger_grace_time=30))
    sched.add_task(jobs.add, trigger="date", run_date=datetime.now(UTC), name="sum", args=(1, 2))
    await sched.start()
    recorder = Recorder().attach(sched)
    reader = Ledger(url)
    seen: list[str] = []
    assert sched.asyncz is not None
    sched.asyncz.add_listener(
        lambda event: seen.extend(r.status for r in reader.runs(task="sum")), TASK_EXECUTED
    )
    executor = sched._process_executor
    assert executor is not None
    try:
        assert await asyncio.to_thread(entered.wait, 60)
        assert not recorder.matching(TASK_EXECUTED)  # the outcome is not in the ledger yet

        def release_once_draining() -> None:
            wait_until(lambda: executor._drain.started, what="the shutdown to begin")
            release.set()

        releaser = threading.Thread(target=release_once_draining)
        releaser.start()
        await sched.shutdown()
        releaser.join(10)
        [event] = recorder.matching(TASK_EXECUTED, "sum")
        assert event.return_value == 3
        assert seen == ["executed"]
    finally:
        release.set()
        reader.close()


@pytest.mark.parametrize("stop", ["lease", "kill_running"])
async def test_a_shutdown_stops_waiting_for_an_outcome_the_database_cannot_record(
    stop: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away as a run ends: its outcome cannot be recorded, so its event is
    not dispatched. A shutdown without a time limit waits for the database no longer than the
    lease, or than ``kill_running()``; the run then stays in progress in the ledger until
    another replica finds the lease expired and reports it lost, its one outcome."""
    lease = 2 if stop == "lease" else 120
    url = make_url(fresh_database("postgresql", tmp_path))
    direct = url.render_as_string(hide_password=False)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    gate = tmp_path / "gate"
    sched = Scheduler(config(through, replica_lease=lease, shutdown_timeout=None))
    sched.add_task(
        shutdown_tasks.wait_for,
        trigger="date",
        run_date=datetime.now(UTC),
        name="held",
        args=(str(gate),),
        mistrigger_grace_time=30,
    )
    reaper = Ledger(direct, lease=lease)
    try:
        await sched.start()
        recorder = Recorder().attach(sched)
        await asyncio.to_thread(
            wait_until,
            lambda: [r for r in reaper.runs(task="held") if r.worker_pid is not None],
            60,
            "the run started in a worker",
        )
        proxy.cut()
        gate.touch()  # the run ends while the database is away
        with caplog.at_level(logging.WARNING, logger="corral.ledger"):
            stopping = asyncio.ensure_future(sched.shutdown())
            if stop == "kill_running":  # once the shutdown waits for the outcome
                executor = sched._process_executor
                assert executor is not None
                await _eventually(lambda: executor._drain.started, "the shutdown to begin")
                sched.kill_running()
            await asyncio.wait_for(stopping, 60)  # (well within a lease of 120 s)
        assert not recorder.matching(TASK_EXECUTED)
        assert "could not be reached at shutdown to record it" in caplog.text
        if stop == "kill_running":
            return  # (its lease is long: the reap is the other case's)
        proxy.restore()
        reaper.join()
        lost = await asyncio.to_thread(
            wait_until, reaper.reap, 60, "the run reported lost by another replica"
        )
        assert [run.task for run in lost] == ["held"]
        [run] = reaper.runs(task="held")
        assert run.status == "lost"
    finally:
        gate.touch()
        proxy.close()
        reaper.close()


async def test_a_shutdown_waits_for_thread_executor_runs_and_records_them(tmp_path: Path) -> None:
    """asyncz's ``shutdown(wait=True)`` waits for the runs its thread pool was handed: so does
    the scheduler's, and each outcome is recorded and reported before it returns (not recorded
    ``cancelled`` by the replica leaving while its event comes later)."""
    url = fresh_database("sqlite", tmp_path)
    sched, recorder, gate = await _thread_run_started(url, tmp_path)
    try:
        stopping = asyncio.ensure_future(sched.shutdown())
        await _eventually(lambda: sched.asyncz is None, "the shutdown to begin")
        gate.touch()
        await asyncio.wait_for(stopping, 60)
    finally:
        gate.touch()
    [event] = recorder.matching(TASK_EXECUTED, "held")
    assert event.return_value == str(tmp_path / "mark")
    assert _statuses(url, "held") == ["executed"]


async def test_kill_running_ends_a_shutdown_that_waits_for_thread_executor_runs(
    tmp_path: Path,
) -> None:
    """A thread cannot be stopped, and a shutdown without a time limit waits for the thread
    executor's runs; a second Ctrl-C (``kill_running``) ends that wait."""
    sched, _, gate = await _thread_run_started(fresh_database("sqlite", tmp_path), tmp_path)
    try:
        stopping = asyncio.ensure_future(sched.shutdown(timeout=None))
        await _eventually(lambda: sched.asyncz is None, "the shutdown to begin")
        sched.kill_running()
        await asyncio.wait_for(stopping, 60)
        assert not gate.exists()  # (the run itself goes on, unwaited)
    finally:
        gate.touch()


def test_a_delayed_claim_is_made_by_the_ledgers_thread_without_an_event_loop(
    tmp_path: Path,
) -> None:
    """A replica with no free worker claims a little later; the ledger's own thread keeps that
    delay, so a loop blocked meanwhile (a shutdown on its thread) does not hold the claim up.
    A claim still waiting when the coordinator stops is not made (the fire is left to the
    replicas that go on), and says so."""
    coordinator = Coordinator(Ledger(fresh_database("sqlite", tmp_path)), on_lost=lambda _: None)
    coordinator.start()
    answered: list[tuple[float, Claim]] = []
    withdrawn: list[BaseException | None] = []
    sent = time.monotonic()

    def answer(results: list[ClaimResult] | None, error: BaseException | None) -> None:
        if results is None:
            withdrawn.append(error)
        else:
            answered.append((time.monotonic() - sent, results[0].claim))

    try:
        coordinator.claim(
            "soon",
            [datetime(2030, 1, 1, tzinfo=UTC)],
            1,
            answer,
            delay=0.2,
        )
        coordinator.claim(
            "later",
            [datetime(2030, 1, 1, tzinfo=UTC)],
            1,
            answer,
            delay=3600,
        )
        wait_until(lambda: answered, what="the delayed claim")
        [(after, claim)] = answered
        assert after >= 0.2
        assert claim is Claim.WON
    finally:
        coordinator.stop()
    assert len(answered) == 1  # the hour-late one was not made
    [error] = withdrawn
    assert isinstance(error, ClaimWithdrawn)
    assert "'later': the scheduler stopped before it claimed 1 fire(s)" in str(error)


async def test_a_claim_answered_late_does_not_make_its_fire_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mistrigger_grace_time`` measures how late the scheduler hands a fire over, not how long
    the database takes to answer its claim."""
    url = fresh_database("sqlite", tmp_path)
    entered, release = _stall(monkeypatch)
    # A grace time that a busy machine's scheduler keeps (the task is added once it runs, so
    # its start is no lateness), and a claim answered later than it.
    sched = Scheduler(config(url, mistrigger_grace_time=3))
    async with sched:
        recorder = Recorder().attach(sched)
        due = datetime.now(UTC) + timedelta(seconds=0.5)
        sched.add_task(jobs.add, trigger="date", run_date=due, name="sum", args=(1, 2))
        await asyncio.to_thread(entered.wait, 60)
        await asyncio.to_thread(
            wait_until, lambda: datetime.now(UTC) - due > timedelta(seconds=4), 60, "a late answer"
        )
        release.set()
        [event] = await recorder.count(TASK_EXECUTED, "sum", 1, timeout=60)
    assert event.return_value == 3


class _Clock:
    """Wall-clock and monotonic seconds at once, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class _Scheduler:
    """What ``Claims`` dispatches through: asyncz's ``dispatch_event``, which asks it first."""

    def __init__(self) -> None:
        self.claims: Any = None
        self.dispatched: list[Any] = []

    def dispatch_event(self, event: Any) -> None:
        if not self.claims.hold(event):
            self.dispatched.append(event)


class _Executor:
    def __init__(self) -> None:
        self.won: list[tuple[list[datetime], int]] = []
        self.changed = asyncio.Event()

    def claim_sent(self) -> Any:
        return lambda: None

    def run_claimed(
        self, task: Any, run_times: list[datetime], *, rerun: bool, handed_at: datetime, term: int
    ) -> None:
        self.won.append((run_times, term))
        self.changed.set()


class _Bench:
    """``Claims`` over a real ledger (SQLite), with a stand-in scheduler and executor, clocks
    the test moves, and a second replica's ledger (``reaper``) to reap this one. The lease is
    10 minutes: the coordinator's own renewals (every third of it) do not come during a test,
    which moves the clocks past it instead."""

    task = type("Task", (), {"id": "sync", "max_instances": 5, "store_alias": "default"})()

    def __init__(self, url: str) -> None:
        from corral._claims import Claims

        self.clock = _Clock()
        ledger = Ledger(url, lease=600, clock=self.clock, monotonic=self.clock)
        self.coordinator = Coordinator(ledger, on_lost=lambda _: None)
        self.scheduler, self.executor = _Scheduler(), _Executor()
        self.claims = Claims(
            self.coordinator, self.scheduler, asyncio.get_running_loop(), lambda _: False
        )
        self.scheduler.claims = self.claims
        self.reaper = Ledger(url, lease=600, clock=self.clock)

    def claim(self, fires: list[datetime], attempt: int = 0) -> None:
        self.claims.claim(self.executor, self.task, fires, attempt=attempt)

    async def claimed(self, count: int) -> int:
        """The term of the ``count``-th claim won, once it is."""
        await _eventually(lambda: len(self.executor.won) >= count, "the claim won")
        return self.executor.won[count - 1][1]

    def outcome(self, fire: datetime, value: str = "") -> Any:
        from asyncz.events import TaskExecutionEvent

        return TaskExecutionEvent(
            code=TASK_EXECUTED,
            task_id="sync",
            store="default",
            scheduled_run_time=fire,
            return_value=value,
        )

    def status(self, fire: datetime, attempt: int = 0) -> str:
        [run] = [
            r for r in self.reaper.runs(task="sync") if (r.scheduled, r.attempt) == (fire, attempt)
        ]
        return run.status

    async def recorded(self, fire: datetime, attempt: int = 0) -> str:
        """The status of a run once its outcome is recorded."""
        await _eventually(lambda: self.status(fire, attempt) != "claimed", "the outcome recorded")
        return self.status(fire, attempt)

    def reap(self) -> list[Any]:
        """Another replica, whose lease holds, reaps this one (its clocks moved past its lease)."""
        self.reaper.join()
        return self.reaper.reap()


@contextlib.asynccontextmanager
async def _bench(tmp_path: Path) -> AsyncIterator[_Bench]:
    bench = _Bench(fresh_database("sqlite", tmp_path))
    await asyncio.to_thread(bench.coordinator.start)
    try:
        yield bench
    finally:
        await asyncio.to_thread(bench.coordinator.stop)
        bench.reaper.close()


async def test_an_outcome_event_waits_for_the_ledger_and_is_dropped_if_the_run_was_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A claimed run's outcome event waits for the ledger to record it: dispatched if the run
    was still this replica's (even past its lease, if nobody reaped it), dropped (with a
    WARNING) if another replica had reported it lost meanwhile, whose ReplicaLostError was then
    the run's one outcome."""
    moments = [datetime(2030, 1, 1, second=s, tzinfo=UTC) for s in range(3)]
    async with _bench(tmp_path) as bench:
        scheduler = bench.scheduler
        bench.claim(moments[:2])
        assert await bench.claimed(1) == 1
        first, second = (bench.outcome(moment) for moment in moments[:2])
        scheduler.dispatch_event(first)
        assert await bench.recorded(moments[0]) == "executed"
        await _eventually(lambda: scheduler.dispatched, "the first outcome dispatched")
        assert scheduler.dispatched == [first]

        bench.clock.now += 700  # stopped past its lease; another replica reaps it
        assert [run.scheduled for run in bench.reap()] == [moments[1]]
        with caplog.at_level(logging.WARNING, logger="corral.ledger"):
            scheduler.dispatch_event(second)
            await _eventually(
                lambda: "is not reported by this replica" in caplog.text, "the drop logged"
            )
        assert scheduler.dispatched == [first]  # dropped: its ReplicaLostError was its outcome
        assert "task 'sync' (run time 2030-01-01 00:00:01+00:00)" in caplog.text

        bench.claim(moments[2:])  # claimed in a new term
        assert await bench.claimed(2) == 2
        third = bench.outcome(moments[2])
        bench.clock.now += 700  # stopped past its lease again, but nobody reaped it
        scheduler.dispatch_event(third)
        assert await bench.recorded(moments[2]) == "executed"
        await _eventually(lambda: len(scheduler.dispatched) > 1, "the held event dispatched")
        assert scheduler.dispatched == [first, third]


async def test_an_outcome_given_up_at_shutdown_is_still_reported_if_the_database_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The replica leaves while an outcome's write waits for the database, and stops waiting
    for it: the outcome is logged as not reported. If the write then completes, its event
    follows: the run has its one outcome, the one in the ledger."""
    fire = datetime(2030, 1, 1, tzinfo=UTC)
    async with _bench(tmp_path) as bench:
        bench.claim([fire])
        assert await bench.claimed(1) == 1
        entered, release = _stall(monkeypatch, "finish_many")
        outcome = bench.outcome(fire)
        bench.scheduler.dispatch_event(outcome)
        assert await asyncio.to_thread(entered.wait, 30)
        assert await asyncio.to_thread(bench.coordinator.stop, 0.05) == []  # it gives up
        with caplog.at_level(logging.WARNING, logger="corral.ledger"):
            await bench.claims.outcomes.left()
        assert "is not reported by this replica" in caplog.text
        assert bench.scheduler.dispatched == []
        release.set()
        await _eventually(lambda: bench.scheduler.dispatched, "the event, once recorded")
        assert bench.scheduler.dispatched == [outcome]
        assert bench.status(fire) == "executed"


async def test_a_thread_or_asyncio_run_starts_only_while_its_claims_lease_holds() -> None:
    """asyncz's own executors run a claimed fire through ``leased``: a run that waited for a
    thread (or the loop) past its lease, or into a new term, is not started and says why."""
    from corral._executor import leased
    from corral._ledger._lease import HeldLease

    clock = _Clock()
    lease = HeldLease(10, clock=clock)
    lease.renewed(clock.now, fresh=True)
    ran: list[str] = []

    def sync_job(value: str) -> str:
        ran.append(value)
        return value

    async def async_job(value: str) -> str:
        ran.append(value)
        return value

    sync_run, async_run = leased(sync_job, lease, 1), leased(async_job, lease, 1)
    assert asyncio.iscoroutinefunction(async_run) and not asyncio.iscoroutinefunction(sync_run)
    assert sync_run("a") == "a" and await async_run("b") == "b"
    clock.now += 9.5  # within the lease, past its margin
    with pytest.raises(JobCancelledError, match=r"sync_job was not started: the lease .*term 1"):
        sync_run("c")
    lease.renewed(clock.now, fresh=True)  # registered again: term 2
    with pytest.raises(JobCancelledError, match="async_job was not started"):
        await async_run("d")
    assert ran == ["a", "b"]


async def test_an_outcome_event_waits_for_its_write_even_while_the_lease_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database may go away right after a run ends, with the lease still held: the event
    waits for the outcome's write all the same. Written, it is dispatched; if the write took
    longer than the lease and another replica reported the run lost meanwhile, it is dropped,
    and that report is the run's one outcome."""
    moments = [datetime(2030, 1, 1, second=s, tzinfo=UTC) for s in range(2)]
    async with _bench(tmp_path) as bench:
        scheduler = bench.scheduler
        bench.claim(moments)
        assert await bench.claimed(1) == 1
        entered, release = _stall(monkeypatch, "finish_many")
        first, second = (bench.outcome(moment) for moment in moments)
        scheduler.dispatch_event(first)
        assert await asyncio.to_thread(entered.wait, 30)
        assert scheduler.dispatched == []  # the lease holds, but nothing is recorded yet
        release.set()
        assert await bench.recorded(moments[0]) == "executed"
        await _eventually(lambda: scheduler.dispatched, "the first outcome dispatched")
        assert scheduler.dispatched == [first]

        entered, release = _stall(monkeypatch, "finish_many")
        scheduler.dispatch_event(second)
        assert await asyncio.to_thread(entered.wait, 30)
        bench.clock.now += 700  # the write outlasts the lease; another replica reaps the run
        assert [run.scheduled for run in bench.reap()] == [moments[1]]
        with caplog.at_level(logging.WARNING, logger="corral.ledger"):
            release.set()
            await _eventually(
                lambda: "is not reported by this replica" in caplog.text, "the drop logged"
            )
        assert scheduler.dispatched == [first]
        assert bench.status(moments[1]) == "lost"


async def test_a_rerun_claimed_beside_an_older_run_of_its_fire_keeps_its_own_outcome(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica back from a pause can claim a rerun of a fire whose older run, lost meanwhile,
    is still in its worker. Each run's outcome is its own: the rerun's is recorded on the
    rerun and dispatched; the lost run's is dropped, not taken for the rerun's."""
    fire = datetime(2030, 1, 1, tzinfo=UTC)
    async with _bench(tmp_path) as bench:
        bench.claim([fire])
        assert await bench.claimed(1) == 1
        bench.clock.now += 700  # stopped past its lease; another replica reaps its run
        assert len(bench.reap()) == 1
        bench.claim([fire], attempt=1)  # back, it claims the rerun itself
        assert await bench.claimed(2) == 2
        rerun, stale = bench.outcome(fire, "rerun"), bench.outcome(fire, "stale")
        with caplog.at_level(logging.WARNING, logger="corral.ledger"):
            bench.claims.dispatch(rerun, 2)
            bench.claims.dispatch(stale, 1)
            assert await bench.recorded(fire, attempt=1) == "executed"
            await _eventually(
                lambda: "is not reported by this replica" in caplog.text, "the stale one dropped"
            )
        assert bench.status(fire) == "lost"
        assert bench.scheduler.dispatched == [rerun]


def _stall(
    monkeypatch: pytest.MonkeyPatch, method: str = "claim_many"
) -> tuple[threading.Event, threading.Event]:
    """Make every call of the ledger's ``method`` (its claims by default) wait before it reaches
    the database: ``entered`` is set once one does, and it goes on once ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    call = getattr(Ledger, method)

    def stalled(self: Ledger, *args: Any) -> Any:
        entered.set()
        release.wait(60)
        return call(self, *args)

    monkeypatch.setattr(Ledger, method, stalled)
    return entered, release


async def _eventually(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    """``wait_until`` for a test on the event loop: polls, and lets the loop run meanwhile."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def _statuses(url: str, task: str) -> list[str]:
    """The statuses of ``task``'s runs in the ledger at ``url``."""
    ledger = Ledger(url)
    try:
        return [run.status for run in ledger.runs(task=task)]
    finally:
        ledger.close()


async def _thread_run_started(url: str, tmp_path: Path) -> tuple[Scheduler, Recorder, Path]:
    """A started scheduler whose thread executor runs task ``held``, which returns the path of
    its mark once the returned gate exists."""
    mark, gate = tmp_path / "mark", tmp_path / "gate"
    sched = Scheduler(config(url, executor="thread", mistrigger_grace_time=30))
    sched.add_task(
        shutdown_tasks.mark_then_wait_for,
        trigger="date",
        run_date=datetime.now(UTC),
        name="held",
        args=(str(mark), str(gate)),
    )
    await sched.start()
    recorder = Recorder().attach(sched)
    await _eventually(mark.exists, "the run to start in a thread")
    return sched, recorder, gate
