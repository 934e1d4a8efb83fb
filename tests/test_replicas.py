"""Several real processes sharing one ledger database: each fire runs exactly once among them,
a replica that dies loses nothing silently, and the database being away is survivable."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest

from conftest import assert_gone, wait_until
from corral._ledger import Ledger, RunRecord
from test_cli import ROOT, corral_command

pytestmark = pytest.mark.timeout(240)


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


class Cluster:
    """``corral run replica_tasks`` processes sharing ``database``, and what their tasks wrote."""

    def __init__(self, folder: Path, database: str, tasks: str, **env: str) -> None:
        self.folder = folder
        self.database = database
        self.out = folder / "out.txt"
        self.out.touch()
        self.release = folder / "release"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path]),
            "CORRAL_TEST_OUT": str(self.out),
            "CORRAL_TEST_RELEASE": str(self.release),
            "CORRAL_TEST_TASKS": tasks,
            **env,
        }
        self.replicas: list[Replica] = []

    def start(self, *args: str) -> Replica:
        log = self.folder / f"replica-{len(self.replicas)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    *corral_command(),
                    *("run", "replica_tasks", "--plain", "--workers", "1"),
                    *("--database", self.database, *args),
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        replica = Replica(process, log)
        self.replicas.append(replica)
        return replica

    def lines(self, what: str) -> list[tuple[int, float]]:
        rows = [line.split() for line in self.out.read_text().splitlines()]
        return [(int(pid), float(at)) for name, pid, at in rows if name == what]

    def runs(self, task: str) -> list[RunRecord]:
        ledger = Ledger(self.database)
        try:
            return ledger.runs(task=task, limit=None)
        finally:
            ledger.close()

    def kill_all(self) -> None:
        self.release.touch()
        for replica in self.replicas:
            with contextlib.suppress(ProcessLookupError):
                replica.process.kill()
            replica.process.wait(30)


@pytest.fixture
def cluster_of(tmp_path: Path, database_url: str) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(tasks: str, **env: str) -> Cluster:
        cluster = Cluster(tmp_path, database_url, tasks, **env)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.kill_all()


def assert_every_fire_ran_once(runs: list[RunRecord], ran: list[tuple[int, float]]) -> None:
    """Scheduled times one second apart, none missing, each executed once, as often as the
    task really ran, each by the worker the ledger names."""
    times = sorted(run.scheduled for run in runs)
    assert len(times) >= 8, runs
    assert len(set(times)) == len(times)
    steps = {(b - a) for a, b in itertools.pairwise(times)}
    assert steps == {timedelta(seconds=1)}, f"gaps or doubles in {times}"
    assert {run.status for run in runs} == {"executed"}, [(r.scheduled, r.status) for r in runs]
    assert len(ran) == len(runs)  # no run happened that the ledger does not know of
    assert Counter(pid for pid, _ in ran) == Counter(run.worker_pid for run in runs)
    for run in runs:
        assert run.started_at is not None and run.finished_at is not None
        assert run.duration is not None and run.duration >= 0


def test_three_processes_run_each_fire_of_a_one_second_task_exactly_once(
    cluster_of: Callable[..., Cluster],
) -> None:
    cluster = cluster_of("tick")
    replicas = [cluster.start("--duration", "15") for _ in range(3)]
    for replica in replicas:
        assert replica.process.wait(timeout=90) == 0, replica.text()
    runs = cluster.runs("tick")
    assert_every_fire_ran_once(runs, cluster.lines("tick"))
    assert {run.pid for run in runs} <= {replica.pid for replica in replicas}


def test_a_killed_replica_s_run_is_reported_lost_and_the_others_carry_on(
    cluster_of: Callable[..., Cluster],
) -> None:
    cluster = cluster_of("tick,hold", CORRAL_REPLICA_LEASE="2")
    replicas = [cluster.start() for _ in range(3)]
    by_pid = {replica.pid: replica for replica in replicas}
    held = wait_until(
        lambda: [r for r in cluster.runs("hold") if r.status == "claimed" and r.worker_pid],
        timeout=60,
        what="a run of hold started in a worker",
    )[0]
    victim = by_pid[held.pid]
    worker = held.worker_pid
    # max_instances=1 holds across replicas: the two others had free workers, yet held off.
    wait_until(
        lambda: len([r for r in cluster.runs("hold") if r.status == "skipped"]) >= 3,
        timeout=60,
        what="later fires of hold skipped",
    )
    assert [pid for pid, _ in cluster.lines("hold")] == [worker]
    assert worker is not None and psutil.pid_exists(worker)
    victim.process.kill()
    victim.process.wait(10)
    assert_gone([worker], timeout=10)  # its worker does not outlive it
    lost = wait_until(
        lambda: [r for r in cluster.runs("hold") if r.id == held.id and r.status == "lost"],
        timeout=60,
        what="the killed replica's run reported lost",
    )[0]
    assert f"pid {victim.pid}" in (lost.error or "")
    survivors = [r for r in replicas if r is not victim]
    reported = wait_until(
        lambda: [r for r in survivors if f"pid {victim.pid}) stopped renewing" in r.text()],
        timeout=30,
        what="a survivor's report of the lost run",
    )
    assert len(reported) == 1  # reported once, by one replica
    assert "ReplicaLostError" in reported[0].text() or "replica" in reported[0].text()
    # The instance is released: another replica runs hold; ticks go on after the kill.
    killed_at = datetime.now().astimezone()
    wait_until(
        lambda: [r for r in cluster.runs("hold") if r.pid != victim.pid and r.status == "claimed"],
        timeout=60,
        what="hold claimed by a survivor",
    )
    wait_until(
        lambda: len([r for r in cluster.runs("tick") if r.scheduled > killed_at]) >= 3,
        timeout=60,
        what="ticks after the kill",
    )
    cluster.release.touch()
    for replica in survivors:
        assert replica.stop() == 0, replica.text()
    ticks = cluster.runs("tick")
    # A tick the killed replica was running is lost; no fire is claimed twice.
    assert {r.status for r in ticks} <= {"executed", "lost"}
    assert len({r.scheduled for r in ticks}) == len(ticks)


def test_runs_left_when_every_replica_died_are_reported_and_rerun_by_the_next(
    cluster_of: Callable[..., Cluster],
) -> None:
    cluster = cluster_of("hold", CORRAL_REPLICA_LEASE="1", CORRAL_TEST_RERUN="1")
    first = cluster.start()
    held = wait_until(
        lambda: [r for r in cluster.runs("hold") if r.status == "claimed" and r.worker_pid],
        timeout=60,
        what="a run of hold started in a worker",
    )[0]
    first.process.kill()
    first.process.wait(10)
    cluster.release.touch()  # the rerun may finish at once
    second = cluster.start()
    rerun = wait_until(
        lambda: [
            r
            for r in cluster.runs("hold")
            if r.scheduled == held.scheduled and r.attempt == 1 and r.status == "executed"
        ],
        timeout=60,
        what="the lost run rerun and executed",
    )[0]
    assert rerun.pid == second.pid
    [lost] = [r for r in cluster.runs("hold") if r.id == held.id]
    assert lost.status == "lost"
    assert f"pid {first.pid}) stopped renewing" in second.text()
    assert "runs again here" in second.text()
    assert second.stop() == 0


def test_a_replica_paused_past_its_lease_neither_starts_nor_reports_the_runs_reaped_meanwhile(
    cluster_of: Callable[..., Cluster],
) -> None:
    """A replica stopped (SIGSTOP) with a run in its worker and fires queued behind it. Another
    reports them lost and reruns them. The stopped one starts none of its queued runs: while it
    is stopped its worker waits, and once it runs again their lease has lapsed. It dispatches
    no outcome event for any of them: the ReplicaLostError was their outcome. Every queued fire
    runs exactly once, on the other."""
    cluster = cluster_of("backlog", CORRAL_REPLICA_LEASE="2", CORRAL_TEST_RERUN="1")
    paused = cluster.start("--log-format", "json")

    def claimed_by(pid: int) -> list[RunRecord]:
        return [r for r in cluster.runs("backlog") if r.pid == pid and r.status == "claimed"]

    wait_until(
        lambda: (
            len(claimed_by(paused.pid)) >= 3 and any(r.worker_pid for r in claimed_by(paused.pid))
        ),
        timeout=60,
        what="a run of backlog started and two more queued behind it",
    )
    other = cluster.start("--log-format", "json")
    ledger = Ledger(cluster.database)
    try:
        wait_until(
            lambda: other.pid in {r.pid for r in ledger.replicas()}, timeout=60, what="the other"
        )
    finally:
        ledger.close()
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        stopped_at = time.time()
        stranded = {r.id: r for r in claimed_by(paused.pid)}  # nothing changes them now
        started = [r for r in stranded.values() if r.worker_pid]
        assert len(started) == 1 and len(stranded) >= 3, stranded
        # Its worker, not stopped with it, finishes its run now, while the lease still holds:
        # it waits for the replica to run again before it starts another.
        cluster.release.touch()
        wait_until(
            lambda: all(r.status == "lost" for r in cluster.runs("backlog") if r.id in stranded),
            timeout=60,
            what="the stopped replica's runs reported lost",
        )
    finally:
        os.kill(paused.pid, signal.SIGCONT)

    def reruns() -> list[RunRecord]:
        scheduled = {r.scheduled for r in stranded.values()}
        return [r for r in cluster.runs("backlog") if r.scheduled in scheduled and r.attempt == 1]

    wait_until(
        lambda: len([r for r in reruns() if r.status == "executed"]) == len(stranded),
        timeout=60,
        what="each lost run rerun and executed by the other replica",
    )
    assert {r.pid for r in reruns()} == {other.pid}
    assert paused.stop() == 0, paused.text()  # (after every run handed over to it has ended)
    assert other.stop() == 0, other.text()

    runs = cluster.runs("backlog")
    # Its worker started the one run it had started before it was stopped, and then only runs
    # it claimed again after it came back (recorded executed by it): none of those reaped.
    worker = started[0].worker_pid
    ran_there = [at for pid, at in cluster.lines("backlog") if pid == worker]
    executed_there = [r for r in runs if r.worker_pid == worker and r.status == "executed"]
    assert len(ran_there) == 1 + len(executed_there), (ran_there, executed_there)
    assert len([at for at in ran_there if at >= stopped_at]) == len(executed_there)
    # It reported no outcome of a reaped run: each of its outcome events is one it recorded.
    events = [
        json.loads(line)
        for line in paused.text().splitlines()
        if line.startswith("{") and '"event": "outcome"' in line
    ]
    reported = [e for e in events if e.get("task") == "backlog"]
    assert len(reported) == len([r for r in runs if r.pid == paused.pid and r.status != "lost"])
    assert not [e for e in reported if "lease" in e.get("detail", "")]
    assert not [
        e for e in reported if e["kind"] == "executed" and _started_at(e["detail"]) < stopped_at
    ]
    assert paused.text().count("is not reported by this replica") == len(stranded)  # (logged)


def _started_at(detail: str) -> float:
    """When a run of ``backlog`` started, from its value (``"pid@time"``)."""
    return float(detail.strip("'").split("@")[1])


# -- under a real multi-worker server -------------------------------------------------------------


def _uvicorn(folder: Path, workers: int, **env: str) -> subprocess.Popen[bytes]:
    with (folder / f"uvicorn-{len(list(folder.glob('uvicorn-*')))}.log").open("wb") as log:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "replica_app:app", "--port", "0"),
                *("--workers", str(workers), "--lifespan", "on"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path]),
                "CORRAL_TEST_OUT": str(folder / "out.txt"),
                "CORRAL_TEST_TASKS": "tick",
                **env,
            },
            cwd=folder,
        )


def test_uvicorn_workers_sharing_a_database_run_each_fire_once(
    tmp_path: Path, database_url: str
) -> None:
    (tmp_path / "out.txt").touch()
    server = _uvicorn(tmp_path, 3, CORRAL_DATABASE=database_url)
    log = next(tmp_path.glob("uvicorn-*.log"))
    try:
        wait_until(
            lambda: log.read_text().count("corral-test: scheduler started") == 3,
            timeout=60,
            what="three uvicorn workers with their schedulers",
        )
        ledger = Ledger(database_url)
        try:
            wait_until(
                lambda: len([r for r in ledger.runs(task="tick") if r.finished]) >= 10,
                timeout=60,
                what="ten ticks",
            )
        finally:
            ledger.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    runs = Cluster(tmp_path, database_url, "tick").runs("tick")
    lines = [line.split() for line in (tmp_path / "out.txt").read_text().splitlines()]
    assert_every_fire_ran_once(runs, [(int(pid), float(at)) for _, pid, at in lines])
    assert "without a database" not in log.read_text()


def test_uvicorn_workers_without_a_database_are_warned_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "out.txt").touch()
    server = _uvicorn(tmp_path, 2)
    log = next(tmp_path.glob("uvicorn-*.log"))
    try:
        text = wait_until(
            lambda: (t := log.read_text()).count("corral-test: scheduler started") == 2 and t,
            timeout=60,
            what="two uvicorn workers with their schedulers",
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    warning = "corral runs under uvicorn with 2 workers without a database"
    assert text.count(warning) == 2, text
    assert "SchedulerConfig(database='sqlite:///path/to/corral.db')" in text


def test_gunicorn_workers_without_a_database_are_warned_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "out.txt").touch()
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker"),
                *("-w", "2", "-b", "127.0.0.1:0", "replica_app:app"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path]),
                "CORRAL_TEST_OUT": str(tmp_path / "out.txt"),
                "CORRAL_TEST_TASKS": "tick",
            },
            cwd=tmp_path,
        )
    try:
        text = wait_until(
            lambda: (t := log_path.read_text()).count("corral runs under gunicorn") == 2 and t,
            timeout=60,
            what="both gunicorn workers warned",
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert "corral runs under gunicorn with 2 workers without a database" in text
