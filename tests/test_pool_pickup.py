"""A caller waiting on a job that ``submit`` wrote to an idle worker reads the reply itself.

Most tests hold the job at a gate (a named pipe) until the caller is seen reading the worker's
socket, so that the reply is read by the caller, not by a supervisor that got there first; the
last two make the caller and the supervisor meet over one reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import jobs
from conftest import PoolFactory, assert_gone, busy_pids, wait_until, worker_pids
from corral import JobTimeoutError, Pool, WorkerDiedError
from corral._pool import _core, _state
from test_pool_batches import Gate, hold_the_only_worker, waiting

# As an app's worker thread calls the pool (the main thread never reads a reply itself).
pytestmark = pytest.mark.off_main_thread


def picking(pool: Pool) -> bool:
    supervisor = pool._supervisor
    assert supervisor is not None
    return any(worker.picker for worker in list(supervisor._workers.values()))


def once_picking(pool: Pool, then: Callable[[], object]) -> threading.Thread:
    """Run ``then`` on a thread of its own as soon as a caller reads a worker's socket."""

    def run() -> None:
        wait_until(lambda: picking(pool), what="the caller to read the worker's socket")
        then()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@contextlib.contextmanager
def picked_up(pool: Pool) -> Iterator[None]:
    """The block must make a caller read a worker's socket."""
    seen = threading.Event()
    watcher = once_picking(pool, seen.set)
    yield
    watcher.join(10)
    assert seen.is_set(), "no caller read a worker's socket"


def resolved_on(future: Future[Any]) -> list[threading.Thread]:
    """The thread that resolves ``future`` runs its done-callbacks: collect it."""
    threads: list[threading.Thread] = []
    future.add_done_callback(lambda _: threads.append(threading.current_thread()))
    return threads


def test_the_waiting_caller_reads_its_reply_and_the_supervisor_reads_the_rest(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, future = hold_the_only_worker(pool, tmp_path)
    resolvers = resolved_on(future)
    releaser = once_picking(pool, gate.release)
    assert future.result(10) == worker_pids(pool)[0]
    releaser.join(10)
    assert resolvers == [threading.current_thread()]
    assert not picking(pool)

    # Nobody waits on this one: the supervisor thread reads its reply. (It is held until the
    # callback is in place: a callback added to a done future runs on the thread adding it.)
    gate = Gate(tmp_path / "second-gate")
    unwatched = pool.submit(jobs.hold, gate.path)
    resolvers = resolved_on(unwatched)
    gate.release()
    wait_until(unwatched.done, what="the job to end")
    assert resolvers[0].name.endswith("-supervisor")
    assert unwatched.result() == worker_pids(pool)[0]


def test_logs_and_output_before_the_reply_are_handled_by_the_reading_caller(
    make_pool: PoolFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    pool = make_pool(workers=1)
    gate = Gate(tmp_path / "gate")
    future = pool.submit(jobs.hold_then_log, gate.path, "hi", label="talker")
    releaser = once_picking(pool, gate.release)
    assert future.result(10) == "hi"
    releaser.join(10)
    [record] = [r for r in caplog.records if r.name == "tests.jobs"]
    assert record.getMessage() == "job says hi"
    assert record.corral_job_label == "talker"  # type: ignore[attr-defined]
    out, err = capsys.readouterr()
    assert "stdout: hi\n" in out
    assert "stderr: hi\n" in err


def result(future: Future[Any], timeout: float | None) -> Any:
    """``future.result(timeout)``. With no timeout (the caller's ``recv`` on the worker's
    socket then has no time limit), on a thread of its own that must be done within 20 s: a
    caller left waiting fails the test instead of hanging it."""
    if timeout is not None:
        return future.result(timeout)
    outcome: Future[Any] = Future()

    def wait() -> None:
        try:
            outcome.set_result(future.result())
        except BaseException as exc:
            outcome.set_exception(exc)

    threading.Thread(target=wait, daemon=True).start()
    return outcome.result(20)


DEADLINES = pytest.mark.parametrize("timeout", [None, 10.0], ids=["no-deadline", "deadline"])


@DEADLINES
def test_a_worker_killed_while_its_caller_reads_gives_one_outcome_and_is_replaced(
    make_pool: PoolFactory, tmp_path: Path, timeout: float | None
) -> None:
    pool = make_pool(workers=1)
    _gate, future = hold_the_only_worker(pool, tmp_path)
    [pid] = worker_pids(pool)
    supervisor = pool._supervisor
    assert supervisor is not None
    worker = supervisor._workers[pid]
    killer = once_picking(pool, lambda: os.kill(pid, signal.SIGKILL))
    with pytest.raises(WorkerDiedError, match="SIGKILL"):
        result(future, timeout)
    killer.join(10)
    wait_until(lambda: worker.sock.fileno() == -1, what="the dead worker's socket to be closed")
    assert pool.submit(jobs.add, 1, 2).result(10) == 3
    assert pool.statistics().crashed == 1


@DEADLINES
def test_a_timeout_ends_the_job_while_its_caller_reads(
    make_pool: PoolFactory, tmp_path: Path, timeout: float | None
) -> None:
    pool = make_pool(workers=1, kill_grace=0.1)
    gate = Gate(tmp_path / "gate")
    future = pool.submit(jobs.hold, gate.path, timeout=0.5)
    with picked_up(pool), pytest.raises(JobTimeoutError):
        result(future, timeout)
    assert pool.submit(jobs.add, 2, 2).result(10) == 4


@DEADLINES
def test_a_caller_reading_a_dead_worker_kept_open_by_a_process_of_its_job_is_not_left_waiting(
    make_pool: PoolFactory, tmp_path: Path, timeout: float | None
) -> None:
    """The job started a process outside the worker's process group that holds the worker's
    socket: its end never comes until that process is gone too (the worker's keeper kills it
    once the worker has exited). The caller's wait ends with the worker's death."""
    pool = make_pool(workers=1)
    gate = Gate(tmp_path / "gate")
    pid_file = tmp_path / "holder.pid"
    future = pool.submit(jobs.leave_a_holder_of_the_socket_then_exit, gate.path, str(pid_file))
    releaser = once_picking(pool, gate.release)
    try:
        with pytest.raises(WorkerDiedError, match="exit code 7"):
            result(future, timeout)
        releaser.join(10)
        assert not picking(pool)
        assert pool.submit(jobs.add, 1, 2).result(10) == 3
    finally:
        holder = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGKILL)
    assert_gone([holder])


def test_a_caller_that_stops_waiting_leaves_the_reply_to_the_supervisor(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, future = hold_the_only_worker(pool, tmp_path)
    with picked_up(pool), pytest.raises(TimeoutError):
        future.result(0.3)
    assert not picking(pool)
    resolvers = resolved_on(future)
    gate.release()
    assert future.result(10) == worker_pids(pool)[0]
    assert resolvers[0].name.endswith("-supervisor")


def test_a_worker_recycled_by_the_reading_caller_is_replaced_and_the_queue_goes_on(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """The reply makes the worker reach ``max_jobs_per_worker`` on the caller's thread: the
    caller stops it, starts its replacement, and wakes the supervisor for the queued job."""
    pool = make_pool(workers=1, max_jobs_per_worker=1)
    gate = Gate(tmp_path / "gate")
    first = pool.submit(jobs.hold, gate.path)
    second = pool.submit(jobs.pid)  # queued: the worker has taken its one job
    releaser = once_picking(pool, gate.release)
    first_pid = first.result(10)
    releaser.join(10)
    assert second.result(10) != first_pid
    assert pool.statistics().recycled >= 1


def test_a_done_callback_that_shuts_the_pool_down_on_the_reading_thread_does_not_hang(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """The callback runs while its thread holds the state lock: shutdown cannot wait there for
    the supervisor (which needs that lock), so it returns and the pool winds down after."""
    pool = make_pool(workers=1)
    gate, future = hold_the_only_worker(pool, tmp_path)
    future.add_done_callback(lambda _: pool.shutdown())
    releaser = once_picking(pool, gate.release)
    assert future.result(10) == worker_pids(pool)[0]
    releaser.join(10)
    supervisor = pool._supervisor
    assert supervisor is not None
    assert supervisor.finished.wait(10)


def test_two_threads_waiting_on_one_job_both_get_its_value(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = make_pool(workers=1)
    gate, future = hold_the_only_worker(pool, tmp_path)
    values: list[int] = []
    other = threading.Thread(target=lambda: values.append(future.result(10)))
    other.start()
    releaser = once_picking(pool, gate.release)
    values.append(future.result(10))
    other.join(10)
    releaser.join(10)
    assert values == [worker_pids(pool)[0]] * 2


def test_back_to_back_round_trips_each_get_their_reply(make_pool: PoolFactory) -> None:
    """A job with a timeout wakes the supervisor (to arm it), so the reply often arrives while
    the supervisor is awake and the caller is about to read: one of them takes it, every time."""
    pool = make_pool(workers=2)
    for number in range(5000):
        assert pool.submit(jobs.echo, number, timeout=30).result(10) == number
    assert pool.statistics().completed == 5000


def test_a_reply_that_arrives_before_the_caller_waits_is_read_once(
    make_pool: PoolFactory,
) -> None:
    """The supervisor has seen the reply but not read it when the caller starts to read: the
    caller reads it, and the supervisor, handling what it saw, leaves it alone."""
    pool = make_pool(workers=1)
    supervisor = pool._supervisor
    assert supervisor is not None
    [pid] = worker_pids(pool)
    sock = supervisor._workers[pid].sock

    def inside(thread: threading.Thread, function: str) -> bool:
        frame = sys._current_frames().get(thread.ident or 0)
        while frame is not None and frame.f_code.co_name != function:
            frame = frame.f_back
        return frame is not None

    def wait_for(future: Future[Any], values: list[Any]) -> threading.Thread:
        # No timeout: a caller left waiting for a reply that someone else read would hang.
        thread = threading.Thread(target=lambda: values.append(future.result()), daemon=True)
        thread.start()
        return thread

    for number in range(20):
        values: list[int] = []
        with supervisor.state_lock:  # the supervisor can see the reply, not handle it
            caller = wait_for(pool.submit(jobs.echo, number), values)
            wait_until(lambda: inside(caller, "pick_up"), what="the caller to wait")  # noqa: B023
            assert select.select([sock], [], [], 10)[0], "no reply"
            # The supervisor saw it, and waits for the lock behind the caller (which gets the
            # lock first on this platform; if not, the supervisor reads the reply: also right).
            wait_until(lambda: inside(supervisor._thread, "_hold"), what="the supervisor to wait")
        caller.join(10)
        assert values == [number], "the caller still waits for a reply that was read"


def test_an_apps_default_socket_timeout_does_not_reach_the_workers_sockets(
    make_pool: PoolFactory,
) -> None:
    """A caller waits in ``recv`` on a worker's socket: a socket timeout set for the whole app
    (``socket.setdefaulttimeout``) must not cut that wait short."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.05)
    try:
        pool = make_pool(workers=1)
    finally:
        socket.setdefaulttimeout(previous)
    assert pool.wait_ready(10)  # so that submit writes the job to the idle worker itself
    with picked_up(pool):
        assert pool.submit(jobs.sleep, 0.3).result() == 0.3
    assert pool.submit(jobs.sleep, 0.3).result(10) == 0.3


def test_jobs_a_recall_gives_back_to_a_reading_caller_go_to_the_idle_worker_at_once(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """A caller reading worker A's socket reads A's answer to a recall: the jobs it gives back
    are queued while worker B idles and the supervisor sleeps. The caller wakes it, so they run
    on B now, not once A's long job is over."""
    pool = make_pool(workers=2)
    gate_a, gate_b = Gate(tmp_path / "a"), Gate(tmp_path / "b")
    long_a = pool.submit(jobs.hold, gate_a.path)
    reader = threading.Thread(target=lambda: long_a.exception(60))  # reads A's socket
    reader.start()
    wait_until(lambda: picking(pool), what="a caller to read worker A's socket")
    long_b = pool.submit(jobs.hold, gate_b.path)
    wait_until(lambda: len(busy_pids(pool)) == 2, what="both workers to be busy")
    quick = [pool.submit(jobs.pid) for _ in range(4)]
    wait_until(lambda: waiting(pool) == 4, what="the jobs to be sent behind the busy ones")

    gate_b.release()
    freed = long_b.result(10)
    # Two ran in B behind its job; the two taken back from A come to B too, A still busy.
    assert [future.result(10) for future in quick] == [freed] * 4
    assert not long_a.done()
    gate_a.release()
    reader.join(10)
    assert long_a.result(10) != freed


def test_a_frame_the_submitter_could_only_half_write_is_whole_before_it_lets_the_worker_go(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's socket that takes part of a job's frame: the rest is in the worker's outbox
    before the submitting thread gives the worker up (``writing``), so that what the supervisor
    writes to it next can only come after the whole frame."""
    pool = make_pool(workers=1)
    supervisor = pool._supervisor
    assert supervisor is not None
    [channel] = list(supervisor._workers.values())
    me = threading.current_thread()
    real = channel.sock

    class HalfASend:  # a socket with room for half a frame, for this thread's first send
        halved = False

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def send(self, data: bytes, flags: int = 0) -> int:
            if threading.current_thread() is me and not HalfASend.halved:
                HalfASend.halved = True
                return real.send(data[: len(data) // 2], flags)
            return real.send(data, flags)

    outbox_when_let_go: list[int] = []
    set_attribute = _state.Worker.__setattr__

    def watch(worker: _state.Worker, name: str, value: Any) -> None:
        set_attribute(worker, name, value)
        if name == "writing" and value is False and threading.current_thread() is me:
            outbox_when_let_go.append(len(worker.io.link.outbox))

    monkeypatch.setattr(channel, "sock", HalfASend())
    monkeypatch.setattr(_state.Worker, "__setattr__", watch)
    future = pool.submit(jobs.echo, "x" * 8000)
    assert HalfASend.halved
    assert outbox_when_let_go and outbox_when_let_go[0] > 0
    assert future.result(10) == "x" * 8000
    assert pool.submit(jobs.add, 1, 2).result(10) == 3


def test_a_job_written_to_an_idle_worker_that_has_just_died_runs_on_another(
    make_pool: PoolFactory,
) -> None:
    """A submitting thread takes an idle worker whose death the supervisor has not handled
    yet: the write fails, and the job, which never reached a live worker, is queued and runs
    on the replacement (it does not fail with the dead worker's ``WorkerDiedError``)."""
    pool = make_pool(workers=1)
    supervisor = pool._supervisor
    assert supervisor is not None
    [channel] = list(supervisor._workers.values())
    dead = channel.pid
    hangup = select.poll()
    hangup.register(channel.sock.fileno(), select.POLLHUP)

    with supervisor.state_lock:  # the supervisor sees the exit only after the submit
        os.kill(dead, signal.SIGKILL)
        wait_until(lambda: hangup.poll(0), what="the dead worker's end of its socket to close")
        future = pool.submit(jobs.pid)
    assert future.result(30) != dead
    assert pool.statistics().crashed == 0


def test_a_worker_whose_exit_the_supervisor_handles_is_not_given_a_job(
    make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the supervisor handles an idle worker's exit, no submitting thread can take that
    worker any more (even before the exit reaches the core): a job submitted meanwhile waits
    for the replacement instead of failing with the dead worker's ``WorkerDiedError``."""
    pool = make_pool(workers=1)
    [dead] = worker_pids(pool)
    in_exit, go_on = threading.Event(), threading.Event()
    exited = _core.Core.exited

    def paused(core: _core.Core, worker: Any, exitcode: int | None) -> None:
        in_exit.set()
        go_on.wait(10)
        exited(core, worker, exitcode)

    monkeypatch.setattr(_core.Core, "exited", paused)
    os.kill(dead, signal.SIGKILL)
    assert in_exit.wait(10), "the supervisor did not see the worker's exit"
    future = pool.submit(jobs.pid)
    go_on.set()
    assert future.result(30) != dead
    assert pool.statistics().crashed == 0


def test_a_caller_reading_output_lines_does_not_wake_the_supervisor_for_each(
    make_pool: PoolFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While jobs are queued, a caller reading its job's output wakes the supervisor only when
    what it read changed the supervisor's work (its reply frees the worker), not per line."""
    pool = make_pool(workers=2)
    supervisor = pool._supervisor
    assert supervisor is not None
    other_gate, chatty_gate = Gate(tmp_path / "other"), Gate(tmp_path / "chatty")
    other = pool.submit(jobs.hold, other_gate.path)
    chatty = pool.submit(jobs.hold_then_print_lines, chatty_gate.path, 300)
    wait_until(lambda: len(busy_pids(pool)) == 2, what="both workers to be busy")
    queued = [pool.submit(jobs.pid) for _ in range(300)]  # more than the batches take
    wait_until(lambda: waiting(pool) == 128, what="full batches behind both workers")
    wakes: list[int] = []
    wake = supervisor._wake

    def counted() -> None:
        if supervisor._sleeping and not supervisor._wake_pending:  # a byte is written
            wakes.append(1)
        wake()

    monkeypatch.setattr(supervisor, "_wake", counted)
    releaser = once_picking(pool, chatty_gate.release)
    assert chatty.result(30) == 300
    releaser.join(10)
    monkeypatch.setattr(supervisor, "_wake", wake)
    assert len(wakes) <= 3, f"{len(wakes)} wake-ups for 300 lines"
    other_gate.release()
    assert other.result(30) > 0
    assert all(future.result(30) > 0 for future in queued)
