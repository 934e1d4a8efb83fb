"""What a job can do wrong, and what the pool does about it: one job fails, the pool goes on."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

import jobs
from conftest import PoolFactory, assert_gone, busy_pids, wait_until, worker_pids
from corral import (
    CorralError,
    JobCancelledError,
    JobExitError,
    JobTimeoutError,
    MemoryLimitError,
    Pool,
    PoolNotRunningError,
    RemoteError,
    SerializationError,
    WorkerDiedError,
    WorkerStartError,
)
from test_pool_batches import hold_the_only_worker

HOWS = ["exception", "sys.exit", "os._exit", "SIGKILL", "segfault", "hang"]
DIED = {
    "os._exit": "exit code 5",
    "SIGKILL": "killed by SIGKILL",
    "segfault": "killed by SIGSEGV",
}


def _expected(where: str, how: str) -> tuple[type[BaseException], str]:
    if how in DIED:
        return WorkerDiedError, DIED[how]
    if how == "hang":
        return JobTimeoutError, "ran past its timeout"
    if where == "run":
        if how == "exception":
            return jobs.JobFailure, "failed on purpose"
        return JobExitError, "SystemExit with exit code 5"
    if where == "unpickle-call":
        if how == "exception":
            return SerializationError, "could not unpickle the job's arguments"
        return JobExitError, "SystemExit with exit code 5"
    assert where == "pickle-result"
    return SerializationError, "could not be pickled"


def _submit(pool: Pool, where: str, how: str) -> Any:
    if where == "run":
        return pool.submit(jobs.act, how, timeout=1)
    if where == "unpickle-call":
        return pool.submit(jobs.takes, jobs.FaultOnLoad(how), timeout=1)
    assert where == "pickle-result"
    return pool.submit(jobs.return_fault_on_dump, how, timeout=1)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("where", ["unpickle-call", "run", "pickle-result"])
def test_crash_matrix_in_the_worker(make_pool: PoolFactory, where: str, how: str) -> None:
    pool = make_pool(workers=1, kill_grace=0.2)
    before = worker_pids(pool)
    error_type, text = _expected(where, how)
    with pytest.raises(error_type, match=text) as caught:
        _submit(pool, where, how).result(20)
    if error_type is WorkerDiedError:
        assert caught.value.pid == before[0]  # type: ignore[attr-defined]
        assert str(before[0]) in str(caught.value)
    # Exactly one outcome, counted once, and the pool runs the next job.
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    stats = pool.statistics()
    assert stats.submitted == 2
    assert stats.finished == 2
    assert stats.completed == 1
    if error_type in (WorkerDiedError, JobTimeoutError):
        assert worker_pids(pool) != before
        assert stats.restarts == 1


def test_pickling_the_call_fails_at_submit(pool: Pool) -> None:
    with pytest.raises(SerializationError, match="cannot be pickled") as caught:
        pool.submit(jobs.takes, jobs.FaultOnDump("exception"))
    assert isinstance(caught.value.__cause__, jobs.JobFailure)
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_a_result_that_cannot_be_unpickled_in_the_parent(pool: Pool) -> None:
    with pytest.raises(SerializationError, match="could not be unpickled in the parent") as caught:
        pool.submit(jobs.return_unloadable).result(20)
    assert caught.value.stage == "result"
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_an_unpicklable_result_is_a_clear_error(pool: Pool) -> None:
    with pytest.raises(SerializationError, match="could not be pickled") as caught:
        pool.submit(jobs.return_unpicklable).result(20)
    assert "return plain data" in str(caught.value)
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


@pytest.mark.parametrize(
    "fn", [jobs.raise_unpicklable, jobs.raise_unloadable], ids=["unpicklable", "unloadable"]
)
def test_an_exception_that_cannot_travel_keeps_its_name_message_and_traceback(
    pool: Pool, fn: Any
) -> None:
    with pytest.raises(RemoteError) as caught:
        pool.submit(fn).result(20)
    error = caught.value
    assert error.type_name.startswith("jobs.")
    assert fn.__name__ in error.traceback
    assert "could not be sent to the parent" in str(error)
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_a_death_costs_one_job_and_other_workers_jobs_complete(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2)
    slow = pool.submit(jobs.sleep, 1.0)
    wait_until(lambda: busy_pids(pool), what="the slow job to start")
    with pytest.raises(WorkerDiedError, match="SIGSEGV"):
        pool.submit(jobs.segfault).result(20)
    assert slow.result(20) == 1.0
    stats = pool.statistics()
    assert (stats.completed, stats.crashed) == (1, 1)


def test_an_idle_worker_that_dies_is_replaced(pool: Pool) -> None:
    victim = worker_pids(pool)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: victim not in worker_pids(pool) and pool.wait_ready(0),
        what="a replacement worker",
    )
    assert pool.statistics().restarts == 1
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_a_timeout_kills_a_job_that_ignores_sigterm_and_its_children(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1, kill_grace=0.3)
    pid_file = tmp_path / "child.pid"
    future = pool.submit(jobs.spawn_child_and_hang, str(pid_file), timeout=0.5)
    child = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
    with pytest.raises(JobTimeoutError, match=r"timeout of 0\.5s") as caught:
        future.result(20)
    assert caught.value.timeout == 0.5
    assert_gone([caught.value.pid, child])
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_sigterm_is_ignored_so_sigkill_follows_after_the_grace(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1, kill_grace=0.3)
    ready = tmp_path / "ready"
    future = pool.submit(jobs.ignore_sigterm_and_hang, str(ready), timeout=0.3)
    with pytest.raises(JobTimeoutError) as caught:
        future.result(20)
    assert ready.exists()
    assert_gone([caught.value.pid])
    assert pool.statistics().timed_out == 1


def test_memory_limit_kills_a_growing_job_while_it_runs(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1, max_memory="80MiB", memory_check_interval=0.05)
    with pytest.raises(MemoryLimitError, match="over max_memory") as caught:
        pool.submit(jobs.grow_memory, 400, timeout=60).result(30)
    assert caught.value.rss > caught.value.limit == 80 * 1024 * 1024
    assert pool.submit(jobs.add, 1, 2).result(20) == 3
    assert pool.statistics().memory_exceeded == 1


def test_workers_are_recycled_after_max_jobs(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=1, max_jobs_per_worker=2)
    pids = [pool.submit(jobs.pid).result(20) for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
    assert len(set(pids)) == 3
    wait_until(lambda: pool.statistics().recycled == 3)
    assert_gone(pids[:4])


def test_a_restart_storm_backs_off_and_fails_jobs_clearly(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = Pool(workers=2, initializer=jobs.failing_initializer, start_method="forkserver")
    pool.start()
    try:
        future = pool.submit(jobs.add, 1, 2)
        with pytest.raises(WorkerStartError, match="cannot start workers") as caught:
            future.result(30)
        assert "initializer cannot connect" in caught.value.cause
        failures = pool.statistics().start_failures
        # Back-off, not a spin: a handful of attempts, each logged with the cause.
        assert 3 <= failures <= 6
        logged = [r.getMessage() for r in caplog.records if r.name == "corral.pool"]
        assert any("initializer cannot connect" in m and "next start in" in m for m in logged)
        # Jobs submitted while no worker can start fail at once instead of waiting forever.
        with pytest.raises(WorkerStartError):
            pool.submit(jobs.add, 1, 2).result(30)
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_shutdown_drains_then_kills_at_the_deadline(make_pool: PoolFactory) -> None:
    pool = make_pool(workers=2, kill_grace=0.2)
    quick = pool.submit(jobs.sleep, 0.2)
    stuck = pool.submit(jobs.sleep, 60)
    wait_until(lambda: len(busy_pids(pool)) == 2)
    pids = worker_pids(pool)
    pool.shutdown(wait=True, timeout=0.5)
    assert quick.result(0) == 0.2
    with pytest.raises(Exception, match="still running at shutdown") as caught:
        stuck.result(0)
    assert caught.value.started is True  # type: ignore[attr-defined]
    assert_gone(pids)


def test_a_shutdown_timeout_also_stops_an_idle_worker_slow_to_exit(make_pool: PoolFactory) -> None:
    """An idle worker asked to exit at shutdown may take up to 5 s before it is killed; a
    shutdown ``timeout`` shorter than that bounds it too (SIGTERM, ``kill_grace``, SIGKILL)."""
    pool = make_pool(workers=1, kill_grace=0.1)
    worker = pool.submit(jobs.leave_a_thread_behind, 60).result(20)  # it now exits slowly
    began = time.monotonic()
    pool.shutdown(wait=True, timeout=0.3)
    assert time.monotonic() - began < 4  # not the 5 s an idle worker gets otherwise
    assert_gone([worker])


def test_a_second_shutdown_with_a_timeout_bounds_the_first_ones_wait(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """While ``shutdown(wait=True)`` waits for a running job, a ``shutdown(wait=True,
    timeout=t)`` stops the job at ``t``: both return."""
    pool = make_pool(workers=1, kill_grace=0.1)
    gate, holder = hold_the_only_worker(pool, tmp_path)
    first = threading.Thread(target=pool.shutdown, kwargs={"wait": True})
    second = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "timeout": 0.3})
    try:
        first.start()
        supervisor = pool._supervisor
        assert supervisor is not None
        wait_until(lambda: supervisor.core.fleet.closing, what="the first shutdown to begin")
        second.start()
        second.join(20)
        first.join(20)
        assert not second.is_alive() and not first.is_alive()
        with pytest.raises(JobCancelledError, match="still running at shutdown"):
            holder.result(0)
    finally:
        if first.is_alive():
            gate.release()


PARENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import jobs
    from corral import Pool

    if __name__ == "__main__":
        pool = Pool(workers=4, start_method={method!r})
        pool.start()
        pool.submit(jobs.write_pid_and_spin, {d!r} + "/spin")
        pool.submit(jobs.write_pid_and_hang, {d!r} + "/sleep")
        pool.submit(jobs.ignore_sigterm_and_hang, {d!r} + "/ignore")
        pool.submit(jobs.spawn_child_and_hang, {d!r} + "/grandchild")
        print("started", flush=True)
        time.sleep(600)
    """
)


def test_workers_and_their_children_exit_when_the_parent_is_killed(
    start_method: str, tmp_path: Path
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        PARENT_SCRIPT.format(tests=str(Path(__file__).parent), method=start_method, d=str(tmp_path))
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL)
    try:
        files = [tmp_path / name for name in ("spin", "sleep", "ignore", "grandchild")]
        wait_until(lambda: all(f.exists() and f.read_text() for f in files), timeout=30)
        pids = [int(f.read_text()) for f in files]
        grandchild = pids[-1]
        pids.append(psutil.Process(grandchild).ppid())  # the worker that started it
        assert all(psutil.pid_exists(pid) for pid in pids)
        parent.kill()
        parent.wait(10)
        assert_gone(pids, timeout=3)  # workers busy in every way, and the job's own child
    finally:
        parent.kill()
        parent.wait(10)


def test_an_initializer_that_cannot_be_imported_is_a_start_failure_not_a_spin() -> None:
    pool = Pool(workers=1, initializer="no_such_module:setup", start_method="forkserver")
    pool.start()
    try:
        with pytest.raises(WorkerStartError, match="No module named 'no_such_module'"):
            pool.submit(jobs.add, 1, 2).result(30)
        assert 3 <= pool.statistics().start_failures <= 6
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_a_supervisor_failure_fails_every_job_and_kills_every_worker(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(workers=1)  # the next job waits for the supervisor to dispatch it
    running = pool.submit(jobs.sleep, 30)
    wait_until(lambda: busy_pids(pool))
    pids = worker_pids(pool)
    supervisor = pool._supervisor
    assert supervisor is not None

    def broken() -> None:
        raise RuntimeError("a bug in the supervisor")

    monkeypatch.setattr(supervisor, "_dispatch", broken)
    waiting = pool.submit(jobs.add, 1, 2)  # wakes the supervisor, which then fails
    for future in (running, waiting):
        with pytest.raises(CorralError, match="supervisor failed"):
            future.result(20)
    assert supervisor.finished.wait(20)
    assert_gone(pids)
    with pytest.raises(PoolNotRunningError):
        pool.submit(jobs.noop)


def test_a_worker_stopped_in_the_middle_of_a_message_cannot_stall_supervision(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool(workers=2, kill_grace=0.1)
    stuck = pool.submit(jobs.write_half_a_frame_and_hang, timeout=0.5)
    wait_until(lambda: busy_pids(pool))
    assert pool.submit(jobs.sleep, 0.2).result(20) == 0.2  # the other worker goes on
    with pytest.raises(JobTimeoutError):
        stuck.result(20)  # and the deadline is still enforced
    assert pool.submit(jobs.add, 1, 2).result(20) == 3


def test_a_worker_that_stops_reading_cannot_stall_supervision(make_pool: PoolFactory) -> None:
    """A job bigger than the socket's buffer, sent to a worker stopped by SIGSTOP: the rest of it
    waits in the supervisor's outbox, and timeouts and the other worker carry on."""
    pool = make_pool(workers=2, kill_grace=0.1)
    blocker = pool.submit(jobs.sleep, 60, timeout=1)
    [busy] = wait_until(lambda: busy_pids(pool))
    [frozen] = [pid for pid in worker_pids(pool) if pid != busy]
    os.kill(frozen, signal.SIGSTOP)  # idle, and now it will never read
    try:
        big = pool.submit(jobs.echo, b"x" * (8 << 20), timeout=0.5)  # to the only idle worker
        with pytest.raises(JobTimeoutError):
            big.result(20)  # the supervisor was not stuck writing to it
        with pytest.raises(JobTimeoutError):
            blocker.result(20)
        assert pool.submit(jobs.add, 1, 2).result(20) == 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)


class Interrupted(BaseException):
    """What the test's signal handler raises on the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``."""


def test_signals_interrupting_the_main_thread_as_it_submits_and_reads_lose_nothing(
    make_pool: PoolFactory,
) -> None:
    """A signal handler that raises (Ctrl-C's ``KeyboardInterrupt``) can strike the main thread
    anywhere while it submits a job or reads its reply. Every job still ends with an outcome,
    the pool goes on, and it shuts down: nothing is left holding its state."""
    assert threading.current_thread() is threading.main_thread()
    pool = make_pool(workers=2)
    # The handler raises only while the pool's code runs (not the test's own), once a call.
    armed = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal armed
        if armed:
            armed = False
            raise Interrupted

    def round_trip(number: int) -> None:
        nonlocal armed
        armed = True
        try:
            futures.append(pool.submit(jobs.echo, number))
            futures[-1].result(30)
        finally:
            armed = False

    go, storm = threading.Event(), threading.Event()

    def strike() -> None:
        go.wait()
        gaps = itertools.cycle([0.0, 0.00005, 0.0001, 0.0003, 0.0007])
        while not storm.wait(next(gaps)):
            os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    striker = threading.Thread(target=strike)
    striker.start()
    futures: list[Future[Any]] = []
    interrupts = 0
    # No garbage collection during the storm: a raise inside a finalizer of another test's
    # objects that the collector happened to run would only be reported as ignored there.
    gc.collect()
    gc.disable()
    try:
        go.set()
        for number in range(3000):
            try:
                round_trip(number)
            except Interrupted:
                interrupts += 1
    finally:
        gc.enable()
        storm.set()
        striker.join()
        signal.signal(signal.SIGUSR1, previous)
    assert interrupts > 10  # the storm did strike
    for future in futures:  # each ended: its value (the main thread drives nothing)
        assert future.exception(60) is None
    assert pool.submit(jobs.echo, "after").result(30) == "after"
    stopping = threading.Thread(target=pool.shutdown)
    stopping.start()
    stopping.join(60)
    assert not stopping.is_alive(), "the pool's shutdown hung"


SIGNAL_HANDLER_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    sys.path.insert(0, {tests!r})
    import jobs
    from corral import Pool

    pool = Pool(workers=1)
    pool.start()
    assert pool.wait_ready(30)
    supervisor = pool._supervisor
    futures = []

    def submit(signum, frame):
        futures.append(pool.submit(jobs.add, 1, 2))

    def wait_for_a_job(signum, frame):
        try:
            pool.submit(jobs.add, 2, 3).result(30)
        except RuntimeError as exc:  # at once: its outcome needs the lock this thread holds
            print("refused", "cannot wait for it" in str(exc), flush=True)

    def shut_down(signum, frame):
        pool.shutdown(wait=True)  # cannot wait here: the thread it interrupted holds the lock
        print("shutdown returned", flush=True)

    signal.signal(signal.SIGUSR1, submit)
    signal.signal(signal.SIGUSR2, shut_down)
    signal.signal(signal.SIGHUP, wait_for_a_job)
    with supervisor.lock:  # as the main thread holds it while it submits
        signal.raise_signal(signal.SIGUSR1)
    print("value", futures[0].result(30), flush=True)
    with supervisor.lock:
        signal.raise_signal(signal.SIGHUP)
    with supervisor.lock:
        signal.raise_signal(signal.SIGUSR2)
    print("finished", supervisor.finished.wait(30), flush=True)
    """
)


def test_a_signal_handler_that_calls_the_pool_while_the_main_thread_submits_does_not_hang() -> None:
    """Python runs signal handlers on the main thread between any two lines, including while
    that thread holds the pool's lock inside ``submit``: a handler that submits a job or shuts
    the pool down there neither deadlocks on that lock nor waits for a supervisor that needs
    it (the shutdown goes on once the handler returns); one that waits for a job's outcome is
    refused at once, since that outcome needs the lock."""
    script = SIGNAL_HANDLER_SCRIPT.format(tests=str(Path(__file__).parent))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "value 3",
        "refused True",
        "shutdown returned",
        "finished True",
    ]
