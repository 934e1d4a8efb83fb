"""Starting workers: a failed start is retried with back-off, whatever failed."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import jobs
from conftest import PoolFactory, busy_pids, wait_until, worker_pids
from corral import JobTimeoutError, Pool, WorkerDiedError, WorkerStartError
from corral._pool import _launch
from corral._pool._actions import Abandon, Action, Launch, Log, Signal
from corral._pool._core import Core
from corral._pool._settings import PoolSettings
from corral._pool._starts import LAUNCH_DEADLINE, Starts
from corral._pool._state import Counters
from corral._pool._timers import Timers
from test_pool_batches import Gate


class FailingStarts:
    """Makes the next ``count`` process starts of one start method fail as ``process.start()``
    does when the parent is out of descriptors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start_method: str) -> None:
        original: Callable[[Any], Any] = _launch.launch  # what process.start() calls
        self.lock = threading.Lock()
        self.left = 0
        self.failed = 0

        def popen(process: Any) -> Any:
            with self.lock:
                failing = self.left > 0
                if failing:
                    self.left -= 1
                    self.failed += 1
            if failing:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return original(process)

        monkeypatch.setattr(_launch, "launch", popen)

    def fail(self, count: int) -> None:
        with self.lock:
            self.left = count


@pytest.fixture
def failing_starts(monkeypatch: pytest.MonkeyPatch, start_method: str) -> FailingStarts:
    return FailingStarts(monkeypatch, start_method)


def test_a_start_that_fails_once_is_retried(
    make_pool: PoolFactory, failing_starts: FailingStarts
) -> None:
    pool = make_pool(workers=1)
    [victim] = worker_pids(pool)
    failing_starts.fail(1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(pool), what="the death to be seen")
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    assert failing_starts.failed == 1
    stats = pool.statistics()
    assert stats.start_failures == 1
    assert [w.pid for w in stats.workers] != [victim]


def test_starts_that_keep_failing_back_off_fail_the_jobs_and_recover(
    make_pool: PoolFactory, failing_starts: FailingStarts, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(workers=1)
    [victim] = worker_pids(pool)
    failing_starts.fail(1_000_000)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(pool), what="the death to be seen")
    with pytest.raises(WorkerStartError, match="cannot start workers") as caught:
        pool.submit(jobs.add, 1, 2).result(20)
    assert "Too many open files" in caught.value.cause
    assert 3 <= pool.statistics().start_failures <= 6  # a back-off, not a spin
    delays = [
        r.getMessage().rsplit("next start in ", 1)[1]
        for r in caplog.records
        if r.name == "corral.pool" and "next start in" in r.getMessage()
    ]
    assert delays[:3] == ["0.1s", "0.2s", "0.4s"]
    failing_starts.fail(0)
    # The next retry (after at most 10 s) starts a worker, and jobs run again.
    wait_until(lambda: pool.wait_ready(0), timeout=30, what="a worker to start again")
    assert pool.submit(jobs.add, 2, 2).result(20) == 4


def fork_server(pool: Pool) -> psutil.Process:
    """The process that starts ``pool``'s workers: the parent of their keepers (each worker's
    parent, which kills what the worker leaves)."""
    keeper = psutil.Process(worker_pids(pool)[0]).parent()
    assert keeper is not None
    server = keeper.parent()
    assert server is not None and server.pid != os.getpid()
    return server


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_stuck_process_that_starts_workers_stalls_neither_supervision_nor_callers(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool(workers=2, kill_grace=0.1, start_timeout=8)
    server = fork_server(pool)
    server.suspend()  # SIGSTOP: every start now waits on it
    try:
        # A crash: its outcome comes, though its replacement cannot start.
        with pytest.raises(WorkerDiedError, match="exit code 3"):
            pool.submit(jobs.hard_exit, 3).result(10)
        # The other worker idles: submit writes the job to it, and its caller reads the reply.
        began = time.monotonic()
        future = pool.submit(jobs.add, 1, 2)
        assert time.monotonic() - began < 0.5
        assert future.result(timeout=2) == 3
        assert time.monotonic() - began < 3
        # A 1-s timeout is reported long before the job's natural end.
        began = time.monotonic()
        with pytest.raises(JobTimeoutError):
            pool.submit(jobs.sleep, 60, timeout=1).result(30)
        assert time.monotonic() - began < 6
        # No worker is left: result(timeout=t) still returns within t.
        waiting = pool.submit(jobs.add, 2, 2)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            waiting.result(timeout=1)
        assert time.monotonic() - began < 2
        # Past the start deadline the stuck process is replaced and workers start again.
        assert waiting.result(60) == 4
        assert gone(server)
        assert pool.statistics().start_failures >= 1
        wait_until(lambda: pool.wait_ready(0), timeout=30, what="both workers to start")
    finally:
        with contextlib.suppress(psutil.Error):
            server.resume()


def test_a_new_pool_on_a_stuck_shared_fork_server_restarts_it_after_the_short_deadline(
    make_pool: PoolFactory,
) -> None:
    """A fork server another pool has started workers with has done its imports: a new pool's
    first start that sticks on it is abandoned after ``LAUNCH_DEADLINE``, not its own
    ``start_timeout`` (meant for a fresh server's imports), and the server is restarted."""
    first = make_pool(workers=1)
    server = fork_server(first)
    server.suspend()
    try:
        began = time.monotonic()
        second = Pool(workers=1, start_timeout=60, start_method=first.settings.start_method)
        second.start()
        try:
            assert second.wait_ready(LAUNCH_DEADLINE + 30), "the stuck server was not replaced"
            assert time.monotonic() - began < 60  # within start_timeout: the short deadline
            assert gone(server)
            assert second.statistics().start_failures == 1
        finally:
            second.shutdown(wait=True, timeout=5)
    finally:
        with contextlib.suppress(psutil.Error):
            server.resume()
    assert first.submit(jobs.add, 1, 2).result(30) == 3


def test_killing_the_process_that_starts_workers_kills_no_worker(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=2)
    gate = Gate(tmp_path / "gate")
    holder = pool.submit(jobs.hold, gate.path)
    [busy] = wait_until(lambda: busy_pids(pool), what="the job to start")
    workers = sorted(worker_pids(pool))
    server = fork_server(pool)
    server.kill()
    wait_until(lambda: gone(server), what="the process that starts workers to die")
    gate.release()
    assert holder.result(20) == busy  # the running job ends as it would have
    assert sorted(worker_pids(pool)) == workers
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    # A worker that dies now is reported as itself, and its replacement starts.
    with pytest.raises(WorkerDiedError, match="exit code 5") as caught:
        pool.submit(jobs.hard_exit, 5).result(20)
    assert "os._exit or a native exit in the job" in str(caught.value)
    wait_until(lambda: pool.wait_ready(0), timeout=30, what="a replacement worker")
    assert pool.submit(jobs.add, 2, 2).result(20) == 4
    assert pool.statistics().crashed == 1


def test_a_worker_whose_keeper_is_killed_is_reported_as_such_not_as_its_job(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """The process that watches a worker (its keeper) is killed: the worker goes with it, and
    its job's error says what happened instead of blaming the job."""
    pool = make_pool(workers=1)
    gate = Gate(tmp_path / "gate")
    holder = pool.submit(jobs.hold, gate.path)
    [busy] = wait_until(lambda: busy_pids(pool), what="the job to start")
    keeper = psutil.Process(busy).parent()
    assert keeper is not None and keeper.pid != os.getpid()
    keeper.kill()
    with pytest.raises(WorkerDiedError, match="the process that starts workers") as caught:
        holder.result(20)
    assert "in the job" not in str(caught.value)
    assert caught.value.exitcode is None
    wait_until(lambda: pool.wait_ready(0), timeout=30, what="a replacement worker")
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_a_worker_whose_start_was_under_way_at_shutdown_is_gone_when_shutdown_returns(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shutdown(wait=True)`` returns once every worker has exited: one whose start was under
    way when the pool began to close too (it is killed when the start gives it, and reaped)."""
    pool = make_pool(workers=1, kill_grace=0.1)
    started: list[int] = []
    original: Callable[[Any], Any] = _launch.launch

    def launch(process: Any) -> Any:
        launched = original(process)
        started.append(launched.pid)
        return launched

    monkeypatch.setattr(_launch, "launch", launch)
    [victim] = worker_pids(pool)
    server = fork_server(pool)
    server.suspend()  # the replacement's start waits on it
    try:
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in worker_pids(pool), what="the death to be seen")
        closing = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
        closing.start()
        supervisor = pool._supervisor
        assert supervisor is not None
        wait_until(lambda: supervisor.core.fleet.closing, what="the pool to begin closing")
    finally:
        server.resume()
    closing.join(30)
    assert not closing.is_alive()
    assert len(started) == 1, "shutdown returned before its last worker's start had ended"
    [replacement] = started
    assert not psutil.pid_exists(replacement)  # its keeper reaped it before reporting its exit


def test_a_start_under_way_when_the_pool_closes_is_killed_and_reaped_before_it_finishes() -> None:
    """The same, in the core alone: closing abandons no start; the worker a start gives then is
    killed at once, and the core has finished only once its exit is seen."""
    now = [0.0]
    core = Core(PoolSettings(workers=1), "close", lambda: now[0])
    core.fleet.top_up()
    [launch] = [a for a in core.actions if isinstance(a, Launch)]
    core.actions.clear()
    core.close(True, None)
    assert not any(isinstance(a, Abandon) for a in core.actions)
    assert not core.finished
    worker = core.launched(launch.token, 4242)
    assert worker is not None
    assert [(a.pid, a.signal) for a in core.actions if isinstance(a, Signal)] == [
        (4242, signal.SIGKILL)
    ]
    assert not core.finished
    core.exiting(worker)
    core.exited(worker, -signal.SIGKILL)
    assert core.finished
    # A start that sticks is still abandoned at its deadline, so closing ends anyway...
    stuck = Core(PoolSettings(workers=1, start_timeout=5), "stuck", lambda: now[0])
    stuck.fleet.top_up()
    stuck.close(True, None)
    assert not stuck.finished
    now[0] = 5.1
    stuck.fire()
    assert stuck.finished
    # ...or kill_grace after the shutdown's own timeout, if that passes first.
    now[0] = 0.0
    settings = PoolSettings(workers=1, start_timeout=60, kill_grace=0.5)
    bounded = Core(settings, "bounded", lambda: now[0])
    bounded.fleet.top_up()
    bounded.close(True, 2.0)
    for moment in (1.9, 2.0, 2.4):
        now[0] = moment
        bounded.fire()
        assert not bounded.finished
    now[0] = 2.5
    bounded.fire()
    assert bounded.finished
    # A start that fails while the pool closes is not a failure to report: no start follows.
    failing = Core(PoolSettings(workers=1), "failing", lambda: now[0])
    failing.fleet.top_up()
    [launch] = [a for a in failing.actions if isinstance(a, Launch)]
    failing.actions.clear()
    failing.close(True, None)
    failing.launch_failed(launch.token, "OSError: the fork server has gone")
    assert failing.finished
    assert not any(isinstance(a, Log | Launch) for a in failing.actions)
    assert failing.counters.start_failures == 0


class StartsOnAClock:
    """The core's start bookkeeping alone, on a clock the test moves (no process)."""

    def __init__(self, start_timeout: float) -> None:
        self.now = 0.0
        self.timers: Timers[Callable[[], None]] = Timers()
        self.actions: list[Action] = []
        self.starts = Starts(
            PoolSettings(workers=2, start_timeout=start_timeout),
            "sim",
            lambda: self.now,
            self.timers,
            self.actions,
            Counters(),
            top_up=lambda: None,
        )

    def launch(self) -> int:
        self.starts.start(1)
        [launch] = [a for a in self.actions if isinstance(a, Launch)]
        self.actions.clear()
        return launch.token

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock on, firing what falls due; the actions taken meanwhile."""
        self.now += seconds
        while (target := self.timers.pop_due(self.now)) is not None:
            target()
        actions, self.actions[:] = list(self.actions), []
        return actions


def test_a_fresh_process_that_starts_workers_gets_start_timeout_for_its_imports() -> None:
    """A launch to a process that has not started a worker yet may take the whole
    ``start_timeout`` (it imports the worker's modules and the pool's ``preload`` first, which a
    busy machine can make slow); once it has started one, a fork taking longer than
    ``LAUNCH_DEADLINE`` means it is stuck, and it is restarted."""
    sim = StartsOnAClock(start_timeout=60)
    first = sim.launch()
    assert not any(isinstance(a, Abandon) for a in sim.advance(LAUNCH_DEADLINE + 30))
    assert sim.starts.launched(first) == 0.0
    stuck = sim.launch()
    [abandon] = [a for a in sim.advance(LAUNCH_DEADLINE + 0.1) if isinstance(a, Abandon)]
    assert abandon.tokens == (stuck,) and abandon.restart
    assert sim.starts.failures_in_row == 1
    # The restarted process is fresh again: its first launch may take start_timeout.
    sim.advance(1)  # the back-off
    fresh = sim.launch()
    assert not any(isinstance(a, Abandon) for a in sim.advance(59))
    [abandon] = [a for a in sim.advance(1.1) if isinstance(a, Abandon)]
    assert abandon.tokens == (fresh,)
    # A start_timeout shorter than the deadline bounds every launch.
    short = StartsOnAClock(start_timeout=2)
    assert short.starts.deadline() == 2
    short.starts.launched(short.launch())
    assert short.starts.deadline() == 2


def test_a_forgotten_fork_server_is_kept_until_it_has_been_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork server that has gone away is forgotten (killed, and another started on the next
    start). If it has not ended by then, its process object is kept and reaped later: dropped
    while it runs, Python would warn that it is still running."""
    server = _launch._Server((True, ()))
    server._start(())
    process = server.process
    assert process is not None
    monkeypatch.setattr(process, "kill", lambda: None)  # it has not died yet when looked at
    server._forget()
    assert server.process is None
    assert process in _launch._stopped
    monkeypatch.undo()
    process.kill()
    process.wait(30)
    _launch._server((True, ()))  # the next start reaps it
    assert process not in _launch._stopped
